//! VMs prepared ahead for a route ([`xcgi_vmm::PreparedVm`]): a background thread keeps
//! `route.prepared` of them ready, so that a request only adds its devices and command line
//! to one (tens of microseconds) instead of building a VM (memory slots, kernel load, vCPUs:
//! about a millisecond, growing with memory size).
//!
//! Each prepared VM is used by one request and never returned: no guest instruction has run
//! in it before its request, and its memory is its own. When none is ready (a burst larger
//! than the pool), the request builds its VM itself, as without a pool.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xcgi_vmm::{PreparedVm, VmConfig};

use crate::metrics::Metrics;

/// The longest wait between two attempts after preparing failed.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Failures in a row after which the pool counts as failing (readiness goes false).
const FAILING_AFTER: u32 = 3;

/// What a pool says about readiness (`/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolHealth {
    /// It has been full at least once since start, and preparing works.
    Filled,
    /// Still filling for the first time.
    Warming { ready: usize, target: usize },
    /// Preparing failed this many times in a row (VMs cannot be built: requests would fail).
    Failing { failures: u32 },
}

pub struct Spares {
    shared: Arc<Shared>,
    refiller: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    cfg: VmConfig,
    target: usize,
    state: Mutex<State>,
    wake: Condvar,
    metrics: Arc<Metrics>,
    route: String,
    /// Preparing failures in a row (0 after a success).
    failures: AtomicU32,
}

#[derive(Default)]
struct State {
    ready: Vec<PreparedVm>,
    stop: bool,
    /// The pool has held `target` VMs at least once.
    filled_once: bool,
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spares")
            .field("route", &self.shared.route)
            .field("target", &self.shared.target)
            .finish_non_exhaustive()
    }
}

impl Spares {
    /// Starts keeping `target` VMs of `cfg`'s shape ready for `route`. None when `target` is 0.
    pub fn start(
        route: &str,
        cfg: VmConfig,
        target: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Option<Arc<Spares>>> {
        if target == 0 {
            return Ok(None);
        }
        let shared = Arc::new(Shared {
            cfg,
            target,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            metrics,
            route: route.to_string(),
            failures: AtomicU32::new(0),
        });
        let s = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("xcgi-spares".into())
            .spawn(move || refill(&s))?;
        Ok(Some(Arc::new(Spares {
            shared,
            refiller: Mutex::new(Some(handle)),
        })))
    }

    /// A ready VM, if there is one; the refiller starts on its replacement at once.
    pub fn take(&self) -> Option<PreparedVm> {
        let mut st = self.shared.state.lock().ok()?;
        let vm = st.ready.pop();
        if vm.is_some() {
            self.shared
                .metrics
                .vms_prepared
                .fetch_sub(1, Ordering::Relaxed);
            self.shared.wake.notify_all();
        }
        vm
    }

    /// How many are ready now.
    pub fn ready(&self) -> usize {
        self.shared.state.lock().map(|s| s.ready.len()).unwrap_or(0)
    }

    /// Readiness: warming until the pool was full once; failing while preparing fails
    /// [`FAILING_AFTER`] times in a row. A pool drained by a burst stays `Filled` (requests
    /// then build their own VMs, counted in `xcgi_prepared_misses_total`): taking a busy
    /// server out of a balancer for that would make it flap.
    pub fn health(&self) -> PoolHealth {
        let failures = self.shared.failures.load(Ordering::Relaxed);
        if failures >= FAILING_AFTER {
            return PoolHealth::Failing { failures };
        }
        match self.shared.state.lock() {
            Ok(st) if st.filled_once => PoolHealth::Filled,
            Ok(st) => PoolHealth::Warming {
                ready: st.ready.len(),
                target: self.shared.target,
            },
            Err(_) => PoolHealth::Failing { failures },
        }
    }

    /// Stops the refiller and releases every VM still waiting (waits for both).
    pub fn stop(&self) {
        let unused = match self.shared.state.lock() {
            Ok(mut st) => {
                st.stop = true;
                std::mem::take(&mut st.ready)
            }
            Err(_) => Vec::new(),
        };
        self.shared.wake.notify_all();
        self.shared
            .metrics
            .vms_prepared
            .fetch_sub(unused.len() as i64, Ordering::Relaxed);
        drop(unused);
        let handle = self.refiller.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.stop();
    }
}

fn refill(s: &Shared) {
    let mut failures: u32 = 0;
    loop {
        {
            let Ok(mut st) = s.state.lock() else { return };
            while !st.stop && st.ready.len() >= s.target {
                st = match s.wake.wait(st) {
                    Ok(st) => st,
                    Err(_) => return,
                };
            }
            if st.stop {
                return;
            }
        }
        match xcgi_vmm::prepare(&s.cfg, Instant::now()) {
            Ok(vm) => {
                if failures > 0 {
                    tracing::info!(route = %s.route, "preparing VMs ahead works again");
                }
                failures = 0;
                let Ok(mut st) = s.state.lock() else { return };
                if st.stop {
                    // Released outside the lock, like any other.
                    drop(st);
                    drop(vm);
                    return;
                }
                st.ready.push(vm);
                st.filled_once |= st.ready.len() >= s.target;
                s.failures.store(0, Ordering::Relaxed);
                s.metrics.vms_prepared.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                s.failures.store(failures, Ordering::Relaxed);
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(
                        route = %s.route,
                        error = %e,
                        failures,
                        "cannot prepare a VM ahead; requests build their own meanwhile"
                    );
                }
                let backoff = Duration::from_millis(10)
                    .saturating_mul(1 << failures.min(10))
                    .min(MAX_BACKOFF);
                let Ok(st) = s.state.lock() else { return };
                if st.stop {
                    return;
                }
                let _ = s.wake.wait_timeout(st, backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel that is not there: preparing fails, the pool stays empty, stop still returns.
    #[test]
    fn failing_preparation_backs_off_and_stops() {
        let metrics = Arc::new(Metrics::default());
        let cfg = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: Some("/nonexistent/initrd".into()),
            ..Default::default()
        };
        let s = Spares::start("/x", cfg, 2, Arc::clone(&metrics))
            .unwrap()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.take().is_none());
        assert_eq!(s.ready(), 0);
        // Three tries (10 + 20 ms of back-off) fit in well under a second.
        let t = Instant::now();
        while s.health() != (PoolHealth::Failing { failures: 3 })
            && t.elapsed() < Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            matches!(s.health(), PoolHealth::Failing { failures } if failures >= 3),
            "{:?}",
            s.health()
        );
        let t = Instant::now();
        s.stop();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(metrics.vms_prepared.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn zero_means_no_pool() {
        let s = Spares::start("/x", VmConfig::default(), 0, Arc::new(Metrics::default())).unwrap();
        assert!(s.is_none());
    }
}
