//! The HTTP server: one fresh handler (VM or process) per request.
//!
//! A request is routed (longest prefix), checked against the route's body limit (413),
//! admitted (at most `concurrency` at once, then a bounded queue with a timeout: 503), and
//! handed to its handler. The response streams back as the handler writes it; when it ends,
//! or the client goes away, or the route's timeout passes, the handler's VM is killed. Every
//! request ends in one log line and in the metrics. Health, readiness and metrics are
//! answered under a reserved prefix and on an optional admin listener ([`crate::admin`]).

use std::convert::Infallible;
use std::future::Future;
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
use tracing::{debug, info, warn};

use crate::admin::{self, Health};
use crate::cgi::{self, CgiHead, MAX_HEADER_BLOCK};
use crate::config::{Config, Isolation, Mode};
use crate::exec::{self, Exchange, Finish, Invocation, Killer};
use crate::jail::ProcessJail;
use crate::metrics::{GaugeGuard, Metrics};
use crate::prepare::Prepared;
use crate::spares::Spares;
use crate::{conn, escape};

/// Longest request head (request line and headers) taken from a client; over it: 431.
const MAX_REQUEST_HEAD: usize = 256 * 1024;
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
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot use the socket passed by the service manager: {0}")]
    Systemd(#[from] crate::systemd::SystemdError),
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
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
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
    /// Handlers running at once (`concurrency`). A permit is held until the handler (VM or
    /// process) is gone, not until its response is written.
    slots: Arc<Semaphore>,
    /// Requests waiting for a slot (`queue`).
    waiting: AtomicUsize,
    /// Client connections open at once (`max_connections`).
    conns: Arc<Semaphore>,
    /// Bytes of chunked request bodies held at once (`body_budget`).
    body_budget: Arc<Semaphore>,
    /// Process isolation's confinement (None with VM isolation).
    jail: Option<ProcessJail>,
    net: Option<GuestNet>,
    next_id: AtomicU64,
    /// Readiness (`readyz`, `xcgi_ready`, sd_notify).
    health: Arc<Health>,
    _workdir: tempfile::TempDir,
}

/// The sockets a server accepts on.
#[derive(Debug)]
pub struct Listeners {
    /// The serving port.
    pub http: TcpListener,
    /// `server.admin_listen`: healthz, readyz and metrics only.
    pub admin: Option<TcpListener>,
}

/// Admin connections open at once (probes and scrapes: a few; kept apart from
/// `max_connections` so that a flood on the serving port does not fail the liveness probe).
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Most bytes one request may hold of the body budget (the semaphore counts in u32).
const BODY_BUDGET_MAX: u64 = u32::MAX as u64;
/// How long a proxied response may still drain after its VM ended (what the guest sent is
/// already in the host's socket buffer by then).
const VM_END_GRACE: Duration = Duration::from_millis(200);

impl Server {
    /// Prepares every route (images, kernel, network). Slow work happens here, once.
    pub fn new(cfg: Config) -> Result<Server, ServeError> {
        let workdir = tempfile::Builder::new()
            .prefix("xcgi-serve-")
            .tempdir()
            .map_err(ServeError::Workdir)?;
        let mut routes = crate::prepare::prepare(&cfg, workdir.path())?;
        let jail = if cfg.server.isolation == Isolation::Process {
            let jail = ProcessJail::new(&cfg.process)?;
            for r in &routes {
                jail.check_executable(&r.program)?;
            }
            Some(jail)
        } else {
            None
        };
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
        let pools = routes
            .iter()
            .filter_map(|r| Some((r.route.prefix.clone(), r.spec.as_ref()?.spares.clone()?)))
            .collect();
        Ok(Server {
            health: Arc::new(Health::new(Arc::clone(&metrics), pools)),
            slots: Arc::new(Semaphore::new(cfg.server.concurrency)),
            conns: Arc::new(Semaphore::new(cfg.server.max_connections)),
            body_budget: Arc::new(Semaphore::new(
                cfg.server.body_budget.min(BODY_BUDGET_MAX) as usize
            )),
            cfg,
            routes,
            metrics,
            waiting: AtomicUsize::new(0),
            jail,
            net,
            next_id: AtomicU64::new(1),
            _workdir: workdir,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn timeouts(&self) -> conn::Timeouts {
        let s = &self.cfg.server;
        conn::Timeouts {
            idle: Duration::from_millis(s.idle_timeout_ms),
            header: Duration::from_millis(s.header_timeout_ms),
            write: Duration::from_millis(s.write_timeout_ms),
        }
    }

    /// Serves until `shutdown` resolves; then readiness goes false, new connections are
    /// still taken for `drain_delay_ms` (not for a [`Shutdown::Handover`]), then accepting
    /// stops, in-flight requests finish (up to `drain_timeout_ms`) and every VM is torn down.
    pub async fn serve(
        self: Arc<Self>,
        listeners: Listeners,
        shutdown: impl std::future::Future<Output = Shutdown>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let admin = listeners
            .admin
            .map(|l| tokio::spawn(Arc::clone(&self).serve_admin(l)));
        self.health.set_serving();
        let watcher = tokio::spawn(watch_readiness(Arc::clone(&self.health)));
        let health = Arc::clone(&self.health);
        let delay = Duration::from_millis(self.cfg.server.drain_delay_ms);
        let stop = async move {
            let how = shutdown.await;
            health.begin_drain();
            notify("STOPPING=1\nSTATUS=draining");
            if how == Shutdown::Drain && !delay.is_zero() {
                info!(
                    drain_delay_ms = delay.as_millis() as u64,
                    "not ready any more; still accepting for drain_delay_ms"
                );
                tokio::time::sleep(delay).await;
            }
        };
        Arc::clone(&self)
            .accept_loop(listeners.http, &graceful, stop)
            .await;
        watcher.abort();
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
        self.wind_down().await;
        if let Some(a) = admin {
            a.abort();
        }
        info!("server stopped");
    }

    /// Accepts on the serving port until `stop` resolves; each connection is watched by
    /// `graceful`.
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        graceful: &hyper_util::server::graceful::GracefulShutdown,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let local = listener.local_addr().ok();
        let timeouts = self.timeouts();
        let mut backoff = conn::AcceptBackoff::default();
        tokio::pin!(stop);
        loop {
            let (stream, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => {
                        backoff.succeeded();
                        x
                    }
                    Err(e) => {
                        accept_failed(&mut backoff, e).await;
                        continue;
                    }
                },
                _ = &mut stop => break,
            };
            let Ok(conn_slot) = Arc::clone(&self.conns).try_acquire_owned() else {
                self.refuse(stream);
                continue;
            };
            let open = GaugeGuard::add(&self.metrics, |m| &m.connections_open, 1);
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().ok().or(local).unwrap_or(remote);
            let activity = Arc::new(conn::Activity::default());
            let io = conn::TimedIo::new(stream, timeouts, Arc::clone(&activity));
            let me = Arc::clone(&self);
            let svc = hyper::service::service_fn(move |req| {
                let me = Arc::clone(&me);
                let activity = Arc::clone(&activity);
                async move { Ok::<_, Infallible>(me.handle(req, remote, local, activity).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(io), svc);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
                drop(conn_slot);
                drop(open);
            });
        }
    }

    /// Over `max_connections`: close at once (the client sees the connection reset or
    /// closed) rather than let it queue behind the cap.
    fn refuse(&self, stream: tokio::net::TcpStream) {
        let n = self
            .metrics
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1000) {
            warn!(
                max_connections = self.cfg.server.max_connections,
                refused = n + 1,
                "connection cap reached: closing new connections (logged every 1000th)"
            );
        }
        drop(stream);
    }

    /// The admin listener: healthz, readyz and metrics, with the serving port's deadlines
    /// and a small connection cap of its own. Runs until aborted.
    async fn serve_admin(self: Arc<Self>, listener: TcpListener) {
        let cap = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
        let timeouts = self.timeouts();
        let mut backoff = conn::AcceptBackoff::default();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    backoff.succeeded();
                    s
                }
                Err(e) => {
                    accept_failed(&mut backoff, e).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&cap).try_acquire_owned() else {
                continue; // dropped: closed at once
            };
            let io = conn::TimedIo::new(stream, timeouts, Arc::new(conn::Activity::default()));
            let me = Arc::clone(&self);
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let ep = admin::on_admin_port(req.uri().path(), &me.cfg.server.admin_prefix);
                let resp = admin::respond(ep, req.method(), &me.health);
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
                drop(slot);
            });
        }
    }

    /// After the drain: VMs prepared ahead go, handlers still ending are waited for (so
    /// nothing outlives the server), and the TAP pool is emptied.
    async fn wind_down(&self) {
        // Closing a VM blocks for milliseconds: off the runtime's threads.
        let spares: Vec<_> = self
            .routes
            .iter()
            .filter_map(|r| r.spec.as_ref()?.spares.clone())
            .collect();
        let _ = tokio::task::spawn_blocking(move || spares.iter().for_each(|s| s.stop())).await;
        let t = Instant::now();
        while (self.metrics.vms_running.load(Ordering::Relaxed) > 0
            || self.slots.available_permits() < self.cfg.server.concurrency)
            && t.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(net) = &self.net {
            net.pool.wait_idle(Duration::from_secs(5));
        }
    }

    /// The admin endpoint a serving-port request names (under `admin_prefix`), if any. The
    /// path is normalised first, so `/x/../_xcgi/readyz` is the endpoint too, and nothing
    /// under the prefix ever reaches a route.
    fn admin_endpoint(&self, raw: &str) -> Option<admin::Endpoint> {
        let s = &self.cfg.server;
        let path = crate::path::normalize(raw).ok()?;
        admin::on_serving_port(&path.decoded, &s.admin_prefix, s.admin_listen.is_none())
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
        local: SocketAddr,
        activity: Arc<conn::Activity>,
    ) -> Response<OutBody> {
        let t0 = Instant::now();
        let active = activity.begin();
        if let Some(ep) = self.admin_endpoint(req.uri().path()) {
            return admin::respond(ep, req.method(), &self.health)
                .map(|b| b.map_err(|never| match never {}).boxed());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut log = RequestLog::new(
            id,
            req.method().clone(),
            req.uri().path(),
            t0,
            &self.metrics,
            active,
        );
        let resp = self.dispatch(req, remote, local, id, &mut log).await;
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
        id: u64,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        let rpath = match crate::path::normalize(req.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                log.note = Some(format!("bad request path: {e}"));
                return error(StatusCode::BAD_REQUEST, &format!("bad request path: {e}"));
            }
        };
        let Some((index, _)) = self.cfg.route_for(&rpath.decoded) else {
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
        // Admission first: nothing of a request is taken in before it has a slot.
        let deadline = log.t0 + route.route.timeout();
        let permit = match self.admit(deadline).await {
            Ok(p) => p,
            Err(Refused::Busy(why)) => {
                log.note = Some(why.into());
                return error(StatusCode::SERVICE_UNAVAILABLE, why);
            }
            Err(Refused::Deadline) => {
                log.note = Some("the request's deadline passed while it waited for a slot".into());
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the request's deadline passed while it waited",
                );
            }
        };
        let slot = Arc::new(permit);
        let body_deadline = Instant::now() + Duration::from_millis(self.cfg.server.body_timeout_ms);
        let body = if declared.is_some() || incoming.is_end_stream() {
            RequestBody::Stream(incoming, declared.unwrap_or(0), body_deadline)
        } else {
            // Chunked: CGI needs CONTENT_LENGTH, so take it in (up to the limits) first.
            match self
                .buffer_body(incoming, route.route.max_body, body_deadline.min(deadline))
                .await
            {
                Ok((bytes, budget)) => RequestBody::Buffered(bytes, budget),
                Err(e) => {
                    log.note = Some(e.to_string());
                    return e.response();
                }
            }
        };
        let job = Job {
            route,
            parts,
            path: rpath,
            body,
            slot,
            deadline,
            id,
        };
        match route.route.mode {
            Mode::Cgi => self.cgi(job, remote, local, log).await,
            Mode::Http => self.http(job, log).await,
        }
    }

    /// Takes in a chunked body whole: at most `max` bytes, within the server's body budget,
    /// before `deadline`.
    async fn buffer_body(
        &self,
        mut incoming: Incoming,
        max: u64,
        deadline: Instant,
    ) -> Result<(Bytes, Option<BudgetHold>), BodyError> {
        let mut buf = bytes::BytesMut::new();
        let mut hold: Option<BudgetHold> = None;
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            let frame = match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Err(_) => return Err(BodyError::Timeout),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(BodyError::Read),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let len = data.len() as u64;
            if buf.len() as u64 + len > max {
                return Err(BodyError::TooLarge);
            }
            let more = u32::try_from(len).map_err(|_| BodyError::TooLarge)?;
            let permit = Arc::clone(&self.body_budget)
                .try_acquire_many_owned(more)
                .map_err(|_| BodyError::Budget)?;
            match &mut hold {
                Some(h) => h.add(permit, len),
                None => hold = Some(BudgetHold::new(permit, len, &self.metrics)),
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), hold))
    }

    /// A concurrency slot: at once, or after waiting in the bounded queue (no longer than
    /// `queue_timeout_ms`, nor past the request's deadline).
    async fn admit(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(p);
        }
        // Both counts come back down however this ends: a queued client that hangs up
        // cancels this future mid-wait.
        let Some(_spot) = QueueSpot::take(&self.waiting, self.cfg.server.queue) else {
            return Err(Refused::Busy("server busy: the request queue is full"));
        };
        let _depth = GaugeGuard::add(&self.metrics, |m| &m.queue_depth, 1);
        let queue_end = Instant::now() + Duration::from_millis(self.cfg.server.queue_timeout_ms);
        let until = queue_end.min(deadline);
        let r = tokio::time::timeout_at(
            tokio::time::Instant::from_std(until),
            Arc::clone(&self.slots).acquire_owned(),
        )
        .await;
        match r {
            Ok(Ok(p)) if Instant::now() < deadline => Ok(p),
            Ok(Ok(_)) => Err(Refused::Deadline),
            Ok(Err(_)) => Err(Refused::Busy("server shutting down")),
            Err(_) if deadline <= queue_end => Err(Refused::Deadline),
            Err(_) => Err(Refused::Busy("server busy: waited too long in the queue")),
        }
    }

    /// Starts the route's handler for one CGI request: a VM, or a jailed process.
    fn start_cgi(
        &self,
        route: &Prepared,
        inv: &Invocation,
        body: mpsc::Receiver<Bytes>,
        slot: &Arc<OwnedSemaphorePermit>,
        id: u64,
    ) -> Result<Exchange, exec::ExecError> {
        match (&route.spec, &self.jail) {
            (Some(spec), None) => {
                exec::spawn_vm_cgi(spec, inv, body, Arc::clone(&self.metrics), Arc::clone(slot))
            }
            (_, Some(jail)) => exec::spawn_process(inv, body, jail, id, Arc::clone(slot)),
            (None, None) => Err(exec::ExecError::Spawn {
                program: inv.program.clone(),
                source: std::io::Error::other("VM isolation without a VM spec"),
            }),
        }
    }

    async fn cgi(
        &self,
        job: Job<'_>,
        remote: SocketAddr,
        local: SocketAddr,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        let Job {
            mut route,
            parts,
            path: rpath,
            body,
            slot,
            deadline,
            id,
        } = job;
        let mut method = parts.method.clone();
        let mut path = rpath.decoded;
        let mut query = parts.uri.query().unwrap_or("").to_string();
        let mut body = Some(body);
        for _ in 0..=MAX_LOCAL_REDIRECTS {
            let (body_rx, content_length, mut late) = match body.take() {
                Some(b) => b.into_channel(),
                None => (mpsc::channel(1).1, None, oneshot::channel().1),
            };
            let extra: Vec<(String, String)> = route
                .route
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let info = cgi::RequestInfo {
                method: &method,
                version: parts.version,
                path: &path,
                query: &query,
                headers: &parts.headers,
                remote,
                local,
                script_name: &route.route.prefix,
                document_root: &route.route.document_root,
                content_length,
                pass_authorization: route.route.pass_authorization,
            };
            let env = match cgi::environment(&info, &extra) {
                Ok(env) => env,
                Err(e) => {
                    log.note = Some(e.to_string());
                    return error(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request header fields too large for a CGI environment",
                    );
                }
            };
            let inv = Invocation {
                program: route.program.clone(),
                env,
                cwd: route.cwd.clone(),
            };
            let mut ex = match self.start_cgi(route, &inv, body_rx, &slot, id) {
                Ok(ex) => ex,
                Err(e) => {
                    log.note = Some(e.to_string());
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "cannot start the handler",
                    );
                }
            };
            // Biased: a body that came too late must not pass for complete because the
            // handler answered the EOF it got when the feeding stopped.
            let head = tokio::select! {
                biased;
                Ok(()) = &mut late => Err(HeadError::BodyTimeout),
                h = read_head(&mut ex, deadline) => h,
            };
            let (head, rest) = match head {
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
                Err(HeadError::BodyTimeout) => {
                    ex.killer.kill();
                    log.note = Some(format!(
                        "the request body did not arrive within {} ms",
                        self.cfg.server.body_timeout_ms
                    ));
                    log.finish = Some(ex.finish);
                    return error(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body came too slowly",
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
                    let target = crate::path::normalize(p).ok();
                    query = q.to_string();
                    method = Method::GET;
                    match target.as_ref().and_then(|t| self.cfg.route_for(&t.decoded)) {
                        Some((i, r)) if r.mode == Mode::Cgi => route = &self.routes[i],
                        _ => {
                            log.note = Some(format!("local redirect to {location}: no CGI route"));
                            return error(StatusCode::BAD_GATEWAY, "bad local redirect");
                        }
                    }
                    path = target.map(|t| t.decoded).unwrap_or_default();
                    continue;
                }
                CgiHead::Document { status, headers } => {
                    let mut resp = Response::new(
                        ChanBody {
                            first: (!rest.is_empty()).then_some(rest),
                            rx: Some(ex.stdout),
                            complete: ex.complete,
                            guard: Some(Guard {
                                killer: ex.killer.clone(),
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

    async fn http(&self, job: Job<'_>, log: &mut RequestLog) -> Response<OutBody> {
        let Job {
            route,
            parts,
            path,
            body,
            slot,
            deadline,
            ..
        } = job;
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
        // The slot and the TAP stay taken until the VM is gone.
        let vm = match exec::start_vm(spec, cfg, Arc::clone(&self.metrics), (lease, slot)) {
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
        let target = forwarded_target(&path, parts.uri.query(), &route.route);
        let mut out = Request::builder().method(parts.method.clone()).uri(target);
        for (k, v) in parts.headers.iter() {
            if !is_hop_by_hop(k.as_str()) {
                out = out.header(k, v);
            }
        }
        let (req_body, budget): (OutBody, _) = match body {
            RequestBody::Stream(inc, _, body_deadline) => (
                TimedBody {
                    inner: inc,
                    deadline: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                        body_deadline,
                    ))),
                }
                .boxed(),
                None,
            ),
            RequestBody::Buffered(b, hold) => {
                (Full::new(b).map_err(|never| match never {}).boxed(), hold)
            }
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
            timer: spawn_deadline(killer, deadline),
        };
        Response::from_parts(
            rparts,
            GuardedBody {
                inner: rbody.map_err(std::io::Error::other).boxed(),
                vm_end: outcome,
                grace: None,
                _guard: guard,
                _budget: budget,
            }
            .boxed(),
        )
    }
}

/// One admitted request on its way to its handler.
struct Job<'a> {
    route: &'a Prepared,
    parts: hyper::http::request::Parts,
    path: crate::path::RequestPath,
    body: RequestBody,
    /// The concurrency slot: shared with the handler, which holds it until it is gone.
    slot: Arc<OwnedSemaphorePermit>,
    deadline: Instant,
    id: u64,
}

/// Why a request got no slot.
enum Refused {
    /// 503, with the reason.
    Busy(&'static str),
    /// 504: its deadline passed while it waited (no handler is started for it).
    Deadline,
}

/// A place in the admission queue, given back on drop (RAII).
struct QueueSpot<'a>(&'a AtomicUsize);

impl<'a> QueueSpot<'a> {
    fn take(waiting: &'a AtomicUsize, limit: usize) -> Option<Self> {
        if waiting.fetch_add(1, Ordering::SeqCst) >= limit {
            waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(QueueSpot(waiting))
    }
}

impl Drop for QueueSpot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a chunked request body was not taken in.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("chunked body over the route's max_body")]
    TooLarge,
    #[error("the server's body budget (body_budget) is used up")]
    Budget,
    #[error("the request body did not arrive in time (body_timeout_ms)")]
    Timeout,
    #[error("cannot read the request body")]
    Read,
}

impl BodyError {
    fn response(&self) -> Response<OutBody> {
        match self {
            BodyError::TooLarge => error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            BodyError::Budget => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server busy: too many request bodies in memory",
            ),
            BodyError::Timeout => error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body came too slowly",
            ),
            BodyError::Read => error(StatusCode::BAD_REQUEST, "cannot read the request body"),
        }
    }
}

/// Bytes of the body budget a buffered body holds, and the gauge that shows them.
struct BudgetHold {
    permit: OwnedSemaphorePermit,
    _gauge: GaugeGuard,
    metrics: Arc<Metrics>,
    extra: i64,
}

impl BudgetHold {
    fn new(permit: OwnedSemaphorePermit, len: u64, metrics: &Arc<Metrics>) -> Self {
        BudgetHold {
            permit,
            _gauge: GaugeGuard::add(metrics, |m| &m.body_bytes_buffered, len as i64),
            metrics: Arc::clone(metrics),
            extra: 0,
        }
    }

    fn add(&mut self, permit: OwnedSemaphorePermit, len: u64) {
        self.permit.merge(permit);
        self.extra += len as i64;
        self.metrics
            .body_bytes_buffered
            .fetch_add(len as i64, Ordering::Relaxed);
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.metrics
            .body_bytes_buffered
            .fetch_sub(self.extra, Ordering::Relaxed);
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

/// The request target sent to an HTTP-mode guest: the normalised path as the client encoded
/// it, or without the route's prefix (`strip_prefix`), and the query.
fn forwarded_target(
    path: &crate::path::RequestPath,
    query: Option<&str>,
    route: &crate::config::Route,
) -> String {
    let path = if route.strip_prefix {
        let segments = route.prefix.split('/').filter(|s| !s.is_empty()).count();
        path.raw_without_segments(segments)
    } else {
        path.raw.clone()
    };
    match query {
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
    /// The client's body as it arrives, with its declared length (0: none) and the time by
    /// which it must have arrived.
    Stream(Incoming, u64, Instant),
    /// A chunked body, taken in whole, and the share of the body budget it holds.
    Buffered(Bytes, Option<BudgetHold>),
}

impl RequestBody {
    /// A channel the handler's stdin is fed from, CONTENT_LENGTH, and a signal that fires
    /// if the body did not arrive by its deadline (the feeding stops then).
    fn into_channel(self) -> (mpsc::Receiver<Bytes>, Option<u64>, oneshot::Receiver<()>) {
        let (late_tx, late) = oneshot::channel();
        match self {
            RequestBody::Buffered(b, hold) => {
                // Capacity 1: once the handler side has taken the body, there is room again,
                // and the budget goes back. The sender is dropped then, so the handler's
                // stdin gets its EOF.
                let (tx, rx) = mpsc::channel(1);
                let len = b.len() as u64;
                if !b.is_empty() {
                    tokio::spawn(async move {
                        if tx.send(b).await.is_ok() {
                            let _ = tx.reserve().await;
                        }
                        drop(hold);
                        drop(late_tx);
                    });
                }
                (rx, (len > 0).then_some(len), late)
            }
            RequestBody::Stream(mut inc, len, by) => {
                let (tx, rx) = mpsc::channel(8);
                tokio::spawn(async move {
                    let by = tokio::time::Instant::from_std(by);
                    loop {
                        let frame = tokio::select! {
                            f = inc.frame() => f,
                            _ = tokio::time::sleep_until(by) => {
                                let _ = late_tx.send(());
                                return;
                            }
                        };
                        let Some(Ok(frame)) = frame else { break };
                        if let Ok(data) = frame.into_data() {
                            if tx.send(data).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                (rx, (len > 0).then_some(len), late)
            }
        }
    }
}

/// A request body for an HTTP-mode guest that fails once its deadline passes (a client
/// trickling its body must not hold a VM until the route's deadline).
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(std::io::Error::other)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body did not arrive in time",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum HeadError {
    Timeout,
    BodyTimeout,
    Bad(String),
}

/// Reads the handler's stdout up to the end of its CGI header block. Returns the parsed head
/// and the body bytes that came with it. Each byte is looked at once ([`cgi::HeadScanner`]),
/// however small the pieces it arrives in.
async fn read_head(ex: &mut Exchange, deadline: Instant) -> Result<(CgiHead, Bytes), HeadError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut scanner = cgi::HeadScanner::default();
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
        if let Some(end) = scanner.scan(&buf) {
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

/// Held by a response body: the handler's life (the concurrency slot is the handler's own:
/// it goes when the handler is gone, whether or not the client reads).
struct Guard {
    killer: Killer,
    timer: tokio::task::JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.timer.abort();
        // Response done or client gone: the handler goes now, whatever it is doing.
        self.killer.kill();
    }
}

/// A CGI response body: the bytes that came with the headers, then the handler's stdout.
/// Output cut short (the handler killed at its deadline, its VM died) ends in an error, so
/// the client sees a truncated response, not a complete one: hyper then closes the
/// connection without the final chunk.
struct ChanBody {
    first: Option<Bytes>,
    rx: Option<mpsc::Receiver<Bytes>>,
    complete: Arc<std::sync::atomic::AtomicBool>,
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
                if self.complete.load(Ordering::SeqCst) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(std::io::Error::other(
                        "the handler was stopped before its response was complete",
                    ))))
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rx.is_none()
    }
}

/// A proxied (HTTP mode) response body that keeps its VM's guard until it ends. Once the VM
/// is gone (killed at the deadline, crashed), nothing more can come: after a short grace
/// for what is already in the host's socket buffer, the body fails instead of waiting on a
/// peer that vanished without closing.
struct GuardedBody {
    inner: OutBody,
    /// Resolves when the VM is gone.
    vm_end: oneshot::Receiver<Result<xcgi_vmm::Outcome, String>>,
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    _guard: Guard,
    _budget: Option<BudgetHold>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f);
        }
        if self.grace.is_none() {
            if Pin::new(&mut self.vm_end).poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.grace = Some(Box::pin(tokio::time::sleep(VM_END_GRACE)));
        }
        match self.grace.as_mut().map(|g| g.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(std::io::Error::other(
                "the VM ended before its response was complete",
            )))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The per-request log line and metrics, written once, when the response body is finished
/// or dropped, or when the request is abandoned earlier (its future dropped because the
/// client went away: `Drop` writes it then, so no gauge is left counting it).
struct RequestLog {
    id: u64,
    route: String,
    method: Method,
    /// The path as the client sent it, escaped and cut for the log.
    path: String,
    t0: Instant,
    boot: Option<Duration>,
    status: u16,
    note: Option<String>,
    metrics: Arc<Metrics>,
    finish: Option<oneshot::Receiver<Finish>>,
    /// The body reached its end (else the client went away first).
    done: bool,
    /// The body ended in an error: the client got a truncated response.
    cut: bool,
    _in_flight: GaugeGuard,
    _active: conn::ActiveRequest,
}

/// Rounds a duration to milliseconds with one decimal, for a log field.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

impl RequestLog {
    fn new(
        id: u64,
        method: Method,
        path: &str,
        t0: Instant,
        metrics: &Arc<Metrics>,
        active: conn::ActiveRequest,
    ) -> Self {
        RequestLog {
            id,
            route: String::new(),
            method,
            path: escape::for_log(path, 256),
            t0,
            boot: None,
            // Until a response exists: "client closed the request" (nginx's 499).
            status: 499,
            note: None,
            metrics: Arc::clone(metrics),
            finish: None,
            done: false,
            cut: false,
            _in_flight: GaugeGuard::add(metrics, |m| &m.in_flight, 1),
            _active: active,
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let total = self.t0.elapsed();
        self.metrics.record(self.status, total);
        if let Some(b) = self.boot {
            self.metrics.boot.observe(b);
        }
        let finish = self.finish.take();
        let client_gone = !self.done;
        let (id, status, boot, cut) = (self.id, self.status, self.boot, self.cut);
        let route = escape::for_log(&self.route, 256);
        let method = self.method.clone();
        let path = std::mem::take(&mut self.path);
        let note = self.note.take();
        // Exit status and stderr come a moment later; log once they are known (no runtime
        // left, at shutdown: log what is known now).
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            warn!(vm = id, route = %route, status, "request cut off at shutdown");
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
            let boot_ms = boot.map(ms);
            let handler_ms = boot.map(|b| ms(total.saturating_sub(b)));
            let total_ms = ms(total);
            let exit = fin.as_ref().and_then(|f| f.exit);
            let mut note = note.unwrap_or_default();
            if client_gone {
                note = "client went away: handler killed".into();
            }
            if let Some(f) = &fin {
                if f.exit.is_none() || status >= 500 {
                    if let Some(fl) = &f.failure {
                        if !note.is_empty() {
                            note.push_str("; ");
                        }
                        note.push_str(fl);
                    }
                    if !f.stderr_tail.trim().is_empty() {
                        note.push_str("; stderr: ");
                        note.push_str(f.stderr_tail.trim());
                    }
                }
            }
            // Handler, guest and client text is in here: escaped and cut.
            let note = escape::for_log(&note, escape::LOG_TEXT_MAX);
            if status >= 500 || client_gone || cut {
                warn!(
                    vm = id,
                    route = %route,
                    method = %method,
                    path = %path,
                    status,
                    boot_ms,
                    handler_ms,
                    total_ms,
                    exit,
                    "{note}"
                );
            } else {
                info!(
                    vm = id,
                    route = %route,
                    method = %method,
                    path = %path,
                    status,
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
        match &r {
            Poll::Ready(None) => {
                if let Some(mut log) = self.log.take() {
                    log.done = true;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut log) = self.log.take() {
                    log.done = true;
                    log.cut = true;
                    let cut = format!("response cut off: {e}");
                    log.note = Some(match log.note.take() {
                        Some(n) => format!("{n}; {cut}"),
                        None => cut,
                    });
                }
            }
            _ => {}
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
        if let Some(log) = self.log.as_mut() {
            // Dropped before its end: only an error here if there was a body left to send. A
            // HEAD response has no body to send: hyper drops it unpolled once the head is out.
            log.done = self.inner.is_end_stream() || log.method == Method::HEAD;
        }
    }
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
        s.push_str("; stderr: ");
        s.push_str(f.stderr_tail.trim());
    }
    s
}

/// An accept error: resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off, since the
/// pending connection stays queued and retrying at once would spin; others are one
/// connection's problem.
async fn accept_failed(backoff: &mut conn::AcceptBackoff, e: std::io::Error) {
    if !conn::AcceptBackoff::is_resource_error(&e) {
        debug!(error = %e, "accept failed (one connection)");
        return;
    }
    let (pause, report) = backoff.failed(Instant::now());
    if let Some(failures) = report {
        warn!(error = %e, failures, pause_ms = pause.as_millis() as u64,
            "accept failed for lack of resources; backing off (at most one line per 10 s)");
    }
    tokio::time::sleep(pause).await;
}

/// Tells the service manager (sd_notify), where there is one; a failure is logged once.
fn notify(state: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = crate::systemd::notify(state) {
        WARNED
            .call_once(|| warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)"));
    }
}

/// Follows readiness: READY=1 to the service manager the first time it is ready, STATUS=
/// when it changes, and the `xcgi_ready` gauge kept current between scrapes.
async fn watch_readiness(health: Arc<Health>) {
    let mut said_ready = false;
    let mut last = String::new();
    loop {
        let r = health.readiness();
        let status = match &r {
            Ok(()) => "ready".to_string(),
            Err(why) => format!("not ready: {why}"),
        };
        if r.is_ok() && !said_ready {
            said_ready = true;
            info!("ready for traffic");
            notify(&format!("READY=1\nSTATUS={status}"));
        } else if status != last {
            info!(%status, "readiness changed");
            notify(&format!("STATUS={status}"));
        }
        last = status;
        if health.draining() {
            return;
        }
        let pause = if said_ready { 1000 } else { 10 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// How a server is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGTERM / SIGINT: not ready at once, still accepting for `drain_delay_ms` (so a
    /// balancer's health check sees it leave), then drain.
    Drain,
    /// SIGUSR1: a new instance already serves beside this one on the same port
    /// (`reuse_port`): stop accepting at once (the delay would only make the shared address
    /// look half unready to a balancer), then drain.
    Handover,
}

/// Runs the server until SIGTERM, SIGINT or SIGUSR1 ([`Shutdown`]). Returns after the drain.
pub async fn run(server: Arc<Server>, listeners: Listeners) {
    use tokio::signal::unix::{signal, SignalKind};
    let shutdown = async {
        let (term, usr1) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::user_defined1()),
        ) {
            (Ok(t), Ok(u)) => (t, u),
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %e, "cannot watch SIGTERM / SIGUSR1");
                return std::future::pending::<Shutdown>().await;
            }
        };
        let (mut term, mut usr1) = (term, usr1);
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: draining"); Shutdown::Drain }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: draining"); Shutdown::Drain }
            _ = usr1.recv() => { info!("SIGUSR1: handing over (no drain delay)"); Shutdown::Handover }
        }
    };
    server.serve(listeners, shutdown).await;
}

/// The listeners: those the service manager passed (socket activation), else bound to the
/// configured addresses (SO_REUSEPORT with `reuse_port`). Raises the open-file limit first
/// (to its hard limit).
pub async fn bind(
    cfg: &Config,
    inherited: crate::systemd::Inherited,
) -> Result<Listeners, ServeError> {
    match conn::raise_fd_limit() {
        Ok((old, new)) if new > old => info!(old, new, "raised the open-file limit"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
    let s = &cfg.server;
    let from_manager = |l: std::net::TcpListener, addr| {
        TcpListener::from_std(l).map_err(|source| ServeError::Listen {
            addr,
            source,
            hint: "",
        })
    };
    let http = match inherited.http {
        Some(l) => from_manager(l, s.listen)?,
        None => bind_one(s.listen, s.reuse_port)?,
    };
    let admin = match (inherited.admin, s.admin_listen) {
        (Some(l), a) => Some(from_manager(l, a.unwrap_or(s.listen))?),
        (None, Some(a)) => Some(bind_one(a, s.reuse_port)?),
        (None, None) => None,
    };
    Ok(Listeners { http, admin })
}

/// A listening socket on `addr` (SO_REUSEADDR; SO_REUSEPORT when asked).
fn bind_one(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, ServeError> {
    let err = |source: std::io::Error| ServeError::Listen {
        addr,
        hint: match source.kind() {
            std::io::ErrorKind::AddrInUse if reuse_port => {
                " (another socket holds it without SO_REUSEPORT, or as another user)"
            }
            std::io::ErrorKind::AddrInUse => {
                " (another server listens there; to start a new instance beside a running one \
                 during a restart, set server.reuse_port = true in both, or --reuse-port)"
            }
            _ => "",
        },
        source,
    };
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    if reuse_port {
        sock.set_reuseport(true).map_err(err)?;
    }
    sock.bind(addr).map_err(err)?;
    sock.listen(LISTEN_BACKLOG).map_err(err)
}

/// The accept queue's length (the kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_target_keeps_or_strips_the_prefix() {
        let mut r = crate::config::Route::quick("/bin/true".into(), Mode::Http);
        r.prefix = "/app".into();
        let p = |s: &str| crate::path::normalize(s).unwrap();
        assert_eq!(
            forwarded_target(&p("/app/x/y"), Some("q=1"), &r),
            "/app/x/y?q=1"
        );
        r.strip_prefix = true;
        assert_eq!(
            forwarded_target(&p("/app/x/y"), Some("q=1"), &r),
            "/x/y?q=1"
        );
        assert_eq!(forwarded_target(&p("/app"), None, &r), "/");
        assert_eq!(forwarded_target(&p("/app/./a%20b/../c"), None, &r), "/c");
        r.prefix = "/".into();
        assert_eq!(forwarded_target(&p("/z"), None, &r), "/z");
    }
}
