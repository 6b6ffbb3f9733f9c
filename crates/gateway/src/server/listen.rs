//! Listening: the sockets (bound, or passed by the service manager), the accept loops of
//! the serving port and the admin listener, readiness reports, signals and the drain.

use super::*;

/// An accept error: resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off, since the
/// pending connection stays queued and retrying at once would spin; others are one
/// connection's problem.
pub(super) async fn accept_failed(backoff: &mut conn::AcceptBackoff, e: std::io::Error) {
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
pub(super) fn notify(state: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = crate::systemd::notify(state) {
        WARNED
            .call_once(|| warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)"));
    }
}

/// Follows readiness: READY=1 to the service manager the first time it is ready, STATUS=
/// when it changes, and the `xcgi_ready` gauge kept current between scrapes.
pub(super) async fn watch_readiness(health: Arc<Health>) {
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
pub(super) fn bind_one(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, ServeError> {
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
pub(super) const LISTEN_BACKLOG: u32 = 4096;

impl Server {
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
    pub(super) async fn accept_loop(
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
    pub(super) fn refuse(&self, stream: tokio::net::TcpStream) {
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
    pub(super) async fn serve_admin(self: Arc<Self>, listener: TcpListener) {
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
    pub(super) async fn wind_down(&self) {
        // No new template from here on (one being taken is finished first).
        let keeper = self.keeper.lock().ok().and_then(|mut k| k.take());
        if let Some(mut k) = keeper {
            let _ = tokio::task::spawn_blocking(move || k.stop()).await;
        }
        // Closing a VM blocks for milliseconds: off the runtime's threads.
        let spares: Vec<_> = self
            .routes
            .iter()
            .filter_map(|r| r.spec.as_ref()?.pool.clone())
            .collect();
        let _ = tokio::task::spawn_blocking(move || spares.iter().for_each(|s| s.stop())).await;
        // Jailed VM processes waiting for a request: killed and reaped.
        let jailed: Vec<_> = self
            .routes
            .iter()
            .filter_map(|r| r.spec.as_ref()?.jail.clone())
            .collect();
        let _ = tokio::task::spawn_blocking(move || jailed.iter().for_each(|w| w.stop())).await;
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
        // Last: the helper kills what is left of the VM processes, removes their cgroups and
        // the guests' namespace mount, and exits.
        if let Some(h) = self.helper.clone() {
            let _ = tokio::task::spawn_blocking(move || h.close()).await;
        }
    }
}
