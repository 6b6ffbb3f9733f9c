//! `xcgi serve` as a service (docs/deploy.md): health and readiness under the reserved
//! prefix and on an admin listener, metrics that no longer shadow a route, readiness that
//! goes false first on SIGTERM, SO_REUSEPORT for a new instance beside the old one, sd_notify
//! (READY=1 only once the pool of prepared VMs is full; STOPPING=1) and systemd socket
//! activation. Real curl, real systemd tools, on this host (VM pools are built here: this
//! host's /dev/kvm runs every setup call; nothing boots).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::served::*;
use common::*;

fn cgi_c() -> PathBuf {
    example("cgi-c/cgi")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The server's exit code, waiting for it at most 10 s after `since`.
fn exit_code(s: &mut Served, since: Instant) -> Option<i32> {
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            return st.code();
        }
        assert!(since.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

#[test]
fn health_endpoints_are_reserved_and_metrics_no_longer_shadow_a_route() {
    let s = Served::start("", &route("/", &cgi_c(), ""));
    assert_eq!(curl(&[&s.url("/_xcgi/healthz")]), ("ok\n".into(), 200));
    assert!(wait_until(Duration::from_secs(5), || curl(&[
        &s.url("/_xcgi/readyz")
    ])
    .1 == 200));
    assert_eq!(curl(&[&s.url("/_xcgi/readyz")]).0, "ready\n");
    // A route `/` serves /metrics: the handler answers, not the server.
    let (body, code) = curl(&[&s.url("/metrics")]);
    assert_eq!(code, 200);
    assert!(body.starts_with("Hello from CGI"), "{body}");
    // Normalised before the check: the reserved prefix is reached however it is spelled, and
    // nothing under it reaches a route.
    assert_eq!(
        curl(&["--path-as-is", &s.url("/x/../_xcgi/readyz")]).0,
        "ready\n"
    );
    assert_eq!(curl(&[&s.url("/_xcgi/nope")]).1, 404);
    assert_eq!(curl(&[&s.url("/_xcgi")]).1, 404);
    assert_eq!(curl(&["-X", "POST", &s.url("/_xcgi/readyz")]).1, 405);
    let (m, code) = curl(&[&s.url("/_xcgi/metrics")]);
    assert_eq!(code, 200);
    assert!(
        m.contains("xcgi_ready 1") && m.contains("xcgi_draining 0"),
        "{m}"
    );
    // Only the one routed request is counted; health checks and scrapes are not requests.
    assert!(m.contains("xcgi_requests_total{status=\"200\"} 1\n"), "{m}");
    assert_eq!(s.stop(), 0);
}

#[test]
fn a_route_under_the_reserved_prefix_is_refused_at_start() {
    let err = serve_refuses(&format!(
        "[server]\nisolation = \"process\"\n{}",
        route("/_xcgi/app", &cgi_c(), "")
    ));
    assert!(
        err.contains("route[0]") && err.contains("reserved admin prefix"),
        "{err}"
    );
}

#[test]
fn an_admin_listener_takes_metrics_off_the_serving_port() {
    let admin = format!("127.0.0.1:{}", free_port());
    let s = Served::start(
        &format!("admin_listen = \"{admin}\"\nadmin_prefix = \"/-/x\""),
        &route("/", &cgi_c(), ""),
    );
    // The log is read on a thread of its own: wait for the line rather than race it.
    let want = format!("admin on http://{admin}");
    assert!(
        s.wait_log_line(Duration::from_secs(5), |l| l.contains(&want))
            .is_some(),
        "{}",
        s.log()
    );
    let (m, code) = curl(&[&format!("http://{admin}/metrics")]);
    assert_eq!(code, 200);
    assert!(m.contains("# TYPE xcgi_requests_total counter"), "{m}");
    assert_eq!(curl(&[&format!("http://{admin}/healthz")]).1, 200);
    assert!(wait_until(Duration::from_secs(5), || {
        curl(&[&format!("http://{admin}/readyz")]).1 == 200
    }));
    assert_eq!(curl(&[&format!("http://{admin}/")]).1, 404);
    // The serving port: probes under the configured prefix, no metrics.
    assert_eq!(curl(&[&s.url("/-/x/readyz")]).0, "ready\n");
    assert_eq!(curl(&[&s.url("/-/x/metrics")]).1, 404);
    assert!(curl(&[&s.url("/_xcgi/metrics")])
        .0
        .starts_with("Hello from CGI"));
    assert_eq!(s.stop(), 0);
}

/// SIGTERM: readiness is false at once, while the server still takes and answers new
/// requests for drain_delay_ms (so a balancer's check sees it leave first); then it stops
/// accepting, finishes, and exits 0.
#[test]
fn sigterm_turns_readiness_false_first_and_still_serves_for_the_drain_delay() {
    let s = Served::start("drain_delay_ms = 1500", &route("/", &cgi_c(), ""));
    assert!(wait_until(Duration::from_secs(5), || curl(&[
        &s.url("/_xcgi/readyz")
    ])
    .1 == 200));
    let t = Instant::now();
    sigterm(s.pid());
    assert!(
        wait_until(Duration::from_millis(500), || curl(&[
            &s.url("/_xcgi/readyz")
        ])
        .1 == 503),
        "readiness did not go false within 0.5 s of SIGTERM\n{}",
        s.log_tail(20)
    );
    assert_eq!(curl(&[&s.url("/_xcgi/readyz")]).0, "not ready: draining\n");
    assert_eq!(s.metric("xcgi_draining"), Some(1));
    assert_eq!(s.metric("xcgi_ready"), Some(0));
    // New connections are still served during the delay.
    let mut served = 0;
    while t.elapsed() < Duration::from_millis(1200) {
        let (body, code) = curl(&["-m", "5", &s.url("/hello")]);
        assert_eq!(code, 200, "a request during the drain delay failed: {body}");
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served >= 5, "{served}");
    let mut s = s;
    assert_eq!(exit_code(&mut s, t), Some(0));
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "exited before drain_delay_ms: {:?}",
        t.elapsed()
    );
}

/// SIGUSR1 (handover: a new instance already serves beside this one): the drain delay is
/// skipped, accepting stops at once, a request in flight still finishes, exit 0.
#[test]
fn sigusr1_hands_over_without_the_drain_delay() {
    let s = Served::start("drain_delay_ms = 5000", &route("/", &cgi_c(), ""));
    assert!(wait_until(Duration::from_secs(5), || curl(&[
        &s.url("/_xcgi/readyz")
    ])
    .1 == 200));
    let url = s.url("/stream");
    let streaming = std::thread::spawn(move || curl(&["-N", &url]));
    std::thread::sleep(Duration::from_millis(150));
    let t = Instant::now();
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(s.pid() as i32, libc::SIGUSR1) };
    assert!(
        wait_until(Duration::from_secs(2), || curl(&["-m", "1", &s.url("/")]).1
            == 0),
        "still accepting 2 s after SIGUSR1 (the 5 s drain delay was not skipped)\n{}",
        s.log_tail(20)
    );
    let (body, code) = streaming.join().unwrap();
    assert_eq!(code, 200, "{body}");
    let mut s = s;
    assert_eq!(exit_code(&mut s, t), Some(0));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(s.log().contains("SIGUSR1: handing over"), "{}", s.log());
}

/// Without reuse_port a second server on the same port is refused, saying what to do; with
/// it, a new instance binds beside the old one and takes over when the old one stops.
#[test]
fn reuse_port_lets_a_new_instance_bind_beside_the_old_one() {
    let port = free_port();
    let server = |reuse: bool| format!("listen = \"127.0.0.1:{port}\"\nreuse_port = {reuse}");
    let old = Served::start(&server(true), &route("/", &cgi_c(), ""));
    // Not asked for: refused with a hint.
    let err = serve_refuses(&format!(
        "[server]\nisolation = \"process\"\n{}\n{}",
        server(false),
        route("/", &cgi_c(), "")
    ));
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")) && err.contains("reuse_port"),
        "{err}"
    );
    // Asked for: both listen; then the old one goes and every request still succeeds.
    let new = Served::start(&server(true), &route("/", &cgi_c(), ""));
    assert_eq!(new.addr, old.addr);
    let old_pid = old.pid();
    for _ in 0..20 {
        assert_eq!(curl(&[&new.url("/")]).1, 200);
    }
    assert_eq!(old.stop(), 0);
    for _ in 0..20 {
        assert_eq!(curl(&[&new.url("/")]).1, 200);
    }
    assert!(
        new.metric("xcgi_requests_total{status=\"200\"}")
            .unwrap_or(0)
            >= 20
    );
    assert_ne!(new.pid(), old_pid);
    assert_eq!(new.stop(), 0);
}

/// With $NOTIFY_SOCKET, READY=1 comes once the pool of VMs prepared ahead is full (and not
/// before), and STOPPING=1 at SIGTERM.
#[test]
fn sd_notify_says_ready_when_the_pool_is_full_and_stopping_at_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let server = format!(
        "isolation = \"vm\"\nkernel = \"{}\"\ninit = \"{}\"",
        kernel().display(),
        xcgi_init().display()
    );
    let launch = Launch {
        env: vec![("NOTIFY_SOCKET".into(), sock_path.display().to_string())],
        ..Launch::default()
    };
    let s = Served::start_with(&server, &route("/", &cgi_c(), "prepared = 3"), &launch);
    let mut buf = [0u8; 512];
    let ready = loop {
        let n = sock.recv(&mut buf).expect("no READY=1 within 20 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("READY=1") {
            break msg;
        }
    };
    // Sent only once ready: the pool is already full.
    assert!(ready.contains("STATUS=ready"), "{ready}");
    assert_eq!(s.metric("xcgi_vms_prepared"), Some(3), "{ready}");
    assert_eq!(curl(&[&s.url("/_xcgi/readyz")]).0, "ready\n");
    sigterm(s.pid());
    let stopping = loop {
        let n = sock
            .recv(&mut buf)
            .expect("no STOPPING=1 within 20 s of SIGTERM");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("STOPPING=1") {
            break msg;
        }
    };
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    let mut s = s;
    assert!(wait_until(Duration::from_secs(10), || s
        .child
        .try_wait()
        .unwrap()
        .is_some()));
}

/// Socket activation: systemd's own `systemd-socket-activate` binds the port and passes it
/// (LISTEN_FDS, named "http") once a first connection arrives; the server serves on that
/// socket (not on its `listen`), and the connection made before it started is answered.
#[test]
fn socket_activation_serves_on_the_passed_socket() {
    use std::io::{BufRead, BufReader};
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("x.toml");
    // `listen` names port 1 (privileged, unusable here): only the passed socket can work.
    std::fs::write(
        &cfg,
        format!(
            "[server]\nisolation = \"process\"\nlisten = \"127.0.0.1:1\"\n{}",
            route("/", &cgi_c(), "")
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        Command::new("systemd-socket-activate")
            .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=http"])
            .arg(xcgi())
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("systemd-socket-activate (Debian's systemd package, scripts/setup.sh)"),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let wait_for = |what: &str, log: &mut String| loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => {
                log.push_str(&l);
                log.push('\n');
                if l.contains(what) {
                    return;
                }
            }
            Err(_) => panic!("no line with {what:?} within 20 s:\n{log}"),
        }
    };
    wait_for(&format!("Listening on 127.0.0.1:{port}"), &mut log);
    // The first connection starts the server; it is queued on the socket meanwhile.
    let url = format!("http://127.0.0.1:{port}");
    let (body, code) = curl(&["-m", "20", &format!("{url}/hi")]);
    assert_eq!(code, 200, "{body}\n{log}");
    assert!(body.starts_with("Hello from CGI"), "{body}");
    wait_for(&format!("listening on http://127.0.0.1:{port} "), &mut log);
    // The variables that named the socket are not handed down to handlers.
    let (env, code) = curl(&[&format!("{url}/env")]);
    assert_eq!(code, 200, "{env}");
    assert!(
        env.contains("SCRIPT_NAME=") && !env.contains("LISTEN_"),
        "{env}"
    );
    sigterm(child.0.id());
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
}

/// A child killed if the test fails before it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// HTTP-mode VMs that fail (their guest exits before listening; here, where nothing boots,
/// never gets that far) give their TAP back usable: after 50 of them, 4 at a time, the pool
/// of 4 is whole, no slot is stuck behind a TAP that outlived its VM, nothing was logged
/// about one, and the next request still gets a slot (issue 15).
#[test]
fn fifty_failed_http_mode_vms_leave_the_tap_pool_whole() {
    let server = format!(
        "isolation = \"vm\"\nkernel = \"{}\"\ninit = \"{}\"\nconcurrency = 4\n\
         [network]\nbase = \"172.16.8.0\"\nsize = 4\nprefill = 2",
        kernel().display(),
        xcgi_init().display()
    );
    let hello = example("hello-c.ext4");
    let s = Served::start(
        &server,
        &route("/", &hello, "mode = \"http\"\nport = 80\ntimeout_ms = 300"),
    );
    let failed = |n: usize| {
        let url = s.url("/");
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || curl(&["-m", "10", &url]).1)
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<u16>>()
    };
    for _ in 0..50 / 4 + 1 {
        let codes = failed(4);
        // 502: the guest ended before it listened; 504: it did not accept in time. Never 503
        // (no network slot left).
        assert!(
            codes.iter().all(|c| *c == 502 || *c == 504),
            "{codes:?}\n{}",
            s.log_tail(20)
        );
    }
    let slots = |state: &str| s.metric(&format!("xcgi_tap_slots{{state=\"{state}\"}}"));
    assert!(
        wait_until(Duration::from_secs(10), || slots("leased") == Some(0)
            && slots("returning") == Some(0)),
        "{:?} {:?}",
        slots("leased"),
        slots("returning")
    );
    assert_eq!(slots("stuck"), Some(0), "{}", s.log_tail(20));
    assert_eq!(
        slots("ready").unwrap_or(0) + slots("free").unwrap_or(0),
        4,
        "{}",
        s.log_tail(20)
    );
    assert!(!s.log().contains("still exists"), "{}", s.log());
    assert!(matches!(failed(1)[..], [502] | [504]));
    assert_eq!(s.stop(), 0);
}
