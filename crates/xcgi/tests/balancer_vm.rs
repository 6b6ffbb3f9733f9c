//! xcgi behind HAProxy with VM isolation, in the lab (where this host has no hardware KVM):
//! two `xcgi serve` instances (CGI mode, one VM prepared ahead each) behind Debian's haproxy
//! with dist/haproxy.cfg, inside one lab session. A handful of requests spread over both
//! (per-instance counts from their metrics), then a rolling restart of both under a steady
//! load (one client, sequential requests: the lab has one CPU for every VM), with zero failed
//! requests. The load figures come from the native test with process isolation
//! (balancer.rs); each VM request takes about 2 s in the lab.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The instances' drain_delay_ms in the lab: HAProxy checks every 500 ms (fall 2), so it
/// needs (2 + 1) x 500 ms = 1.5 s to see readiness go false; the lab's one CPU, busy booting
/// VMs, delays its checks, hence the margin.
const DRAIN_DELAY_MS: u64 = 5000;

const SCRIPT: &str = r#"
    LB=127.0.0.1:8080; STATS=127.0.0.1:9000
    start_server() { # NAME GEN PORT
        cat > "$1.$2.toml" <<EOF
[server]
listen = "127.0.0.1:$3"
kernel = "$K"
concurrency = 2
queue_timeout_ms = 120000
drain_delay_ms = $DRAIN_DELAY_MS
drain_timeout_ms = 60000
[[route]]
prefix = "/cgi"
handler = "$CGI"
prepared = 1
timeout_ms = 120000
env = { INSTANCE = "$1.$2" }
EOF
        xcgi serve --config "$1.$2.toml" > "$1.$2.log" 2>&1 &
        echo $! > "$1.pid"
        w=0; while [ $w -lt 600 ]; do grep -q 'listening on' "$1.$2.log" && return 0; sleep 0.1; w=$((w+1)); done
        echo "server $1.$2 did not start"; cat "$1.$2.log"; return 1
    }
    code() { curl -s -m 10 -o /dev/null -w '%{http_code}' "$@"; }
    wait_ready() { # PORT: the VM pool filled once
        w=0; while [ "$(code http://127.0.0.1:$1/_xcgi/readyz)" != 200 ]; do
            w=$((w+1)); [ $w -gt 600 ] && { echo "not ready on $1"; return 1; }; sleep 0.1; done
    }
    lbstatus() { curl -s -m 5 "http://$STATS/stats;csv" | awk -F, -v s="$1" '$1=="xcgi" && $2==s {print $18}'; }
    lbfield() { # SERVER COLUMN-NAME
        curl -s -m 5 "http://$STATS/stats;csv" | awk -F, -v s="$1" -v f="$2" \
            'NR==1 {for (i=1;i<=NF;i++) {h=$i; sub(/^# /,"",h); c[h]=i}} $1=="xcgi" && $2==s {print $c[f]}'
    }
    wait_lb() { # SERVER STATUS
        w=0; while [ "$(lbstatus "$1")" != "$2" ]; do
            w=$((w+1)); [ $w -gt 600 ] && { echo "haproxy: $1 not $2 but $(lbstatus "$1")"; return 1; }; sleep 0.1; done
    }
    served() { curl -s -m 10 "http://127.0.0.1:$1/_xcgi/metrics" | grep '^xcgi_requests_total{status="200"} ' | cut -d' ' -f2; }
    now_ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
    # One client: sequential requests through haproxy until ./stop exists; a line per request.
    client() { # ID
        i=0
        while [ ! -e stop ]; do
            r=$(curl -s -m 100 -w '\nHTTP=%{http_code}' "http://$LB/cgi/env?n=$1-$i"); rc=$?
            inst=$(echo "$r" | sed -n 's/^INSTANCE=//p')
            if [ $rc = 0 ] && echo "$r" | grep -qx 'HTTP=200' && echo "$r" | grep -qx "QUERY_STRING=n=$1-$i" \
                && echo "$r" | grep -qx 'body=\[\]'; then
                echo "ok $inst"
            else
                echo "FAIL n=$1-$i curl=$rc $(echo "$r" | tail -n 1) at=$(now_ms)"
            fi
            i=$((i+1))
        done > "client$1.txt"
    }

    t0=$(now_ms)
    start_server xcgi1 1 8081 || exit 1
    start_server xcgi2 1 8082 || exit 1
    wait_ready 8081 && wait_ready 8082 || { cat xcgi*.log; exit 1; }
    echo "instances ready after $(( $(now_ms) - t0 )) ms"
    XCGI_LB_BIND=$LB XCGI_LB_STATS=$STATS XCGI_CHECK_INTER=500ms \
        XCGI_SERVER1=127.0.0.1:8081 XCGI_SERVER2=127.0.0.1:8082 \
        haproxy -db -f "$LBCFG" > lb.log 2>&1 &
    echo $! > lb.pid
    wait_lb xcgi1 UP && wait_lb xcgi2 UP || { cat lb.log; exit 1; }

    echo "===spread==="
    t=$(now_ms)
    for i in 1 2 3 4; do
        echo "req$i=$(curl -s -m 100 "http://$LB/cgi/env?n=s$i" | sed -n 's/^INSTANCE=//p')"
    done
    echo "spread_ms=$(( $(now_ms) - t ))"
    echo "metrics xcgi1=$(served 8081) xcgi2=$(served 8082)"
    echo "===end spread==="

    echo "===restart==="
    t=$(now_ms)
    client 1 & c1=$!
    sleep 2
    for s in xcgi1:8081 xcgi2:8082; do
        name=${s%:*}; port=${s#*:}
        ts=$(now_ms)
        kill -TERM $(cat $name.pid)
        # haproxy takes it out during drain_delay_ms, while it still accepts.
        w=0; while [ "$(lbstatus $name)" != DOWN ] && [ $w -lt 100 ]; do sleep 0.1; w=$((w+1)); done
        down=$(( $(now_ms) - ts ))
        wait $(cat $name.pid); rc=$?
        echo "$name.1: SIGTERM, haproxy $(lbstatus $name) after ${down} ms, exit rc=$rc after $(( $(now_ms) - ts )) ms"
        start_server $name 2 $port || exit 1
        wait_lb $name UP || { cat lb.log; exit 1; }
        echo "$name.2: UP after $(( $(now_ms) - ts )) ms from the SIGTERM"
    done
    # Until both new instances have answered (at most 60 s more).
    tw=$(now_ms)
    until grep -q 'ok xcgi1.2' client1.txt && grep -q 'ok xcgi2.2' client1.txt; do
        [ $(( $(now_ms) - tw )) -gt 60000 ] && break; sleep 0.5; done
    touch stop
    wait $c1
    echo "restart_ms=$(( $(now_ms) - t ))"
    sort client1.txt | uniq -c
    echo "requests=$(wc -l < client1.txt) failed=$(grep -c FAIL client1.txt)"
    echo "retries=$(lbfield xcgi1 wretr)+$(lbfield xcgi2 wretr) redispatches=$(lbfield xcgi1 wredis)+$(lbfield xcgi2 wredis)"
    echo "===end restart==="
    kill $(cat lb.pid); wait $(cat lb.pid) 2>/dev/null
    for n in xcgi1 xcgi2; do kill -TERM $(cat $n.pid); wait $(cat $n.pid); echo "$n.2 stop rc=$?"; done
    echo "===logs==="; tail -n 5 xcgi*.log; grep -v ' 200 ' lb.log | tail -n 20; echo "===end logs==="
"#;

#[test]
fn two_vm_instances_behind_haproxy_spread_and_restart_without_failures() {
    let kernel = kernel();
    let cgi = example("cgi-c/cgi");
    let cfg = workspace().join("dist/haproxy.cfg");
    let haproxy = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("haproxy missing: scripts/setup.sh installs Debian's");
    let t = Instant::now();
    // One lab CPU (see serve_vm.rs: two soft-locked the lab's kernel), 2 GiB.
    let script = format!("DRAIN_DELAY_MS={DRAIN_DELAY_MS}\n{SCRIPT}");
    let r = run_script_with_binaries(
        &script,
        &[(&kernel, "K"), (&cgi, "CGI"), (&cfg, "LBCFG")],
        &[(haproxy, "haproxy")],
        Duration::from_secs(600),
        2048,
        1,
    );
    let wall = t.elapsed();
    println!("balancer_vm: lab session {:.0} s", wall.as_secs_f64());
    assert_eq!(r.code, 0, "{}", r.output);

    let s = section(&r.output, "spread");
    let answered: Vec<&str> = s
        .lines()
        .filter_map(|l| l.split_once('=').filter(|(k, _)| k.starts_with("req")))
        .map(|(_, v)| v.trim())
        .collect();
    assert_eq!(answered.len(), 4, "{s}");
    for inst in ["xcgi1.1", "xcgi2.1"] {
        assert!(
            answered.contains(&inst),
            "{inst} answered none of the 4:\n{s}"
        );
    }
    // Each instance's own count of 200s is what it answered (health checks not counted).
    let metrics = s
        .lines()
        .find_map(|l| l.strip_prefix("metrics "))
        .unwrap_or_else(|| panic!("{s}"));
    let count = |i: &str| answered.iter().filter(|a| **a == i).count();
    assert_eq!(
        metrics.trim(),
        format!("xcgi1={} xcgi2={}", count("xcgi1.1"), count("xcgi2.1")),
        "{s}"
    );

    let s = section(&r.output, "restart");
    assert!(
        s.contains("failed=0"),
        "requests failed:\n{s}\n{}",
        r.output
    );
    // xcgi2.1 carried the load while xcgi1 restarted; both new instances took it over.
    for inst in ["xcgi2.1", "xcgi1.2", "xcgi2.2"] {
        assert!(
            s.lines().any(|l| l.trim().ends_with(&format!("ok {inst}"))),
            "{inst} answered nothing under the load:\n{s}"
        );
    }
    for n in ["xcgi1", "xcgi2"] {
        let line = s
            .lines()
            .find(|l| l.starts_with(&format!("{n}.1: SIGTERM")))
            .unwrap_or_else(|| panic!("{s}"));
        let down_ms: u64 = line
            .split_once("haproxy DOWN after ")
            .and_then(|(_, r)| r.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("haproxy did not take {n} out: {line}\n{s}"));
        assert!(
            down_ms < DRAIN_DELAY_MS,
            "haproxy took {n} out only after {down_ms} ms, after its drain delay: {line}"
        );
        assert!(line.contains("exit rc=0"), "{n}.1 did not exit 0: {line}");
    }
    for n in ["xcgi1.2", "xcgi2.2"] {
        assert!(r.output.contains(&format!("{n} stop rc=0")), "{}", r.output);
    }
}
