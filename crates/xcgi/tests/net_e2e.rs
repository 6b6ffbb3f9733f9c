//! End to end: guests with a network stack. `xcgi run --net` boots examples/http-hello with a
//! virtio-net NIC on a TAP device in a network namespace of its own; real curl and ping reach
//! it; nothing (namespace, TAP, address, route) is left afterwards.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Shell helpers for the scripts below.
const PRELUDE: &str = r#"
    count_xcgi() { n=0; for c in /proc/[0-9]*/comm; do [ "$(cat "$c" 2>/dev/null)" = xcgi ] && n=$((n+1)); done; echo $n; }
    # wait_http NETNS ADDR OUT [UNTIL]: poll every 0.1 s until the guest answers, for at most
    # 1200 tries or until the epoch second UNTIL.
    wait_http() { w=0; while [ $w -lt 1200 ]; do
        if ip netns exec "$1" curl -s -m 2 "http://$2/" > "$3" 2>/dev/null; then return 0; fi
        [ -n "$4" ] && [ "$(date +%s)" -ge "$4" ] && return 1
        sleep 0.1; w=$((w+1)); done; return 1; }
    leftovers() { echo "netns=[$(ls /run/netns 2>/dev/null | tr '\n' ' ')] taps=[$(ip -o link show | grep -c xcgi)] vmms=$(count_xcgi)"; }
"#;

#[test]
fn a_guest_with_a_network_answers_ping_and_http_then_leaves_nothing() {
    let kernel = kernel();
    let http = example("http-hello.ext4");
    let script = format!(
        r#"{PRELUDE}
        echo "===one==="
        xcgi run --kernel "$K" --rootfs "$HTTP" --net --netns n1 --timeout 300 > vm.log 2>&1 &
        pid=$!
        wait_http n1 172.16.0.2 body.txt && echo "body=[$(cat body.txt)]"
        ip netns exec n1 ping -c 1 -W 5 172.16.0.2 > /dev/null && echo "ping=ok"
        echo "neigh=[$(ip -n n1 neigh show 172.16.0.2)]"
        echo "forwarding=$(ip netns exec n1 cat /proc/sys/net/ipv4/ip_forward)"
        kill -TERM $pid; wait $pid; echo "rc=$?"
        cat vm.log
        echo "after: $(leftovers)"
        echo "===end one==="
    "#
    );
    let r = run_script(
        &script,
        &[(&kernel, "K"), (&http, "HTTP")],
        Duration::from_secs(400),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "one");
    assert!(
        s.contains("body=[Hello from a fresh VM!]"),
        "curl got the body:\n{s}"
    );
    assert!(s.contains("ping=ok"), "ping:\n{s}");
    assert!(
        s.contains("PERMANENT"),
        "static neighbour entry, no ARP wait:\n{s}"
    );
    assert!(
        s.contains("06:00:ac:10:00:02"),
        "guest MAC in the neighbour entry:\n{s}"
    );
    assert!(
        s.contains("forwarding=0"),
        "guests are not routed anywhere:\n{s}"
    );
    assert!(s.contains("http-hello: listening on :80"), "{s}");
    assert_eq!(rc(s), 143, "{s}");
    assert!(
        s.contains("after: netns=[] taps=[0] vmms=0"),
        "nothing left behind:\n{s}"
    );
}

/// Guests booted at once (`XCGI_TEST_GUESTS` overrides).
fn concurrent_guests() -> u32 {
    std::env::var("XCGI_TEST_GUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// 20 guests alive at once, each reachable at its own address from its own namespace and from
/// no other. In a one-CPU lab this takes about 150 s: the guest kernel is tickless when idle
/// (NO_HZ_IDLE); with a periodic tick, 20 idle guests starved the lab (docs/kernel.md).
#[test]
fn many_guests_at_once_each_reachable_at_its_own_address() {
    let kernel = kernel();
    let http = example("http-hello.ext4");
    let n = concurrent_guests();
    let script = format!(
        r#"{PRELUDE}
        N={n}
        echo "===many==="
        i=0
        while [ $i -lt $N ]; do
            xcgi run --kernel "$K" --rootfs "$HTTP" --mem 48 --net --netns g$i \
                --net-base 172.16.0.$((4*i)) --timeout 600 --debug-dump > vm$i.log 2>&1 &
            echo $! > pid$i
            i=$((i+1))
        done
        # Every guest answers within 480 s of the start (about 150 s in a one-CPU lab).
        until=$(( $(date +%s) + 480 ))
        i=0; ok=0
        while [ $i -lt $N ]; do
            addr=172.16.0.$((4*i+2))
            if wait_http g$i $addr b$i.txt $until && [ "$(cat b$i.txt)" = "Hello from a fresh VM!" ]; then
                ok=$((ok+1)); echo "reached g$i $addr"
            else
                # What the host saw of the link, then the VM's own debug dump (it ends now).
                echo "FAILED g$i $addr"; ip -n g$i -s link show; ip -n g$i neigh show
                kill -TERM $(cat pid$i); wait $(cat pid$i); sed 's/^/  g'$i': /' vm$i.log
            fi
            i=$((i+1))
        done
        echo "reachable=$ok"
        # Each guest's namespace holds only its own link: no route to another guest.
        ip netns exec g0 curl -s -m 2 http://172.16.0.6/ > /dev/null 2>&1 && echo "cross=reachable" || echo "cross=blocked"
        i=0; while [ $i -lt $N ]; do kill -TERM $(cat pid$i); i=$((i+1)); done
        i=0; while [ $i -lt $N ]; do wait $(cat pid$i); i=$((i+1)); done
        echo "after: $(leftovers)"
        echo "===end many==="
    "#
    );
    let r = run_script_mem(
        &script,
        &[(&kernel, "K"), (&http, "HTTP")],
        Duration::from_secs(900),
        3072,
        1,
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "many");
    assert!(
        s.contains(&format!("reachable={n}")),
        "all {n} guests answered:\n{s}"
    );
    for i in 0..n {
        assert!(
            s.contains(&format!("reached g{i} 172.16.0.{}", 4 * i + 2)),
            "g{i}:\n{s}"
        );
    }
    assert!(
        s.contains("cross=blocked"),
        "one guest's namespace cannot reach another guest:\n{s}"
    );
    assert!(
        s.contains("after: netns=[] taps=[0] vmms=0"),
        "nothing left behind:\n{s}"
    );
}

/// Bad network input fails before any guest runs, so this runs on the host directly.
#[test]
fn bad_network_input_gets_a_clear_error_and_leaves_nothing() {
    let kernel = kernel();
    let http = example("http-hello.ext4");
    let run = |pre: &[&str], netns: &str| {
        let mut cmd = Command::new(pre.first().copied().unwrap_or(xcgi().to_str().unwrap()));
        if !pre.is_empty() {
            cmd.args(&pre[1..]).arg(xcgi());
        }
        let out = cmd
            .args(["run", "--kernel"])
            .arg(&kernel)
            .arg("--rootfs")
            .arg(&http)
            .args(["--net", "--netns", netns, "--setup-only"])
            .output()
            .expect("spawn xcgi");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A namespace name already in use.
    let st = Command::new("ip")
        .args(["netns", "add", "xcgi-test-busy"])
        .status()
        .unwrap();
    assert!(st.success());
    let (code, err) = run(&[], "xcgi-test-busy");
    let _ = Command::new("ip")
        .args(["netns", "del", "xcgi-test-busy"])
        .status();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("xcgi-test-busy"),
        "names the namespace:\n{err}"
    );
    assert!(
        err.contains("in use") || err.contains("exists"),
        "says why:\n{err}"
    );

    // Without CAP_NET_ADMIN (dropped from the bounding set, so root's exec gets none).
    let (code, err) = run(
        &["setpriv", "--bounding-set", "-net_admin", "--"],
        "xcgi-test-nocap",
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("CAP_NET_ADMIN"),
        "names the capability:\n{err}"
    );
    assert!(
        !std::path::Path::new("/run/netns/xcgi-test-nocap").exists(),
        "namespace left behind"
    );

    // Nothing left in the host namespace either.
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("xcgi"),
        "TAP left behind"
    );
}
