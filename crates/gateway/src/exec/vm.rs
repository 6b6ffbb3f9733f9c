//! A route's VM and one run of it, shared by CGI and HTTP mode.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use xcgi_vmm::{Attachments, Cancel, ExitReason, MachineShape, Pool, RunOptions};

use super::ExecError;
use crate::metrics::Metrics;

/// The guest's root: an initramfs or a read-only ext4 disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRoot {
    /// A newc cpio archive, loaded as the initramfs.
    Initramfs(PathBuf),
    /// An ext4 image, attached as the read-only root disk.
    Disk(PathBuf),
}

impl GuestRoot {
    /// The image file on the host.
    pub fn path(&self) -> &Path {
        match self {
            GuestRoot::Initramfs(p) | GuestRoot::Disk(p) => p,
        }
    }
}

/// How to boot a route's VM: prepared once per route at start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The guest kernel on the host.
    pub kernel: PathBuf,
    /// The guest's root filesystem.
    pub root: GuestRoot,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Guest memory on 2 MiB huge pages.
    pub hugepages: bool,
    /// Guest vCPUs.
    pub vcpus: u8,
    /// The VM's own time limit per run: a backstop behind the server's request deadline
    /// (for a route: its timeout plus 1 s).
    pub timeout: Duration,
    /// VMs of this shape prepared ahead (None: every request builds its own).
    pub pool: Option<Arc<Pool>>,
    /// Jailed VM processes for this route (`[server] jail`): each run goes to one of them
    /// instead of a thread of the server.
    pub jail: Option<Arc<super::jailed::Workers>>,
    /// Log a debug dump of a VM that ends badly (`[server] debug_dump`).
    pub debug_dump: bool,
    /// Guest memory to add to that dump (`[server] debug_probe`).
    pub debug_probe: Option<Arc<xcgi_vmm::diagnostics::Probe>>,
    /// `start = "snapshot"`: the route's template snapshot (taken at start); each VM is a
    /// clone of it, whose xcgi-init already said hello and waits for its request.
    pub snapshot: Option<PathBuf>,
    /// With `snapshot`: served clones record the pages they touched until the template has a
    /// working set, which the clones prepared after it touch ahead (route `working_set`).
    pub working_set: bool,
}

impl VmSpec {
    /// The machine: what its prepared VMs are keyed by.
    pub fn shape(&self) -> MachineShape {
        let (initramfs, rootfs) = match &self.root {
            GuestRoot::Initramfs(p) => (Some(p.clone()), None),
            GuestRoot::Disk(p) => (None, Some(p.clone())),
        };
        MachineShape {
            kernel: self.kernel.clone(),
            initramfs,
            rootfs,
            memory: xcgi_vmm::memory::MemoryConfig {
                size_mib: self.memory_mib,
                hugepages: self.hugepages,
                populate: false,
            },
            vcpus: self.vcpus,
            snapshot: self.snapshot.clone(),
            ..MachineShape::default()
        }
    }

    /// A small machine for tests: 64 MiB, one vCPU, a 1 s deadline, booted (no pool, jail or
    /// snapshot).
    #[cfg(test)]
    pub(crate) fn for_test(kernel: PathBuf, root: GuestRoot) -> VmSpec {
        VmSpec {
            kernel,
            root,
            memory_mib: 64,
            hugepages: false,
            vcpus: 1,
            timeout: Duration::from_secs(1),
            pool: None,
            jail: None,
            debug_dump: false,
            debug_probe: None,
            snapshot: None,
            working_set: false,
        }
    }

    /// One request's run: the route's deadline, stopped early by `cancel`.
    pub fn run_options(&self, cancel: Cancel) -> RunOptions {
        RunOptions {
            timeout: self.timeout,
            cancel,
            debug_dump: self.debug_dump,
            debug_probe: self.debug_probe.clone(),
            // Until the template has a working set, served clones record theirs.
            record_working_set: self.working_set
                && self
                    .snapshot
                    .as_ref()
                    .is_some_and(|d| !d.join(xcgi_vmm::prefault::WORKING_SET_FILE).exists()),
            ..RunOptions::default()
        }
    }
}

/// A VM running on its own thread (or in a jailed process of its own); how it ended
/// arrives when it has been torn down.
pub struct VmThread {
    /// Stops the VM.
    pub cancel: Cancel,
    /// How the run ended (or why it could not run), sent after teardown.
    pub outcome: oneshot::Receiver<VmEnd>,
}

/// How a VM's run ended, as a log line says it: made from the monitor's outcome in this
/// process, or sent back by a jailed VM process (or said for it when it died).
#[derive(Debug, Clone)]
pub struct VmEnd {
    /// A short description ([`describe_outcome`]).
    pub description: String,
    /// The debug dump, when one was asked for and taken.
    pub dump: Option<String>,
    /// The pages the guest touched, when they were asked for
    /// ([`RunOptions::record_working_set`]). From a jailed VM process, as
    /// untrusted as the guest: checked again before it is kept ([`keep_working_set`]).
    pub working_set: Option<xcgi_vmm::prefault::WorkingSet>,
}

impl VmEnd {
    /// From the monitor's result.
    pub fn from_run(r: &Result<xcgi_vmm::Outcome, xcgi_vmm::VmError>) -> VmEnd {
        VmEnd {
            description: describe_outcome(r),
            dump: r.as_ref().ok().and_then(|o| o.dump.clone()),
            working_set: r.as_ref().ok().and_then(|o| o.working_set.clone()),
        }
    }
}

/// Keeps a served clone's working set as its template's (`dir/working-set`), unless the
/// template has one: clones prepared from then on touch those pages before their request
/// (xcgi_vmm::prefault). Checked against the route's memory first; a failure is logged and
/// costs only speed.
pub fn keep_working_set(set: &xcgi_vmm::prefault::WorkingSet, dir: &Path, memory_mib: u64) {
    let checked = xcgi_vmm::prefault::WorkingSet::new(set.pages().to_vec(), memory_mib << 20);
    match checked.and_then(|s| s.write_new(dir)) {
        Ok(true) => tracing::info!(
            "template {}: working set of {} pages recorded from a served clone",
            dir.display(),
            set.pages().len()
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!("template {}: {e}", dir.display()),
    }
}

/// Boots `spec`'s machine with `attach` on a new thread, from a VM prepared ahead when its
/// pool has one ready. `metrics.vms_running` counts it until its teardown is done. `keep` (a
/// TAP lease) is dropped after the VM is gone and `attach` (its copy of the TAP) closed.
pub fn start_vm<K: Send + 'static>(
    spec: &VmSpec,
    attach: Attachments,
    opts: RunOptions,
    metrics: Arc<Metrics>,
    keep: K,
) -> Result<VmThread, ExecError> {
    let t0 = Instant::now();
    let jail = spec.jail.clone();
    let prepared = spec.pool.as_ref().and_then(|s| s.take());
    if spec.pool.is_some() && prepared.is_none() {
        metrics.prepared_misses.fetch_add(1, Ordering::Relaxed);
    }
    let shape = (prepared.is_none() && jail.is_none()).then(|| spec.shape());
    let template = spec.snapshot.clone().map(|dir| (dir, spec.memory_mib));
    let cancel = opts.cancel.clone();
    let (tx, outcome) = oneshot::channel();
    metrics.vms_running.fetch_add(1, Ordering::Relaxed);
    let m = Arc::clone(&metrics);
    let spawned = std::thread::Builder::new()
        .name("xcgi-vm".into())
        .spawn(move || {
            let end = match (jail, prepared, shape) {
                (Some(j), _, _) => j.run(&attach, &opts),
                (None, Some(p), _) => {
                    VmEnd::from_run(&xcgi_vmm::launch(p, &attach, &opts, t0, None))
                }
                (None, None, Some(shape)) => {
                    VmEnd::from_run(&xcgi_vmm::run(&shape, &attach, &opts, t0, None))
                }
                (None, None, None) => unreachable!("a shape is made when no VM was prepared"),
            };
            if let (Some(set), Some((dir, mib))) = (&end.working_set, &template) {
                keep_working_set(set, dir, *mib);
            }
            // Every copy of the TAP's descriptor is closed before the lease goes back: the
            // pool destroys the TAP by closing the last one, and one still open here made
            // the slot unusable ("returned TAP still exists", issue 15).
            drop(attach);
            drop(keep);
            m.vms_running.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(end);
        });
    if let Err(e) = spawned {
        metrics.vms_running.fetch_sub(1, Ordering::Relaxed);
        return Err(ExecError::Thread(e));
    }
    metrics.vms_started.fetch_add(1, Ordering::Relaxed);
    Ok(VmThread { cancel, outcome })
}

/// Logs the debug dump of a VM whose request failed, if one was taken (`[server]
/// debug_dump`). Called on the failure paths only: a VM stopped after its response is
/// cancelled too, and that is no failure.
pub fn log_dump(end: &VmEnd, vm: Option<u64>) {
    if let Some(dump) = end.dump.as_deref() {
        // Numbers, and console lines escaped (xcgi_vmm::diagnostics); the description too.
        let how = crate::escape::for_log(&end.description, crate::escape::LOG_TEXT_MAX);
        let of = vm.map(|n| format!(" of vm={n}")).unwrap_or_default();
        tracing::warn!("VM debug dump{of} ({how})\n{dump}");
    }
}

/// A short description of how a VM ended, for a log line.
pub fn describe_outcome(r: &Result<xcgi_vmm::Outcome, xcgi_vmm::VmError>) -> String {
    match r {
        Ok(o) => {
            let mut s = o.reason.describe();
            if matches!(o.reason, ExitReason::Panic { .. } | ExitReason::TripleFault) {
                if let Some(last) = o.console.lines().rev().find(|l| !l.trim().is_empty()) {
                    s.push_str(&format!(" (console: {})", last.trim()));
                }
            }
            s
        }
        Err(e) => format!("VM failed to start: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::sync::{mpsc, Weak};
    use xcgi_vmm::NetAttachment;

    /// Reports, when dropped, whether the TAP it watches was closed by then.
    struct Lease(Weak<OwnedFd>, mpsc::Sender<bool>);

    impl Drop for Lease {
        fn drop(&mut self) {
            let _ = self.1.send(self.0.upgrade().is_none());
        }
    }

    /// A snapshot route's clones record their working set until its template has one, and
    /// not at all with `working_set = false`; a booted route's never do.
    #[test]
    fn clones_record_a_working_set_until_the_template_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let booted = VmSpec::for_test("k".into(), GuestRoot::Initramfs("i".into()));
        let clones = VmSpec {
            snapshot: Some(dir.path().to_path_buf()),
            working_set: true,
            ..booted.clone()
        };
        let off = VmSpec {
            working_set: false,
            ..clones.clone()
        };
        let records = |s: &VmSpec| s.run_options(Cancel::new()).record_working_set;
        assert_eq!(
            (records(&booted), records(&clones), records(&off)),
            (false, true, false)
        );
        xcgi_vmm::prefault::WorkingSet::default()
            .write_new(dir.path())
            .unwrap();
        assert!(!records(&clones), "the template has one");
    }

    #[test]
    fn the_tap_lease_goes_back_only_after_the_vm_closed_its_copy() {
        let tap: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let tap = Arc::new(tap);
        let (tx, rx) = mpsc::channel();
        let lease = Lease(Arc::downgrade(&tap), tx);
        let attach = Attachments {
            net: Some(NetAttachment {
                tap,
                mac: [6, 0, 0, 0, 0, 1],
                ip_param: String::new(),
                rx_ready: None,
            }),
            ..Attachments::default()
        };
        // A VM that cannot start (no such kernel): the thread ends at once, as after a failure.
        let spec = VmSpec::for_test(
            "/nonexistent/vmlinux".into(),
            GuestRoot::Initramfs("/nonexistent/initramfs".into()),
        );
        let metrics = Arc::new(Metrics::default());
        let vm = start_vm(
            &spec,
            attach,
            spec.run_options(Cancel::new()),
            metrics,
            lease,
        )
        .unwrap();
        let closed = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            closed,
            "the lease went back while the VM's copy of the TAP was still open"
        );
        drop(vm);
    }
}
