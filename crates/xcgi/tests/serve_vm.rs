//! End to end: `xcgi serve` with a fresh microVM per request (in the lab where this host has
//! no hardware KVM), real curl against the real server. CGI mode over virtio-console with
//! xcgi-init in the guest, and HTTP mode proxying to a guest's own HTTP server over a TAP.

mod common;

use std::time::Duration;

use common::*;

/// Runs a script where VMs boot, with a one-CPU lab: with two lab CPUs the lab's own kernel
/// (nested SVM emulated by QEMU/TCG) soft-locked in three runs out of four after 30-100
/// serve requests ("CPU#0 stuck for 477s! [xcgi-serve]", the other CPU idle and
/// unresponsive: a cross-CPU IPI that never arrives); with one CPU, 40 requests took the same
/// 2.2 s each and nothing hung.
fn lab(script: &str, files: &[(&std::path::Path, &str)], timeout: Duration) -> common::Ran {
    run_script_mem(script, files, timeout, 2048, 1)
}

/// Shell helpers: start a server from a config and wait until it listens; count leftovers.
const PRELUDE: &str = r#"
    start_server() { # NAME CONFIG
        xcgi serve --config "$2" > "$1.log" 2>&1 &
        echo $! > "$1.pid"
        w=0; while [ $w -lt 600 ]; do grep -q 'listening on' "$1.log" && return 0; sleep 0.1; w=$((w+1)); done
        echo "server $1 did not start"; cat "$1.log"; return 1
    }
    stop_server() { kill -TERM $(cat "$1.pid"); wait $(cat "$1.pid"); echo "rc=$?"; }
    code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
    count_xcgi() { n=0; for c in /proc/[0-9]*/comm; do [ "$(cat "$c" 2>/dev/null)" = xcgi ] && n=$((n+1)); done; echo $n; }
    count_jailed() { n=0; for s in /proc/[0-9]*/status; do grep -q '^Uid:.*3000000' "$s" 2>/dev/null && n=$((n+1)); done; echo $n; }
    leftovers() { echo "netns=[$(ls /run/netns 2>/dev/null | tr '\n' ' ')] taps=[$(ip -o link show | grep -c xcgi)] vmms=$(count_xcgi) workdirs=$(ls -d /tmp/xcgi-serve-* 2>/dev/null | wc -l) cgroups=$(ls -d /sys/fs/cgroup/xcgi-* 2>/dev/null | wc -l) jailed=$(count_jailed)"; }
    metric() { curl -s "http://$1/_xcgi/metrics" | grep "^$2 " | cut -d' ' -f2; }
"#;

/// The end of a script: the server `main` stopped (its exit code), what is left, its log.
const STOP_MAIN: &str = r#"
        echo "===stop==="
        stop_server main
        echo "after: $(leftovers)"
        echo "===end stop==="
        echo "===log==="; cat main.log; echo "===end log==="
"#;

/// The value of `key` (e.g. `random=`) among `line`'s whitespace-separated `key=value` words.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .to_string()
}

/// The number on the line of `m` that starts with `key` (e.g. `huge_rsvd=`).
fn number(m: &str, key: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no number after {key}:\n{m}"))
}

/// Checks the `freshN: time=T random=R at_random=A before=B host=H` lines (`examples/cgi-c`
/// `/fresh`, with the host's clock before and after each request): every VM's wall clock
/// within 1 s of the host's, and no two VMs with the same random bytes or AT_RANDOM.
fn assert_fresh(m: &str, count: usize) {
    let fresh: Vec<(i64, i64, i64, String, String)> = (1..=count)
        .map(|i| {
            let p = format!("fresh{i}: ");
            let l = m
                .lines()
                .find_map(|l| l.strip_prefix(p.as_str()))
                .unwrap_or_else(|| panic!("no {p}:\n{m}"));
            let f = |k: &str| field(l, k);
            let n = |k: &str| f(k).parse::<i64>().unwrap_or_else(|_| panic!("{l:?}"));
            let (time, before, host) = (n("time="), n("before="), n("host="));
            (time, before, host, f("random="), f("at_random="))
        })
        .collect();
    for (guest, before, after, _, _) in &fresh {
        // The host's clock (whole seconds) before and after the request.
        assert!(
            before - 1 <= *guest && *guest <= after + 1,
            "a VM's clock is {guest}, the host's was {before}..{after}: not within 1 s\n{m}"
        );
    }
    for i in 0..fresh.len() {
        for j in i + 1..fresh.len() {
            assert_ne!(fresh[i].3, fresh[j].3, "two VMs drew the same random bytes");
            assert_ne!(fresh[i].4, fresh[j].4, "two VMs got the same AT_RANDOM");
        }
    }
}

/// The main test server's configuration (a shell here-document; $K, $CGI, ... set by the
/// lab prelude) and its start.
const MAIN_SERVER: &str = r#"
        cat > main.toml <<EOF
[server]
listen = "127.0.0.1:8080"
kernel = "$K"
concurrency = 2
queue = 64
queue_timeout_ms = 600000
# A VM that ends badly leaves its state in the log (one clone of 20 concurrent requests gave
# no answer in 180 s once, session 10: not understood yet).
debug_dump = true
debug_probe = """
$(cat $PROBE)
"""
[[route]]
prefix = "/cgi"
handler = "$CGI"
timeout_ms = 180000
max_body = 1000000
env = { GREETING = "hi" }
[[route]]
prefix = "/slow"
handler = "$CGI"
timeout_ms = 8000
max_body = 1000
prepared = 0
[[route]]
prefix = "/sh"
handler = "$SH"
tree = "$TREE"
prepared = 1
[[route]]
prefix = "/go"
handler = "$GO"
prepared = 1
EOF
        start_server main main.toml || exit 1
        A=127.0.0.1:8080
"#;

/// The main server's `debug_probe` (issue 13's hang: a clone took the interrupt for its
/// request and never read it): the guest kernel's hvc/virtio-console/tty state, the hvc
/// thread and the first tasks, the clock. Symbols from the kernel's own symbol table (`nm`);
/// the field offsets are this kernel config's (6.12 tinyconfig + kernel/config.fragment, read
/// with gdb `ptype /o` from a DEBUG_INFO build of it): a dump line per struct.
fn probe_file() -> std::path::PathBuf {
    let out = std::process::Command::new("nm")
        .arg(kernel())
        .output()
        .expect("run nm (binutils) on the guest kernel");
    assert!(out.status.success(), "nm failed on {}", kernel().display());
    let syms = String::from_utf8_lossy(&out.stdout);
    let sym = |name: &str| {
        syms.lines()
            .find_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() == 3 && w[2] == name).then(|| w[0].to_string())
            })
            .unwrap_or_else(|| panic!("no symbol {name} in the guest kernel"))
    };
    let (hvc, port) = (
        format!("{} * -198", sym("hvc_structs")),
        format!("{} +18 * -50", sym("pdrvdata")),
    );
    let task = sym("hvc_task");
    let init = sym("init_task");
    let mut p = format!(
        "hvc {hvc} 432\nhvc_tty_flags {hvc} +80 * +178 8\nntty_heads {hvc} +80 * +218 * 48
ntty_tail {hvc} +80 * +218 * +2260 8\nhvc_kicked {} 8\nkhvcd_state {task} * +18 8
khvcd_stack {task} * +6d8 * 256\nport {port} 192\nport_inbuf {port} +18 * 32
in_vq {port} +20 * 128\nout_vq {port} +28 * 128\njiffies {} 8\ntimer_base {} 48
pid1_state {init} +280 * -280 +18 8\npid1_stack {init} +280 * -280 +6d8 * 256\n",
        sym("hvc_kicked"),
        sym("jiffies_64"),
        sym("timer_bases"),
    );
    for k in 2..12 {
        let t = format!("{init} +280 {}-280", "* ".repeat(k));
        p.push_str(&format!(
            "task{k}_state {t} +18 8\ntask{k}_comm {t} +458 16\n"
        ));
    }
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("main-probe.txt");
    std::fs::write(&file, p).expect("write the probe file");
    file
}

/// The files the main server's routes need.
fn main_files() -> Vec<(std::path::PathBuf, &'static str)> {
    vec![
        (kernel(), "K"),
        (probe_file(), "PROBE"),
        (example("cgi-c/cgi"), "CGI"),
        (example("cgi-sh/hello.sh"), "SH"),
        (example("cgi-sh/tree"), "TREE"),
        (example("cgi-go/cgi-go"), "GO"),
    ]
}

/// Runs `body` (shell) against a started main server, then stops it and reports leftovers.
/// Lab sessions are kept small and run with one lab CPU (see [`lab`]).
fn with_main_server(body: &str, timeout: Duration) -> common::Ran {
    let files = main_files();
    let refs: Vec<(&std::path::Path, &str)> =
        files.iter().map(|(p, n)| (p.as_path(), *n)).collect();
    let script = format!(
        r#"{PRELUDE}{MAIN_SERVER}{body}
{STOP_MAIN}"#
    );
    let r = lab(&script, &refs, timeout);
    assert_eq!(r.code, 0, "{}", r.output);
    let stop = section(&r.output, "stop");
    assert_eq!(rc(stop), 0, "{stop}");
    assert!(
        stop.contains("after: netns=[] taps=[0] vmms=0 workdirs=0 cgroups=0 jailed=0"),
        "nothing left:\n{stop}"
    );
    r
}

/// What the server logged about requests that went wrong: each request line that is not a
/// 200, and each VM debug dump (up to its next log line), so that a failed assertion leads
/// with them (a CI report shows only part of a long output).
fn failed_requests(output: &str) -> String {
    let log = output.split("===log===").nth(1).unwrap_or(output);
    let mut out = String::new();
    let mut in_dump = false;
    for line in log.lines() {
        let stamped = line.trim_start_matches("lab| ").starts_with("20");
        if stamped {
            in_dump = line.contains("VM debug dump");
            if in_dump || (line.contains("reqlog") && !line.contains("status=200")) {
                out.push_str(line);
                out.push('\n');
            }
        } else if in_dump {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn failed_requests_lists_bad_request_lines_and_dumps_only() {
    let output = "lab| ===seq===\nlab| ===log===
lab| 2026-12-03T00:29:10.5Z  INFO xcgi_gateway::server::reqlog:  vm=564 status=200 total_ms=668.7
lab| 2026-12-03T00:29:11.5Z  WARN xcgi_gateway::server::reqlog: timeout; killed vm=565 status=504
lab| 2026-12-03T00:29:11.7Z  WARN xcgi_gateway::exec::vm: VM debug dump of vm=565 (stopped on request)
lab| debug dump: stopped on request, VM killed
lab| vcpu0: mp_state=3 rip=0xffffffff8128f47c
lab| 2026-12-03T00:29:14.7Z  INFO xcgi_gateway::server::reqlog:  vm=581 status=200 total_ms=668.7
lab| ===end log===\n";
    let f = failed_requests(output);
    assert_eq!(f.lines().count(), 4, "{f}");
    assert!(
        f.contains("vm=565 status=504") && f.contains("vcpu0: mp_state=3"),
        "{f}"
    );
    assert!(!f.contains("vm=564") && !f.contains("vm=581"), "{f}");
}

#[test]
fn cgi_requests_each_get_a_fresh_vm_with_the_cgi_semantics() {
    let r = with_main_server(
        r#"
        echo "===env==="
        curl -s "http://$A/cgi/env/x?a=1" -H 'X-Custom: yes' --data-binary 'hello body'
        echo "===end env==="
        echo "===misc==="
        echo "status: $(curl -s -i http://$A/cgi/status | tr -d '\r' | grep -iE '^(HTTP|x-handler)' | tr '\n' ' ')"
        echo "client: $(curl -s -i http://$A/cgi/client | tr -d '\r' | grep -iE '^(HTTP|location)' | tr '\n' ' ')"
        echo "local: $(curl -s http://$A/cgi/local | grep -E 'QUERY_STRING|REQUEST_METHOD' | tr '\n' ' ')"
        echo "persist1: $(curl -s http://$A/cgi/persist)"
        echo "persist2: $(curl -s http://$A/cgi/persist)"
        for i in 1 2; do b=$(date +%s); r=$(curl -s http://$A/cgi/fresh); echo "fresh$i: $r before=$b host=$(date +%s)"; done
        echo "sh: $(curl -s "http://$A/sh?q=1" --data-binary abc | tr '\n' ' ')"
        echo "go: $(curl -s "http://$A/go/p?q=2" --data-binary gobody)"
        head -c 300000 /dev/urandom > big.bin
        curl -s --data-binary @big.bin http://$A/cgi/echo > big.out
        cmp big.bin big.out && echo "echo300k=same"
        echo "crash=$(code http://$A/cgi/crash)"
        echo "garbage=$(code http://$A/cgi/garbage)"
        echo "toolarge=$(code --data-binary @big.bin http://$A/slow/echo)"
        s=$(date +%s); echo "timeout=$(code http://$A/slow/sleep) after=$(( $(date +%s) - s ))s"
        # Streaming: the five ticks come 300 ms apart, and so reach the client.
        # (Stamps from /proc/uptime, in ms: the lab's date has no %N.)
        curl -sN http://$A/cgi/stream | while read -r l; do echo "$(awk '{printf "%d", $1*1000}' /proc/uptime) $l"; done > ticks.txt
        echo "ticks_spread_ms=$(( $(tail -1 ticks.txt | cut -d' ' -f1) - $(head -1 ticks.txt | cut -d' ' -f1) ))"
        # A client that leaves: its VM is killed at once, not at the route's timeout.
        curl -s -m 1 http://$A/cgi/sleep > /dev/null; sleep 1
        echo "vms_after_client_left=$(metric $A xcgi_vms_running)"
        echo "===end misc==="
"#,
        Duration::from_secs(900),
    );
    let env = section(&r.output, "env");
    for want in [
        "GATEWAY_INTERFACE=CGI/1.1",
        "REQUEST_METHOD=POST",
        "SCRIPT_NAME=/cgi",
        "PATH_INFO=/env/x",
        "QUERY_STRING=a=1",
        "CONTENT_LENGTH=10",
        "HTTP_X_CUSTOM=yes",
        "REMOTE_ADDR=127.0.0.1",
        "SERVER_PORT=8080",
        "GREETING=hi",
        "body=[hello body]",
    ] {
        assert!(env.contains(want), "{want} missing:\n{env}");
    }
    let m = section(&r.output, "misc");
    for want in [
        "status: HTTP/1.1 418 I'm a teapot x-handler: cgi-c",
        "client: HTTP/1.1 302 Found location: http://example.org/elsewhere",
        "QUERY_STRING=via=local REQUEST_METHOD=GET",
        "persist1: before=no created=yes",
        // The second request's VM is new: the first one's file is gone.
        "persist2: before=no created=yes",
        "sh: Hello from busybox sh! method=POST query=q=1 body=[abc]",
        "go: Hello from Go CGI! POST /go/p query=q=2 body=[gobody]",
        "echo300k=same",
        "crash=502",
        "garbage=502",
        "toolarge=413",
        "vms_after_client_left=0",
    ] {
        assert!(m.contains(want), "{want} missing:\n{m}");
    }
    // Each VM gets the host's wall clock and fresh entropy with its request: the handler sees
    // the time of day, and no two VMs the same random bytes or AT_RANDOM. (The /cgi route's
    // VMs are snapshot clones, the default: they share their template's state but these.)
    assert_fresh(m, 2);
    let t = m
        .lines()
        .find_map(|l| l.strip_prefix("timeout="))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(t.starts_with("504 "), "{t}");
    let spread = number(m, "ticks_spread_ms=");
    assert!(
        spread >= 900,
        "ticks {spread} ms apart: streamed responses must not be buffered"
    );
    let log = section(&r.output, "log");
    assert!(
        log.contains("crashing on purpose"),
        "crash reason logged:\n{log}"
    );
    assert!(log.contains("boot_ms="), "{log}");
    // The server has debug_dump: the VM that did not answer in time (a clone, jailed) was
    // asked to stop and report before it was killed, and its state is in the log.
    let timed_out = log
        .lines()
        .find(|l| l.contains("status=504"))
        .unwrap_or_else(|| panic!("no 504 logged:\n{log}"));
    let vm = field(timed_out, "vm=");
    let dump = log
        .split(&format!("VM debug dump of vm={vm} ("))
        .nth(1)
        .unwrap_or_else(|| panic!("no debug dump of vm={vm}:\n{log}"));
    assert!(dump.contains("vcpu0: mp_state="), "{dump}");
    // ...with the server's debug_probe read through the guest's page tables: a kernel
    // variable, and a struct found by following a pointer (into the kernel's direct map).
    assert!(dump.contains("probe jiffies @0xffffffff8"), "{dump}");
    assert!(dump.contains("probe port @0xffff8880"), "{dump}");
}

/// Issue 13: `start = "snapshot"`. Each route's template boots once at start, to xcgi-init's
/// hello, and is captured; every request runs in a clone of it (jailed VM processes, the
/// default), prepared ahead. Clones share nothing a request can see: different random bytes
/// and AT_RANDOM, the host's wall clock, no file left by an earlier request; a 300 kB body
/// round-trips, a crash is a 502 and a timeout a 504; one template per route, never resumed,
/// however many requests; nothing left after SIGTERM. Prints boot against clone latency.
#[test]
fn snapshot_clones_serve_cgi_requests_and_share_nothing() {
    let files = main_files();
    let refs: Vec<(&std::path::Path, &str)> =
        files.iter().map(|(p, n)| (p.as_path(), *n)).collect();
    let script = format!(
        r#"{PRELUDE}
        cat > snap.toml <<EOF
[server]
listen = "127.0.0.1:8080"
kernel = "$K"
concurrency = 2
[[route]]
prefix = "/snap"
handler = "$CGI"
start = "snapshot"
timeout_ms = 180000
max_body = 1000000
[[route]]
prefix = "/snapslow"
handler = "$CGI"
start = "snapshot"
timeout_ms = 8000
prepared = 1
[[route]]
prefix = "/boot"
handler = "$CGI"
start = "boot"
timeout_ms = 180000
memory_mib = 160
[[route]]
prefix = "/gosnap"
handler = "$GO"
start = "snapshot"
timeout_ms = 180000
memory_mib = 192
prepared = 1
[[route]]
prefix = "/img"
handler = "$PWD/img.cpio"
program = "/cgi-bin/h"
start = "snapshot"
timeout_ms = 180000
memory_mib = 200
prepared = 1
[[route]]
prefix = "/huge"
handler = "$CGI"
start = "snapshot"
hugepages = true
memory_mib = 96
prepared = 1
timeout_ms = 180000
EOF
        # /huge's clones: its template's memory on the lab's hugetlbfs (/dev/hugepages), each
        # clone reserving its 48 pages.
        echo 256 > /proc/sys/vm/nr_hugepages
        # What a server killed with SIGKILL left there: its directory (no lock held on it any
        # more) and a memory file holding a huge page. The server removes it at start.
        mkdir /dev/hugepages/xcgi-serve-1-0123456789abcdef
        fallocate -l 2097152 /dev/hugepages/xcgi-serve-1-0123456789abcdef/snapshot-0.1 || exit 1
        echo "leftover_free=$(awk '/HugePages_Free/ {{print $2}}' /proc/meminfo)"
        # /img's handler is a prebuilt image, replaced below by another one.
        mkdir -p c go; cp "$CGI" c/h; cp "$GO" go/h
        xcgi image build --cgi --program c/h --format initramfs -o img.cpio > /dev/null || exit 1
        xcgi image build --cgi --program go/h --format initramfs -o img-go.cpio > /dev/null || exit 1
        export XCGI_LOG=info,xcgi_gateway::exec::jailed=debug
        start_server main snap.toml || exit 1
        A=127.0.0.1:8080
        echo "===snap==="
        echo "templates=$(metric $A xcgi_snapshot_templates_total)"
        echo "leftover=$(ls /dev/hugepages/xcgi-serve-1-0123456789abcdef 2>/dev/null | wc -l) swept_log=$(grep -c 'removed huge-page template memory left by a server that is gone' main.log)"
        for i in 1 2 3; do b=$(date +%s); r=$(curl -s http://$A/snap/fresh); echo "fresh$i: $r before=$b host=$(date +%s)"; done
        echo "persist1: $(curl -s http://$A/snap/persist)"
        echo "persist2: $(curl -s http://$A/snap/persist)"
        head -c 300000 /dev/urandom > big.bin
        curl -s --data-binary @big.bin http://$A/snap/echo > big.out
        cmp big.bin big.out && echo "echo300k=same"
        echo "crash=$(code http://$A/snap/crash)"
        code http://$A/snapslow/sleep > timeout.txt &
        slow=$!
        sleep 2
        # The VM process serving /snapslow/sleep runs at weight 100, the waiting ones at 1.
        echo "weights: $(cat /sys/fs/cgroup/xcgi-vms-*/vm*/cpu.weight | sort -n | uniq -c | tr -s ' \n' '  ')"
        wait $slow
        echo "timeout=$(cat timeout.txt)"
        echo "greeting: $(curl -s http://$A/snap | head -1)"
        for i in 1 2 3; do echo "go: $(curl -s "http://$A/gosnap/p?q=$i" --data-binary gobody)"; done
        for i in 1 2; do echo "hfresh: $(curl -s http://$A/huge/fresh)"; done
        for i in 1 2; do echo "hpersist: $(curl -s http://$A/huge/persist)"; done
        sleep 3
        for i in 1 2 3 4 5; do curl -s -o /dev/null -w 'boot_s=%{{time_total}}\n' http://$A/boot; sleep 2; done
        for i in 1 2 3 4 5; do curl -s -o /dev/null -w 'snap_s=%{{time_total}}\n' http://$A/snap; sleep 2; done
        echo "templates_after=$(metric $A xcgi_snapshot_templates_total)"
        echo "started=$(metric $A xcgi_vms_started_total)"
        # The image changes under the running server: the route gets a new template.
        echo "img1: $(curl -s http://$A/img | head -1)"
        mv img-go.cpio img.cpio
        w=0; until [ "$(metric $A xcgi_snapshot_templates_total)" = 6 ] || [ $w -ge 900 ]; do sleep 0.1; w=$((w+1)); done
        echo "templates_renewed=$(metric $A xcgi_snapshot_templates_total)"
        for i in 1 2 3 4; do echo "img_after: $(curl -s http://$A/img | head -1)"; done
        echo "huge_files=$(ls /dev/hugepages/xcgi-serve-*/* 2>/dev/null | wc -l) huge_dirs=$(ls /dev/hugepages | grep -c '^xcgi-serve-')"
        echo "huge_rsvd=$(awk '/HugePages_Rsvd/ {{print $2}}' /proc/meminfo)"
        echo "snapshot_links=$(find /tmp/xcgi-serve-* -maxdepth 1 -name 'snapshot-*' -type l | wc -l)"
        echo "snapshot_dirs=$(find /tmp/xcgi-serve-* -maxdepth 1 -name 'snapshot-*' -type d | wc -l)"
        echo "working_sets=$(find /tmp/xcgi-serve-* -name working-set -type f | wc -l)"
        echo "recorded_logs=$(grep -c 'pages recorded from a served clone' main.log)"
        echo "touched_logs=$(grep -c 'clone touched its working set ahead' main.log)"
        echo "===end snap==="
{STOP_MAIN}
        echo "huge_after: files=$(ls /dev/hugepages | wc -l) free=$(awk '/HugePages_Free/ {{print $2}}' /proc/meminfo) total=$(awk '/HugePages_Total/ {{print $2}}' /proc/meminfo)"
"#
    );
    let r = lab(&script, &refs, Duration::from_secs(900));
    assert_eq!(r.code, 0, "{}", r.output);
    let m = section(&r.output, "snap");
    for want in [
        "templates=5",
        "go: Hello from Go CGI! POST /gosnap/p query=q=3 body=[gobody]",
        "persist1: before=no created=yes",
        "persist2: before=no created=yes",
        "echo300k=same",
        "crash=502",
        "timeout=504",
        "greeting: Hello from CGI in a fresh VM! (GET /snap)",
        // One template per snapshot route, however many requests ran in its clones.
        "templates_after=5",
        "img1: Hello from CGI in a fresh VM! (GET /img)",
        // ...and one more when a route's image changed: the old one and the new one kept.
        "templates_renewed=6",
        "snapshot_links=5",
        "snapshot_dirs=6",
        // The huge-page route's template memory: one file, in the server's directory on
        // hugetlbfs; what a dead server left there was removed at start.
        "huge_files=1 huge_dirs=1",
        "leftover=0 swept_log=1",
    ] {
        assert!(m.contains(want), "{want} missing:\n{m}\n{}", r.output);
    }
    assert_fresh(m, 3);
    // Every template that served a request got the working set its first clones recorded
    // (one file each), and clones prepared after that touched all of it while they waited
    // for their request (the VM process says so): they are among those that passed every
    // check above.
    let sets = number(m, "working_sets=");
    assert!(
        sets >= 5 && number(m, "recorded_logs=") == sets,
        "one working set per template that served: {m}"
    );
    assert!(
        number(m, "touched_logs=") >= 5,
        "clones touched their working set ahead: {m}"
    );
    // Huge-page clones: not twins either, and the waiting one holds its reservation (a
    // 96 MiB guest: 48 pages) from the pool, as a booted huge-page VM does.
    let hfresh: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("hfresh: "))
        .collect();
    assert_eq!(hfresh.len(), 2, "{m}");
    assert_eq!(
        m.matches("hpersist: before=no created=yes").count(),
        2,
        "a huge-page clone's write is its own: {m}"
    );
    for k in ["random=", "at_random="] {
        assert_ne!(
            field(hfresh[0], k),
            field(hfresh[1], k),
            "{k} of two huge-page clones"
        );
    }
    let rsvd = number(m, "huge_rsvd=");
    // Reserved and not yet used: 47 seen before clones touched their working set ahead (one
    // page is written while the clone's state is restored); now the huge pages the working
    // set writes are used, not reserved, and the rest stays reserved. A clone on 4 KiB pages
    // reserves none.
    assert!(
        (1..=48).contains(&rsvd),
        "a prepared huge-page clone reserves its pages: {rsvd}"
    );
    // VMs prepared before the change may serve as they are (as booted ones do); then the
    // new image's handler answers.
    let after: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("img_after: "))
        .collect();
    assert_eq!(after.len(), 4, "{m}");
    assert!(
        after[3].starts_with("Hello from Go CGI! GET /img"),
        "the new image's handler does not answer: {after:?}\n{m}"
    );
    let w = m
        .lines()
        .find_map(|l| l.strip_prefix("weights: "))
        .unwrap_or_else(|| panic!("{m}"));
    let counts: Vec<(u32, u32)> = w
        .split_whitespace()
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|c| Some((c.first()?.parse().ok()?, c.get(1)?.parse().ok()?)))
        .collect();
    let of = |weight: u32| counts.iter().find(|c| c.1 == weight).map_or(0, |c| c.0);
    assert!(
        of(100) >= 1 && of(1) >= 3 && of(1) + of(100) == counts.iter().map(|c| c.0).sum::<u32>(),
        "waiting VM processes at cpu.weight 1, the busy one at 100: {w}"
    );
    let times = |k: &str| -> Vec<f64> {
        m.lines()
            .filter_map(|l| l.strip_prefix(k))
            .filter_map(|v| v.trim().parse().ok())
            .collect()
    };
    let (mut boot, mut snap) = (times("boot_s="), times("snap_s="));
    assert_eq!((boot.len(), snap.len()), (5, 5), "{m}");
    boot.sort_by(f64::total_cmp);
    snap.sort_by(f64::total_cmp);
    eprintln!(
        "lab, cgi-c greeting, sequential: boot median {:.0} ms, snapshot clone median {:.0} ms ({:.1}x)",
        boot[2] * 1e3,
        snap[2] * 1e3,
        boot[2] / snap[2]
    );
    assert!(
        snap[2] < boot[2],
        "a clone is not faster than a boot: {snap:?} vs {boot:?}"
    );
    let log = section(&r.output, "log");
    assert_eq!(
        log.matches("template captured").count(),
        6,
        "one template per route, one more for the changed image:\n{log}"
    );
    // Host memory per VM process (its cgroup's memory.peak: the guest pages it wrote, or the
    // booted guest's, plus the process), told apart by their memory.max (guest + 48 MiB).
    let peaks = |guest_mib: u64| -> Vec<f64> {
        log.lines()
            .filter(|l| l.contains("VM process reaped"))
            .filter(|l| l.contains(&format!("memory_max={}", (guest_mib + 48) << 20)))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("memory_peak="))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .map(|b| b / 1048576.0)
            .filter(|&m| m > 2.5) // VM processes that ran a guest (unused ones: ~1.8 MiB)
            .collect()
    };
    let (c, boot, go) = (peaks(128), peaks(160), peaks(192));
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "lab, memory.peak per VM process: cgi-c clone max {:.1} MiB ({} VMs), Go CGI clone max {:.1} MiB ({}), cgi-c boot max {:.1} MiB ({})",
        max(&c),
        c.len(),
        max(&go),
        go.len(),
        max(&boot),
        boot.len()
    );
    assert!(!c.is_empty() && !go.is_empty() && !boot.is_empty(), "{log}");
    assert!(
        max(&c) < max(&boot),
        "a clone charged more host memory than a boot"
    );
    let stop = section(&r.output, "stop");
    assert_eq!(rc(stop), 0, "{stop}");
    assert!(
        stop.contains("after: netns=[] taps=[0] vmms=0 workdirs=0 cgroups=0 jailed=0"),
        "nothing left:\n{stop}\n{}",
        r.output
    );
    // No template file left on hugetlbfs, every huge page back in the pool (the one the
    // dead server's file held too).
    assert_eq!(number(&r.output, "leftover_free="), 255, "{}", r.output);
    let after = r
        .output
        .lines()
        .find_map(|l| l.split("huge_after: ").nth(1))
        .unwrap_or_else(|| panic!("{}", r.output));
    assert!(after.starts_with("files=0 free=256 total=256"), "{after}");
}

#[test]
fn a_hundred_sequential_and_twenty_concurrent_requests_all_correct() {
    let r = with_main_server(
        r#"
        echo "===seq==="
        ok=0; i=0
        while [ $i -lt 100 ]; do
            curl -s -m 120 "http://$A/cgi/env?n=$i" | grep -qx "QUERY_STRING=n=$i" && ok=$((ok+1))
            i=$((i+1))
        done
        echo "sequential_ok=$ok"
        echo "===end seq==="
        echo "===conc==="
        i=0; pids=""
        while [ $i -lt 20 ]; do
            (curl -s -m 300 "http://$A/cgi/env?c=$i" | grep -qx "QUERY_STRING=c=$i" && echo ok > c$i.res || echo bad > c$i.res) &
            pids="$pids $!"
            i=$((i+1))
        done
        wait $pids
        echo "concurrent_ok=$(cat c*.res | grep -c ok)"
        echo "vms_started=$(metric $A xcgi_vms_started_total)"
        echo "===end conc==="
        # VMs prepared ahead hold fds too: count once the pool is full again
        # (/cgi keeps 2, /sh and /go 1 each, /slow none).
        wait_prepared() { w=0; while [ "$(metric $A xcgi_vms_prepared)" != 4 ] && [ $w -lt 600 ]; do sleep 0.1; w=$((w+1)); done; }
        wait_prepared
        echo "prepared=$(metric $A xcgi_vms_prepared)"
        fds_before=$(ls /proc/$(cat main.pid)/fd | wc -l)
        curl -s http://$A/cgi > /dev/null; sleep 0.5; wait_prepared
        echo "fds_grew=$(( $(ls /proc/$(cat main.pid)/fd | wc -l) - fds_before ))"
"#,
        Duration::from_secs(900),
    );
    assert!(
        section(&r.output, "seq").contains("sequential_ok=100"),
        "what the server logged about failed requests:\n{}\n{}",
        failed_requests(&r.output),
        r.output
    );
    let c = section(&r.output, "conc");
    assert!(
        c.contains("concurrent_ok=20"),
        "{c}\nwhat the server logged about them:\n{}",
        failed_requests(&r.output)
    );
    assert!(r.output.contains("fds_grew=0"), "{}", r.output);
    assert!(
        r.output.contains("prepared=4"),
        "the routes keep 4 VMs prepared:\n{}",
        r.output
    );
}

#[test]
fn queue_overflow_gives_503_and_sigterm_drains() {
    let kernel = kernel();
    let cgi = example("cgi-c/cgi");
    let script = format!(
        r#"{PRELUDE}
        cat > q.toml <<EOF
[server]
listen = "127.0.0.1:8081"
kernel = "$K"
concurrency = 1
queue = 1
queue_timeout_ms = 60000
jail = false
[[route]]
prefix = "/cgi"
handler = "$CGI"
timeout_ms = 20000
EOF
        start_server q q.toml || exit 1
        A=127.0.0.1:8081
        echo "===queue==="
        # One streams (holding the only slot: boot, then 20 lines 300 ms apart), one waits,
        # two are refused.
        curl -sN "http://$A/cgi/stream?20" > s1.txt &
        p1=$!
        sleep 0.3
        pids=""
        for i in 1 2 3; do (echo "code=$(code http://$A/cgi)" > q$i.res) & pids="$pids $!"; done
        # Until one waits in the queue and two were refused (the lab's one CPU is slow).
        w=0; while [ $w -lt 600 ]; do
            [ "$(metric $A xcgi_queue_depth)" = 1 ] && [ "$(metric $A 'xcgi_requests_total{{status="503"}}')" = 2 ] && break
            sleep 0.1; w=$((w+1)); done
        echo "queued=$(metric $A xcgi_queue_depth)"
        # SIGTERM while requests are in flight: they finish, then the server exits.
        kill -TERM $(cat q.pid)
        wait $p1 $pids
        cat q*.res | sort
        echo "streamed_ticks=$(grep -c tick s1.txt)"
        wait $(cat q.pid); echo "rc=$?"
        echo "after: $(leftovers)"
        echo "===end queue==="
        cat q.log
    "#
    );
    let r = lab(
        &script,
        &[(&kernel, "K"), (&cgi, "CGI")],
        Duration::from_secs(600),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "queue");
    assert_eq!(s.matches("code=503").count(), 2, "{s}");
    assert_eq!(s.matches("code=200").count(), 1, "{s}");
    assert!(s.contains("queued=1"), "{s}");
    assert!(s.contains("streamed_ticks=20"), "drained, not cut:\n{s}");
    assert_eq!(rc(s), 0, "{s}");
    assert!(
        s.contains("after: netns=[] taps=[0] vmms=0 workdirs=0 cgroups=0 jailed=0"),
        "{s}"
    );
    // jail = false: the VMs ran as threads of the server (no VM process was started).
    assert!(!s.contains("jailed VM process"), "{s}");
}

#[test]
fn http_mode_proxies_to_the_guests_own_server_and_images_serve_as_handlers() {
    let kernel = kernel();
    let http = example("http-hello/http-hello");
    let http_img = example("http-hello.ext4");
    // A CGI image built by `xcgi image build --cgi` (xcgi-init as /init).
    let dir = tempfile::tempdir().unwrap();
    let cgi_img = dir.path().join("cgi.cpio");
    let out = std::process::Command::new(xcgi())
        .args(["image", "build", "--cgi", "--format", "initramfs", "--init"])
        .arg(xcgi_init())
        .arg("--program")
        .arg(example("cgi-c/cgi"))
        .arg("--output")
        .arg(&cgi_img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("/cgi-bin/cgi"));
    let script = format!(
        r#"{PRELUDE}
        cat > h.toml <<EOF
[server]
listen = "127.0.0.1:8082"
kernel = "$K"
concurrency = 2
[network]
base = "172.16.0.0"
size = 4
prefill = 2
netns = "xcgi-http"
[[route]]
prefix = "/"
mode = "http"
handler = "$HTTP"
port = 80
timeout_ms = 60000
[[route]]
prefix = "/img"
mode = "http"
strip_prefix = true
handler = "$HTTPIMG"
timeout_ms = 60000
[[route]]
prefix = "/cgiimg"
handler = "$CGIIMG"
program = "/cgi-bin/cgi"
timeout_ms = 60000
[[route]]
prefix = "/stall"
mode = "http"
handler = "$HTTP"
prepared = 0
timeout_ms = 30000
EOF
        start_server h h.toml || exit 1
        A=127.0.0.1:8082
        echo "===http==="
        for i in 1 2 3; do echo "body$i=[$(curl -s http://$A/)]"; done
        echo "taps_during=$(ip -n xcgi-http -o link show | grep -c xcgi)"
        echo "vms_started=$(metric $A xcgi_vms_started_total)"
        echo "ext4image=[$(curl -s http://$A/img)]"
        echo "cgiimage=[$(curl -s http://$A/cgiimg/env?z=9 | grep QUERY_STRING)]"
        # A guest that stalls mid-response: at the route's deadline its VM is killed, and the
        # client must see a cut (curl 18), not wait on a socket whose peer vanished (28).
        t0=$(date +%s); curl -s -m 90 -o /dev/null http://$A/stall; rc=$?
        echo "stall_curl=$rc stall_s=$(( $(date +%s) - t0 ))"
        stop_server h
        echo "after: $(leftovers)"
        echo "===end http==="
        cat h.log
    "#
    );
    let r = lab(
        &script,
        &[
            (&kernel, "K"),
            (&http, "HTTP"),
            (&http_img, "HTTPIMG"),
            (&cgi_img, "CGIIMG"),
        ],
        Duration::from_secs(600),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "http");
    assert!(s.contains("ext4image=[Hello from a fresh VM!]"), "{s}");
    assert!(s.contains("cgiimage=[QUERY_STRING=z=9]"), "{s}");
    for i in 1..=3 {
        assert!(
            s.contains(&format!("body{i}=[Hello from a fresh VM!]")),
            "request {i}:\n{s}"
        );
    }
    assert!(s.contains("vms_started=3"), "one VM per request:\n{s}");
    // Finding 9 of issue 10: the proxied body is aborted when its VM is killed.
    let stall = s
        .lines()
        .find(|l| l.starts_with("stall_curl="))
        .unwrap_or_else(|| panic!("no stall line:\n{s}"));
    let secs: u64 = stall
        .split("stall_s=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(999);
    assert!(
        stall.starts_with("stall_curl=18 ") && secs < 75,
        "a stalled proxied response must be cut soon after the 30 s deadline (curl 18), not \
         wait for curl's own 90 s limit (28): {stall}\n{s}"
    );
    assert_eq!(rc(s), 0, "{s}");
    assert!(
        s.contains("after: netns=[] taps=[0] vmms=0 workdirs=0"),
        "{s}"
    );
}

/// A dynamically linked CGI program from the distribution, packed by `xcgi image build --cgi`
/// with its interpreter and libraries taken from this host (issue 15): Debian's cgit, with a
/// git repository and its configuration in `--dir`, serves the repository's pages.
#[test]
fn a_dynamically_linked_cgi_program_cgit_serves_a_repository() {
    let cgit = std::path::Path::new("/usr/lib/cgit/cgit.cgi");
    assert!(cgit.is_file(), "cgit is missing: run scripts/setup.sh");
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("srv/git")).unwrap();
    std::fs::write(
        tree.join("etc/cgitrc"),
        "cache-size=0\nvirtual-root=/git/\nrepo.url=demo\nrepo.path=/srv/git/demo.git\n\
         repo.desc=an xcgi test repository\n",
    )
    .unwrap();
    let git = |cwd: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new("git")
            .current_dir(cwd)
            .args([
                "-c",
                "user.name=xcgi",
                "-c",
                "user.email=xcgi@example.invalid",
            ])
            .args(args)
            .output()
            .expect("git (scripts/setup.sh installs it)");
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("README"), "hello from a fresh VM\n").unwrap();
    git(&work, &["add", "README"]);
    git(&work, &["commit", "-q", "-m", "first commit in a fresh VM"]);
    git(
        dir.path(),
        &["clone", "-q", "--bare", "work", "tree/srv/git/demo.git"],
    );
    let image = dir.path().join("cgit.cpio");
    let out = std::process::Command::new(xcgi())
        .args(["image", "build", "--cgi", "--format", "initramfs", "--init"])
        .arg(xcgi_init())
        .arg("--program")
        .arg(cgit)
        .arg("--dir")
        .arg(&tree)
        .arg("--output")
        .arg(&image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("added /lib/x86_64-linux-gnu/libc.so.6"),
        "{err}"
    );
    let script = format!(
        r#"{PRELUDE}
        cat > git.toml <<EOF
[server]
listen = "127.0.0.1:8083"
kernel = "$K"
[[route]]
prefix = "/git"
handler = "$CGIT"
program = "/cgi-bin/cgit.cgi"
timeout_ms = 60000
prepared = 0
EOF
        start_server git git.toml || exit 1
        echo "===cgit==="
        echo "index=$(code http://127.0.0.1:8083/git/)"
        curl -s http://127.0.0.1:8083/git/ | grep -o 'an xcgi test repository' | head -1
        echo "log=$(code http://127.0.0.1:8083/git/demo/log/)"
        curl -s http://127.0.0.1:8083/git/demo/log/ | grep -o 'first commit in a fresh VM' | head -1
        stop_server git
        echo "===end cgit==="
        echo "===log==="; cat git.log; echo "===end log==="
    "#
    );
    let r = lab(
        &script,
        &[(&kernel(), "K"), (&image, "CGIT")],
        Duration::from_secs(600),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "cgit");
    assert!(s.contains("index=200"), "{}", r.output);
    assert!(s.contains("an xcgi test repository"), "{s}");
    assert!(s.contains("log=200"), "{s}");
    assert!(s.contains("first commit in a fresh VM"), "{s}");
    assert_eq!(rc(s), 0, "{s}");
}

/// The jail (on by default): every VM in a jailed process of its own (crates/gateway/src/exec/
/// jailed.rs) in a cgroup of its own. The CGI semantics hold; the VM processes run as users of
/// the jail's range under their filters (log mode: the kernel logs any call outside a list,
/// and none may be; the console channel's RX thread is exercised here); each has its route's
/// memory.max and pids.max; a guest that makes its VM process pass memory.max gets it
/// OOM-killed: a 502 naming the OOM killer, and the server keeps serving; a crash is a 502, a
/// deadline a 504; no VM process, uid or cgroup is left after SIGTERM.
#[test]
fn jailed_vm_processes_serve_cgi_requests() {
    let files = main_files();
    let refs: Vec<(&std::path::Path, &str)> =
        files.iter().map(|(p, n)| (p.as_path(), *n)).collect();
    // A guest of 384 MiB whose VM process may have 128 MiB: touching 300 MiB passes it.
    // The server itself runs unprivileged after its start-up (its jail helper stays root).
    let server = MAIN_SERVER.replace(
        "concurrency = 2\n",
        "concurrency = 2\nuser = \"65534:65534\"\n",
    );
    let server = server.replace(
        "EOF\n        start_server main",
        "[[route]]\nprefix = \"/oom\"\nhandler = \"$CGI\"\nmemory_mib = 384\n\
         memory_max_mib = 128\nprepared = 0\ntimeout_ms = 120000\n\
         EOF\n        start_server main",
    );
    let script = format!(
        r#"{PRELUDE}
        dmesg -c > /dev/null 2>&1
        export XCGI_SECCOMP=log XCGI_LOG=info,xcgi_gateway::exec::jailed=debug
        {server}
        echo "===jail==="
        curl -s "http://$A/cgi/env/x?a=1" --data-binary 'hello body' | grep -E 'PATH_INFO|body='
        echo "persist1: $(curl -s http://$A/cgi/persist)"
        echo "persist2: $(curl -s http://$A/cgi/persist)"
        echo "go: $(curl -s "http://$A/go/p?q=2" --data-binary gobody)"
        head -c 300000 /dev/urandom > big.bin
        curl -s --data-binary @big.bin http://$A/cgi/echo > big.out
        cmp big.bin big.out && echo "echo300k=same"
        echo "crash=$(code http://$A/cgi/crash)"
        echo "timeout=$(code http://$A/slow/sleep)"
        echo "jailed_processes=$(count_jailed)"
        echo "server: $(grep -E '^(Uid|CapEff)' /proc/$(cat main.pid)/status | tr -s '\t ' ' ' | tr '\n' ' ')"
        for c in /sys/fs/cgroup/xcgi-vms-*/vm*; do echo "limits: $(cat $c/memory.max) $(cat $c/pids.max)"; done | sort | uniq -c
        echo "within=$(curl -s "http://$A/cgi/alloc?64")"
        echo "oom=$(code "http://$A/oom/alloc?300")"
        echo "after_oom: $(curl -s http://$A/cgi/persist)"
        echo "logged=$(dmesg | grep -c 'type=1326')"
        dmesg | grep 'type=1326' | head -5
        echo "===end jail==="
{STOP_MAIN}"#
    );
    let r = lab(&script, &refs, Duration::from_secs(900));
    assert_eq!(r.code, 0, "{}", r.output);
    let j = section(&r.output, "jail");
    for want in [
        "PATH_INFO=/env/x",
        "body=[hello body]",
        "persist1: before=no created=yes",
        "persist2: before=no created=yes",
        "go: Hello from Go CGI! POST /go/p query=q=2 body=[gobody]",
        "echo300k=same",
        "crash=502",
        "timeout=504",
        // The prepared VM processes of /cgi, /sh and /go: 128 MiB guests, 1 vCPU.
        &format!("limits: {} 9", (128 + 48) << 20),
        "server: Uid: 65534 65534 65534 65534 CapEff: 0000000000000000",
        "within=touched 64 MiB",
        "oom=502",
        "after_oom: before=no created=yes",
        "logged=0",
    ] {
        assert!(j.contains(want), "{want} missing:\n{j}\n{}", r.output);
    }
    let n: usize = j
        .lines()
        .find_map(|l| l.strip_prefix("jailed_processes="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(n >= 1, "no jailed VM process:\n{j}");
    let log = section(&r.output, "log");
    assert!(
        log.contains("OOM killer") && log.contains("memory.max (128 MiB"),
        "the 502's log line does not say why:\n{log}"
    );
    // What a 128 MiB guest's VM process had charged at most (the measure behind
    // VM_OVERHEAD_MIB), from the debug lines of the reaped VM processes of /cgi.
    let peaks: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("VM process reaped"))
        .filter(|l| l.contains(&format!("memory_max={}", (128 + 48) << 20)))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("memory_peak="))
                .and_then(|v| v.parse().ok())
        })
        .collect();
    assert!(!peaks.is_empty(), "no memory_peak in the log:\n{log}");
    let max = peaks.iter().max().copied().unwrap_or(0);
    eprintln!(
        "VM process memory.peak, 128 MiB guests: max {:.1} MiB over {} VM processes",
        max as f64 / 1048576.0,
        peaks.len(),
    );
    assert!(
        max < (128 + 48) << 20,
        "a VM process came close to its memory.max"
    );
    let stop = section(&r.output, "stop");
    assert_eq!(rc(stop), 0, "{stop}");
    assert!(
        stop.contains("after: netns=[] taps=[0] vmms=0 workdirs=0 cgroups=0 jailed=0"),
        "nothing left:\n{stop}\n{}",
        r.output
    );
}

/// `[server] jail = true` in HTTP mode: the TAP goes to the jailed VM process over its
/// control socket; the guest's server answers; the NIC's RX thread runs under its filter
/// (log mode: nothing may be logged); nothing is left after SIGTERM.
#[test]
fn jailed_vm_processes_serve_http_mode() {
    let kernel = kernel();
    let http = example("http-hello/http-hello");
    let script = format!(
        r#"{PRELUDE}
        dmesg -c > /dev/null 2>&1
        export XCGI_SECCOMP=log
        cat > h.toml <<EOF
[server]
listen = "127.0.0.1:8083"
kernel = "$K"
concurrency = 2
jail = true
[network]
base = "172.16.0.0"
size = 4
prefill = 2
netns = "xcgi-jhttp"
[[route]]
prefix = "/"
mode = "http"
handler = "$HTTP"
port = 80
timeout_ms = 60000
EOF
        start_server h h.toml || exit 1
        A=127.0.0.1:8083
        echo "===http==="
        for i in 1 2; do echo "body$i=[$(curl -s http://$A/)]"; done
        echo "logged=$(dmesg | grep -c 'type=1326')"
        dmesg | grep 'type=1326' | head -5
        stop_server h
        echo "after: $(leftovers)"
        echo "===end http==="
        cat h.log
    "#
    );
    let r = lab(
        &script,
        &[(&kernel, "K"), (&http, "HTTP")],
        Duration::from_secs(600),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "http");
    for want in [
        "body1=[Hello from a fresh VM!]",
        "body2=[Hello from a fresh VM!]",
        "logged=0",
        "after: netns=[] taps=[0] vmms=0 workdirs=0 cgroups=0 jailed=0",
    ] {
        assert!(s.contains(want), "{want} missing:\n{s}\n{}", r.output);
    }
}
