//! What describes a VM, split by lifetime (as Firecracker's `vstate/resources.rs`):
//! - [`MachineShape`]: what the machine is (kernel, root, memory, vCPUs). Everything a VM
//!   prepared ahead has already done depends on it alone; it is what a pool of prepared VMs
//!   (and later a snapshot) is keyed by (`Eq + Hash`).
//! - [`Attachments`]: what one run adds to a machine (the CGI channel, a NIC, extra kernel
//!   parameters), bound to one request.
//! - [`RunOptions`]: how the run goes (deadline, cancel) and what it measures.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::arch::x86_64::loader::LoadMode;
use crate::memory::MemoryConfig;

/// What the machine is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MachineShape {
    /// The guest kernel: an ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// A root filesystem image on a virtio-blk disk (it decides the `root=` parameter, so it
    /// is part of the machine: the disk device itself is attached at launch).
    pub rootfs: Option<PathBuf>,
    /// An initramfs (the root when there is no `rootfs`).
    pub initramfs: Option<PathBuf>,
    /// Guest RAM size and backing.
    pub memory: MemoryConfig,
    /// Number of vCPUs, 1 to 32.
    pub vcpus: u8,
    /// Map the kernel and initramfs copy-on-write (default) or copy them.
    pub load_mode: LoadMode,
    /// A snapshot directory (its `state` and `memory` files) of this machine: a VM of this
    /// shape is a clone restored from it instead of a boot (issue 13).
    pub snapshot: Option<PathBuf>,
}

impl Default for MachineShape {
    fn default() -> Self {
        MachineShape {
            kernel: PathBuf::new(),
            rootfs: None,
            initramfs: None,
            memory: MemoryConfig::default(),
            vcpus: 1,
            load_mode: LoadMode::Map,
            snapshot: None,
        }
    }
}

/// What one run adds to the machine.
#[derive(Debug, Clone, Default)]
pub struct Attachments {
    /// A virtio-console port (/dev/hvc0 in the guest) bridged to this connected Unix stream
    /// socket. The VM uses a duplicate, closed when it ends; the socket is put in
    /// non-blocking mode (shared by every duplicate).
    pub channel: Option<Arc<OwnedFd>>,
    /// A virtio-net interface backed by a TAP device.
    pub net: Option<NetAttachment>,
    /// Extra kernel parameters, appended last.
    pub cmdline_extra: Option<String>,
}

/// How one run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The deadline, from the first KVM_RUN.
    pub timeout: Duration,
    /// Stops the VM early when cancelled.
    pub cancel: Cancel,
    /// Stop right before the first KVM_RUN (to measure setup alone).
    pub setup_only: bool,
    /// Measure the host memory behind the VM when it ends ([`crate::Outcome::memory`]).
    pub measure_memory: bool,
    /// When the VM ends badly (triple fault, deadline, cancel, vCPU failure, panic), describe
    /// its vCPUs, interrupt controllers, timers and devices in [`crate::Outcome::dump`]
    /// ([`crate::diagnostics`]).
    pub debug_dump: bool,
    /// With `debug_dump`: guest memory to add to the dump ([`crate::diagnostics::Probe`]).
    pub debug_probe: Option<std::sync::Arc<crate::diagnostics::Probe>>,
    /// Take a snapshot of the running VM when asked ([`Capture`]) and end it there.
    pub capture: Option<Capture>,
    /// When the run ends (not captured), record the pages the guest touched
    /// ([`crate::Outcome::working_set`], [`crate::prefault`]).
    pub record_working_set: bool,
}

/// Where and when a run is captured into a snapshot: the VM is stopped, its state and memory
/// written to `dir` ([`crate::snapshot::STATE_FILE`], [`crate::snapshot::MEMORY_FILE`]), and
/// the run ends with [`crate::ExitReason::Captured`]. The VM is never resumed.
#[derive(Debug, Clone)]
pub struct Capture {
    /// Set (from any thread) to take it now.
    pub now: Cancel,
    /// Also taken when a line of the guest's serial console contains this text.
    pub marker: Option<String>,
    /// The snapshot directory (created if missing).
    pub dir: PathBuf,
    /// Where the memory goes instead of `dir/memory` (which is then a symbolic link to it).
    /// A VM on huge pages needs one: a file on hugetlbfs, which its clones map copy-on-write
    /// in 2 MiB pages. Whoever asked for it removes it (it holds huge pages).
    pub memory_file: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(10),
            cancel: Cancel::default(),
            setup_only: false,
            measure_memory: false,
            debug_dump: false,
            debug_probe: None,
            capture: None,
            record_working_set: false,
        }
    }
}

/// A network interface for the guest: a TAP device (opened with IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR, 12-byte header) and how the guest configures itself.
#[derive(Debug, Clone)]
pub struct NetAttachment {
    /// The TAP descriptor; the VM uses a duplicate.
    pub tap: Arc<OwnedFd>,
    /// The guest's MAC address (unicast, not all zeros).
    pub mac: [u8; 6],
    /// The kernel's `ip=` parameter for the guest (e.g. `ip=172.16.0.2::172.16.0.1:...`).
    pub ip_param: String,
    /// Set when the guest's driver first posts receive buffers (its interface is up): until
    /// then, packets sent to the guest only queue up. Lets a host wait for the guest without
    /// sending anything.
    pub rx_ready: Option<Arc<AtomicBool>>,
}

/// Asks a running VM to stop (from another thread, a signal handler thread, a server whose
/// client went away). The VM ends within about 10 ms with [`crate::ExitReason::Cancelled`].
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks every run given this handle (or a clone) to stop; it cannot be undone.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether [`Cancel::cancel`] was called on this or a clone.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
