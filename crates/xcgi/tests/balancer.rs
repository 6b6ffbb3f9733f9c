//! xcgi behind a real load balancer: Debian's HAProxy with `dist/haproxy.cfg`, in front of
//! three `xcgi serve --isolation process` instances on loopback ports, health-checked on
//! `/_xcgi/readyz`. Under a bounded load (four client threads, two keeping their connection
//! to HAProxy alive, two opening one per request) the tests assert:
//!
//! - spread: every instance answers some requests, and each one's `xcgi_requests_total`
//!   matches what the clients saw it answer (health checks are not counted);
//! - rolling restarts, stop-then-start and start-beside (`reuse_port`): zero failed requests;
//! - SIGKILL: only requests in flight at the kill may fail, HAProxy takes the instance out,
//!   and everything after succeeds.
//!
//! Each prints its figures (requests, failures, per-instance counts, latency). The same
//! configuration with VM isolation runs in the lab: balancer_vm.rs.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::served::{descendants, kill_pids, wait_until, Launch, Served};
use common::*;

/// HAProxy's health-check interval in these tests (XCGI_CHECK_INTER); fall and rise are the
/// config's defaults, 2 each.
const CHECK_INTER_MS: u64 = 100;
/// `drain_delay_ms` of the instances: HAProxy needs up to (fall + 1) x inter = 300 ms to see
/// readiness go false; the rest is margin for a loaded 2-core machine.
const DRAIN_DELAY_MS: u64 = 600;
/// Client threads of the load generator: even ones keep their connection alive, odd ones
/// open a new connection per request.
const CLIENTS: usize = 4;

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: no retries, every deviation is an error.

struct Resp {
    status: u16,
    body: Vec<u8>,
    close: bool,
}

fn read_response(r: &mut BufReader<TcpStream>) -> Result<Resp, String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => return Err("connection closed before any response".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("reading the status line: {e}")),
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or("").to_string();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) => return Err("connection closed in the response head".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the response head: {e}")),
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("bad header {h:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let mut close = version == "HTTP/1.0" || header("connection").is_some_and(|v| v == "close");
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            match r.read_line(&mut size) {
                Ok(0) => return Err(format!("truncated chunked body after {} bytes", body.len())),
                Ok(_) => {}
                Err(e) => return Err(format!("truncated chunked body ({e})")),
            }
            let hex = size.trim_end().split(';').next().unwrap_or("").trim();
            let n = usize::from_str_radix(hex, 16)
                .map_err(|_| format!("bad chunk size {size:?} after {} bytes", body.len()))?;
            if n == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    match r.read_line(&mut t) {
                        Ok(0) | Err(_) => return Err("truncated after the last chunk".into()),
                        Ok(_) if t.trim_end().is_empty() => break,
                        Ok(_) => {}
                    }
                }
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)
                .map_err(|e| format!("truncated chunk after {} bytes ({e})", body.len()))?;
            if &chunk[n..] != b"\r\n" {
                return Err("chunk not followed by CRLF".into());
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| format!("bad length {len:?}"))?;
        body.resize(len, 0);
        r.read_exact(&mut body)
            .map_err(|e| format!("truncated body of {len} bytes ({e})"))?;
    } else if status != 204 && status != 304 {
        r.read_to_end(&mut body)
            .map_err(|e| format!("reading a body to EOF: {e}"))?;
        close = true;
    }
    Ok(Resp {
        status,
        body,
        close,
    })
}

struct Client {
    addr: SocketAddr,
    keep_alive: bool,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    fn new(addr: SocketAddr, keep_alive: bool) -> Client {
        Client {
            addr,
            keep_alive,
            conn: None,
        }
    }

    fn get(&mut self, path: &str) -> Result<Resp, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.set_nodelay(true);
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: xcgi-test\r\n{}\r\n",
            if self.keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        );
        let r = conn
            .get_mut()
            .write_all(req.as_bytes())
            .map_err(|e| format!("sending the request: {e}"))
            .and_then(|()| read_response(conn));
        if !matches!(&r, Ok(resp) if self.keep_alive && !resp.close) {
            self.conn = None;
        }
        r
    }
}

/// One GET on a fresh connection.
fn get(addr: SocketAddr, path: &str) -> Result<Resp, String> {
    Client::new(addr, false).get(path)
}

fn body_text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

// ---------------------------------------------------------------------------------------
// Ports, instances, HAProxy.

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `n` distinct loopback ports free now (held together, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

#[derive(Clone, Copy)]
struct Opts {
    /// `reuse_port = true`: a new instance may bind beside the old one.
    reuse_port: bool,
    /// An `admin_listen` port per instance (metrics leave the serving port).
    admin: bool,
    /// `drain_delay_ms`.
    drain_delay_ms: u64,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            reuse_port: false,
            admin: false,
            drain_delay_ms: DRAIN_DELAY_MS,
        }
    }
}

/// One `xcgi serve` generation on a fixed port; `label` ("xcgi2.1") is what its handler
/// prints as INSTANCE, so each response says who answered it.
struct Instance {
    name: String,
    gen: u32,
    port: u16,
    admin: Option<u16>,
    served: Served,
}

impl Instance {
    /// Starts generation `gen` of `name` on `port`, with an admin listener on `admin` if
    /// `opts.admin` (a free port is picked when `admin` is None).
    fn start(name: &str, gen: u32, port: u16, admin: Option<u16>, opts: Opts) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let admin = opts
            .admin
            .then(|| admin.unwrap_or_else(|| free_ports(1)[0]));
        let admin_line = admin
            .map(|p| format!("admin_listen = \"127.0.0.1:{p}\"\n"))
            .unwrap_or_default();
        let cfg = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nisolation = \"process\"\n\
             reuse_port = {}\ndrain_delay_ms = {}\ndrain_timeout_ms = 10000\n\
             {admin_line}\n[[route]]\nprefix = \"/cgi\"\nhandler = \"{}\"\n\
             env = {{ INSTANCE = \"{name}.{gen}\" }}\n",
            opts.reuse_port,
            opts.drain_delay_ms,
            example("cgi-c/cgi").display()
        );
        let path = dir.path().join("xcgi.toml");
        std::fs::write(&path, cfg).unwrap();
        let served = Served::launch(&path, &Launch::default(), Some(dir));
        Instance {
            name: name.to_string(),
            gen,
            port,
            admin,
            served,
        }
    }

    fn label(&self) -> String {
        format!("{}.{}", self.name, self.gen)
    }

    /// An admin endpoint of this very process: on its admin listener if it has one (the
    /// serving port may be shared with another generation), else under /_xcgi.
    fn admin_get(&self, ep: &str) -> Result<Resp, String> {
        match self.admin {
            Some(p) => get(loopback(p), &format!("/{ep}")),
            None => get(loopback(self.port), &format!("/_xcgi/{ep}")),
        }
    }

    /// `xcgi_requests_total{status="200"}` (0 before the first request).
    fn requests_200(&self) -> u64 {
        let r = self
            .admin_get("metrics")
            .unwrap_or_else(|e| panic!("{} metrics: {e}", self.label()));
        assert_eq!(r.status, 200, "{} metrics: {}", self.label(), body_text(&r));
        metric_value(&body_text(&r), "xcgi_requests_total{status=\"200\"}").unwrap_or(0)
    }

    fn ready(&self) -> bool {
        self.admin_get("readyz").is_ok_and(|r| r.status == 200)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the server this test started (still its child, not reaped).
        unsafe { libc::kill(self.served.pid() as i32, sig) };
    }

    fn exited(&mut self) -> Option<i32> {
        self.served
            .child
            .try_wait()
            .unwrap()
            .map(|st| st.code().unwrap_or(-1))
    }
}

fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// HAProxy with dist/haproxy.cfg, killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    stats: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Haproxy {
    fn start(servers: &[u16]) -> Haproxy {
        let ports = free_ports(2);
        let cfg = workspace().join("dist/haproxy.cfg");
        let bin = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("haproxy"));
        let mut cmd = Command::new(&bin);
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .env("XCGI_LB_BIND", format!("127.0.0.1:{}", ports[0]))
            .env("XCGI_LB_STATS", format!("127.0.0.1:{}", ports[1]))
            .env("XCGI_CHECK_INTER", format!("{CHECK_INTER_MS}ms"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for i in 1..=3 {
            match servers.get(i - 1) {
                Some(p) => cmd.env(format!("XCGI_SERVER{i}"), format!("127.0.0.1:{p}")),
                None => cmd.env_remove(format!("XCGI_SERVER{i}")),
            };
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {bin:?}: {e} (scripts/setup.sh installs Debian's haproxy)")
        });
        let log = Arc::new(Mutex::new(String::new()));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let mut g = log.lock().unwrap();
                    g.push_str(&line);
                    g.push('\n');
                }
            });
        }
        let lb = Haproxy {
            child,
            addr: loopback(ports[0]),
            stats: loopback(ports[1]),
            log,
        };
        let t = Instant::now();
        let mut lb = lb;
        loop {
            if let Some(st) = lb.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("haproxy exited at start ({st}):\n{}", lb.log());
            }
            if get(lb.stats, "/stats;csv").is_ok() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "haproxy stats page not up after 10 s:\n{}",
                lb.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        lb
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The backend's rows of `/stats;csv`, by server name ("xcgi1", ..., "BACKEND").
    fn stats(&self) -> HashMap<String, HashMap<String, String>> {
        let r = get(self.stats, "/stats;csv").expect("haproxy stats");
        let text = body_text(&r);
        let mut lines = text.lines();
        let head: Vec<String> = lines
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_string)
            .collect();
        let mut out = HashMap::new();
        for l in lines {
            let row: HashMap<String, String> = head
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .collect();
            if row.get("pxname").map(String::as_str) == Some("xcgi") {
                out.insert(row["svname"].clone(), row);
            }
        }
        out
    }

    fn field(&self, server: &str, field: &str) -> String {
        self.stats()
            .get(server)
            .and_then(|r| r.get(field).cloned())
            .unwrap_or_default()
    }

    /// "UP", "DOWN", "UP 1/2" (going down), "DOWN 1/2" (coming up), ...
    fn status(&self, server: &str) -> String {
        self.field(server, "status")
    }

    fn wait_status(&self, server: &str, want: &str, timeout: Duration) -> Duration {
        let t = Instant::now();
        loop {
            if self.status(server) == want {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < timeout,
                "haproxy: {server} not {want} after {timeout:?} (it is {:?}):\n{}",
                self.status(server),
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- haproxy log (last {n} lines) ---\n{}",
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// Retries and redispatches HAProxy made, over the backend's servers.
    fn retries(&self) -> (u64, u64) {
        let s = self.stats();
        let sum = |f: &str| -> u64 {
            s.iter()
                .filter(|(k, _)| k.as_str() != "BACKEND")
                .map(|(_, r)| r.get(f).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
                .sum()
        };
        (sum("wretr"), sum("wredis"))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// N instances (xcgi1.1, xcgi2.1, ...) and HAProxy in front, every server checked UP.
fn cluster(n: usize, opts: Opts) -> (Haproxy, Vec<Instance>) {
    // Serving and admin ports picked together, so that no instance takes another's.
    let all = free_ports(2 * n);
    let (ports, admins) = all.split_at(n);
    let insts: Vec<Instance> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| Instance::start(&format!("xcgi{}", i + 1), 1, p, Some(admins[i]), opts))
        .collect();
    for i in &insts {
        assert!(
            wait_until(Duration::from_secs(10), || i.ready()),
            "{} not ready:\n{}",
            i.label(),
            i.served.log_tail(20)
        );
    }
    let lb = Haproxy::start(ports);
    for i in &insts {
        lb.wait_status(&i.name, "UP", Duration::from_secs(10));
    }
    (lb, insts)
}

// ---------------------------------------------------------------------------------------
// The load.

/// One request the load made.
struct Rec {
    thread: usize,
    keep_alive: bool,
    start: Instant,
    end: Instant,
    /// The label of the instance that answered (`slow` for /cgi/stream), or what went wrong.
    outcome: Result<String, String>,
}

impl Rec {
    fn took(&self) -> Duration {
        self.end - self.start
    }
}

/// Checks a /cgi/env?n=ID answer in full; the instance that answered.
fn check_env(r: &Resp, id: &str) -> Result<String, String> {
    let body = body_text(r);
    if r.status != 200 {
        return Err(format!("status {}: {body:?}", r.status));
    }
    if !body.contains(&format!("\nQUERY_STRING=n={id}\n")) || !body.ends_with("\nbody=[]\n") {
        return Err(format!("wrong or incomplete body: {body:?}"));
    }
    body.lines()
        .find_map(|l| l.strip_prefix("INSTANCE="))
        .map(str::to_string)
        .ok_or_else(|| format!("no INSTANCE in {body:?}"))
}

/// /cgi/stream?2: two lines 300 ms apart, so that some requests are in flight at any time.
fn check_slow(r: &Resp) -> Result<String, String> {
    match (r.status, r.body.as_slice()) {
        (200, b"tick 1\ntick 2\n") => Ok("slow".into()),
        _ => Err(format!("status {}: {:?}", r.status, body_text(r))),
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    /// Requests made so far, all clients together.
    done: Arc<std::sync::atomic::AtomicUsize>,
    threads: Vec<JoinHandle<Vec<Rec>>>,
    started: Instant,
}

impl Load {
    /// `CLIENTS` threads, each doing sequential requests with `pause` between them, at most
    /// `max_each`; the first `slow` threads ask for /cgi/stream?2, the others /cgi/env.
    fn start(addr: SocketAddr, pause: Duration, max_each: usize, slow: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads = (0..CLIENTS)
            .map(|t| {
                let stop = Arc::clone(&stop);
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    let keep_alive = t % 2 == 0;
                    let mut c = Client::new(addr, keep_alive);
                    let mut recs = Vec::new();
                    for j in 0..max_each {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let id = format!("{t}-{j}");
                        let start = Instant::now();
                        let outcome = if t < slow {
                            c.get("/cgi/stream?2").and_then(|r| check_slow(&r))
                        } else {
                            c.get(&format!("/cgi/env?n={id}"))
                                .and_then(|r| check_env(&r, &id))
                        };
                        recs.push(Rec {
                            thread: t,
                            keep_alive,
                            start,
                            end: Instant::now(),
                            outcome,
                        });
                        done.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(pause);
                    }
                    recs
                })
            })
            .collect();
        Load {
            stop,
            done,
            threads,
            started: Instant::now(),
        }
    }

    /// Lets the load go on until it has made at least `n` requests (at most `timeout`): a
    /// quick restart must not leave too few requests to mean anything.
    fn wait_for(&self, n: usize, timeout: Duration) {
        let t = Instant::now();
        while self.done.load(Ordering::Relaxed) < n && t.elapsed() < timeout && self.running() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether every client is still going (none reached its cap).
    fn running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Stops the clients (after their current request) and collects their records.
    fn finish(self) -> (Vec<Rec>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits until every client has made its `max_each` requests; their records.
    fn join(mut self) -> (Vec<Rec>, Duration) {
        let mut recs: Vec<Rec> = std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().expect("load thread panicked"))
            .collect();
        recs.sort_by_key(|r| r.start);
        (recs, self.started.elapsed())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A failed test: let the clients end on their own (their servers are going away).
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn latency_line(durs: &[Duration]) -> String {
    let mut v = durs.to_vec();
    v.sort();
    format!(
        "p50 {}, p99 {}, max {} (n={})",
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(v.last().copied().unwrap_or_default()),
        v.len()
    )
}

/// Requests per instance label.
fn per_instance(recs: &[Rec]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in recs {
        if let Ok(l) = &r.outcome {
            *m.entry(l.clone()).or_insert(0) += 1;
        }
    }
    m
}

/// The figures of one load run, as printed.
fn report(title: &str, recs: &[Rec], wall: Duration, lb: &Haproxy) -> String {
    let failed: Vec<&Rec> = recs.iter().filter(|r| r.outcome.is_err()).collect();
    let by_mode = |ka: bool| failed.iter().filter(|r| r.keep_alive == ka).count();
    let fast: Vec<Duration> = recs
        .iter()
        .filter(|r| matches!(&r.outcome, Ok(l) if l != "slow"))
        .map(Rec::took)
        .collect();
    let (retries, redispatches) = lb.retries();
    let mut s = format!(
        "=== {title}\n  requests {} in {:.1} s ({:.0}/s), failed {} (keep-alive clients {}, \
         new-connection clients {})\n  per instance: {:?}\n  latency through haproxy \
         (/cgi/env): {}\n  haproxy: {retries} retries, {redispatches} redispatches\n",
        recs.len(),
        wall.as_secs_f64(),
        recs.len() as f64 / wall.as_secs_f64(),
        failed.len(),
        by_mode(true),
        by_mode(false),
        per_instance(recs),
        latency_line(&fast),
    );
    for f in failed.iter().take(10) {
        s.push_str(&format!(
            "  FAILED: thread {} ({}), started {:.3} s, took {}: {}\n",
            f.thread,
            if f.keep_alive {
                "keep-alive"
            } else {
                "new connection"
            },
            (f.start - recs[0].start).as_secs_f64(),
            ms(f.took()),
            f.outcome.as_ref().unwrap_err()
        ));
    }
    s
}

fn assert_no_failures(report: &str, recs: &[Rec], lb: &Haproxy, insts: &[Instance]) {
    if recs.iter().any(|r| r.outcome.is_err()) {
        let logs: String = insts.iter().map(|i| i.served.log_tail(15) + "\n").collect();
        panic!(
            "requests failed during the restarts:\n{report}\n{}\n{logs}",
            lb.log_tail(40)
        );
    }
}

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn haproxy_spreads_requests_over_three_instances_and_their_metrics_add_up() {
    let (lb, insts) = cluster(3, Opts::default());
    for i in &insts {
        let r = i.admin_get("healthz").unwrap();
        assert_eq!((r.status, body_text(&r).trim()), (200, "ok"));
        let r = i.admin_get("readyz").unwrap();
        assert_eq!((r.status, body_text(&r).trim()), (200, "ready"));
    }
    // Health checks (every 100 ms on each instance) and metrics scrapes are not requests.
    std::thread::sleep(Duration::from_millis(10 * CHECK_INTER_MS));
    let checks: u64 = insts.iter().map(Instance::requests_200).sum();
    assert_eq!(
        checks, 0,
        "health checks on /_xcgi/readyz must not count in xcgi_requests_total"
    );
    // The admin endpoints are not reachable through the balancer.
    let r = get(lb.addr, "/_xcgi/metrics").unwrap();
    assert_eq!(r.status, 404, "{}", body_text(&r));
    for path in [
        "/x/../_xcgi/readyz",
        "/%5fxcgi/metrics",
        "/cgi/%2e%2e/_xcgi/readyz",
    ] {
        let r = get(lb.addr, path).unwrap();
        assert_eq!(r.status, 404, "{path}: {}", body_text(&r));
    }

    // M requests, four clients, no pause.
    const EACH: usize = 75;
    let load = Load::start(lb.addr, Duration::ZERO, EACH, 0);
    let (recs, wall) = load.join();
    let text = report("spread: 3 instances, 4 clients", &recs, wall, &lb);
    println!("{text}");
    let m = (EACH * CLIENTS) as u64;
    assert_eq!(recs.len() as u64, m);
    assert_no_failures(&text, &recs, &lb, &insts);
    let seen = per_instance(&recs);
    let mut metrics = BTreeMap::new();
    for i in &insts {
        metrics.insert(i.label(), i.requests_200());
    }
    println!("  xcgi_requests_total{{status=\"200\"}} per instance: {metrics:?}");
    for i in &insts {
        let n = metrics[&i.label()];
        assert!(n > 0, "{} answered nothing: {metrics:?}", i.label());
        assert_eq!(
            n,
            seen.get(&i.label()).copied().unwrap_or(0) as u64,
            "{}: its metrics and what the clients saw differ: {metrics:?} vs {seen:?}",
            i.label()
        );
        // Round robin: about a third each.
        assert!(
            n >= m / 6 && n <= m / 2,
            "roundrobin should spread evenly: {metrics:?}"
        );
    }
    assert_eq!(metrics.values().sum::<u64>(), m, "{metrics:?}");

    // Latency: straight to one instance vs through HAProxy, one client, sequential.
    const N: usize = 200;
    let mut lines = String::from("  latency, one sequential client, /cgi/env:\n");
    for (what, addr) in [("direct ", loopback(insts[0].port)), ("haproxy", lb.addr)] {
        for keep_alive in [true, false] {
            let mut c = Client::new(addr, keep_alive);
            let mut durs = Vec::with_capacity(N);
            let t = Instant::now();
            for j in 0..N {
                let id = format!("lat-{j}");
                let s = Instant::now();
                let r = c.get(&format!("/cgi/env?n={id}")).unwrap();
                check_env(&r, &id).unwrap();
                durs.push(s.elapsed());
            }
            lines.push_str(&format!(
                "    {what} {:<14} {} ({:.0} req/s)\n",
                if keep_alive {
                    "keep-alive"
                } else {
                    "new connection"
                },
                latency_line(&durs),
                N as f64 / t.elapsed().as_secs_f64()
            ));
        }
    }
    println!("{lines}");
}

/// Restarts every instance in turn under load; `beside`: the new one starts next to the
/// old one (reuse_port) and the old one is stopped once the new one is ready; else the old
/// one is stopped first and the new one started on the freed port.
fn rolling_restart(beside: bool, drain_delay_ms: u64) {
    let opts = Opts {
        reuse_port: beside,
        admin: beside,
        drain_delay_ms,
    };
    let (lb, mut insts) = cluster(3, opts);
    let load = Load::start(lb.addr, Duration::from_millis(15), 1500, 0);
    std::thread::sleep(Duration::from_millis(500));
    let mut steps = String::new();
    let mut exits: Vec<Instant> = Vec::new();
    for slot in insts.iter_mut() {
        let (name, port, gen) = (slot.name.clone(), slot.port, slot.gen);
        let mut new = None;
        if beside {
            let t = Instant::now();
            let n = Instance::start(&name, gen + 1, port, None, opts);
            assert!(
                wait_until(Duration::from_secs(10), || n.ready()),
                "{} not ready beside {}:\n{}",
                n.label(),
                slot.label(),
                n.served.log_tail(20)
            );
            steps.push_str(&format!(
                "  {}: started beside, ready after {:.2} s; ",
                n.label(),
                t.elapsed().as_secs_f64()
            ));
            new = Some(n);
        }
        if !beside {
            steps.push_str("  ");
        }
        let old = &mut *slot;
        let t = Instant::now();
        // Beside: a handover (SIGUSR1, no drain delay); else a drain (SIGTERM).
        let (sig, sig_name) = if beside {
            (libc::SIGUSR1, "SIGUSR1")
        } else {
            (libc::SIGTERM, "SIGTERM")
        };
        old.signal(sig);
        let mut down_after = None;
        let code = loop {
            if let Some(c) = old.exited() {
                break c;
            }
            if down_after.is_none() && lb.status(&name) == "DOWN" {
                down_after = Some(t.elapsed());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{} did not exit after {sig_name}:\n{}",
                old.label(),
                old.served.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let exited_after = t.elapsed();
        exits.push(Instant::now());
        assert_eq!(
            code,
            0,
            "{} exit status:\n{}",
            old.label(),
            old.served.log()
        );
        steps.push_str(&format!(
            "{}: {sig_name}, haproxy DOWN after {}, exited 0 after {:.2} s",
            old.label(),
            down_after.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
            exited_after.as_secs_f64()
        ));
        if !beside {
            // HAProxy must have taken it out while it was still accepting (drain_delay_ms).
            let d = down_after.unwrap_or_else(|| {
                panic!(
                    "{}: haproxy had not marked it DOWN when it stopped ({:?}):\n{}",
                    old.label(),
                    lb.status(&name),
                    lb.log_tail(20)
                )
            });
            assert!(
                d < Duration::from_millis(drain_delay_ms),
                "{}: DOWN only after {d:?}, drain_delay_ms is {drain_delay_ms}",
                old.label()
            );
            let t = Instant::now();
            let n = Instance::start(&name, gen + 1, port, None, opts);
            lb.wait_status(&name, "UP", Duration::from_secs(10));
            steps.push_str(&format!(
                "; {} started, haproxy UP after {:.2} s",
                n.label(),
                t.elapsed().as_secs_f64()
            ));
            new = Some(n);
        } else {
            // The old instance stopped accepting at once (handover: whatever drain_delay_ms
            // says): every check since went to the new one, so the address never left the
            // pool, and the old one exited well before any drain delay.
            assert!(
                down_after.is_none(),
                "{}: haproxy took the address out although a ready instance was \
                 listening beside the old one:\n{}",
                old.label(),
                lb.log_tail(20)
            );
            assert!(
                drain_delay_ms == 0 || exited_after < Duration::from_millis(drain_delay_ms),
                "{}: SIGUSR1 waited for the drain delay ({exited_after:?})",
                old.label()
            );
            lb.wait_status(&name, "UP", Duration::from_secs(10));
        }
        steps.push('\n');
        *slot = new.unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(500));
    load.wait_for(250, Duration::from_secs(30));
    assert!(
        load.running(),
        "the load ended before the restarts did: raise its cap"
    );
    let (recs, wall) = load.finish();
    let title = if beside {
        format!(
            "rolling restart, new instance beside the old (reuse_port), then SIGUSR1 (handover) \
             to the old (drain_delay_ms {drain_delay_ms})"
        )
    } else {
        format!(
            "rolling restart, SIGTERM then start on the same port (drain_delay_ms \
             {drain_delay_ms})"
        )
    };
    let mut text = report(&title, &recs, wall, &lb);
    text.push_str(&steps);
    if beside {
        // Answers from new instances that started before their predecessor had exited: both
        // served the port at once.
        let overlap = recs
            .iter()
            .filter(|r| {
                insts
                    .iter()
                    .zip(&exits)
                    .any(|(i, &e)| r.outcome.as_deref() == Ok(&i.label()) && r.start < e)
            })
            .count();
        // Expect few or none: HAProxy keeps reusing its idle connections to the old instance.
        text.push_str(&format!(
            "  answered by a new instance while its predecessor was still running: {overlap}\n"
        ));
    }
    println!("{text}");
    assert_no_failures(&text, &recs, &lb, &insts);
    let seen = per_instance(&recs);
    for i in &insts {
        assert!(
            seen.get(&i.label()).copied().unwrap_or(0) > 0,
            "{} (restarted) never answered: {seen:?}",
            i.label()
        );
        assert!(
            seen.get(&format!("{}.1", i.name)).copied().unwrap_or(0) > 0,
            "{}.1 never answered: {seen:?}",
            i.name
        );
    }
    assert!(
        recs.len() >= 200,
        "too little load to mean anything:\n{text}"
    );
}

#[test]
fn rolling_restart_stop_then_start_under_load_fails_no_request() {
    rolling_restart(false, DRAIN_DELAY_MS);
}

/// The hand-over reuse_port is for: the new instance accepts on the port as soon as the old
/// one stops, so the old one needs no drain delay, and the address never leaves HAProxy's pool.
#[test]
fn rolling_restart_beside_with_reuse_port_and_no_drain_delay_fails_no_request_and_stays_up() {
    rolling_restart(true, 0);
}

/// Beside, in a deployment configured with the drain delay that stop-then-start needs: the
/// handover signal (SIGUSR1) skips it, so the address still never leaves HAProxy's pool. (With
/// SIGTERM the draining instance answered about half of HAProxy's checks on the shared port
/// with 503, and HAProxy took the whole address out for the delay.)
#[test]
fn rolling_restart_beside_with_reuse_port_and_a_drain_delay_hands_over_and_stays_up() {
    rolling_restart(true, DRAIN_DELAY_MS);
}

#[test]
fn sigkill_fails_at_most_the_requests_in_flight_and_haproxy_takes_the_instance_out() {
    let (lb, mut insts) = cluster(3, Opts::default());
    // Two clients ask for a 300 ms response, two for a fast one: some requests are always in
    // flight on every instance.
    let load = Load::start(lb.addr, Duration::from_millis(10), 1000, 2);
    std::thread::sleep(Duration::from_millis(1500));
    let victim = &mut insts[1];
    let below = descendants(victim.served.pid());
    let in_flight_gauge = victim
        .admin_get("metrics")
        .ok()
        .and_then(|r| metric_value(&body_text(&r), "xcgi_requests_in_flight"));
    let killed = Instant::now();
    victim.signal(libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(5), || victim
        .exited()
        .is_some()));
    // Its handlers would end by themselves (their output pipe is gone); not left to chance.
    kill_pids(&below);
    lb.wait_status(&victim.name, "DOWN", Duration::from_secs(5));
    let down = killed.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(load.running(), "the load ended early: raise its cap");
    let (recs, wall) = load.finish();
    let in_flight = recs
        .iter()
        .filter(|r| r.start < killed && r.end > killed)
        .count();
    let after = recs.iter().filter(|r| r.start > killed).count();
    let failed: Vec<&Rec> = recs.iter().filter(|r| r.outcome.is_err()).collect();
    let mut text = report("SIGKILL one of 3 instances under load", &recs, wall, &lb);
    text.push_str(&format!(
        "  {} killed: in flight at that moment {in_flight} over all instances \
         ({} on it, per its gauge just before), failed {}; haproxy DOWN after {:.2} s \
         (check: {}); {after} requests started after the kill\n",
        victim.label(),
        in_flight_gauge.map_or("?".into(), |g| g.to_string()),
        failed.len(),
        down.as_secs_f64(),
        lb.field(&victim.name, "check_status"),
    ));
    println!("{text}");
    assert!(
        failed.len() <= in_flight && failed.len() <= CLIENTS,
        "more failures than requests in flight at the kill:\n{text}\n{}",
        lb.log_tail(30)
    );
    for f in &failed {
        assert!(
            f.start < killed,
            "a request started after the kill failed: HAProxy should retry it elsewhere:\n{text}\n{}",
            lb.log_tail(30)
        );
    }
    assert!(after >= 20, "too few requests after the kill:\n{text}");
    assert_eq!(lb.status(&victim.name), "DOWN", "{text}");
    let seen = per_instance(&recs[recs.partition_point(|r| r.start <= killed)..]);
    assert!(
        !seen.contains_key(&victim.label()),
        "the dead instance answered after its death?\n{text}"
    );
}
