//! A cgroup v2 per jailed VM process (step 3 of the jail, docs/security.md): `memory.max`
//! (guest memory plus the VM process's own), `pids.max` and `cpu.max`, set before the process
//! starts in it (`CLONE_INTO_CGROUP`: limited from its first instruction). The server makes
//! them under one parent of its own (`xcgi-vms-PID`, in `[server] cgroup_parent` or its own
//! cgroup) and removes each once its process is reaped. Where cgroup v2 or a controller is
//! missing, the server warns once at start and VM processes run without that limit.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use xcgi_jail::cgroup::{self, Cgroup};

/// MiB a VM process needs besides its guest's memory, charged to its cgroup: the monitor's
/// own pages (~4 MiB resident waiting, docs/benchmarks.md §12), KVM's per-VM and per-vCPU
/// kernel memory (page tables of the guest's memory, vCPU state) and device buffers.
/// In the lab (`jailed_vm_processes_serve_cgi_requests` prints each cgroup's memory.peak) a
/// 128 MiB guest's VM process peaks at 20-28 MiB over a CGI request and at 80 MiB when its
/// handler touches 64 MiB: the guest's pages plus a few MiB; this leaves ample headroom.
pub const VM_OVERHEAD_MIB: u64 = 48;

/// The tasks (threads) a VM process of `vcpus` vCPUs may have: its main thread, a thread per
/// vCPU, the device RX threads, with room. Its cgroup's default `pids.max` and its
/// RLIMIT_NPROC (counted per uid: each VM process has its own).
pub fn vm_process_tasks(vcpus: u8) -> u32 {
    8 + u32::from(vcpus)
}

/// One VM process's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// `memory.max`, bytes.
    pub memory_max: u64,
    /// `pids.max`: tasks (its threads).
    pub pids_max: u32,
    /// `cpu.max` as a percentage of one CPU (100: one CPU's time); None: no limit.
    pub cpu_percent: Option<u32>,
}

impl VmLimits {
    /// The defaults for a guest of `memory_mib` MiB and `vcpus` vCPUs: guest memory plus
    /// [`VM_OVERHEAD_MIB`], [`vm_process_tasks`], no CPU limit.
    pub fn for_guest(memory_mib: u64, vcpus: u8) -> VmLimits {
        VmLimits {
            memory_max: (memory_mib + VM_OVERHEAD_MIB).saturating_mul(1 << 20),
            pids_max: vm_process_tasks(vcpus),
            cpu_percent: None,
        }
    }
}

/// The parent of the server's VM cgroups, and which limits it can set.
#[derive(Debug)]
pub struct VmCgroups {
    parent: Cgroup,
    memory: bool,
    pids: bool,
    cpu: bool,
    next: AtomicU64,
}

/// `cpu.max`'s period, µs.
const CPU_PERIOD_US: u64 = 100_000;

/// `cpu.weight` of a VM process that waits for its request (the lowest): preparing the next VM
/// takes no CPU time from VMs serving requests (in the lab, with one CPU, a clone's request
/// took 3-5x longer while its replacement was being prepared beside it at equal weight).
const WAITING_WEIGHT: &str = "1";
/// `cpu.weight` once it has its request: the default, as every other cgroup.
pub const RUNNING_WEIGHT: &[u8] = b"100";

impl VmCgroups {
    /// Makes the parent under `base` (default: the server's own cgroup), removing what an
    /// earlier server killed with SIGKILL left there. None, with a warning naming why, where
    /// cgroup v2 is missing or not writable; a warning for each controller it cannot use.
    pub fn new(base: Option<&Path>) -> Option<Arc<VmCgroups>> {
        let base: PathBuf = match base
            .map(Path::to_path_buf)
            .or_else(|| cgroup::of_process("self"))
        {
            Some(b) => b,
            None => {
                warn!("no cgroup v2 hierarchy: jailed VM processes run without memory.max, pids.max or cpu.max (mount cgroup2, or see docs/security.md)");
                return None;
            }
        };
        for gone in cgroup::remove_stale(&base, "xcgi-vms-") {
            info!(cgroup = %gone.display(), "removed a cgroup left by an earlier server");
        }
        let made = Cgroup::make_parent(
            &base,
            &format!("xcgi-vms-{}", std::process::id()),
            &["memory", "pids", "cpu"],
            &format!("xcgi-server-{}", std::process::id()),
        );
        let parent = match made {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, cgroup = %base.display(),
                    "cannot make the jailed VM processes' cgroup: they run without memory.max, pids.max or cpu.max (make cgroup v2 writable, e.g. Delegate=yes, or set [server] cgroup_parent)");
                return None;
            }
        };
        for (c, why) in &parent.missing {
            warn!(controller = %c, why = %why, cgroup = %parent.cgroup.path().display(),
                "a cgroup v2 controller is not available: jailed VM processes run without its limit");
        }
        let has = |c: &str| !parent.missing.iter().any(|(m, _)| m == c);
        Some(Arc::new(VmCgroups {
            memory: has("memory"),
            pids: has("pids"),
            cpu: has("cpu"),
            parent: parent.cgroup,
            next: AtomicU64::new(0),
        }))
    }

    /// A new cgroup with `limits` set (those the parent can), for one VM process.
    pub fn make(self: &Arc<Self>, limits: &VmLimits) -> io::Result<VmCgroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let cg = Cgroup::create(self.parent.path(), &format!("vm{n}"))?;
        let vm = VmCgroup {
            cg,
            memory_max: self.memory.then_some(limits.memory_max),
            cpu: self.cpu,
            _parent: Arc::clone(self),
        };
        let set = |file: &str, value: String| {
            vm.cg
                .set(file, &value)
                .map_err(|e| io::Error::new(e.kind(), format!("writing {value} to {file}: {e}")))
        };
        if self.memory {
            set("memory.max", limits.memory_max.to_string())?;
            // No swap: the limit is the VM process's memory, not a prompt to page it out.
            let _ = vm.cg.set("memory.swap.max", "0");
        }
        if self.pids {
            set("pids.max", limits.pids_max.to_string())?;
        }
        if self.cpu {
            set("cpu.weight", WAITING_WEIGHT.to_string())?;
        }
        if let (true, Some(p)) = (self.cpu, limits.cpu_percent) {
            let quota = (u64::from(p) * CPU_PERIOD_US / 100).max(1000);
            set("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
        }
        Ok(vm)
    }
}

impl Drop for VmCgroups {
    fn drop(&mut self) {
        if let Err(e) = self.parent.remove(Duration::from_millis(500)) {
            warn!(error = %e, cgroup = %self.parent.path().display(),
                "cannot remove the jailed VM processes' cgroup");
        }
    }
}

/// One VM process's cgroup: removed on drop (once its process is reaped).
#[derive(Debug)]
pub struct VmCgroup {
    cg: Cgroup,
    memory_max: Option<u64>,
    /// The cpu controller is on: `cpu.weight` starts at [`WAITING_WEIGHT`].
    cpu: bool,
    /// Keeps the parent until its last child is gone.
    _parent: Arc<VmCgroups>,
}

impl VmCgroup {
    /// Its directory (to open for `CLONE_INTO_CGROUP`).
    pub fn path(&self) -> &Path {
        self.cg.path()
    }

    /// When the kernel's OOM killer killed a process in it: the `memory.max` it hit.
    pub fn oom_killed(&self) -> Option<u64> {
        let max = self.memory_max?;
        (self.cg.event("memory.events", "oom_kill").unwrap_or(0) > 0).then_some(max)
    }

    /// Its `cpu.weight`, open for writing: the server, which cannot open the cgroup's files
    /// (it may have dropped root), raises the weight through it ([`RUNNING_WEIGHT`]) when it
    /// hands the VM process its request. None without the cpu controller.
    pub fn weight_handle(&self) -> Option<std::fs::File> {
        if !self.cpu {
            return None;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.cg.path().join("cpu.weight"))
            .map_err(|e| warn!(error = %e, "cannot open a VM process's cpu.weight"))
            .ok()
    }

    /// Its `memory.max`, bytes, when set.
    pub fn memory_max(&self) -> Option<u64> {
        self.memory_max
    }

    /// The most memory its processes ever had charged (`memory.peak`, Linux 5.19+).
    pub fn memory_peak(&self) -> Option<u64> {
        std::fs::read_to_string(self.cg.path().join("memory.peak"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        // Whatever is left in it (nothing, once its VM process is reaped) goes first.
        if self.cg.populated() {
            let _ = self.cg.kill();
        }
        if let Err(e) = self.cg.remove(Duration::from_secs(1)) {
            warn!(error = %e, cgroup = %self.cg.path().display(), "cannot remove a VM process's cgroup");
        }
    }
}
