//! Seccomp filters for a jailed VM process, one per thread kind (`xcgi run --jail`; the
//! jail's last step, docs/security.md): each thread installs its own before it touches guest
//! data, and any system call outside its list kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`). `ioctl` is allowed only with the KVM requests the thread
//! kind makes (and the terminal's, for a console on a tty).
//!
//! How the lists were made: the monitor run under `strace -f` on this host (setup, the
//! deadline, the debug dump, teardown), then each filter in `log` mode (`XCGI_SECCOMP=log`:
//! allowed but logged by the kernel) through real guests in the lab (boot, console, root
//! disk, the CGI channel of `xcgi serve` with `[server] jail`) until nothing more was logged
//! (`tests/jail.rs` and `serve_vm::jailed_vm_processes_serve_cgi_requests` check it on every
//! run; HTTP mode through a NIC in `serve_vm::jailed_vm_processes_serve_http_mode`).
//!
//! The filters are set once per process ([`set_process_filters`]); the monitor's threads call
//! [`install`] when they start. Nothing is installed in a process that set none (the
//! server, `xcgi run` without `--jail`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// The threads of a VM process, each with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that built the VM and waits for its end, then tears it down.
    Main,
    /// A vCPU thread: KVM_RUN and the device emulation it calls.
    Vcpu,
    /// A device's RX thread (console channel, TAP).
    Device,
}

/// What happens to a system call outside the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The process is killed (SIGSYS): the default.
    Kill,
    /// It is allowed and logged by the kernel (`dmesg`: audit type=1326): for deriving the
    /// lists.
    Log,
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not compile to BPF.
    #[error("seccomp filter for the {kind:?} thread: {source}")]
    Build {
        /// Which filter.
        kind: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("installing the seccomp filter of a {kind:?} thread: {source}")]
    Install {
        /// Which filter.
        kind: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
}

/// The compiled filters of one process.
#[derive(Debug)]
pub struct Filters {
    main: BpfProgram,
    vcpu: BpfProgram,
    device: BpfProgram,
}

static PROCESS_FILTERS: OnceLock<Filters> = OnceLock::new();

/// Sets this process's filters (once; a second call changes nothing). Each of the monitor's
/// threads installs its own from then on: the vCPU and device threads when they start, the
/// main thread once it has started the vCPUs.
pub fn set_process_filters(filters: Filters) {
    let _ = PROCESS_FILTERS.set(filters);
}

/// Installs the process's filter for `kind` in the calling thread; nothing when the process
/// has none.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(f) = PROCESS_FILTERS.get() else {
        return Ok(());
    };
    seccompiler::apply_filter(f.program(kind))
        .map_err(|source| SeccompError::Install { kind, source })
}

impl Filters {
    /// Compiles the three filters.
    pub fn new(mismatch: Mismatch) -> Result<Filters, SeccompError> {
        let build = |kind| compile(kind, mismatch);
        Ok(Filters {
            main: build(ThreadKind::Main)?,
            vcpu: build(ThreadKind::Vcpu)?,
            device: build(ThreadKind::Device)?,
        })
    }

    /// The BPF program for `kind`.
    pub fn program(&self, kind: ThreadKind) -> &BpfProgram {
        match kind {
            ThreadKind::Main => &self.main,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Device => &self.device,
        }
    }
}

/// What every thread of the monitor does: memory for its allocations, locks, time, its own
/// signals and its end.
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_close,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Descriptor waits and reads of eventfds, sockets and the TAP.
const IO: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_fcntl,
];

/// The KVM ioctl requests the monitor makes after the jail, computed from kvm-bindings'
/// structures as the kernel's headers do.
#[allow(missing_docs, non_snake_case)]
mod nr {
    use kvm_bindings::{
        kvm_clock_data, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_list,
        kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    #[cfg(test)]
    use vmm_sys_util::ioctl_iow_nr;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    // For tests only: a KVM request no thread may make after the jail.
    #[cfg(test)]
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
}

/// A vCPU runs, and reads its state for the debug dump as it ends (the MSR list, once per
/// process, from /dev/kvm).
fn vcpu_ioctls() -> Vec<u64> {
    [
        nr::KVM_RUN(),
        nr::KVM_GET_MSR_INDEX_LIST(),
        nr::KVM_GET_REGS(),
        nr::KVM_GET_SREGS(),
        nr::KVM_GET_MSRS(),
        nr::KVM_GET_FPU(),
        nr::KVM_GET_LAPIC(),
        nr::KVM_GET_MP_STATE(),
        nr::KVM_GET_VCPU_EVENTS(),
        nr::KVM_GET_XSAVE(),
        nr::KVM_GET_XCRS(),
    ]
    .to_vec()
}

/// The main thread reads the VM's interrupt controllers, PIT and clock for the dump.
fn main_ioctls() -> Vec<u64> {
    [
        nr::KVM_GET_IRQCHIP(),
        nr::KVM_GET_CLOCK(),
        nr::KVM_GET_PIT2(),
    ]
    .to_vec()
}

fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    requests
        .iter()
        .map(|&r| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                r,
            )?])
        })
        .collect()
}

fn compile(kind: ThreadKind, mismatch: Mismatch) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[libc::c_long]| {
        for &c in calls {
            rules.insert(c, Vec::new());
        }
    };
    allow(COMMON);
    allow(IO);
    let ioctls: Vec<u64> = match kind {
        ThreadKind::Vcpu => {
            // The kick handler is installed by the first vCPU thread; the root disk's
            // requests are served on the vCPU thread that notified (positional reads).
            allow(&[libc::SYS_rt_sigaction, libc::SYS_pread64]);
            // A virtio device is activated on the vCPU thread whose write set DRIVER_OK: its
            // RX thread (eventfds, an epoll, a new thread that then installs the device
            // filter on top of this one) is started there. Found by the lab in log mode.
            // Starting RX threads before the filters would take these out of the list.
            allow(&[
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_clone3,
                libc::SYS_clone,
                libc::SYS_rseq,
                libc::SYS_set_robust_list,
                libc::SYS_sched_getaffinity,
                libc::SYS_prctl,
                libc::SYS_seccomp,
            ]);
            vcpu_ioctls()
        }
        ThreadKind::Main => {
            // Kicks the vCPU threads out of KVM_RUN; reads the guest's working set from the
            // page map opened before the jail (positional reads).
            allow(&[libc::SYS_tgkill, libc::SYS_pread64]);
            main_ioctls()
        }
        ThreadKind::Device => Vec::new(),
    };
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules(&ioctls).map_err(err)?);
    }
    let on_mismatch = match mismatch {
        Mismatch::Kill => SeccompAction::KillProcess,
        Mismatch::Log => SeccompAction::Log,
    };
    let arch = seccompiler::TargetArch::x86_64;
    let filter = SeccompFilter::new(rules, on_mismatch, SeccompAction::Allow, arch).map_err(err)?;
    BpfProgram::try_from(filter).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child (raw system calls only: the filter is compiled before the
    /// fork) and returns how the child ended: Ok(exit code) or Err(signal).
    fn in_child(program: &BpfProgram, f: fn()) -> Result<i32, i32> {
        // SAFETY: fork in a test; the child makes system calls only (no allocation, no lock)
        // and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if seccompiler::apply_filter(program).is_err() {
                // SAFETY: leaves the child at once.
                unsafe { libc::_exit(90) };
            }
            f();
            // SAFETY: leaves the child at once.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if libc::WIFSIGNALED(status) {
            Err(libc::WTERMSIG(status))
        } else {
            Ok(libc::WEXITSTATUS(status))
        }
    }

    #[test]
    fn a_system_call_outside_the_list_kills_the_process() {
        let filters = Filters::new(Mismatch::Kill).unwrap();
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Device] {
            // Allowed: a write to stdout's dup... and a clock read.
            let fine = in_child(filters.program(kind), || {
                // SAFETY: a plain syscall.
                unsafe { libc::syscall(libc::SYS_getpid) };
            });
            assert_eq!(fine, Ok(0), "{kind:?}: an allowed call was refused");
            // Forbidden: opening a socket (a jailed VM process never makes one), and
            // opening a file by path.
            let socket = in_child(filters.program(kind), || {
                // SAFETY: a plain syscall; it must not return.
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
            });
            assert_eq!(
                socket,
                Err(libc::SIGSYS),
                "{kind:?}: socket() was not killed"
            );
            let open = in_child(filters.program(kind), || {
                // SAFETY: a plain syscall on a static NUL-terminated path; it must not return.
                unsafe {
                    libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/etc/passwd".as_ptr(),
                        libc::O_RDONLY,
                    )
                };
            });
            assert_eq!(open, Err(libc::SIGSYS), "{kind:?}: openat() was not killed");
        }
    }

    #[test]
    fn ioctl_is_allowed_for_the_kvm_requests_of_the_thread_kind_only() {
        let filters = Filters::new(Mismatch::Kill).unwrap();
        // TIOCSTI (inject terminal input) on stdin: not in any list.
        let tiocsti = in_child(filters.program(ThreadKind::Vcpu), || {
            // SAFETY: a plain syscall; it must not return.
            unsafe { libc::syscall(libc::SYS_ioctl, 0, libc::TIOCSTI, 0) };
        });
        assert_eq!(tiocsti, Err(libc::SIGSYS));
        // The device threads make no ioctl at all, not even KVM_RUN.
        let run = in_child(filters.program(ThreadKind::Device), || {
            // SAFETY: a plain syscall on a bad descriptor; it must not return.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, nr::KVM_RUN(), 0) };
        });
        assert_eq!(run, Err(libc::SIGSYS));
        // No thread sets vCPU registers after the jail.
        let set = in_child(filters.program(ThreadKind::Vcpu), || {
            // SAFETY: a plain syscall on a bad descriptor; it must not return.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, nr::KVM_SET_REGS(), 0) };
        });
        assert_eq!(set, Err(libc::SIGSYS));
        // KVM_RUN on a bad descriptor from a vCPU thread: allowed (EBADF), not killed.
        let vcpu = in_child(filters.program(ThreadKind::Vcpu), || {
            // SAFETY: a plain syscall on a bad descriptor.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, nr::KVM_RUN(), 0) };
        });
        assert_eq!(vcpu, Ok(0));
    }
}
