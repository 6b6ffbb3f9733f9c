//! The HTTP layers with fake executors: routing, the reserved prefix, body limits, admission,
//! CGI heads (status, local redirects, garbage), deadlines and the request counters, without
//! spawning the binary or any handler.

use std::sync::atomic::{AtomicBool, AtomicUsize};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::exec::{CgiExecutor, CgiStart, ExecError};

/// What a fake handler does.
#[derive(Clone)]
enum Script {
    /// Writes this (a CGI head and body) and exits 0; `{env:NAME}` is replaced by the value
    /// of NAME in the request's environment.
    Reply(&'static str),
    /// Writes nothing until released (holding its slot), then replies.
    HoldThen(Arc<tokio::sync::Notify>, &'static str),
}

struct Fake {
    script: Script,
    started: AtomicUsize,
    killed: Arc<AtomicUsize>,
}

impl Fake {
    fn new(script: Script) -> Arc<Fake> {
        Arc::new(Fake {
            script,
            started: AtomicUsize::new(0),
            killed: Arc::default(),
        })
    }
}

fn expand(text: &str, env: &[String]) -> String {
    let mut out = text.to_string();
    while let Some(at) = out.find("{env:") {
        let end = at + out[at..].find('}').unwrap_or(out.len() - at);
        let name = &out[at + 5..end];
        let value = env
            .iter()
            .find_map(|e| e.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or("")
            .to_string();
        out.replace_range(at..=end, &value);
    }
    out
}

impl CgiExecutor for Fake {
    fn start(&self, req: CgiStart<'_>) -> Result<Exchange, ExecError> {
        let CgiStart { inv, slot, .. } = req;
        self.started.fetch_add(1, Ordering::SeqCst);
        let (out_tx, stdout) = mpsc::channel(4);
        let (fin_tx, finish) = oneshot::channel();
        let (ready_tx, ready) = oneshot::channel();
        let _ = ready_tx.send(Duration::from_millis(1));
        let complete = Arc::new(AtomicBool::new(false));
        let c2 = Arc::clone(&complete);
        let script = self.script.clone();
        let env = inv.env.clone();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let text = match script {
                Script::Reply(t) => t,
                Script::HoldThen(gate, t) => tokio::select! {
                    _ = gate.notified() => t,
                    // Killed: it ends (its slot goes) without a word.
                    _ = kill_rx => return,
                },
            };
            let _ = out_tx.send(Bytes::from(expand(text, &env))).await;
            c2.store(true, Ordering::SeqCst);
            drop(out_tx);
            drop(slot);
            let _ = fin_tx.send(Finish {
                exit: Some(0),
                ..Finish::default()
            });
        });
        let killed = Arc::clone(&self.killed);
        Ok(Exchange {
            stdout,
            complete,
            finish,
            ready,
            killer: Killer::new(move || {
                killed.fetch_add(1, Ordering::SeqCst);
                let _ = kill_tx.send(());
            }),
        })
    }
}

/// A server on a loopback port whose routes (prefix, extra TOML) run the given fakes.
struct Running {
    addr: SocketAddr,
    server: Arc<Server>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(server_toml: &str, routes: &[(&str, &str, Arc<Fake>)]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!("[server]\nisolation = \"process\"\n{server_toml}\n");
    for (prefix, extra, _) in routes {
        text.push_str(&format!(
            "[[route]]\nprefix = \"{prefix}\"\nhandler = \"/bin/true\"\n{extra}\n"
        ));
    }
    let cfg = Config::parse(&dir.path().join("x.toml"), &text).unwrap();
    let mut server = Server::new(cfg).unwrap();
    for (i, (_, _, fake)) in routes.iter().enumerate() {
        server.routes[i].exec = Some(RouteExec::Cgi(Arc::clone(fake) as Arc<dyn CgiExecutor>));
    }
    let server = Arc::new(server);
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let s = Arc::clone(&server);
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stop_rx.await;
            Shutdown::Handover
        };
        s.serve(Listeners { http, admin: None }, shutdown).await;
    });
    Running {
        addr,
        server,
        stop: Some(stop_tx),
        task,
    }
}

impl Running {
    /// Sends `request` (a whole HTTP/1.1 request; `Connection: close` is added) and returns
    /// (status, body).
    async fn send(&self, request: &str) -> (u16, String) {
        let mut c = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (head, body) = request.split_once("\r\n\r\n").unwrap_or((request, ""));
        let full = format!("{head}\r\nHost: t\r\nConnection: close\r\n\r\n{body}");
        c.write_all(full.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        (
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_string()
            },
        )
    }

    fn counted(&self, status: u16) -> bool {
        self.server
            .metrics
            .render()
            .lines()
            .any(|l| l.starts_with(&format!("xcgi_requests_total{{status=\"{status}\"}} ")))
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// The data of a chunked body.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

const ENV_REPLY: &str =
    "Content-Type: text/plain\r\n\r\nscript={env:SCRIPT_NAME} info={env:PATH_INFO}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_longest_prefix_after_normalising_and_404s_the_rest() {
    let a = Fake::new(Script::Reply(ENV_REPLY));
    let ab = Fake::new(Script::Reply(ENV_REPLY));
    let r = start(
        "",
        &[("/a", "", Arc::clone(&a)), ("/a/b", "", Arc::clone(&ab))],
    )
    .await;
    assert_eq!(
        r.send("GET /a/x HTTP/1.1").await,
        (200, "script=/a info=/x".into())
    );
    assert_eq!(
        r.send("GET /a/b/c HTTP/1.1").await,
        (200, "script=/a/b info=/c".into())
    );
    // Dot segments are removed before routing: this is /a/y.
    assert_eq!(
        r.send("GET /a/b/../y HTTP/1.1").await,
        (200, "script=/a info=/y".into())
    );
    assert_eq!(r.send("GET /ab HTTP/1.1").await.0, 404);
    assert_eq!(r.send("GET /../etc HTTP/1.1").await.0, 400);
    // The reserved prefix never reaches a route; health is answered by the server.
    assert_eq!(
        r.send("GET /_xcgi/healthz HTTP/1.1").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        a.started.load(Ordering::SeqCst) + ab.started.load(Ordering::SeqCst),
        3
    );
    assert!(r.counted(200) && r.counted(404) && r.counted(400));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_body_is_refused_before_the_handler_starts() {
    let f = Fake::new(Script::Reply(ENV_REPLY));
    let r = start("", &[("/", "max_body = 10", Arc::clone(&f))]).await;
    let (code, _) = r
        .send("POST /x HTTP/1.1\r\nContent-Length: 11\r\n\r\n01234567890")
        .await;
    assert_eq!(code, 413);
    assert_eq!(f.started.load(Ordering::SeqCst), 0);
    let (code, _) = r
        .send("POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789")
        .await;
    assert_eq!(code, 200);
    r.stop().await;
}

/// One slot, no queue: a second request while the first holds the slot gets 503 at once;
/// after the first ends, the counters are back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_over_concurrency_and_queue_and_gives_slots_back() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let hold = Fake::new(Script::HoldThen(
        Arc::clone(&gate),
        "Content-Type: text/plain\r\n\r\nheld",
    ));
    let quick = Fake::new(Script::Reply("Content-Type: text/plain\r\n\r\nquick"));
    let r = start(
        "concurrency = 1\nqueue = 0",
        &[
            ("/hold", "", Arc::clone(&hold)),
            ("/quick", "", Arc::clone(&quick)),
        ],
    )
    .await;
    let r = Arc::new(r);
    let r2 = Arc::clone(&r);
    let first = tokio::spawn(async move { r2.send("GET /hold HTTP/1.1").await });
    while hold.started.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (code, body) = r.send("GET /quick HTTP/1.1").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("queue is full"), "{body}");
    assert_eq!(quick.started.load(Ordering::SeqCst), 0);
    gate.notify_one();
    assert_eq!(first.await.unwrap(), (200, "held".into()));
    assert_eq!(r.send("GET /quick HTTP/1.1").await, (200, "quick".into()));
    let m = &r.server.metrics;
    assert_eq!(m.in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(m.queue_depth.load(Ordering::SeqCst), 0);
    assert!(r.counted(503));
    let r = Arc::try_unwrap(r).ok().unwrap();
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgi_heads_status_local_redirects_and_garbage() {
    let status = Fake::new(Script::Reply("Status: 418 Teapot\r\nX-A: 1\r\n\r\nshort"));
    let redirect = Fake::new(Script::Reply("Location: /status?q=1\r\n\r\n"));
    let garbage = Fake::new(Script::Reply("this is not a header block\r\n\r\n"));
    let r = start(
        "",
        &[
            ("/status", "", Arc::clone(&status)),
            ("/redirect", "", Arc::clone(&redirect)),
            ("/garbage", "", Arc::clone(&garbage)),
        ],
    )
    .await;
    assert_eq!(r.send("GET /status HTTP/1.1").await, (418, "short".into()));
    // A local redirect is served again as a GET of its target, by that route.
    assert_eq!(
        r.send("GET /redirect HTTP/1.1").await,
        (418, "short".into())
    );
    assert_eq!(status.started.load(Ordering::SeqCst), 2);
    assert_eq!(r.send("GET /garbage HTTP/1.1").await.0, 502);
    // The garbage handler was killed; the redirecting one too (its job was done).
    assert!(garbage.killed.load(Ordering::SeqCst) >= 1);
    assert!(redirect.killed.load(Ordering::SeqCst) >= 1);
    r.stop().await;
}

/// No head before the route's deadline: 504, and the handler is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_head_before_the_deadline_is_a_504_and_a_kill() {
    let never = Fake::new(Script::HoldThen(
        Arc::new(tokio::sync::Notify::new()),
        "never",
    ));
    let r = start("", &[("/", "timeout_ms = 300", Arc::clone(&never))]).await;
    let t = Instant::now();
    assert_eq!(r.send("GET / HTTP/1.1").await.0, 504);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(never.killed.load(Ordering::SeqCst) >= 1);
    assert!(r.counted(504));
    r.stop().await;
}

#[test]
fn a_directory_is_writable_by_its_owner_group_or_everyone_as_the_kernel_checks() {
    // systemd's /dev/hugepages: root's, 0755: not for the server's user.
    assert!(!may_write((0, 0, 0o40755), 990, 990));
    // Mounted for the user (uid=, gid= options), or world-writable and sticky.
    assert!(may_write((990, 990, 0o40755), 990, 990));
    assert!(may_write((0, 0, 0o41777), 990, 990));
    assert!(may_write((0, 990, 0o40775), 990, 990));
    // The owner's bits decide for the owner, even when others may write.
    assert!(!may_write((990, 0, 0o40577), 990, 990));
}
