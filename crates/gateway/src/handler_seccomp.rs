//! Process isolation's optional seccomp filters (`[process] seccomp`, on by default): what a
//! CGI handler never needs and a hostile one would use against the host kernel. A deny-list
//! (the handler may be any program: an allow-list would break them), answered with EPERM, in
//! the spirit of container runtimes' default profiles:
//!
//! - debugging other processes and their memory: `ptrace`, `process_vm_readv`/`_writev`,
//!   `kcmp`, `pidfd_getfd`;
//! - new namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*` flag) and mounts
//!   (`mount`, `umount2`, `pivot_root`, `chroot`, the new mount API, `open_tree`,
//!   `move_mount`);
//! - kernel attack surface rarely needed by a request handler: `bpf`, `perf_event_open`,
//!   `userfaultfd`, `io_uring_*`, `keyctl`, `add_key`, `request_key`, `fanotify_init`,
//!   `open_by_handle_at`, `name_to_handle_at`, `lookup_dcookie`;
//! - the host's own business: modules, kexec, reboot, swap, accounting, quotas, the clock,
//!   the host and domain name, `syslog`, `iopl`, `ioperm`, `vhangup`.
//!
//! `clone3` answers ENOSYS instead (a second filter): its flags are behind a pointer a filter
//! cannot read, and ENOSYS makes glibc fall back to `clone`, whose flags the first filter
//! checks.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use xcgi_jail::SeccompProgram;

/// System calls a handler gets EPERM for, whatever their arguments.
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_fanotify_init,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_lookup_dcookie,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_vhangup,
];

/// The `CLONE_NEW*` flags `clone` may not carry.
const NEW_NAMESPACES: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

/// Why the handlers' filters could not be built (a bug: they are constants).
#[derive(Debug, thiserror::Error)]
#[error("building the handlers' seccomp filter: {0}")]
pub struct HandlerSeccompError(String);

/// The handlers' two filters, compiled (installed in this order before `execve`).
pub fn handler_filters() -> Result<Vec<SeccompProgram>, HandlerSeccompError> {
    let err = |e: &dyn std::fmt::Display| HandlerSeccompError(e.to_string());
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&c| (c, Vec::new())).collect();
    let clone_rules = NEW_NAMESPACES
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(|e| err(&e))?])
            .map_err(|e| err(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    let arch = seccompiler::TargetArch::x86_64;
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let first =
        SeccompFilter::new(denied, SeccompAction::Allow, eperm, arch).map_err(|e| err(&e))?;
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into();
    let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
    let second =
        SeccompFilter::new(clone3, SeccompAction::Allow, enosys, arch).map_err(|e| err(&e))?;
    [first, second]
        .into_iter()
        .map(|f| {
            let bpf = BpfProgram::try_from(f).map_err(|e| err(&e))?;
            Ok(SeccompProgram(std::sync::Arc::new(
                bpf.iter()
                    .map(|i| libc::sock_filter {
                        code: i.code,
                        jt: i.jt,
                        jf: i.jf,
                        k: i.k,
                    })
                    .collect(),
            )))
        })
        .collect()
}
