//! `xcgi serve --isolation process` on this host, with real curl: the CGI/1.1 layer, limits,
//! errors, streaming, draining and metrics. The same server code paths serve VMs; the VM side
//! (guest init, channel, one VM per request) is tested in serve_vm.rs.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::served::*;
use common::*;

fn cgi_c() -> PathBuf {
    example("cgi-c/cgi")
}

#[test]
fn cgi_environment_body_status_headers_and_redirects() {
    let s = Served::start(
        "",
        &route(
            "/cgi",
            &cgi_c(),
            "env = { GREETING = \"hi\" }\nmax_body = 4000000",
        ),
    );
    let (body, code) = curl(&[
        &s.url("/cgi/env/more?a=1&b=two"),
        "-H",
        "X-Custom: yes",
        "-H",
        "Content-Type: text/x-test",
        "-u",
        "alice:pw",
        "--data-binary",
        "hello body",
    ]);
    assert_eq!(code, 200, "{body}");
    for want in [
        "GATEWAY_INTERFACE=CGI/1.1",
        "SERVER_PROTOCOL=HTTP/1.1",
        "SERVER_SOFTWARE=xcgi/",
        "SERVER_NAME=127.0.0.1",
        &format!("SERVER_PORT={}", s.addr.rsplit(':').next().unwrap()),
        "REQUEST_METHOD=POST",
        "SCRIPT_NAME=/cgi",
        "PATH_INFO=/env/more",
        "PATH_TRANSLATED=/env/more",
        "QUERY_STRING=a=1&b=two",
        "REMOTE_ADDR=127.0.0.1",
        "REMOTE_HOST=127.0.0.1",
        "CONTENT_LENGTH=10",
        "CONTENT_TYPE=text/x-test",
        "HTTP_X_CUSTOM=yes",
        "HTTP_USER_AGENT=curl/",
        "GREETING=hi",
        "body=[hello body]",
    ] {
        assert!(body.contains(want), "{want} missing from:\n{body}");
    }
    // The server authenticates nobody: unverified Basic credentials are no identity.
    for absent in ["HTTP_AUTHORIZATION", "REMOTE_USER", "AUTH_TYPE"] {
        assert!(!body.contains(absent), "{absent} in:\n{body}");
    }
    // HEAD: the head only, logged as a complete request (not as a client that went away).
    let out = Command::new("curl")
        .args(["-s", "-I", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(s.url("/cgi/env"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let t = Instant::now();
    while !s.log().contains("method=HEAD") && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let head_line = s
        .log()
        .lines()
        .find(|l| l.contains("method=HEAD"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        head_line.contains("status=200") && !head_line.contains("went away"),
        "HEAD logged as: {head_line:?}"
    );
    // PATH_INFO /env/more is not /env: the program greets. Ask /env itself for the rest.
    let (body, _) = curl(&[&s.url("/cgi/env")]);
    assert!(body.contains("PATH_INFO=/env\n"), "{body}");
    assert!(
        !body.contains("CONTENT_LENGTH"),
        "no body, no CONTENT_LENGTH:\n{body}"
    );

    // A 3 MB body through the handler and back, byte for byte (streamed both ways).
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    let out = Command::new("curl")
        .args(["-s", "--data-binary"])
        .arg(format!("@{}", big.display()))
        .arg(s.url("/cgi/echo"))
        .output()
        .unwrap();
    assert!(
        out.stdout == data,
        "echoed {} bytes, sent {}",
        out.stdout.len(),
        data.len()
    );

    // Status and extra headers.
    let out = Command::new("curl")
        .args(["-s", "-i"])
        .arg(s.url("/cgi/status"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 418"), "{text}");
    assert!(text.to_lowercase().contains("x-handler: cgi-c"), "{text}");
    assert!(text.ends_with("short and stout\n"), "{text}");
    // Client redirect: 302 with the Location.
    let out = Command::new("curl")
        .args(["-s", "-i"])
        .arg(s.url("/cgi/client"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 302"), "{text}");
    assert!(
        text.contains("location: http://example.org/elsewhere"),
        "{text}"
    );
    // Local redirect: the server serves the new path itself, as a GET.
    let (body, code) = curl(&[&s.url("/cgi/local"), "-d", "ignored"]);
    assert_eq!(code, 200);
    assert!(body.contains("QUERY_STRING=via=local"), "{body}");
    assert!(body.contains("REQUEST_METHOD=GET"), "{body}");
    assert!(body.contains("PATH_INFO=/env"), "{body}");
    assert_eq!(s.stop(), 0);
}

#[test]
fn streamed_response_arrives_as_it_is_written() {
    let s = Served::start("", &route("/cgi", &cgi_c(), ""));
    let script = format!(
        "curl -sN {} | while read -r l; do echo \"$(date +%s%N) $l\"; done",
        s.url("/cgi/stream")
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let stamps: Vec<u128> = text
        .lines()
        .filter(|l| l.contains("tick"))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(stamps.len(), 5, "{text}");
    let spread_ms = (stamps[4] - stamps[0]) / 1_000_000;
    assert!(
        spread_ms >= 900,
        "the ticks came {spread_ms} ms apart in all: buffered, not streamed:\n{text}"
    );
}

#[test]
fn failures_map_to_502_504_413_404_and_the_log_says_why() {
    let s = Served::start(
        "",
        &route("/cgi", &cgi_c(), "timeout_ms = 1500\nmax_body = 1000"),
    );
    assert_eq!(curl(&[&s.url("/cgi/crash")]).1, 502);
    assert_eq!(curl(&[&s.url("/cgi/garbage")]).1, 502);
    let t = Instant::now();
    assert_eq!(curl(&[&s.url("/cgi/sleep")]).1, 504);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let big = "x".repeat(5000);
    assert_eq!(curl(&[&s.url("/cgi/echo"), "--data-binary", &big]).1, 413);
    // Chunked (no Content-Length) over the limit: 413 too; under it: served, with CONTENT_LENGTH.
    assert_eq!(
        curl(&[
            &s.url("/cgi/echo"),
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &big
        ])
        .1,
        413
    );
    let (body, code) = curl(&[
        &s.url("/cgi/env"),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "small",
    ]);
    assert_eq!(code, 200);
    assert!(
        body.contains("CONTENT_LENGTH=5") && body.contains("body=[small]"),
        "{body}"
    );
    assert_eq!(curl(&[&s.url("/nothing-here")]).1, 404);
    std::thread::sleep(Duration::from_millis(300));
    let log = s.log();
    assert!(
        log.contains("crashing on purpose"),
        "stderr in the log line:\n{log}"
    );
    assert!(log.contains("malformed header line"), "{log}");
    assert!(log.contains("timeout"), "{log}");
    // Nothing left running: the sleeping handler was killed.
    assert_eq!(count_handlers(&s), 0);
    assert_eq!(s.stop(), 0);
}

#[test]
fn queue_overflow_gives_503_and_a_client_that_leaves_gets_its_handler_killed() {
    let s = Served::start(
        "concurrency = 1\nqueue = 1\nqueue_timeout_ms = 10000",
        &route("/cgi", &cgi_c(), "timeout_ms = 2500"),
    );
    // One request holds the only slot for 2.5 s, one waits in the queue, the rest get 503.
    let first = {
        let url = s.url("/cgi/sleep");
        std::thread::spawn(move || curl(&[&url]).1)
    };
    std::thread::sleep(Duration::from_millis(300));
    let others: Vec<_> = (0..3)
        .map(|_| {
            let url = s.url("/cgi/sleep");
            std::thread::spawn(move || curl(&[&url]).1)
        })
        .collect();
    let mut codes: Vec<u16> = others.into_iter().map(|h| h.join().unwrap()).collect();
    codes.push(first.join().unwrap());
    codes.sort();
    assert_eq!(codes, vec![503, 503, 504, 504], "{}", s.log());

    // A client that gives up: its handler goes at once, long before the route's timeout.
    let before = count_handlers(&s);
    assert_eq!(before, 0);
    let (_, code) = curl(&["-m", "1", &s.url("/cgi/sleep")]);
    assert_eq!(code, 0, "curl gave up (timeout)");
    let t = Instant::now();
    while count_handlers(&s) > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "handler still running after its client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.stop(), 0);
}

#[test]
fn many_requests_sequential_and_concurrent_all_correct_nothing_leaks() {
    let s = Served::start(
        "concurrency = 8\nqueue = 64",
        &format!(
            "{}{}{}",
            route("/cgi", &cgi_c(), ""),
            route("/sh", &example("cgi-sh/hello.sh"), ""),
            route("/go", &example("cgi-go/cgi-go"), "")
        ),
    );
    // Warm up, then count the server's fds.
    assert_eq!(curl(&[&s.url("/cgi")]).1, 200);
    std::thread::sleep(Duration::from_millis(300));
    let fds = fd_count(s.pid());
    for i in 0..100 {
        let (body, code) = curl(&[&s.url(&format!("/cgi/env?n={i}"))]);
        assert_eq!(code, 200);
        assert!(body.contains(&format!("QUERY_STRING=n={i}\n")), "{body}");
    }
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let url = s.url(&format!("/cgi/env?c={i}"));
            std::thread::spawn(move || (i, curl(&[&url])))
        })
        .collect();
    for h in handles {
        let (i, (body, code)) = h.join().unwrap();
        assert_eq!(code, 200);
        assert!(body.contains(&format!("QUERY_STRING=c={i}\n")), "{body}");
    }
    let (body, code) = curl(&[&s.url("/sh?x=1"), "--data-binary", "abc"]);
    assert_eq!(code, 200);
    assert!(
        body.contains("Hello from busybox sh! method=POST query=x=1"),
        "{body}"
    );
    assert!(body.contains("body=[abc]"), "{body}");
    let (body, code) = curl(&[&s.url("/go/p?q=2"), "--data-binary", "gobody"]);
    assert_eq!(code, 200);
    assert!(
        body.contains("Hello from Go CGI! POST /go/p query=q=2 body=[gobody]"),
        "{body}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fd_count(s.pid()), fds, "the server's fd count grew");
    assert_eq!(count_handlers(&s), 0);
    let (metrics, code) = curl(&[&s.url("/_xcgi/metrics")]);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("xcgi_requests_total{status=\"200\"} 123"),
        "{metrics}"
    );
    assert!(
        metrics.contains("xcgi_request_duration_seconds_count 123"),
        "{metrics}"
    );
    assert!(metrics.contains("xcgi_queue_depth 0"), "{metrics}");
    let log = s.log();
    assert!(
        log.contains("route=/cgi") && log.contains("status=200") && log.contains("total_ms="),
        "{log}"
    );
    assert_eq!(s.stop(), 0);
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let s = Served::start("", &route("/cgi", &cgi_c(), ""));
    let url = s.url("/cgi/stream");
    let streaming = std::thread::spawn(move || curl(&["-N", &url]));
    std::thread::sleep(Duration::from_millis(300));
    let addr = s.addr.clone();
    let code = s.stop();
    let (body, status) = streaming.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body.matches("tick").count(),
        5,
        "the in-flight response was cut:\n{body}"
    );
    assert_eq!(code, 0);
    assert_eq!(
        curl(&[&format!("http://{addr}/cgi")]).1,
        0,
        "still accepting after exit"
    );
}

#[test]
fn bad_configuration_is_refused_with_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[route]]\nprefix = \"/x\"\nhandler = \"{}\"\nmemory_mib = 8\n",
            cgi_c().display()
        ),
    )
    .unwrap();
    let out = Command::new(xcgi())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("memory_mib") && err.contains("at least 32"),
        "{err}"
    );
    std::fs::write(
        &cfg,
        "[[route]]\nprefix = \"/x\"\nhandler = \"/nonexistent\"\n",
    )
    .unwrap();
    let out = Command::new(xcgi())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("route[0]") && err.contains("handler") && err.contains("/nonexistent"),
        "{err}"
    );
}

/// KVM fds (VMs, vCPUs) the server holds: (VMs, vCPUs).
fn kvm_fds(pid: u32) -> (usize, usize) {
    let mut n = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let link = std::fs::read_link(e.path()).unwrap_or_default();
        match link.to_string_lossy().as_ref() {
            "anon_inode:kvm-vm" => n.0 += 1,
            l if l.starts_with("anon_inode:kvm-vcpu") => n.1 += 1,
            _ => {}
        }
    }
    n
}

/// VM isolation builds VMs ahead for each route (this host's /dev/kvm runs every setup call;
/// booting is the lab's job, serve_vm.rs): the pool fills to each route's `prepared`, holds
/// exactly that many VMs and vCPUs, and releases them all when the server stops. With the
/// jail (the default) each prepared VM is in a VM process of its own, started by the
/// server's jail helper, and the server holds none; with `jail = false` the server holds them.
#[test]
fn vm_routes_keep_their_prepared_vms_and_release_them_on_exit() {
    let kernel = kernel();
    for jail in [true, false] {
        let server = format!(
            "isolation = \"vm\"\nkernel = \"{}\"\ninit = \"{}\"\njail = {jail}",
            kernel.display(),
            xcgi_init().display()
        );
        // No `start`: on this host (PVM, no template can boot) the routes boot, saying so.
        let routes = route("/a", &cgi_c(), "prepared = 3\nmemory_mib = 64")
            + &route("/b", &cgi_c(), "prepared = 0")
            + &route("/c", &cgi_c(), "");
        let s = Served::start(&server, &routes);
        if xcgi_vmm::hypervisor::kvm::host_is_pvm() {
            assert!(
                s.log().contains("cannot boot a template"),
                "the default start's fallback is logged:\n{}",
                s.log()
            );
        }
        let metric = |name: &str| -> Option<i64> {
            let (body, _) = curl(&[&s.url("/_xcgi/metrics")]);
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        };
        let t = Instant::now();
        while metric("xcgi_vms_prepared") != Some(5) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "pool never filled (3 for /a, 2 by default for /c): {:?}\n{}",
                metric("xcgi_vms_prepared"),
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // And stays there: nothing is prepared beyond the target.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(metric("xcgi_vms_prepared"), Some(5));
        let vm_processes = vm_processes_of(s.pid());
        let held = vm_processes
            .iter()
            .map(|&p| kvm_fds(p))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        if jail {
            assert_eq!(vm_processes.len(), 5, "one VM process per prepared VM");
            assert_eq!(held, (5, 5), "one VM and one vCPU in each");
            assert_eq!(kvm_fds(s.pid()), (0, 0), "the jailed server holds no VM");
        } else {
            assert!(vm_processes.is_empty(), "VM processes with jail = false");
            assert_eq!(
                kvm_fds(s.pid()),
                (5, 5),
                "one VM and one vCPU per prepared VM"
            );
        }
        assert_eq!(metric("xcgi_vms_started_total"), Some(0));
        assert_eq!(s.stop(), 0);
        for p in vm_processes {
            assert!(
                !std::path::Path::new(&format!("/proc/{p}")).exists(),
                "VM process {p} outlived the server"
            );
        }
    }
}

/// The VM processes of server `pid`: the children of its jail helper.
fn vm_processes_of(pid: u32) -> Vec<u32> {
    let children = |p: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect()
    };
    children(pid)
        .into_iter()
        .filter(|&c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|l| l.split(|&b| b == 0).any(|a| a == b"jail-helper"))
        })
        .flat_map(children)
        .collect()
}
