//! The HTTP server: one fresh handler (VM or process) per request.
//!
//! A request is routed (longest prefix), checked against the route's body limit (413),
//! admitted (at most `concurrency` at once, then a bounded queue with a timeout: 503), and
//! handed to its handler. The response streams back as the handler writes it; when it ends,
//! or the client goes away, or the route's timeout passes, the handler's VM is killed. Every
//! request ends in one log line and in `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::cgi::{self, CgiHead, MAX_HEADER_BLOCK};
use crate::config::{Config, Isolation, Mode};
use crate::exec::{self, Exchange, Finish, Invocation, Killer};
use crate::metrics::Metrics;
use crate::prepare::Prepared;
use crate::spares::Spares;

/// Local redirects followed for one request before giving up (502).
const MAX_LOCAL_REDIRECTS: usize = 5;
/// Longest wait for an answer to one connection attempt.
const CONNECT_ATTEMPT: Duration = Duration::from_millis(1000);
/// Pause between connection attempts to a booting guest (the bound: 1 ms).
const CONNECT_RETRY: Duration = Duration::from_millis(1);
/// Connection attempts in flight at once while a guest boots.
const CONNECT_PARALLEL: usize = 8;
/// Longest pause before another attempt while earlier ones are still unanswered.
const CONNECT_PATIENCE_MAX: Duration = Duration::from_millis(16);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Prepare(#[from] crate::prepare::PrepareError),
    #[error("guest network: {0}")]
    Net(#[from] xcgi_net::NetError),
    #[error("cannot create the work directory: {0}")]
    Workdir(std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot start the thread that prepares VMs ahead: {0}")]
    Spares(std::io::Error),
}

type OutBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Guest networking for HTTP-mode routes: the TAP pool and a thread inside its namespace
/// that makes sockets for connecting to guests.
struct GuestNet {
    pool: xcgi_net::Pool,
    sockets: Option<SocketRequests>,
    /// The socket thread; it holds the namespace, so it is joined on drop (before the process
    /// exits, the namespace's bind mount must be gone).
    thread: Option<std::thread::JoinHandle<()>>,
}

type SocketRequests =
    std::sync::mpsc::Sender<oneshot::Sender<std::io::Result<std::net::TcpStream>>>;

impl Drop for GuestNet {
    fn drop(&mut self) {
        self.sockets = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl GuestNet {
    fn new(cfg: &Config) -> Result<GuestNet, ServeError> {
        let name = cfg
            .network
            .netns
            .clone()
            .unwrap_or_else(|| format!("xcgi-serve-{}", std::process::id()));
        let ns = Arc::new(xcgi_net::NetNs::create(Some(&name))?);
        let pool = xcgi_net::Pool::new(
            Arc::clone(&ns),
            xcgi_net::PoolConfig {
                base: cfg.network.base,
                size: cfg.network.size,
                prefill: cfg.network.prefill,
            },
        )?;
        let (tx, rx) =
            std::sync::mpsc::channel::<oneshot::Sender<std::io::Result<std::net::TcpStream>>>();
        let thread = std::thread::Builder::new()
            .name("xcgi-netns-sock".into())
            .spawn(move || {
                let _ = ns.run(move || {
                    while let Ok(reply) = rx.recv() {
                        let _ = reply.send(new_tcp_socket());
                    }
                });
            })
            .map_err(ServeError::Thread)?;
        Ok(GuestNet {
            pool,
            sockets: Some(tx),
            thread: Some(thread),
        })
    }

    /// A fresh, unconnected, nonblocking TCP socket in the guests' namespace.
    async fn socket(&self) -> std::io::Result<tokio::net::TcpSocket> {
        let (tx, rx) = oneshot::channel();
        self.sockets
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the guest network is shutting down"))?
            .send(tx)
            .map_err(|_| std::io::Error::other("the namespace socket thread is gone"))?;
        let std_sock = rx
            .await
            .map_err(|_| std::io::Error::other("the namespace socket thread is gone"))??;
        Ok(tokio::net::TcpSocket::from_std_stream(std_sock))
    }
}

fn new_tcp_socket() -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the fd is owned by the returned stream.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

/// A running server's shared state.
pub struct Server {
    cfg: Config,
    routes: Vec<Prepared>,
    pub metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    net: Option<GuestNet>,
    next_id: AtomicU64,
    _workdir: tempfile::TempDir,
}

impl Server {
    /// Prepares every route (images, kernel, network). Slow work happens here, once.
    pub fn new(cfg: Config) -> Result<Server, ServeError> {
        let workdir = tempfile::Builder::new()
            .prefix("xcgi-serve-")
            .tempdir()
            .map_err(ServeError::Workdir)?;
        let mut routes = crate::prepare::prepare(&cfg, workdir.path())?;
        let net = if cfg.needs_network() {
            Some(GuestNet::new(&cfg)?)
        } else {
            None
        };
        let metrics = Arc::new(Metrics::default());
        if cfg.server.isolation == Isolation::Vm {
            for r in &mut routes {
                if let Some(spec) = &mut r.spec {
                    let shape = spec.config(xcgi_vmm::vm::Cancel::new());
                    spec.spares = Spares::start(
                        &r.route.prefix,
                        shape,
                        r.route.prepared,
                        Arc::clone(&metrics),
                    )
                    .map_err(ServeError::Spares)?;
                }
            }
        }
        Ok(Server {
            slots: Arc::new(Semaphore::new(cfg.server.concurrency)),
            cfg,
            routes,
            metrics,
            waiting: AtomicUsize::new(0),
            net,
            next_id: AtomicU64::new(1),
            _workdir: workdir,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Serves on `listener` until `shutdown` resolves; then stops accepting, lets in-flight
    /// requests finish (up to the drain timeout) and waits for every VM to be torn down.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let local = listener.local_addr().ok();
        tokio::pin!(shutdown);
        loop {
            let (stream, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().ok().or(local).unwrap_or(remote);
            let me = Arc::clone(&self);
            let svc = hyper::service::service_fn(move |req| {
                let me = Arc::clone(&me);
                async move { Ok::<_, Infallible>(me.handle(req, remote, local).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        drop(listener);
        let drain = Duration::from_millis(self.cfg.server.drain_timeout_ms);
        info!(
            in_flight = self.metrics.in_flight.load(Ordering::Relaxed),
            "shutting down: draining in-flight requests"
        );
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("drain timeout passed; remaining requests are cut off");
        }
        // VMs prepared ahead and never used go too (closing a VM blocks for milliseconds:
        // off the runtime's threads).
        let spares: Vec<_> = self
            .routes
            .iter()
            .filter_map(|r| r.spec.as_ref()?.spares.clone())
            .collect();
        let _ = tokio::task::spawn_blocking(move || spares.iter().for_each(|s| s.stop())).await;
        // Wait (bounded) for VMs still tearing down, so nothing outlives the server.
        let t = Instant::now();
        while self.metrics.vms_running.load(Ordering::Relaxed) > 0
            && t.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(net) = &self.net {
            net.pool.wait_idle(Duration::from_secs(5));
        }
        info!("server stopped");
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
        local: SocketAddr,
    ) -> Response<OutBody> {
        let t0 = Instant::now();
        if req.uri().path() == "/metrics"
            && self
                .cfg
                .route_for("/metrics")
                .is_none_or(|(_, r)| r.prefix != "/metrics")
        {
            return text(StatusCode::OK, self.metrics.render())
                .map(|b| b.map_err(|never| match never {}).boxed());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut log = RequestLog {
            id,
            route: String::new(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            t0,
            boot: None,
            status: 0,
            note: None,
            metrics: Arc::clone(&self.metrics),
            finish: None,
            done: false,
        };
        let resp = self.dispatch(req, remote, local, &mut log).await;
        log.status = resp.status().as_u16();
        // The log line is written when the response body ends (or is dropped).
        resp.map(|b| {
            LoggedBody {
                inner: b,
                log: Some(log),
            }
            .boxed()
        })
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        local: SocketAddr,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        let path = req.uri().path().to_string();
        let Some((index, _)) = self.cfg.route_for(&path) else {
            return error(StatusCode::NOT_FOUND, "no route for this path");
        };
        let route = &self.routes[index];
        log.route = route.route.prefix.clone();
        let (parts, incoming) = req.into_parts();
        // Body limit: 413 before anything starts.
        let declared = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > route.route.max_body) {
            log.note = Some(format!(
                "body of {} bytes over the route's max_body",
                declared.unwrap_or(0)
            ));
            return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        }
        let body = if declared.is_some() || incoming.is_end_stream() {
            RequestBody::Stream(incoming, declared.unwrap_or(0))
        } else {
            // Chunked: CGI needs CONTENT_LENGTH, so take it in (up to the limit) first.
            match http_body_util::Limited::new(incoming, route.route.max_body as usize)
                .collect()
                .await
            {
                Ok(c) => RequestBody::Buffered(c.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    log.note = Some("chunked body over the route's max_body".into());
                    return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
                }
                Err(_) => return error(StatusCode::BAD_REQUEST, "cannot read the request body"),
            }
        };
        let permit = match self.admit().await {
            Ok(p) => p,
            Err(why) => {
                log.note = Some(why.into());
                return error(StatusCode::SERVICE_UNAVAILABLE, why);
            }
        };
        let deadline = log.t0 + route.route.timeout();
        match route.route.mode {
            Mode::Cgi => {
                self.cgi(route, parts, body, remote, local, permit, deadline, log)
                    .await
            }
            Mode::Http => self.http(route, parts, body, permit, deadline, log).await,
        }
    }

    async fn admit(&self) -> Result<OwnedSemaphorePermit, &'static str> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.cfg.server.queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err("server busy: the request queue is full");
        }
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        let r = tokio::time::timeout(
            Duration::from_millis(self.cfg.server.queue_timeout_ms),
            Arc::clone(&self.slots).acquire_owned(),
        )
        .await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err("server shutting down"),
            Err(_) => Err("server busy: waited too long in the queue"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn cgi(
        &self,
        route: &Prepared,
        parts: hyper::http::request::Parts,
        body: RequestBody,
        remote: SocketAddr,
        local: SocketAddr,
        permit: OwnedSemaphorePermit,
        deadline: Instant,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        let mut method = parts.method.clone();
        let mut path = parts.uri.path().to_string();
        let mut query = parts.uri.query().unwrap_or("").to_string();
        let mut body = Some(body);
        let extra: Vec<(String, String)> = route
            .route
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut route = route;
        for _ in 0..=MAX_LOCAL_REDIRECTS {
            let (body_rx, content_length) = match body.take() {
                Some(b) => b.into_channel(),
                None => (mpsc::channel(1).1, None),
            };
            let info = cgi::RequestInfo {
                method: &method,
                path: &path,
                query: &query,
                headers: &parts.headers,
                remote,
                local,
                script_name: &route.route.prefix,
                document_root: &route.route.document_root,
                content_length,
            };
            let inv = Invocation {
                program: route.program.clone(),
                env: cgi::environment(&info, &extra),
                cwd: route.cwd.clone(),
            };
            let spawned = match (&route.spec, self.cfg.server.isolation) {
                (Some(spec), Isolation::Vm) => {
                    exec::spawn_vm_cgi(spec, &inv, body_rx, Arc::clone(&self.metrics))
                }
                _ => exec::spawn_process(&inv, body_rx),
            };
            let mut ex = match spawned {
                Ok(ex) => ex,
                Err(e) => {
                    log.note = Some(e.to_string());
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "cannot start the handler",
                    );
                }
            };
            let (head, rest) = match read_head(&mut ex, deadline).await {
                Ok(x) => x,
                Err(HeadError::Timeout) => {
                    ex.killer.kill();
                    log.note = Some(format!(
                        "timeout: no response header within {} ms",
                        route.route.timeout_ms
                    ));
                    log.finish = Some(ex.finish);
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the handler did not answer in time",
                    );
                }
                Err(HeadError::Bad(why)) => {
                    ex.killer.kill();
                    let fin = tokio::time::timeout(Duration::from_secs(2), ex.finish)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    log.note = Some(format!("bad gateway: {why}; {}", describe_finish(&fin)));
                    return error(StatusCode::BAD_GATEWAY, "the handler failed");
                }
            };
            log.boot = ex.ready.try_recv().ok();
            match head {
                CgiHead::LocalRedirect { location } => {
                    ex.killer.kill();
                    let (p, q) = location.split_once('?').unwrap_or((&location, ""));
                    path = p.to_string();
                    query = q.to_string();
                    method = Method::GET;
                    match self.cfg.route_for(&path) {
                        Some((i, r)) if r.mode == Mode::Cgi => route = &self.routes[i],
                        _ => {
                            log.note = Some(format!("local redirect to {location}: no CGI route"));
                            return error(StatusCode::BAD_GATEWAY, "bad local redirect");
                        }
                    }
                    continue;
                }
                CgiHead::Document { status, headers } => {
                    let mut resp = Response::new(
                        ChanBody {
                            first: (!rest.is_empty()).then_some(rest),
                            rx: Some(ex.stdout),
                            guard: Some(Guard {
                                killer: ex.killer.clone(),
                                _permit: permit,
                                timer: spawn_deadline(ex.killer.clone(), deadline),
                            }),
                        }
                        .boxed(),
                    );
                    *resp.status_mut() = status;
                    *resp.headers_mut() = headers;
                    log.finish = Some(ex.finish);
                    return resp;
                }
            }
        }
        log.note = Some(format!("more than {MAX_LOCAL_REDIRECTS} local redirects"));
        error(StatusCode::BAD_GATEWAY, "too many local redirects")
    }

    async fn http(
        &self,
        route: &Prepared,
        parts: hyper::http::request::Parts,
        body: RequestBody,
        permit: OwnedSemaphorePermit,
        deadline: Instant,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        let (Some(spec), Some(net)) = (&route.spec, &self.net) else {
            log.note = Some("http mode needs VM isolation".into());
            return error(StatusCode::INTERNAL_SERVER_ERROR, "route misconfigured");
        };
        let t_start = Instant::now();
        let lease = match net.pool.lease() {
            Ok(l) => l,
            Err(e) => {
                log.note = Some(e.to_string());
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no free guest network slot",
                );
            }
        };
        let tap = match lease.try_clone_tap_fd() {
            Ok(fd) => fd,
            Err(e) => {
                log.note = Some(e.to_string());
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "guest network setup failed",
                );
            }
        };
        let guest = SocketAddr::from((lease.guest_ip(), route.route.port));
        let cancel = xcgi_vmm::vm::Cancel::new();
        let mut cfg = spec.config(cancel.clone());
        let rx_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        cfg.net = Some(xcgi_vmm::vm::NetAttachment {
            tap: Arc::new(tap),
            mac: lease.guest_mac().0,
            ip_param: lease.kernel_ip_param(),
            rx_ready: Some(Arc::clone(&rx_ready)),
        });
        let vm = match exec::start_vm(spec, cfg, Arc::clone(&self.metrics), lease) {
            Ok(vm) => vm,
            Err(e) => {
                log.note = Some(e.to_string());
                return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot start the VM");
            }
        };
        let killer = Killer::new(move || cancel.cancel());
        let mut outcome = vm.outcome;
        let stream = tokio::select! {
            s = connect_guest(net, guest, &rx_ready, deadline) => s,
            r = &mut outcome => {
                let why = r.map(|o| exec::describe_outcome(&o)).unwrap_or_else(|_| "VM thread lost".into());
                log.note = Some(format!("the VM ended before its port accepted: {why}"));
                return error(StatusCode::BAD_GATEWAY, "the handler failed");
            }
        };
        let Some(stream) = stream else {
            killer.kill();
            log.note = Some(format!(
                "timeout: guest {guest} did not accept within {} ms",
                route.route.timeout_ms
            ));
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "the handler did not answer in time",
            );
        };
        let ready = t_start.elapsed();
        log.boot = Some(ready);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    killer.kill();
                    log.note = Some(format!("HTTP handshake with the guest failed: {e}"));
                    return error(StatusCode::BAD_GATEWAY, "the handler failed");
                }
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let target = forwarded_target(&parts.uri, &route.route);
        let mut out = Request::builder().method(parts.method.clone()).uri(target);
        for (k, v) in parts.headers.iter() {
            if !is_hop_by_hop(k.as_str()) {
                out = out.header(k, v);
            }
        }
        let req_body: OutBody = match body {
            RequestBody::Stream(inc, _) => inc.map_err(std::io::Error::other).boxed(),
            RequestBody::Buffered(b) => Full::new(b).map_err(|never| match never {}).boxed(),
        };
        let Ok(out) = out.body(req_body) else {
            killer.kill();
            return error(StatusCode::BAD_REQUEST, "cannot forward this request");
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let resp = match tokio::time::timeout(left, sender.send_request(out)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                killer.kill();
                log.note = Some(format!("the guest's HTTP server failed: {e}"));
                return error(StatusCode::BAD_GATEWAY, "the handler failed");
            }
            Err(_) => {
                killer.kill();
                log.note = Some(format!(
                    "timeout: no response within {} ms",
                    route.route.timeout_ms
                ));
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the handler did not answer in time",
                );
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        let hop: Vec<_> = rparts
            .headers
            .keys()
            .filter(|k| is_hop_by_hop(k.as_str()))
            .cloned()
            .collect();
        for k in hop {
            rparts.headers.remove(k);
        }
        let guard = Guard {
            killer: killer.clone(),
            _permit: permit,
            timer: spawn_deadline(killer, deadline),
        };
        Response::from_parts(
            rparts,
            GuardedBody {
                inner: rbody.map_err(std::io::Error::other).boxed(),
                _guard: guard,
            }
            .boxed(),
        )
    }
}

/// Connects to a booting guest's port as soon as it accepts, without flooding it.
///
/// Until the guest's interface is up (its driver posted receive buffers: `rx_ready`, checked
/// every [`CONNECT_RETRY`]), nothing is sent: packets would only queue up and hit the guest in
/// one burst. Then one SYN at a time: a refusal (RST: the stack is up, the port not yet open)
/// is retried [`CONNECT_RETRY`] later; an attempt with no answer yet gets company after
/// `patience` (1 ms, doubling to 16 ms while the guest stays silent), at most
/// [`CONNECT_PARALLEL`] in flight, each kept up to [`CONNECT_ATTEMPT`] so a slow answer still
/// counts. On hardware a try goes out every ~1 ms; a slow guest (the lab) paces the tries
/// with its own answers instead of drowning in them. `None` at the deadline.
async fn connect_guest(
    net: &GuestNet,
    addr: SocketAddr,
    rx_ready: &std::sync::atomic::AtomicBool,
    deadline: Instant,
) -> Option<tokio::net::TcpStream> {
    let deadline = tokio::time::Instant::from_std(deadline);
    while !rx_ready.load(Ordering::Acquire) {
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(CONNECT_RETRY).await;
    }
    let mut attempts = tokio::task::JoinSet::new();
    let mut patience = CONNECT_RETRY;
    let mut next_try = tokio::time::Instant::now();
    loop {
        let can_try = attempts.len() < CONNECT_PARALLEL;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return None,
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                match done {
                    Ok(Ok(Ok(stream))) => return Some(stream),
                    // Refused (or reset): the guest answered; try again shortly.
                    Ok(Ok(Err(_))) => {
                        patience = CONNECT_RETRY;
                        next_try = tokio::time::Instant::now() + CONNECT_RETRY;
                    }
                    // No answer within CONNECT_ATTEMPT, or the task failed: others go on.
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(next_try), if can_try => {
                match net.socket().await {
                    Ok(sock) => {
                        attempts.spawn(tokio::time::timeout(CONNECT_ATTEMPT, sock.connect(addr)));
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot make a socket in the guests' namespace");
                        return None;
                    }
                }
                // If this one stays unanswered, the next goes out after `patience`.
                next_try = tokio::time::Instant::now() + patience;
                patience = (patience * 2).min(CONNECT_PATIENCE_MAX);
            }
        }
    }
}

/// The request target sent to an HTTP-mode guest: the path and query as received, or with
/// the route's prefix taken off (`strip_prefix`).
fn forwarded_target(uri: &hyper::Uri, route: &crate::config::Route) -> String {
    let path = uri.path();
    let path = if route.strip_prefix {
        let rest = path
            .strip_prefix(route.prefix.trim_end_matches('/'))
            .unwrap_or(path);
        if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        }
    } else {
        path.to_string()
    };
    match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

enum RequestBody {
    /// The client's body as it arrives, with its declared length (0: none).
    Stream(Incoming, u64),
    /// A chunked body, taken in whole.
    Buffered(Bytes),
}

impl RequestBody {
    /// A channel the handler's stdin is fed from, and CONTENT_LENGTH.
    fn into_channel(self) -> (mpsc::Receiver<Bytes>, Option<u64>) {
        let (tx, rx) = mpsc::channel(8);
        match self {
            RequestBody::Buffered(b) => {
                let len = b.len() as u64;
                if !b.is_empty() {
                    let _ = tx.try_send(b);
                }
                (rx, (len > 0).then_some(len))
            }
            RequestBody::Stream(mut inc, len) => {
                tokio::spawn(async move {
                    while let Some(frame) = inc.frame().await {
                        let Ok(frame) = frame else { break };
                        if let Ok(data) = frame.into_data() {
                            if tx.send(data).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                (rx, (len > 0).then_some(len))
            }
        }
    }
}

enum HeadError {
    Timeout,
    Bad(String),
}

/// Reads the handler's stdout up to the end of its CGI header block. Returns the parsed head
/// and the body bytes that came with it.
async fn read_head(ex: &mut Exchange, deadline: Instant) -> Result<(CgiHead, Bytes), HeadError> {
    let mut buf: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::from_std(deadline);
    loop {
        let chunk = tokio::select! {
            c = ex.stdout.recv() => c,
            _ = tokio::time::sleep_until(deadline) => return Err(HeadError::Timeout),
        };
        let Some(chunk) = chunk else {
            let why = if buf.is_empty() {
                "the handler wrote nothing".to_string()
            } else {
                cgi::CgiResponseError::Truncated.to_string()
            };
            return Err(HeadError::Bad(why));
        };
        buf.extend_from_slice(&chunk);
        if let Some(end) = cgi::header_end(&buf) {
            if end > MAX_HEADER_BLOCK {
                return Err(HeadError::Bad(
                    cgi::CgiResponseError::HeadersTooLong.to_string(),
                ));
            }
            let rest = Bytes::copy_from_slice(&buf[end..]);
            // A local redirect must have no body: look for one only if none arrived yet.
            let mut body_follows = !rest.is_empty();
            if !body_follows && is_local_redirect_candidate(&buf[..end]) {
                let peek = tokio::select! {
                    c = ex.stdout.recv() => c,
                    _ = tokio::time::sleep_until(deadline) => return Err(HeadError::Timeout),
                };
                if let Some(c) = peek {
                    body_follows = true;
                    let head = cgi::parse_head(&buf[..end], body_follows)
                        .map_err(|e| HeadError::Bad(e.to_string()))?;
                    let mut all = rest.to_vec();
                    all.extend_from_slice(&c);
                    return Ok((head, Bytes::from(all)));
                }
            }
            let head = cgi::parse_head(&buf[..end], body_follows)
                .map_err(|e| HeadError::Bad(e.to_string()))?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEADER_BLOCK {
            return Err(HeadError::Bad(
                cgi::CgiResponseError::HeadersTooLong.to_string(),
            ));
        }
    }
}

fn is_local_redirect_candidate(block: &[u8]) -> bool {
    block.split(|&b| b == b'\n').any(|l| {
        l.len() > 10
            && l[..9].eq_ignore_ascii_case(b"location:")
            && l[9..].trim_ascii_start().starts_with(b"/")
    })
}

/// Kills the handler at the route's deadline (a response still streaming is cut off).
fn spawn_deadline(killer: Killer, deadline: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
        killer.kill();
    })
}

/// Held by a response body: the concurrency slot, and the handler's life.
struct Guard {
    killer: Killer,
    _permit: OwnedSemaphorePermit,
    timer: tokio::task::JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.timer.abort();
        // Response done or client gone: the VM goes now, whatever it is doing.
        self.killer.kill();
    }
}

/// A CGI response body: the bytes that came with the headers, then the handler's stdout.
struct ChanBody {
    first: Option<Bytes>,
    rx: Option<mpsc::Receiver<Bytes>>,
    guard: Option<Guard>,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => {
                self.rx = None;
                self.guard = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rx.is_none()
    }
}

/// A proxied (HTTP mode) response body that keeps its VM's guard until it ends.
struct GuardedBody {
    inner: OutBody,
    _guard: Guard,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The per-request log line and metrics, written when the response body is finished or
/// dropped.
struct RequestLog {
    id: u64,
    route: String,
    method: Method,
    path: String,
    t0: Instant,
    boot: Option<Duration>,
    status: u16,
    note: Option<String>,
    metrics: Arc<Metrics>,
    finish: Option<oneshot::Receiver<Finish>>,
    /// The body reached its end (else the client went away first).
    done: bool,
}

impl RequestLog {
    fn write(mut self) {
        let total = self.t0.elapsed();
        self.metrics.record(self.status, total);
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(b) = self.boot {
            self.metrics.boot.observe(b);
        }
        let finish = self.finish.take();
        let client_gone = !self.done;
        // Exit status and stderr come a moment later; log once they are known (no runtime
        // left, at shutdown: log what is known now).
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            warn!(vm = self.id, route = %self.route, status = self.status, "request cut off at shutdown");
            return;
        };
        rt.spawn(async move {
            let fin = match finish {
                Some(f) => tokio::time::timeout(Duration::from_secs(2), f)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            let boot_ms = self.boot.map(|b| b.as_secs_f64() * 1e3);
            let handler_ms = self
                .boot
                .map(|b| (total.saturating_sub(b)).as_secs_f64() * 1e3);
            let total_ms = total.as_secs_f64() * 1e3;
            let exit = fin.as_ref().and_then(|f| f.exit);
            let mut note = self.note.clone().unwrap_or_default();
            if client_gone {
                note = "client went away: handler killed".into();
            }
            if let Some(f) = &fin {
                if f.exit.is_none() || self.status >= 500 {
                    if let Some(fl) = &f.failure {
                        if !note.is_empty() {
                            note.push_str("; ");
                        }
                        note.push_str(fl);
                    }
                    if !f.stderr_tail.trim().is_empty() {
                        note.push_str(&format!("; stderr: {}", f.stderr_tail.trim()));
                    }
                }
            }
            if self.status >= 500 || client_gone {
                warn!(
                    vm = self.id,
                    route = %self.route,
                    method = %self.method,
                    path = %self.path,
                    status = self.status,
                    boot_ms,
                    handler_ms,
                    total_ms,
                    exit,
                    "{note}"
                );
            } else {
                info!(
                    vm = self.id,
                    route = %self.route,
                    method = %self.method,
                    path = %self.path,
                    status = self.status,
                    boot_ms,
                    handler_ms,
                    total_ms,
                    exit,
                    "{note}"
                );
            }
        });
    }
}

/// Wraps a response body; writes the request's log line when the body ends or is dropped.
struct LoggedBody {
    inner: OutBody,
    log: Option<RequestLog>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            if let Some(mut log) = self.log.take() {
                log.done = true;
                log.write();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            // Dropped before its end: only an error here if there was a body left to send. A
            // HEAD response has no body to send: hyper drops it unpolled once the head is out.
            log.done = self.inner.is_end_stream() || log.method == Method::HEAD;
            log.write();
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<OutBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{} {msg}\n", status.as_u16())))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    let mut h = HeaderMap::new();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    *r.headers_mut() = h;
    r
}

fn describe_finish(f: &Finish) -> String {
    let mut s = match (f.exit, &f.failure) {
        (_, Some(why)) => why.clone(),
        (Some(code), None) => format!("handler exited with status {code}"),
        (None, None) => "handler state unknown".into(),
    };
    if !f.stderr_tail.trim().is_empty() {
        s.push_str(&format!("; stderr: {}", f.stderr_tail.trim()));
    }
    s
}

/// Runs the server until SIGTERM or SIGINT. Returns after the drain.
pub async fn run(server: Arc<Server>, listener: TcpListener) {
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot watch SIGTERM");
                    std::future::pending::<()>().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        }
    };
    server.serve(listener, shutdown).await;
}

/// Binds the configured address.
pub async fn bind(cfg: &Config) -> Result<TcpListener, ServeError> {
    TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.server.listen,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_target_keeps_or_strips_the_prefix() {
        let mut r = crate::config::Route::quick("/bin/true".into(), Mode::Http);
        r.prefix = "/app".into();
        let uri: hyper::Uri = "/app/x/y?q=1".parse().unwrap();
        assert_eq!(forwarded_target(&uri, &r), "/app/x/y?q=1");
        r.strip_prefix = true;
        assert_eq!(forwarded_target(&uri, &r), "/x/y?q=1");
        assert_eq!(forwarded_target(&"/app".parse().unwrap(), &r), "/");
        r.prefix = "/".into();
        assert_eq!(forwarded_target(&"/z".parse().unwrap(), &r), "/z");
    }
}
