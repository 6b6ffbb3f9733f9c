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
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use xcgi_net::GuestNet;

use crate::admin::{self, Health};
use crate::cgi::{self, CgiHead, MAX_HEADER_BLOCK};
use crate::config::{Config, Isolation, Mode};
use crate::exec::{
    CgiStart, Exchange, Finish, GuestConnection, Invocation, Killer, ProcessExecutor, RouteExec,
    VmCgiExecutor, VmHttpExecutor,
};
use crate::images::ServedRoute;
use crate::jail::ProcessJail;
use crate::metrics::{GaugeGuard, Metrics};
use crate::{conn, escape};

mod admission;
mod body;
mod cgi_exchange;
mod deadline;
mod listen;
mod proxy;
mod reqlog;
#[cfg(test)]
mod tests;

use body::*;
use deadline::*;
pub use listen::{bind, run, Shutdown};
use reqlog::*;

/// Longest request head (request line and headers) taken from a client; over it: 431.
const MAX_REQUEST_HEAD: usize = 256 * 1024;
/// Local redirects followed for one request before giving up (502).
const MAX_LOCAL_REDIRECTS: usize = 5;
/// Why the server could not be set up or could not listen.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound (or a passed socket not taken over).
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
        /// What to check, when the error suggests something (address in use); else empty.
        hint: &'static str,
    },
    /// The sockets passed by the service manager are unusable.
    #[error("cannot use the socket passed by the service manager: {0}")]
    Systemd(#[from] crate::systemd::SystemdError),
    /// A route's kernel, `xcgi-init` or guest image could not be made ready.
    #[error(transparent)]
    Prepare(#[from] crate::images::ImageError),
    /// The guests' network (namespace, TAP pool) could not be set up.
    #[error("guest network: {0}")]
    Net(#[from] xcgi_net::NetError),
    /// The temporary directory for packed guest images could not be created.
    #[error("cannot create the work directory: {0}")]
    Workdir(std::io::Error),
    /// A thread could not be started (not produced at present).
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The thread that keeps templates current could not start.
    #[error("cannot start the template keeper's thread: {0}")]
    Keeper(std::io::Error),
    /// A `start = "snapshot"` route's template could not be taken.
    #[error("route {route}: start = \"snapshot\": {source}")]
    Template {
        /// The route's prefix.
        route: String,
        /// Why.
        #[source]
        source: crate::exec::template::TemplateError,
    },
    /// A pool of VMs prepared ahead could not start its thread.
    #[error("cannot start the thread that prepares VMs ahead: {0}")]
    Pool(std::io::Error),
    /// Process isolation: the handlers' user is missing or root, or cannot run a handler.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// `[server] jail`: the jailed VM processes cannot be had.
    #[error("{0}")]
    VmJail(String),
    /// `[server] user`: the switch to that user failed.
    #[error("{0}")]
    Privileges(String),
    /// A route with no way to run; holds its prefix (a checked configuration has none).
    #[error("route {0:?}: no way to run it (VM isolation without a VM, or HTTP mode without a guest network)")]
    Unwired(String),
}

type OutBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// What `poll_frame` of the server's bodies returns.
type FramePoll = std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>>;

/// `is_end_stream` and `size_hint` of a body that wraps another in `self.inner`.
macro_rules! forward_body_hints {
    () => {
        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> hyper::body::SizeHint {
            self.inner.size_hint()
        }
    };
}
use forward_body_hints;

/// A running server's shared state.
pub struct Server {
    cfg: Config,
    routes: Vec<ServedRoute>,
    /// The counters and gauges `metrics` renders.
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
    /// The guests' network (HTTP-mode routes).
    net: Option<Arc<GuestNet>>,
    /// The jail helper (`[server] jail`): closed last at wind-down.
    helper: Option<Arc<crate::exec::jailed::Helper>>,
    next_id: AtomicU64,
    /// Readiness (`readyz`, `xcgi_ready`, sd_notify).
    health: Arc<Health>,
    /// Keeps `start = "snapshot"` routes' templates current; stopped first at wind-down.
    keeper: std::sync::Mutex<Option<crate::exec::template::Keeper>>,
    /// The server's directory on hugetlbfs (huge-page templates' memory), if it has one.
    huge_dir: Option<std::path::PathBuf>,
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
        let mut routes = crate::images::build_routes(&cfg, workdir.path())?;
        let net = if cfg.needs_network() {
            let name = cfg
                .network
                .netns
                .clone()
                .unwrap_or_else(|| format!("xcgi-serve-{}", std::process::id()));
            let pool = xcgi_net::PoolConfig {
                base: cfg.network.base,
                size: cfg.network.size,
                prefill: cfg.network.prefill,
            };
            Some(Arc::new(GuestNet::new(&name, pool)?))
        } else {
            None
        };
        let metrics = Arc::new(Metrics::default());
        if let Some(n) = &net {
            let _ = metrics.net.set(Arc::clone(n));
        }
        let Templates { lives, huge_dir } = if cfg.server.isolation == Isolation::Vm {
            take_templates(
                &mut routes,
                workdir.path(),
                &metrics,
                cfg.server.isolation,
                &cfg.server.hugetlbfs,
            )?
        } else {
            Templates {
                lives: Vec::new(),
                huge_dir: None,
            }
        };
        let keeper = crate::exec::template::Keeper::start(lives, Arc::clone(&metrics))
            .map_err(ServeError::Keeper)?;
        let pools = if cfg.server.isolation == Isolation::Vm && !cfg.server.jail {
            start_pools(&mut routes, &metrics)?
        } else {
            Vec::new()
        };
        let helper = if cfg.server.isolation == Isolation::Vm && cfg.server.jail {
            Some(start_jailed(&cfg, &mut routes, &metrics, net.as_ref())?)
        } else {
            None
        };
        wire_executors(&cfg, &mut routes, &metrics, net.as_ref())?;
        Ok(Server {
            health: Arc::new(
                Health::new(Arc::clone(&metrics), pools).with_jailed(
                    routes
                        .iter()
                        .filter_map(|r| {
                            Some((r.route.prefix.clone(), r.spec.as_ref()?.jail.clone()?))
                        })
                        .collect(),
                ),
            ),
            slots: Arc::new(Semaphore::new(cfg.server.concurrency)),
            conns: Arc::new(Semaphore::new(cfg.server.max_connections)),
            body_budget: Arc::new(Semaphore::new(
                cfg.server.body_budget.min(BODY_BUDGET_MAX) as usize
            )),
            cfg,
            routes,
            metrics,
            waiting: AtomicUsize::new(0),
            net,
            helper,
            next_id: AtomicU64::new(1),
            keeper: std::sync::Mutex::new(Some(keeper)),
            huge_dir,
            _workdir: workdir,
        })
    }

    /// `[server] user`: switches the whole server to that user, for good, once its start-up
    /// is done (routes prepared, the jail helper started and sealed, listeners bound). Its
    /// work directory becomes that user's, so it can still remove it. Returns the uid, if it
    /// switched.
    pub fn drop_privileges(&self) -> Result<Option<libc::uid_t>, ServeError> {
        let Some(spec) = &self.cfg.server.user else {
            return Ok(None);
        };
        let fail = |why: String| ServeError::Privileges(format!("server.user {spec:?}: {why}"));
        let (uid, gid) = crate::jail::resolve_user(spec).ok_or_else(|| {
            fail("no such user on this host: name an existing one, or UID:GID".into())
        })?;
        if uid == 0 {
            return Err(fail("is uid 0: name an unprivileged user".into()));
        }
        chown_tree(self._workdir.path(), uid, gid)
            .map_err(|e| fail(format!("giving it the work directory: {e}")))?;
        self.give_hugetlbfs_files(uid, gid).map_err(fail)?;
        xcgi_jail::switch_user(uid, gid).map_err(|e| fail(e.to_string()))?;
        tracing::info!(
            uid,
            gid,
            "switched to the server's user: no capability left"
        );
        Ok(Some(uid))
    }

    /// `[server] user` with huge-page templates: the server's directory on the hugetlbfs mount
    /// and the memory files in it become the user's, so that the server can still put new
    /// ones there and remove them; a mount that user cannot write is refused (the server could
    /// not remove its directory at exit).
    fn give_hugetlbfs_files(&self, uid: libc::uid_t, gid: libc::gid_t) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let Some(own) = &self.huge_dir else {
            return Ok(());
        };
        let dir = &self.cfg.server.hugetlbfs;
        let md = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !may_write((md.uid(), md.gid(), md.mode()), uid, gid) {
            return Err(format!(
                "cannot write {}, where huge-page templates keep their memory: mount a hugetlbfs \
                 it may write (`mount -t hugetlbfs -o uid={uid},gid={gid} none DIR`) and set \
                 [server] hugetlbfs = \"DIR\"",
                dir.display()
            ));
        }
        chown_tree(own, uid, gid).map_err(|e| format!("{}: {e}", own.display()))
    }

    /// The configuration it serves.
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
        let asked = Instant::now();
        let admitted = self.admit(deadline).await;
        log.queued = Some(asked.elapsed());
        let slot = match admitted {
            Ok(p) => Arc::new(p),
            Err(refused) => {
                let (status, why) = refused.response();
                log.note = Some(why.into());
                return error(status, why);
            }
        };
        let body = match self.request_body(incoming, declared, route, deadline).await {
            Ok(b) => b,
            Err(e) => {
                log.note = Some(e.to_string());
                return e.response();
            }
        };
        let job = Job {
            route,
            parts,
            path: rpath,
            body,
            slot,
            deadline,
        };
        match &route.exec {
            Some(RouteExec::Cgi(_)) => self.cgi(job, remote, local, log).await,
            Some(RouteExec::Http(e)) => {
                let e = Arc::clone(e);
                self.http(&e, job, log).await
            }
            None => {
                log.note = Some("route has no executor".into());
                error(StatusCode::INTERNAL_SERVER_ERROR, "route misconfigured")
            }
        }
    }
}

/// One admitted request on its way to its handler.
struct Job<'a> {
    route: &'a ServedRoute,
    parts: hyper::http::request::Parts,
    path: crate::path::RequestPath,
    body: RequestBody,
    /// The concurrency slot: shared with the handler, which holds it until it is gone.
    slot: Arc<OwnedSemaphorePermit>,
    deadline: Instant,
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

/// Gives each route its executor: a jailed process (process isolation), a CGI VM, or an
/// HTTP-mode VM with the guests' network. Checks at start that the jail's user can run every
/// process handler.
fn wire_executors(
    cfg: &Config,
    routes: &mut [ServedRoute],
    metrics: &Arc<Metrics>,
    net: Option<&Arc<GuestNet>>,
) -> Result<(), ServeError> {
    let jail = if cfg.server.isolation == Isolation::Process {
        let jail = Arc::new(ProcessJail::new(&cfg.process)?);
        for r in routes.iter() {
            jail.check_executable(&r.program)?;
        }
        Some(jail)
    } else {
        None
    };
    for r in routes.iter_mut() {
        r.exec = Some(match (&jail, &r.spec, r.route.mode, net) {
            (Some(jail), _, _, _) => RouteExec::Cgi(Arc::new(ProcessExecutor {
                jail: Arc::clone(jail),
            })),
            (None, Some(spec), Mode::Cgi, _) => RouteExec::Cgi(Arc::new(VmCgiExecutor {
                spec: spec.clone(),
                metrics: Arc::clone(metrics),
            })),
            (None, Some(spec), Mode::Http, Some(net)) => {
                RouteExec::Http(Arc::new(VmHttpExecutor {
                    spec: spec.clone(),
                    net: Arc::clone(net),
                    metrics: Arc::clone(metrics),
                    port: r.route.port,
                    timeout_ms: r.route.timeout_ms,
                }))
            }
            (None, _, _, _) => return Err(ServeError::Unwired(r.route.prefix.clone())),
        });
    }
    Ok(())
}

/// Whether `uid`:`gid` may create and remove files in a directory of this owner, group and
/// mode (write and search permission; by owner first, then group, then others, as the
/// kernel checks).
fn may_write(
    (owner, group, mode): (libc::uid_t, libc::gid_t, u32),
    uid: libc::uid_t,
    gid: libc::gid_t,
) -> bool {
    let bits = if owner == uid {
        mode >> 6
    } else if group == gid {
        mode >> 3
    } else {
        mode
    };
    bits & 0o3 == 0o3
}

/// Gives `dir` and everything under it to `uid`:`gid` (symlinks themselves, not followed).
fn chown_tree(dir: &std::path::Path, uid: libc::uid_t, gid: libc::gid_t) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        for e in std::fs::read_dir(dir)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// `start = "snapshot"` routes: each gets its template, booted and captured here, in the
/// work directory (`snapshot-<route index>`, a link to the generation in use); its VMs are
/// clones of it from now on. What the keeper looks after.
fn take_templates(
    routes: &mut [ServedRoute],
    workdir: &std::path::Path,
    metrics: &Metrics,
    isolation: Isolation,
    hugetlbfs: &std::path::Path,
) -> Result<Templates, ServeError> {
    let pvm = xcgi_vmm::hypervisor::kvm::host_is_pvm();
    let mut lives = Vec::new();
    let mut huge_dir = None;
    for (i, r) in routes.iter_mut().enumerate() {
        if r.route.start_mode(isolation) != crate::config::Start::Snapshot {
            continue;
        }
        if pvm && r.route.start.is_none() {
            // The default cannot apply here: no template can boot. Asked for, it fails below.
            tracing::warn!(
                route = %r.route.prefix,
                "this host's /dev/kvm (PVM) cannot boot a template: the route boots every VM \
                 (start = \"boot\"), which fails too; run inside the lab"
            );
            continue;
        }
        let Some(spec) = &mut r.spec else { continue };
        let link = workdir.join(format!("snapshot-{i}"));
        let fail = |source| ServeError::Template {
            route: r.route.prefix.clone(),
            source,
        };
        if spec.hugepages && huge_dir.is_none() {
            huge_dir = Some(crate::exec::template::claim_huge_dir(hugetlbfs).map_err(fail)?);
        }
        let (live, t) =
            crate::exec::template::take_live(&r.route.prefix, spec, &link, huge_dir.as_ref())
                .map_err(fail)?;
        metrics.snapshot_templates.fetch_add(1, Ordering::Relaxed);
        crate::exec::template::log_taken(&r.route.prefix, &t, 1);
        spec.snapshot = Some(link);
        lives.push(live);
    }
    let huge_dir = huge_dir.map(|d| d.path().to_path_buf());
    Ok(Templates { lives, huge_dir })
}

/// What [`take_templates`] took: the templates to keep current, and the server's directory
/// on hugetlbfs if a huge-page route has one (it goes with the last of them).
struct Templates {
    lives: Vec<crate::exec::template::Live>,
    huge_dir: Option<std::path::PathBuf>,
}

/// `[server] jail`: each VM route gets jailed VM processes (`prepared` of them kept ready),
/// all started by one helper (the one process that keeps the privileges this takes), which is
/// sealed once every route's template is registered.
fn start_jailed(
    cfg: &Config,
    routes: &mut [ServedRoute],
    metrics: &Metrics,
    net: Option<&Arc<GuestNet>>,
) -> Result<Arc<crate::exec::jailed::Helper>, ServeError> {
    use crate::exec::jailed::{Helper, HelperSettings, HelperTaps, Workers};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ServeError::VmJail(
            "[server] jail needs root (namespaces, pivot_root, a change of user): run xcgi \
             serve as root, or set [server] jail = false (VMs as threads of the server: \
             development only)"
                .into(),
        ));
    }
    let program = std::env::current_exe()
        .map_err(|e| ServeError::VmJail(format!("finding the xcgi binary: {e}")))?;
    let helper = Helper::start(&HelperSettings {
        program,
        uid_base: cfg.server.jail_uid_base,
        uid_count: cfg.server.jail_uids,
        cgroup_parent: cfg.server.cgroup_parent.clone(),
    })
    .map_err(|e| ServeError::VmJail(format!("starting the jail helper: {e}")))?;
    for r in routes.iter_mut() {
        let prepared = r.route.prepared;
        let limits = vm_limits(&r.route);
        if let Some(spec) = &mut r.spec {
            let gauge = Arc::clone(&metrics.vms_prepared);
            let w = Workers::start(spec, &helper, limits, prepared, gauge).map_err(|e| {
                ServeError::VmJail(format!("starting the jailed VM processes: {e}"))
            })?;
            spec.jail = Some(w);
        }
    }
    // The guests' TAPs: made by the helper from now on (a fresh one per VM takes
    // CAP_NET_ADMIN and setns, which an unprivileged server has not).
    if let Some(n) = net {
        let c = n.pool.config();
        helper
            .give_network(n.pool.netns(), c.base, c.size)
            .map_err(|e| ServeError::VmJail(format!("giving the jail helper the network: {e}")))?;
        n.pool.set_maker(Arc::new(HelperTaps(Arc::clone(&helper))));
    }
    helper
        .seal()
        .map_err(|e| ServeError::VmJail(format!("sealing the jail helper: {e}")))?;
    Ok(helper)
}

/// A route's VM processes' cgroup limits: its keys, or the defaults they document.
fn vm_limits(r: &crate::config::Route) -> crate::exec::vm_cgroup::VmLimits {
    use crate::exec::vm_cgroup::VmLimits;
    let d = VmLimits::for_guest(r.memory_mib, r.vcpus);
    VmLimits {
        memory_max: r
            .memory_max_mib
            .map_or(d.memory_max, |m| m.saturating_mul(1 << 20)),
        pids_max: r.pids_max.unwrap_or(d.pids_max),
        cpu_percent: r.cpu_percent,
    }
}

/// One pool of VMs prepared ahead per machine shape: routes of the same shape share it (its
/// target the sum of theirs). Returns (the routes it serves, the pool) for readiness.
fn start_pools(
    routes: &mut [ServedRoute],
    metrics: &Arc<Metrics>,
) -> Result<Vec<(String, Arc<xcgi_vmm::Pool>)>, ServeError> {
    let mut by_shape: Vec<(xcgi_vmm::MachineShape, Vec<usize>, usize)> = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let Some(spec) = &r.spec else { continue };
        let shape = spec.shape();
        match by_shape.iter_mut().find(|(s, _, _)| *s == shape) {
            Some((_, members, target)) => {
                members.push(i);
                *target += r.route.prepared;
            }
            None => by_shape.push((shape, vec![i], r.route.prepared)),
        }
    }
    let gauge = Arc::clone(&metrics.vms_prepared);
    let mut pools = Vec::new();
    for (shape, members, target) in by_shape {
        let name = members
            .iter()
            .map(|&i| routes[i].route.prefix.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let pool = xcgi_vmm::Pool::start(&name, shape, target, Arc::clone(&gauge))
            .map_err(ServeError::Pool)?;
        for &i in &members {
            if let Some(spec) = &mut routes[i].spec {
                spec.pool = pool.clone();
            }
        }
        if let Some(p) = pool {
            pools.push((name, p));
        }
    }
    Ok(pools)
}
