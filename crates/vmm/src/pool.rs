//! VMs prepared ahead ([`PreparedVm`]), one pool per [`MachineShape`]: a background thread
//! keeps `target` of them ready, so that a request only adds its devices and command line to
//! one (tens of microseconds) instead of building a VM (memory slots, kernel load, vCPUs:
//! about a millisecond, growing with memory size). `xcgi serve` keeps one per route shape;
//! a pool of restored snapshots or jailed workers can offer the same interface.
//!
//! Each prepared VM is used by one request and never returned: no guest instruction has run
//! in it before its request, and its memory is its own. When none is ready (a burst larger
//! than the pool), the request builds its VM itself, as without a pool.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicI64;

use crate::resources::MachineShape;
use crate::vm::{self, PreparedVm};

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
    Warming {
        /// VMs ready now.
        ready: usize,
        /// VMs the pool keeps ready.
        target: usize,
    },
    /// Preparing failed this many times in a row (VMs cannot be built: requests would fail).
    Failing {
        /// Preparing failures in a row.
        failures: u32,
    },
}

/// Keeps `target` [`PreparedVm`]s of one [`MachineShape`] ready, refilled by a background
/// thread; see the module docs.
pub struct Pool {
    shared: Arc<Shared>,
    refiller: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    shape: MachineShape,
    target: usize,
    state: Mutex<State>,
    wake: Condvar,
    /// Kept equal to the VMs ready, summed over every pool that shares it (a metric).
    gauge: Arc<AtomicI64>,
    name: String,
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

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.name)
            .field("target", &self.shared.target)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts keeping `target` VMs of `shape` ready; `name` is for the log, `gauge` counts the
    /// VMs ready. None when `target` is 0.
    pub fn start(
        name: &str,
        shape: MachineShape,
        target: usize,
        gauge: Arc<AtomicI64>,
    ) -> std::io::Result<Option<Arc<Pool>>> {
        if target == 0 {
            return Ok(None);
        }
        let shared = Arc::new(Shared {
            shape,
            target,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            gauge,
            name: name.to_string(),
            failures: AtomicU32::new(0),
        });
        let s = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("xcgi-pool".into())
            .spawn(move || refill(&s))?;
        Ok(Some(Arc::new(Pool {
            shared,
            refiller: Mutex::new(Some(handle)),
        })))
    }

    /// A ready VM, if there is one; the refiller starts on its replacement at once.
    pub fn take(&self) -> Option<PreparedVm> {
        let mut st = self.shared.state.lock().ok()?;
        let vm = st.ready.pop();
        if vm.is_some() {
            self.shared.gauge.fetch_sub(1, Ordering::Relaxed);
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
            .gauge
            .fetch_sub(unused.len() as i64, Ordering::Relaxed);
        drop(unused);
        let handle = self.refiller.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Pool {
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
        match vm::prepare(&s.shape, Instant::now()) {
            Ok(vm) => {
                if failures > 0 {
                    tracing::info!(pool = %s.name, "preparing VMs ahead works again");
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
                s.gauge.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                s.failures.store(failures, Ordering::Relaxed);
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(
                        pool = %s.name,
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
        let gauge = Arc::new(AtomicI64::new(0));
        let shape = MachineShape {
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: Some("/nonexistent/initrd".into()),
            ..Default::default()
        };
        let s = Pool::start("/x", shape, 2, Arc::clone(&gauge))
            .unwrap()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(s.take().is_none());
        assert_eq!(s.ready(), 0);
        // Three tries (10 + 20 ms of back-off) fit in well under a second.
        let t = Instant::now();
        while !matches!(s.health(), PoolHealth::Failing { .. })
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
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
    }

    /// A real (tiny) machine: the pool fills to its target, says so, refills what is taken,
    /// and the gauge follows; every VM taken has the pool's shape.
    #[test]
    fn fills_refills_and_counts() {
        use crate::arch::x86_64::loader::tests::{tiny_elf, write_tmp};
        let payload: Vec<u8> = (0..4 * 4096).map(|i| (i % 251) as u8).collect();
        let k = write_tmp(&tiny_elf(&payload, 4096));
        let i = write_tmp(&payload);
        let shape = MachineShape {
            kernel: k.path().into(),
            initramfs: Some(i.path().into()),
            memory: crate::memory::MemoryConfig {
                size_mib: 64,
                ..Default::default()
            },
            ..Default::default()
        };
        let gauge = Arc::new(AtomicI64::new(0));
        let pool = Pool::start("tiny", shape.clone(), 3, Arc::clone(&gauge))
            .unwrap()
            .unwrap();
        let full = |n: usize| {
            let t = Instant::now();
            while pool.ready() < n && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            pool.ready() == n
        };
        assert!(full(3), "{:?}", pool.health());
        assert_eq!(pool.health(), PoolHealth::Filled);
        assert_eq!(gauge.load(Ordering::Relaxed), 3);
        let vm = pool.take().unwrap();
        assert_eq!(vm.shape(), &shape);
        assert!(full(3), "not refilled");
        // Drained by a burst, it stays Filled (readiness does not flap under load).
        let taken: Vec<_> = (0..3).filter_map(|_| pool.take()).collect();
        assert_eq!(taken.len(), 3);
        assert_eq!(pool.health(), PoolHealth::Filled);
        pool.stop();
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn zero_means_no_pool() {
        let s = Pool::start("/x", MachineShape::default(), 0, Arc::default()).unwrap();
        assert!(s.is_none());
    }
}
