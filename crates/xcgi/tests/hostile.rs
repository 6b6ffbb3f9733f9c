//! Hostile clients and handlers against `xcgi serve --isolation process` on this host (issue
//! 10): real curl and raw sockets that never read, never finish, flood or lie; handlers that
//! fork, forge log lines or answer with odd statuses. Every test is bounded in time (socket
//! and curl timeouts) and leaves nothing running.
//!
//! Handlers run as `nobody`: every handler here lives in a 0755 temp directory and writes
//! only into a 0777 one.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::example;
use common::served::*;

const SEC: Duration = Duration::from_secs(1);

/// A handler that prints its environment.
const ENV_DUMP: &str = "printf 'Content-Type: text/plain\\r\\n\\r\\n'\nenv\n";

/// A 0755 temp directory for handlers (they run as `nobody`).
struct Handlers {
    dir: tempfile::TempDir,
}

impl Handlers {
    fn new() -> Handlers {
        let dir = tempfile::Builder::new()
            .prefix("xcgi-hostile-")
            .tempdir()
            .unwrap();
        chmod(dir.path(), 0o755);
        Handlers { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `#!/bin/sh` handler with `body`.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
        chmod(&p, 0o755);
        p
    }

    /// A copy of examples/cgi-c (see its PATH_INFO commands).
    fn cgi_c(&self) -> PathBuf {
        let p = self.path().join("cgi-c");
        if !p.exists() {
            std::fs::copy(example("cgi-c/cgi"), &p).unwrap();
            chmod(&p, 0o755);
        }
        p
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs its closure when dropped (cleanup that must happen when an assertion fails too).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn connect(addr: &str) -> TcpStream {
    let a: SocketAddr = addr.parse().unwrap();
    let c = TcpStream::connect_timeout(&a, 2 * SEC).expect("connect to the server");
    c.set_read_timeout(Some(5 * SEC)).unwrap();
    c.set_write_timeout(Some(5 * SEC)).unwrap();
    c
}

/// A connection whose receive buffer is as small as the kernel allows: a client that
/// barely reads (see [`common::served::connect_small_rcvbuf`]).
fn connect_small_rcvbuf(addr: &str) -> TcpStream {
    let a: SocketAddr = addr.parse().unwrap();
    common::served::connect_small_rcvbuf(a).unwrap_or_else(|e| panic!("{e}"))
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The condition held.
    Done,
    /// EOF or an error (reset): the server closed the connection.
    Closed,
    /// Time ran out with the connection still open.
    Open,
}

struct Got {
    /// What was read (the first 1 MiB).
    bytes: Vec<u8>,
    total: usize,
    end: End,
    took: Duration,
}

impl Got {
    fn text(&self) -> String {
        let t = String::from_utf8_lossy(&self.bytes);
        t.chars().take(300).collect()
    }

    fn status(&self) -> Option<u16> {
        let t = String::from_utf8_lossy(&self.bytes);
        t.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }
}

/// Reads from `c` until `done` holds for what was read, the connection closes, or `within`
/// passes.
fn read_until(c: &mut TcpStream, within: Duration, done: impl Fn(&[u8]) -> bool) -> Got {
    const KEEP: usize = 1 << 20;
    let t = Instant::now();
    let mut got = Got {
        bytes: Vec::new(),
        total: 0,
        end: End::Open,
        took: Duration::ZERO,
    };
    let mut buf = vec![0u8; 65536];
    loop {
        let left = within.saturating_sub(t.elapsed());
        if left.is_zero() {
            got.end = End::Open;
            break;
        }
        c.set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .unwrap();
        match c.read(&mut buf) {
            Ok(0) => {
                got.end = End::Closed;
                break;
            }
            Ok(n) => {
                got.total += n;
                let room = KEEP.saturating_sub(got.bytes.len());
                got.bytes.extend_from_slice(&buf[..n.min(room)]);
                if done(&got.bytes) {
                    got.end = End::Done;
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                got.end = End::Closed;
                break;
            }
        }
    }
    got.took = t.elapsed();
    got
}

/// A status line has arrived.
fn has_status_line(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\r\n")
}

/// A whole HTTP/1.1 response has arrived (Content-Length or chunked).
fn response_complete(b: &[u8]) -> bool {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&b[..end]).to_ascii_lowercase();
    let body = &b[end + 4..];
    if let Some(n) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= n;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
}

/// The value of `key` in an environment dump (`KEY=value` lines).
fn env_var<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The value of a `name=value` field in a log line (quotes taken off).
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let v = line[at..].split_whitespace().next()?;
    Some(v.trim_matches('"'))
}

/// A log line about a request for `path`.
fn is_for(line: &str, path: &str) -> bool {
    log_field(line, "path") == Some(path)
}

fn figures_text(f: &ProcFigures) -> String {
    format!(
        "fds {}, threads {}, RSS {} KiB, CPU {:?}",
        f.fds, f.threads, f.rss_kib, f.cpu
    )
}

/// Finding 1. Two clients ask for a gigabyte and never read (tiny receive windows). Once
/// their handlers have ended (route timeout) and their writes stalled (write timeout), their
/// concurrency slots are free again, and the server has closed their connections.
#[test]
fn clients_that_never_read_are_cut_off_and_their_slots_released() {
    let h = Handlers::new();
    // The normal request has a route of its own with a longer deadline: it waits in the
    // queue for the stuck handlers' 2 s deadline plus their kill, and must not race it.
    let s = Served::start(
        "concurrency = 2\nqueue_timeout_ms = 8000\nwrite_timeout_ms = 2000",
        &(route("/cgi", &h.cgi_c(), "timeout_ms = 2000")
            + &route("/normal", &h.cgi_c(), "timeout_ms = 6000")),
    );
    let t0 = Instant::now();
    let mut stuck: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = connect_small_rcvbuf(&s.addr);
            c.write_all(b"GET /cgi/big?1000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    assert!(
        wait_until(3 * SEC, || s.metric("xcgi_requests_in_flight") == Some(2)),
        "the two never-reading requests never were both in flight\n{}",
        s.log_tail(20)
    );
    let (body, code) = curl(&["-m", "8", &s.url("/normal")]);
    let took = t0.elapsed();
    assert_eq!(
        code,
        200,
        "a normal request {took:?} after two clients that never read got {code} (their slots \
         still held?): {body}\n{}",
        s.log_tail(20)
    );
    assert!(
        took < 7 * SEC,
        "the normal request was answered only {took:?} after the never-reading clients came"
    );
    for (i, c) in stuck.iter_mut().enumerate() {
        let got = read_until(c, 4 * SEC, |_| false);
        assert_eq!(
            got.end,
            End::Closed,
            "never-reading client {i}: its connection is still open {:?} after it came, its \
             handler long gone ({} bytes were waiting for it; write_timeout_ms = 2000)\n{}",
            t0.elapsed(),
            got.total,
            s.log_tail(20)
        );
    }
    assert!(
        wait_until(2 * SEC, || count_handlers(&s) == 0),
        "handlers still running: {:?}",
        descendants(s.pid())
    );
}

/// Finding 2. Requests that wait in the queue and whose clients leave, and a slot holder
/// that leaves, give their queue places and in-flight counts back: /metrics says 0 and 0, a
/// normal request is served, and the queue still takes requests.
#[test]
fn clients_that_leave_the_queue_give_back_their_places() {
    let h = Handlers::new();
    let s = Served::start(
        "concurrency = 1\nqueue = 4\nqueue_timeout_ms = 30000",
        &route("/cgi", &h.cgi_c(), "timeout_ms = 60000"),
    );
    let metrics = || {
        let (m, _) = curl(&["-m", "5", &s.url("/_xcgi/metrics")]);
        m.lines()
            .filter(|l| l.starts_with("xcgi_queue_depth") || l.starts_with("xcgi_requests_in"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut holder = connect(&s.addr);
    holder
        .write_all(b"GET /cgi/sleep HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        wait_until(5 * SEC, || s.metric("xcgi_requests_in_flight") == Some(1)),
        "the slot holder is not in flight: {}\n{}",
        metrics(),
        s.log_tail(20)
    );
    let queued: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = connect(&s.addr);
            c.write_all(b"GET /cgi/env HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    assert!(
        wait_until(5 * SEC, || s.metric("xcgi_queue_depth") == Some(4)),
        "four requests behind the slot holder are not queued: {}\n{}",
        metrics(),
        s.log_tail(20)
    );
    drop(queued);
    std::thread::sleep(Duration::from_millis(300));
    drop(holder);
    let settled = wait_until(5 * SEC, || {
        s.metric("xcgi_queue_depth") == Some(0) && s.metric("xcgi_requests_in_flight") == Some(0)
    });
    assert!(
        settled,
        "every client left, yet /metrics says: {} (want queue_depth 0, in_flight 0)\n{}",
        metrics(),
        s.log_tail(20)
    );
    let (body, code) = curl(&["-m", "5", &s.url("/cgi/env")]);
    assert_eq!(code, 200, "{body}\n{}", s.log_tail(20));
    // The queue still has its four places: one request waits behind a new slot holder.
    let mut holder = connect(&s.addr);
    holder
        .write_all(b"GET /cgi/sleep HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(wait_until(5 * SEC, || s.metric("xcgi_requests_in_flight") == Some(1)));
    let url = s.url("/cgi/env");
    let waiting = std::thread::spawn(move || curl(&["-m", "10", &url]));
    let queued = wait_until(3 * SEC, || s.metric("xcgi_queue_depth") == Some(1));
    drop(holder);
    let (body, code) = waiting.join().unwrap();
    assert!(
        queued && code == 200,
        "a request behind a slot holder: queued {queued}, then {code}: {body}\n{}",
        s.log_tail(20)
    );
}

/// Finding 3. A request head that never ends is closed after header_timeout_ms; a keep-alive
/// connection that sends nothing after its response is closed after idle_timeout_ms.
#[test]
fn unfinished_request_heads_and_idle_connections_are_closed() {
    let h = Handlers::new();
    let s = Served::start(
        "header_timeout_ms = 1000\nidle_timeout_ms = 1000",
        &route("/cgi", &h.cgi_c(), ""),
    );
    let mut c = connect(&s.addr);
    c.write_all(b"GET /cgi HTTP/1.1\r\nHost: x\r\n").unwrap();
    let got = read_until(&mut c, 5 * SEC, |_| false);
    assert!(
        got.end == End::Closed && got.took < 3 * SEC,
        "a request head that stops half-way: connection {:?} after {:?} (want closed within \
         ~3 s, header_timeout_ms = 1000); read {:?}\n{}",
        got.end,
        got.took,
        got.text(),
        s.log_tail(10)
    );
    let mut c = connect(&s.addr);
    c.write_all(b"GET /cgi HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let resp = read_until(&mut c, 5 * SEC, response_complete);
    assert!(
        resp.end == End::Done && resp.status() == Some(200),
        "the keep-alive request: {:?} {:?}",
        resp.end,
        resp.text()
    );
    let got = read_until(&mut c, 5 * SEC, |_| false);
    assert!(
        got.end == End::Closed && got.took < 3 * SEC,
        "a keep-alive connection idle after its response: {:?} after {:?} (want closed within \
         ~3 s, idle_timeout_ms = 1000)\n{}",
        got.end,
        got.took,
        s.log_tail(10)
    );
    let (body, code) = curl(&["-m", "5", &s.url("/cgi")]);
    assert_eq!(code, 200, "{body}");
}

/// Finding 3. 100 connections against max_connections = 20: the server does not hold them
/// all, does not spin, does not fill its log, and serves again once they are gone.
#[test]
fn connections_over_max_connections_are_refused_without_spinning() {
    let h = Handlers::new();
    let s = Served::start("max_connections = 20", &route("/cgi", &h.cgi_c(), ""));
    assert_eq!(curl(&["-m", "5", &s.url("/cgi")]).1, 200);
    std::thread::sleep(Duration::from_millis(300));
    let before = s.figures();
    let addr: SocketAddr = s.addr.parse().unwrap();
    let conns: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect_timeout(&addr, SEC).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let during = s.figures();
    let cpu = during.cpu.saturating_sub(before.cpu);
    let open = conns.len();
    drop(conns);
    let served = wait_until(5 * SEC, || curl(&["-m", "2", &s.url("/cgi")]).1 == 200);
    let log = s.log();
    let accept: Vec<&str> = log
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("accept"))
        .collect();
    assert!(
        during.fds <= before.fds + 25,
        "{open} connections open, max_connections = 20: the server holds {} fds, {} before \
         (before: {}; during: {})",
        during.fds,
        before.fds,
        figures_text(&before),
        figures_text(&during)
    );
    assert!(
        cpu < Duration::from_millis(750),
        "the server used {cpu:?} of CPU in 1.5 s over its connection cap (a spin?)"
    );
    assert!(
        served,
        "no 200 after the connections closed\n{}",
        s.log_tail(20)
    );
    assert!(
        accept.len() <= 5,
        "{} log lines about accept (want at most 5), the first: {:?}",
        accept.len(),
        &accept[..accept.len().min(3)]
    );
}

fn need_prlimit() {
    assert!(
        Command::new("prlimit").arg("--version").output().is_ok(),
        "prlimit (util-linux) is needed for this test"
    );
}

/// Finding 3. The server raises its soft fd limit to the hard one at start.
#[test]
fn the_soft_fd_limit_is_raised_to_the_hard_one() {
    need_prlimit();
    let h = Handlers::new();
    let s = Served::start_with(
        "",
        &route("/cgi", &h.cgi_c(), ""),
        &Launch::wrapped(&["prlimit", "--nofile=1024:8192", "--"]),
    );
    assert_eq!(
        nofile_limits(s.pid()),
        (8192, 8192),
        "Max open files (soft, hard) of a server started with soft 1024, hard 8192"
    );
}

/// Finding 3. Out of fds (EMFILE), the server neither spins nor writes a log line per failed
/// accept, and serves again once connections close.
#[test]
fn running_out_of_fds_neither_floods_the_log_nor_stops_the_server() {
    need_prlimit();
    let h = Handlers::new();
    let cgi = h.cgi_c();
    let s = Served::start_with(
        "",
        &route("/cgi", &cgi, ""),
        &Launch::wrapped(&["prlimit", "--nofile=64:64", "--"]),
    );
    assert_eq!(curl(&["-m", "5", &s.url("/cgi")]).1, 200);
    std::thread::sleep(Duration::from_millis(300));
    let before = s.figures();
    let addr: SocketAddr = s.addr.parse().unwrap();
    let conns: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect_timeout(&addr, SEC).ok())
        .collect();
    std::thread::sleep(2 * SEC);
    let during = s.figures();
    let cpu = during.cpu.saturating_sub(before.cpu);
    let open = conns.len();
    drop(conns);
    let served = wait_until(8 * SEC, || curl(&["-m", "2", &s.url("/cgi")]).1 == 200);
    let log = s.log();
    let accept: Vec<&str> = log
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("accept"))
        .collect();
    assert!(
        accept.len() <= 5,
        "{open} connections against a 64-fd limit: {} log lines about accept in 2 s (want at \
         most 5), the first: {:?}",
        accept.len(),
        &accept[..accept.len().min(3)]
    );
    assert!(
        cpu < SEC,
        "the server used {cpu:?} of CPU in 2 s while out of fds (a spin?)"
    );
    assert!(
        served,
        "no 200 after the connections closed\n{}",
        s.log_tail(20)
    );
}

/// How sending a request body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    All,
    /// A write timed out: the server stopped reading.
    Stalled,
    /// A write failed: the server closed the connection.
    Broken,
}

fn write_or(c: &mut TcpStream, data: &[u8]) -> Result<(), Sent> {
    c.write_all(data).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Sent::Stalled,
        _ => Sent::Broken,
    })
}

/// A chunked POST of about `bytes` that never sends its last chunk.
fn send_unfinished_chunked(c: &mut TcpStream, bytes: usize) -> Sent {
    let head = b"POST /cgi/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    if let Err(e) = write_or(c, head) {
        return e;
    }
    let mut chunk = b"10000\r\n".to_vec();
    chunk.extend(std::iter::repeat_n(b'c', 0x10000));
    chunk.extend_from_slice(b"\r\n");
    let mut sent = 0;
    while sent < bytes {
        if let Err(e) = write_or(c, &chunk) {
            return e;
        }
        sent += 0x10000;
    }
    Sent::All
}

/// Finding 4. 50 connections each send ~1 MB of a chunked body and never finish it: the
/// server buffers at most body_budget (4 MiB) of them at once (its RSS stays small), and the
/// requests over the budget get 503 or are closed. (Concurrency is high enough to admit them
/// all: here the budget, not admission, is what must hold.)
#[test]
fn unfinished_chunked_bodies_share_one_memory_budget() {
    let h = Handlers::new();
    let s = Served::start(
        "concurrency = 64\nbody_budget = 4194304",
        &route("/cgi", &h.cgi_c(), "max_body = 2097152"),
    );
    let (body, code) = curl(&[
        "-m",
        "5",
        &s.url("/cgi/env"),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "small",
    ]);
    assert!(
        code == 200 && body.contains("body=[small]"),
        "{code} {body}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = s.figures();
    let senders: Vec<_> = (0..50)
        .map(|_| {
            let addr = s.addr.clone();
            std::thread::spawn(move || {
                let mut c = connect(&addr);
                c.set_write_timeout(Some(2 * SEC)).unwrap();
                let sent = send_unfinished_chunked(&mut c, 1_000_000);
                (c, sent)
            })
        })
        .collect();
    let mut conns: Vec<(TcpStream, Sent)> =
        senders.into_iter().map(|t| t.join().unwrap()).collect();
    std::thread::sleep(SEC);
    let after = s.figures();
    let mut refused = 0;
    let mut answers = Vec::new();
    for (i, (c, sent)) in conns.iter_mut().enumerate() {
        let wait = if i == 0 {
            SEC
        } else {
            Duration::from_millis(50)
        };
        let got = read_until(c, wait, has_status_line);
        if got.status() == Some(503) || got.end == End::Closed || *sent == Sent::Broken {
            refused += 1;
        }
        answers.push(format!("{sent:?}/{:?}/{:?}", got.end, got.status()));
    }
    let grew_kib = after.rss_kib.saturating_sub(before.rss_kib);
    assert!(
        after.rss_kib < 60 * 1024 && grew_kib < 30 * 1024,
        "50 unfinished ~1 MB chunked bodies, body_budget 4 MiB: the server's RSS went from {} \
         to {} KiB (+{grew_kib} KiB; want < 60 MiB, growth < 30 MiB)",
        before.rss_kib,
        after.rss_kib
    );
    assert!(
        refused >= 40,
        "only {refused} of 50 requests over the 4 MiB budget got 503 or were closed (sent/read \
         end/status: {answers:?})\n{}",
        s.log_tail(10)
    );
}

/// Finding 4. A request body trickled in (one byte every 300 ms), chunked or with a
/// Content-Length, gets 408 or is closed soon after body_timeout_ms, and its handler (if
/// one started) is killed.
#[test]
fn trickled_request_bodies_get_408_within_the_body_timeout() {
    let h = Handlers::new();
    let s = Served::start(
        "body_timeout_ms = 1000",
        &route("/cgi", &h.cgi_c(), "max_body = 2097152\ntimeout_ms = 20000"),
    );
    let cases: [(&str, &str, &[u8]); 2] = [
        (
            "chunked",
            "POST /cgi/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"1\r\nx\r\n",
        ),
        (
            "Content-Length",
            "POST /cgi/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
            b"x",
        ),
    ];
    for (what, head, piece) in cases {
        let mut c = connect(&s.addr);
        c.write_all(head.as_bytes()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let mut w = c.try_clone().unwrap();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let t = Instant::now();
                while !stop.load(Ordering::Relaxed) && t.elapsed() < 8 * SEC {
                    if w.write_all(piece).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        };
        let got = read_until(&mut c, 5 * SEC, has_status_line);
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let ok = (got.end == End::Done && got.status() == Some(408)) || got.end == End::Closed;
        assert!(
            ok && got.took < Duration::from_millis(3500),
            "a {what} body trickled one byte every 300 ms: {:?} {:?} after {:?} (want 408 or \
             closed within ~3 s, body_timeout_ms = 1000)\n{}",
            got.end,
            got.text(),
            got.took,
            s.log_tail(10)
        );
        drop(c);
        assert!(
            wait_until(2 * SEC, || count_handlers(&s) == 0),
            "{what}: a handler still runs after its body timed out: {:?}",
            descendants(s.pid())
        );
    }
}

/// Processes a handler of the process-group test left: `sleep SECS` and `yes MARKER`.
fn strays(secs: u64, marker: &str) -> Vec<u32> {
    find_processes(|a| {
        a.len() == 2
            && ((a[0].ends_with("sleep") && a[1] == secs.to_string())
                || (a[0].ends_with("yes") && a[1] == marker))
    })
}

/// Finding 5. A handler that leaves a child in the background and pipes `yes` into its
/// response is killed at the route's timeout with everything it started: the response ends,
/// and no process of it remains.
#[test]
fn a_timed_out_handler_is_killed_with_everything_it_started() {
    let h = Handlers::new();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let secs = 100_000 + (u64::from(std::process::id()) * 7919 + u64::from(nanos)) % 800_000;
    let marker = format!("xcgi-hostile-{}-{nanos}", std::process::id());
    let script = h.script(
        "forker",
        &format!("sleep {secs} &\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nyes {marker}\n"),
    );
    let m2 = marker.clone();
    let _cleanup = OnDrop(move || kill_pids(&strays(secs, &m2)));
    let s = Served::start("", &route("/fork", &script, "timeout_ms = 2000"));
    let t = Instant::now();
    let st = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-m", "8"])
        .arg(s.url("/fork"))
        .status()
        .expect("run curl");
    let curl_took = t.elapsed();
    assert!(
        curl_took < 4 * SEC,
        "curl still received {curl_took:?} after the request started (route timeout 2 s; curl \
         {st}): the handler's children kept its output open\n{}",
        s.log_tail(10)
    );
    let left = (4 * SEC)
        .saturating_sub(t.elapsed())
        .max(Duration::from_millis(500));
    let gone = wait_until(left, || {
        descendants(s.pid()).is_empty() && strays(secs, &marker).is_empty()
    });
    let describe = |pids: Vec<u32>| -> Vec<String> {
        pids.into_iter()
            .map(|p| format!("{p}: {}", cmdline(p).join(" ")))
            .collect()
    };
    assert!(
        gone,
        "left running {:?} after the request started: below the server {:?}, the handler's \
         strays {:?}",
        t.elapsed(),
        describe(descendants(s.pid())),
        describe(strays(secs, &marker))
    );
}

/// A handler that shows its credentials and limits (/proc/self/status and limits; one
/// exec, no fork: RLIMIT_NPROC counts every process of the handlers' user).
const WHO: &str =
    "printf 'Content-Type: text/plain\\r\\n\\r\\n'\nexec cat /proc/self/status /proc/self/limits\n";

/// The ids on a `Uid:`/`Gid:`/`Groups:` line of a /proc/PID/status text.
fn ids(status: &str, name: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in:\n{status}"))
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// The handler runs as nobody (65534), in no root group, without core dumps.
fn assert_nobody(body: &str) {
    assert_eq!(
        ids(body, "Uid:"),
        [65534; 4],
        "the handler does not run as nobody (real, effective, saved, fs uid)"
    );
    let gids = ids(body, "Gid:");
    let groups = ids(body, "Groups:");
    assert!(
        !gids.contains(&0) && !groups.contains(&0),
        "the handler kept root's group: Gid {gids:?}, Groups {groups:?}"
    );
    assert_eq!(
        limit_of(body, "Max core file size").0,
        0,
        "core dumps are on for handlers:\n{body}"
    );
}

/// Finding 5. Handlers run as `nobody` (not in group root) with core dumps off: the
/// defaults.
#[test]
fn handlers_run_as_nobody_without_core_dumps() {
    let h = Handlers::new();
    let s = Served::start("", &route("/who", &h.script("who", WHO), ""));
    let (body, code) = curl(&["-m", "5", &s.url("/who")]);
    assert_eq!(code, 200, "{body}\n{}", s.log_tail(10));
    assert_nobody(&body);
}

/// Finding 5. The [process] section's limits reach the handler: CPU seconds, address space
/// (memory_mib), processes; core dumps stay off; the user is nobody by default.
#[test]
fn process_section_limits_reach_the_handler() {
    let h = Handlers::new();
    let s = Served::start(
        "",
        &format!(
            "[process]\ncpu_seconds = 7\nmemory_mib = 512\nprocesses = 500\n\n{}",
            route("/who", &h.script("who", WHO), "")
        ),
    );
    let (body, code) = curl(&["-m", "5", &s.url("/who")]);
    assert_eq!(code, 200, "{body}\n{}", s.log_tail(10));
    assert_nobody(&body);
    assert_eq!(limit_of(&body, "Max cpu time").0, 7, "{body}");
    assert_eq!(limit_of(&body, "Max address space").0, 512 << 20, "{body}");
    assert_eq!(limit_of(&body, "Max processes").0, 500, "{body}");
}

/// Finding 7. What a handler writes to stderr cannot start a log line of its own (newlines
/// are escaped), and a megabyte of it does not make a huge log line.
#[test]
fn handler_stderr_cannot_forge_log_lines_or_flood_the_log() {
    let h = Handlers::new();
    let forge = h.script(
        "forge",
        "printf '\\n2026-12-01T00:00:00Z  INFO forged status=200\\nmore\\n2026-12-01T00:00:01Z  INFO forged-again status=200\\n' >&2\nexit 1\n",
    );
    let flood = h.script(
        "flood",
        "head -c 1000000 /dev/zero | tr '\\000' e >&2\nexit 1\n",
    );
    let s = Served::start(
        "",
        &(route("/forge", &forge, "") + &route("/flood", &flood, "")),
    );
    assert_eq!(curl(&["-m", "5", &s.url("/forge")]).1, 502);
    assert_eq!(curl(&["-m", "5", &s.url("/flood")]).1, 502);
    for path in ["/forge", "/flood"] {
        assert!(
            s.wait_log_line(3 * SEC, |l| is_for(l, path)).is_some(),
            "no log line for {path}\n{}",
            s.log_tail(10)
        );
    }
    let log = s.log();
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("2026-12-01T00:00:0"))
        .collect();
    assert!(
        forged.is_empty(),
        "the handler's stderr started log lines of its own: {forged:?}"
    );
    assert!(
        log.contains("forged status=200"),
        "the failed handler's stderr is not in the log at all:\n{log}"
    );
    let long: Vec<usize> = log
        .lines()
        .filter(|l| l.len() >= 2048)
        .map(str::len)
        .collect();
    assert!(
        long.is_empty(),
        "a handler's 1 MB of stderr made log lines of {long:?} bytes (want < 2 KB)"
    );
}

/// Finding 8. A response cut off by the route's timeout does not end like a complete one:
/// curl sees the transfer closed with data outstanding (18) or a receive failure (56).
#[test]
fn a_response_cut_off_by_the_timeout_is_not_a_complete_response() {
    let h = Handlers::new();
    let s = Served::start("", &route("/cgi", &h.cgi_c(), "timeout_ms = 1500"));
    let t = Instant::now();
    let st = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-m", "10"])
        .arg(s.url("/cgi/big?10000000000"))
        .status()
        .expect("run curl");
    let took = t.elapsed();
    assert!(
        matches!(st.code(), Some(18) | Some(56)),
        "a 10 GB response cut at 1.5 s: curl {st} after {took:?} (want exit 18 or 56, a \
         truncated transfer)\n{}",
        s.log_tail(5)
    );
    assert!(took < 6 * SEC, "{took:?}");
}

/// Finding 10. Paths are decoded and normalized before routing; a path that climbs out of
/// the document root is refused (400); Basic credentials the server did not check give no
/// REMOTE_USER or AUTH_TYPE, and Authorization is not passed by default.
#[test]
fn request_paths_are_normalized_decoded_and_kept_under_the_document_root() {
    let h = Handlers::new();
    let env = h.script("env", ENV_DUMP);
    let ok = h.script("ok", "printf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'\n");
    let s = Served::start(
        "",
        &(route("/ok", &ok, "document_root = \"/srv\"")
            + &route("/env", &env, "document_root = \"/srv\"")),
    );
    let get = |path: &str, extra: &[&str]| {
        let url = s.url(path);
        let mut args = vec!["-m", "5", "--path-as-is"];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    };
    let (body, code) = get("/env/../../etc/passwd", &[]);
    assert_eq!(code, 400, "/env/../../etc/passwd:\n{body}");
    let (body, code) = get("/ok/../env", &[]);
    assert_eq!(code, 200, "/ok/../env:\n{body}");
    assert_eq!(
        env_var(&body, "SCRIPT_NAME"),
        Some("/env"),
        "/ok/../env is /env:\n{body}"
    );
    let (body, code) = get("/env/a%20b", &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(env_var(&body, "PATH_INFO"), Some("/a b"), "{body}");
    assert_eq!(
        env_var(&body, "PATH_TRANSLATED"),
        Some("/srv/a b"),
        "{body}"
    );
    let (body, code) = get("/env/%2e%2e/%2e%2e/etc", &[]);
    assert_eq!(
        code,
        400,
        "/env/%2e%2e/%2e%2e/etc (PATH_TRANSLATED {:?}):\n{body}",
        env_var(&body, "PATH_TRANSLATED")
    );
    let (body, code) = get("/env", &["-u", "admin:x"]);
    assert_eq!(code, 200, "{body}");
    for var in ["REMOTE_USER", "AUTH_TYPE", "HTTP_AUTHORIZATION"] {
        assert_eq!(
            env_var(&body, var),
            None,
            "unchecked Basic credentials gave the handler {var}:\n{body}"
        );
    }
}

/// Finding 10. Authorization reaches a handler only on a route with pass_authorization, and
/// then as HTTP_AUTHORIZATION alone (no REMOTE_USER: the server checked nothing).
#[test]
fn authorization_reaches_a_handler_only_where_the_route_passes_it() {
    let h = Handlers::new();
    let env = h.script("env", ENV_DUMP);
    let s = Served::start(
        "",
        &(route("/env", &env, "") + &route("/authz", &env, "pass_authorization = true")),
    );
    let (body, code) = curl(&["-m", "5", "-u", "admin:x", &s.url("/env")]);
    assert_eq!(code, 200, "{body}\n{}", s.log_tail(5));
    for var in ["REMOTE_USER", "AUTH_TYPE", "HTTP_AUTHORIZATION"] {
        assert_eq!(env_var(&body, var), None, "/env has {var}:\n{body}");
    }
    let (body, code) = curl(&["-m", "5", "-u", "admin:x", &s.url("/authz")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        env_var(&body, "HTTP_AUTHORIZATION"),
        Some("Basic YWRtaW46eA=="),
        "{body}"
    );
    assert_eq!(env_var(&body, "REMOTE_USER"), None, "{body}");
}

/// Finding 11. A handler's Status of 1xx or not a real status is a bad gateway (502), and
/// is logged as the 502 the client got.
#[test]
fn informational_or_invalid_handler_statuses_become_502_and_are_logged_so() {
    let h = Handlers::new();
    let mut routes = String::new();
    for (name, status) in [
        ("s101", "101 Switching"),
        ("s100", "100 Continue"),
        ("s999", "999 Nope"),
    ] {
        let p = h.script(
            name,
            &format!("printf 'Status: {status}\\r\\nContent-Type: text/plain\\r\\n\\r\\nhi\\n'\n"),
        );
        routes += &route(&format!("/{name}"), &p, "");
    }
    let s = Served::start("", &routes);
    for name in ["s101", "s100", "s999"] {
        let path = format!("/{name}");
        let (body, code) = curl(&["-m", "5", &s.url(&path)]);
        assert_eq!(code, 502, "{path}: {body}\n{}", s.log_tail(5));
        let line = s
            .wait_log_line(3 * SEC, |l| is_for(l, &path))
            .unwrap_or_default();
        assert_eq!(
            log_field(&line, "status"),
            Some("502"),
            "{path} logged as: {line:?}"
        );
    }
}

/// Finding 11. `X_Forwarded_For` (underscores) cannot pass for `X-Forwarded-For`: the
/// handler sees the real header's value only, whichever comes first.
#[test]
fn underscored_headers_cannot_pose_as_dashed_ones() {
    let h = Handlers::new();
    let s = Served::start("", &route("/env", &h.script("env", ENV_DUMP), ""));
    for headers in [
        ["X-Forwarded-For: good", "X_Forwarded_For: evil"],
        ["X_Forwarded_For: evil", "X-Forwarded-For: good"],
    ] {
        let (body, code) = curl(&[
            "-m",
            "5",
            "-H",
            headers[0],
            "-H",
            headers[1],
            &s.url("/env"),
        ]);
        assert_eq!(code, 200, "{body}");
        let xff: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("HTTP_X_FORWARDED_FOR="))
            .collect();
        assert!(
            xff == ["HTTP_X_FORWARDED_FOR=good"] && !body.contains("evil"),
            "headers {headers:?} gave {xff:?}:\n{body}"
        );
    }
}

/// Finding 11. A request header too large for a handler's environment is 431, not 500.
#[test]
fn a_huge_request_header_gets_431() {
    let h = Handlers::new();
    let s = Served::start("", &route("/env", &h.script("env", ENV_DUMP), ""));
    let mut c = connect(&s.addr);
    let req = format!(
        "GET /env HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(200 * 1024)
    );
    // The server may answer and close before it has read it all.
    let _ = c.write_all(req.as_bytes());
    let got = read_until(&mut c, 5 * SEC, has_status_line);
    assert_eq!(
        got.status(),
        Some(431),
        "a 200 KB header value: {:?} {:?}\n{}",
        got.end,
        got.text(),
        s.log_tail(5)
    );
}

/// Finding 11. A config named by a relative path, with a relative handler, works in process
/// isolation (`cd dir && xcgi serve --config sub/xcgi.toml`).
#[test]
fn a_relative_config_path_works_in_process_isolation() {
    let h = Handlers::new();
    let sub = h.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    chmod(&sub, 0o755);
    std::fs::copy(h.cgi_c(), sub.join("cgi")).unwrap();
    chmod(&sub.join("cgi"), 0o755);
    std::fs::write(
        sub.join("xcgi.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\nisolation = \"process\"\n\n\
         [[route]]\nprefix = \"/cgi\"\nhandler = \"cgi\"\n",
    )
    .unwrap();
    let launch = Launch {
        cwd: Some(h.path().to_path_buf()),
        ..Launch::default()
    };
    let s = Served::launch(Path::new("sub/xcgi.toml"), &launch, None);
    let (body, code) = curl(&["-m", "5", &s.url("/cgi")]);
    assert_eq!(code, 200, "{body}\n{}", s.log_tail(5));
    assert!(body.contains("Hello from CGI"), "{body}");
}

/// Finding 11. A request whose deadline passes while it waits in the queue is answered
/// without ever starting a handler. /hold keeps the only slot for 3 s; two /count requests
/// (timeout 1 s) wait behind it: past their deadline once the slot frees, they must not
/// start. Evidence: /count's handler records nothing, and their log lines name no handler
/// exit (one started and killed at once would be logged with its exit status).
#[test]
fn a_request_whose_deadline_passed_in_the_queue_starts_no_handler() {
    let h = Handlers::new();
    let shared = h.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o777);
    let counter = shared.join("starts");
    let hold = h.script(
        "hold",
        &format!(
            "echo hold >> {c}\nsleep 3\nprintf 'Content-Type: text/plain\\r\\n\\r\\nheld\\n'\n",
            c = counter.display()
        ),
    );
    let count = h.script(
        "count",
        &format!(
            "echo count >> {c}\nprintf 'Content-Type: text/plain\\r\\n\\r\\ncounted\\n'\n",
            c = counter.display()
        ),
    );
    let s = Served::start(
        "concurrency = 1\nqueue_timeout_ms = 5000",
        &(route("/hold", &hold, "timeout_ms = 6000")
            + &route("/count", &count, "timeout_ms = 1000")),
    );
    let holder = {
        let url = s.url("/hold");
        std::thread::spawn(move || curl(&["-m", "10", &url]))
    };
    assert!(
        wait_until(3 * SEC, || std::fs::read_to_string(&counter)
            .is_ok_and(|c| c.contains("hold"))),
        "/hold did not start\n{}",
        s.log_tail(10)
    );
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let url = s.url("/count");
            std::thread::spawn(move || curl(&["-m", "10", &url]))
        })
        .collect();
    let queued = wait_until(2 * SEC, || s.metric("xcgi_queue_depth") == Some(2));
    let (hbody, hcode) = holder.join().unwrap();
    let codes: Vec<u16> = waiting.into_iter().map(|t| t.join().unwrap().1).collect();
    assert!(
        queued,
        "the two /count requests were not queued\n{}",
        s.log_tail(10)
    );
    assert_eq!(hcode, 200, "/hold: {hbody}");
    assert!(
        codes.iter().all(|&c| c == 503 || c == 504),
        "/count after its deadline passed in the queue: {codes:?} (want 503 or 504)"
    );
    let mut lines = Vec::new();
    assert!(
        wait_until(3 * SEC, || {
            lines = s
                .log()
                .lines()
                .filter(|l| is_for(l, "/count"))
                .map(str::to_string)
                .collect();
            lines.len() == 2
        }),
        "want 2 log lines for /count, got {lines:?}"
    );
    let starts = std::fs::read_to_string(&counter).unwrap_or_default();
    assert_eq!(
        starts.lines().filter(|l| *l == "count").count(),
        0,
        "/count's handler ran after its deadline had passed in the queue: {starts:?}"
    );
    for l in &lines {
        assert!(
            log_field(l, "exit").is_none() && !l.contains("killed"),
            "a /count handler was started (and killed) after its deadline had passed in the \
             queue: {l}"
        );
    }
}

/// Finding 11. An HTTP/1.0 request is SERVER_PROTOCOL=HTTP/1.0.
#[test]
fn http_1_0_requests_get_server_protocol_http_1_0() {
    let h = Handlers::new();
    let s = Served::start("", &route("/env", &h.script("env", ENV_DUMP), ""));
    let (body, code) = curl(&["-m", "5", "--http1.0", &s.url("/env")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        env_var(&body, "SERVER_PROTOCOL"),
        Some("HTTP/1.0"),
        "{body}"
    );
}

/// A request that waited for a slot says how long in its log line (`queued_ms`), and its
/// `handler_ms` is the handler's own time: a 504 at the deadline can then be told apart from a
/// handler that did not answer (both used to be in `handler_ms`).
#[test]
fn the_log_line_says_how_long_a_request_waited_for_a_slot() {
    let h = Handlers::new();
    let s = Served::start(
        "concurrency = 1\nqueue_timeout_ms = 10000",
        &route("/cgi", &h.cgi_c(), ""),
    );
    // /stream holds the only slot for 1.2 s (five lines 300 ms apart).
    let holder = {
        let url = s.url("/cgi/stream");
        std::thread::spawn(move || curl(&["-m", "10", &url]))
    };
    assert!(
        wait_until(3 * SEC, || s.metric("xcgi_requests_in_flight") == Some(1)),
        "{}",
        s.log_tail(5)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(curl(&["-m", "10", &s.url("/cgi")]).1, 200);
    assert_eq!(holder.join().unwrap().1, 200);
    let field = |path: &str, name: &str| -> f64 {
        let line = s
            .wait_log_line(3 * SEC, |l| {
                is_for(l, path) && log_field(l, "status") == Some("200")
            })
            .unwrap_or_else(|| panic!("no log line for {path}\n{}", s.log_tail(5)));
        log_field(&line, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    let (queued, handler) = (field("/cgi", "queued_ms"), field("/cgi", "handler_ms"));
    assert!(queued >= 500.0, "waited behind /stream: queued_ms={queued}");
    assert!(handler < queued, "handler_ms={handler} counts the wait");
    assert!(field("/cgi/stream", "queued_ms") < 100.0);
}

/// Finding 11. The log's durations (boot_ms, handler_ms, total_ms) have at most 3 decimals.
#[test]
fn log_durations_have_at_most_three_decimals() {
    let h = Handlers::new();
    let s = Served::start("", &route("/cgi", &h.cgi_c(), ""));
    assert_eq!(curl(&["-m", "5", &s.url("/cgi")]).1, 200);
    let line = s
        .wait_log_line(3 * SEC, |l| {
            is_for(l, "/cgi") && log_field(l, "status") == Some("200")
        })
        .unwrap_or_else(|| panic!("no log line for /cgi\n{}", s.log_tail(5)));
    for field in ["queued_ms", "boot_ms", "handler_ms", "total_ms"] {
        let v = log_field(&line, field).unwrap_or_else(|| panic!("no {field} in {line:?}"));
        let decimals = v.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(
            decimals <= 3 && v.parse::<f64>().is_ok(),
            "{field}={v}: {decimals} decimals (want at most 3) in {line:?}"
        );
    }
}
