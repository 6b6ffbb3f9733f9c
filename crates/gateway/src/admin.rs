//! Health, readiness and metrics, for balancers, orchestrators and Prometheus.
//!
//! - `healthz`: the process is alive and its event loop answers (200 `ok`).
//! - `readyz`: ready for traffic (200 `ready`), else 503 `not ready: <why>`: still starting,
//!   a route's pool of VMs prepared ahead not yet filled once, preparing VMs failing, or
//!   draining after SIGTERM (readiness goes false first, then in-flight requests finish).
//! - `metrics`: the Prometheus text ([`crate::metrics`]).
//!
//! On the serving port they live under the reserved `server.admin_prefix` (default
//! `/_xcgi`), which no route may claim, so a route `/` still serves `/metrics`. With
//! `server.admin_listen` they are also served at `/healthz`, `/readyz`, `/metrics` on that
//! listener, and metrics leave the serving port. None of them is counted as a request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderValue;
use hyper::{Method, Response, StatusCode};

use crate::metrics::Metrics;
use xcgi_vmm::{Pool, PoolHealth};

/// One of the admin endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Liveness: always 200 `ok` while the process answers.
    Healthz,
    /// Readiness: 200 `ready`, else 503 with the reason ([`Health::readiness`]).
    Readyz,
    /// The Prometheus text ([`Metrics::render`]).
    Metrics,
    /// Under the reserved prefix, but none of the above: 404.
    Unknown,
}

/// What readiness depends on.
#[derive(Debug)]
pub struct Health {
    metrics: Arc<Metrics>,
    /// Each route's pool of VMs prepared ahead, by route prefix.
    pools: Vec<(String, Arc<Pool>)>,
    /// Each route's jailed VM processes kept ready (`[server] jail`), by route prefix.
    jailed: Vec<(String, Arc<crate::exec::jailed::Workers>)>,
    serving: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    /// Not ready until [`Health::set_serving`]; `pools` are the routes' pools of VMs prepared
    /// ahead, each with the route prefix(es) it serves.
    pub fn new(metrics: Arc<Metrics>, pools: Vec<(String, Arc<Pool>)>) -> Health {
        Health {
            metrics,
            pools,
            jailed: Vec::new(),
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// With `[server] jail`: readiness also waits for each route's jailed VM processes.
    pub fn with_jailed(mut self, jailed: Vec<(String, Arc<crate::exec::jailed::Workers>)>) -> Self {
        self.jailed = jailed;
        self
    }

    /// The listeners are accepting.
    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::SeqCst);
    }

    /// SIGTERM: readiness goes false now, before anything stops.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.draining.store(1, Ordering::Relaxed);
        self.metrics.ready.store(0, Ordering::Relaxed);
    }

    /// True once [`Health::begin_drain`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ok when ready for traffic, else why not. Keeps the `xcgi_ready` gauge in step.
    pub fn readiness(&self) -> Result<(), String> {
        let r = self.why_not().map_or(Ok(()), Err);
        self.metrics
            .ready
            .store(i64::from(r.is_ok()), Ordering::Relaxed);
        r
    }

    fn why_not(&self) -> Option<String> {
        if self.draining() {
            return Some("draining".into());
        }
        if !self.serving.load(Ordering::SeqCst) {
            return Some("starting".into());
        }
        let pools = self.pools.iter().map(|(r, p)| (r, p.health(), "VMs"));
        let jailed = self
            .jailed
            .iter()
            .map(|(r, w)| (r, w.health(), "jailed VM processes"));
        pools
            .chain(jailed)
            .find_map(|(route, health, what)| match health {
                PoolHealth::Filled => None,
                PoolHealth::Warming { ready, target } => Some(format!(
                    "route {route}: {ready} of {target} {what} prepared ahead"
                )),
                PoolHealth::Failing { failures } => Some(format!(
                    "route {route}: preparing {what} failed {failures} times in a row (see the log)"
                )),
            })
    }
}

/// The endpoint `path` (decoded and normalised) names on the serving port, if it is under
/// `prefix`. Metrics only when they are not on an admin listener.
pub fn on_serving_port(path: &str, prefix: &str, metrics_here: bool) -> Option<Endpoint> {
    let rest = path.strip_prefix(prefix)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None; // "/_xcgiX": not under the prefix
    }
    Some(match rest {
        "/healthz" => Endpoint::Healthz,
        "/readyz" => Endpoint::Readyz,
        "/metrics" if metrics_here => Endpoint::Metrics,
        _ => Endpoint::Unknown,
    })
}

/// The endpoint `path` names on the admin listener (`/healthz`, or under the prefix too).
pub fn on_admin_port(path: &str, prefix: &str) -> Endpoint {
    match path {
        "/healthz" => Endpoint::Healthz,
        "/readyz" => Endpoint::Readyz,
        "/metrics" => Endpoint::Metrics,
        _ => on_serving_port(path, prefix, true).unwrap_or(Endpoint::Unknown),
    }
}

/// The answer to `method` on `ep`.
pub fn respond(ep: Endpoint, method: &Method, health: &Health) -> Response<Full<Bytes>> {
    if ep == Endpoint::Unknown {
        return plain(StatusCode::NOT_FOUND, "404 no such endpoint\n".into());
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = match ep {
        Endpoint::Healthz => plain(StatusCode::OK, "ok\n".into()),
        Endpoint::Readyz => match health.readiness() {
            Ok(()) => plain(StatusCode::OK, "ready\n".into()),
            Err(why) => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        Endpoint::Metrics => {
            // Brings xcgi_ready up to date before it is rendered.
            let _ = health.readiness();
            let mut r = plain(StatusCode::OK, health.metrics.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Endpoint::Unknown => unreachable!("answered above"),
    };
    if method == Method::HEAD {
        *r.body_mut() = Full::new(Bytes::new());
    }
    r
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: Response<Full<Bytes>>) -> (u16, String) {
        use http_body_util::BodyExt;
        let status = r.status().as_u16();
        let Ok(b) = futures_block(r.into_body().collect());
        (status, String::from_utf8_lossy(&b.to_bytes()).into_owned())
    }

    fn futures_block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn paths_under_the_prefix_only() {
        let p = "/_xcgi";
        assert_eq!(
            on_serving_port("/_xcgi/healthz", p, false),
            Some(Endpoint::Healthz)
        );
        assert_eq!(
            on_serving_port("/_xcgi/readyz", p, false),
            Some(Endpoint::Readyz)
        );
        assert_eq!(
            on_serving_port("/_xcgi/metrics", p, true),
            Some(Endpoint::Metrics)
        );
        // Metrics moved to the admin listener: reserved, but not served here.
        assert_eq!(
            on_serving_port("/_xcgi/metrics", p, false),
            Some(Endpoint::Unknown)
        );
        assert_eq!(on_serving_port("/_xcgi", p, true), Some(Endpoint::Unknown));
        assert_eq!(
            on_serving_port("/_xcgi/x/y", p, true),
            Some(Endpoint::Unknown)
        );
        assert_eq!(on_serving_port("/_xcgiz/healthz", p, true), None);
        assert_eq!(on_serving_port("/metrics", p, true), None);
        assert_eq!(on_serving_port("/healthz", p, true), None);
        assert_eq!(on_admin_port("/metrics", p), Endpoint::Metrics);
        assert_eq!(on_admin_port("/_xcgi/readyz", p), Endpoint::Readyz);
        assert_eq!(on_admin_port("/", p), Endpoint::Unknown);
    }

    #[test]
    fn readiness_follows_start_and_drain() {
        let m = Arc::new(Metrics::default());
        let h = Health::new(Arc::clone(&m), Vec::new());
        let (code, text) = body(respond(Endpoint::Readyz, &Method::GET, &h));
        assert_eq!((code, text.as_str()), (503, "not ready: starting\n"));
        assert_eq!(body(respond(Endpoint::Healthz, &Method::GET, &h)).0, 200);
        h.set_serving();
        assert_eq!(
            body(respond(Endpoint::Readyz, &Method::GET, &h)),
            (200, "ready\n".into())
        );
        assert_eq!(m.ready.load(Ordering::Relaxed), 1);
        let (_, metrics) = body(respond(Endpoint::Metrics, &Method::GET, &h));
        assert!(metrics.contains("xcgi_ready 1"), "{metrics}");
        h.begin_drain();
        assert_eq!(
            body(respond(Endpoint::Readyz, &Method::GET, &h)),
            (503, "not ready: draining\n".into())
        );
        assert_eq!(m.ready.load(Ordering::Relaxed), 0);
        assert_eq!(m.draining.load(Ordering::Relaxed), 1);
        // Alive while draining.
        assert_eq!(body(respond(Endpoint::Healthz, &Method::GET, &h)).0, 200);
        assert_eq!(body(respond(Endpoint::Readyz, &Method::POST, &h)).0, 405);
        assert_eq!(
            body(respond(Endpoint::Healthz, &Method::HEAD, &h)),
            (200, String::new())
        );
        assert_eq!(body(respond(Endpoint::Unknown, &Method::GET, &h)).0, 404);
    }

    /// A pool whose VMs cannot be prepared makes the server unready, naming the route.
    #[test]
    fn a_failing_pool_makes_it_unready() {
        let m = Arc::new(Metrics::default());
        let shape = xcgi_vmm::MachineShape {
            kernel: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        let pool = Pool::start("/x", shape, 1, Arc::default())
            .unwrap()
            .unwrap();
        let h = Health::new(m, vec![("/x".into(), Arc::clone(&pool))]);
        h.set_serving();
        let t = std::time::Instant::now();
        let mut why = String::new();
        while t.elapsed() < std::time::Duration::from_secs(2) {
            why = h.readiness().unwrap_err();
            if why.contains("failed") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(why.starts_with("route /x: preparing VMs failed"), "{why}");
        pool.stop();
    }
}
