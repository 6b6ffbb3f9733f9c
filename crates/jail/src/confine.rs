//! A process confining itself, in this order (docs/security.md, "The jail"):
//! 1. its mount namespace private, a new empty tmpfs as its root (`pivot_root`; the old root
//!    detached), then read-only: no host file is reachable by path, and there is no /proc;
//! 2. resource limits (RLIMIT_NOFILE, RLIMIT_NPROC, RLIMIT_CORE = 0, RLIMIT_FSIZE = 0);
//! 3. `PR_SET_NO_NEW_PRIVS`, `PR_SET_DUMPABLE = 0`;
//! 4. every capability out of the bounding and ambient sets, supplementary groups dropped,
//!    then the unprivileged gid and uid (which empties the permitted and effective sets).
//!
//! The namespaces themselves (PID, mount, IPC, UTS, network) are made when the process is
//! started ([`crate::spawn`] with `ChildSetup::namespaces`); seccomp filters come last,
//! installed by each thread for itself (`xcgi_vmm::seccomp`).

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// How a process confines itself.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// An existing directory to mount the new, empty root on. It is only a mount point in
    /// this process's own mount namespace: the host never sees the mount.
    pub mount_point: PathBuf,
    /// The uid and gid to run as from then on (never 0).
    pub uid: libc::uid_t,
    /// See `uid`.
    pub gid: libc::gid_t,
    /// Resource limits (soft = hard).
    pub limits: Vec<(libc::__rlimit_resource_t, u64)>,
}

/// A step of the confinement that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A system call of one step failed.
    #[error("jail: {step} failed: {source} (needs root, in a mount namespace of its own)")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The uid or gid to drop to is root's.
    #[error(
        "jail: refusing to run as uid {uid} / gid {gid}: the jail drops to a user that is not root"
    )]
    Root {
        /// The uid asked for.
        uid: libc::uid_t,
        /// The gid asked for.
        gid: libc::gid_t,
    },
    /// The process has other threads: they would keep its root, credentials and
    /// capabilities (the steps change the calling thread, or the filesystem view it shares).
    #[error("jail: the process has {0} threads; it must be confined before it starts any")]
    Threads(usize),
    /// A capability survived the uid change.
    #[error("jail: capabilities left after the uid change: effective {effective:#x}, permitted {permitted:#x}")]
    CapsLeft {
        /// The effective set's low 64 bits.
        effective: u64,
        /// The permitted set's low 64 bits.
        permitted: u64,
    },
}

fn check(step: &'static str, r: libc::c_long) -> Result<(), ConfineError> {
    if r < 0 {
        Err(ConfineError::Step {
            step,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// Confines the calling process (see the module documentation for the steps). Call it
/// single-threaded: the credential change uses raw system calls, which change the calling
/// thread only.
pub fn confine(cfg: &Confinement) -> Result<(), ConfineError> {
    if cfg.uid == 0 || cfg.gid == 0 {
        return Err(ConfineError::Root {
            uid: cfg.uid,
            gid: cfg.gid,
        });
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .map_err(|source| ConfineError::Step {
            step: "counting the process's threads (/proc/self/task)",
            source,
        })?;
    if threads != 1 {
        return Err(ConfineError::Threads(threads));
    }
    empty_root(&cfg.mount_point)?;
    for &(res, value) in &cfg.limits {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: lim is a valid rlimit for this call.
        check("setrlimit", unsafe { libc::setrlimit(res, &lim) }.into())?;
    }
    // SAFETY: prctl with integer arguments, on this process.
    unsafe {
        check(
            "PR_SET_NO_NEW_PRIVS",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
        )?;
        check(
            "PR_SET_DUMPABLE",
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0).into(),
        )?;
    }
    drop_privileges(cfg.uid, cfg.gid)
}

/// Step 1: a private, empty, read-only tmpfs root; the old root detached.
fn empty_root(mount_point: &Path) -> Result<(), ConfineError> {
    let none = std::ptr::null::<libc::c_char>();
    let (root, dot, tmpfs) = (c("/"), c("."), c("tmpfs"));
    let target = CString::new(mount_point.as_os_str().as_encoded_bytes()).map_err(|_| {
        ConfineError::Step {
            step: "naming the mount point",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        }
    })?;
    let opts = c("size=16k,nr_inodes=16,mode=0555");
    // SAFETY: mount/pivot_root/umount2/chdir on NUL-terminated strings made above; they
    // change this process's own mount namespace (private first, so nothing propagates out).
    unsafe {
        check(
            "making mounts private",
            libc::mount(
                none,
                root.as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            )
            .into(),
        )?;
        check(
            "mounting the empty root",
            libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            )
            .into(),
        )?;
        check("chdir to the new root", libc::chdir(target.as_ptr()).into())?;
        // pivot_root(".", "."): the old root ends up on top of the new one, then goes.
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0 {
            check(
                "detaching the old root",
                libc::umount2(dot.as_ptr(), libc::MNT_DETACH).into(),
            )?;
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // The root is the initramfs (rootfs), which cannot be pivoted away (the lab runs
            // so): move the new root over it and chroot, as switch_root does. The old root
            // stays underneath, out of reach: leaving a chroot takes CAP_SYS_CHROOT, which
            // goes in step 4.
            check(
                "moving the empty root over /",
                libc::mount(
                    dot.as_ptr(),
                    root.as_ptr(),
                    none,
                    libc::MS_MOVE,
                    none.cast(),
                )
                .into(),
            )?;
            check("chroot", libc::chroot(dot.as_ptr()).into())?;
        } else {
            return check("pivot_root", -1);
        }
        check("chdir /", libc::chdir(root.as_ptr()).into())?;
        check(
            "making the root read-only",
            libc::mount(
                none,
                root.as_ptr(),
                none,
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                none.cast(),
            )
            .into(),
        )?;
    }
    Ok(())
}

/// Step 4: no capability in any set, no supplementary group, `uid`/`gid` everywhere.
fn drop_privileges(uid: libc::uid_t, gid: libc::gid_t) -> Result<(), ConfineError> {
    // SAFETY: prctl and raw credential system calls on this thread (the caller is
    // single-threaded); a null group list of length 0 is valid.
    unsafe {
        check(
            "clearing the ambient capabilities",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
            .into(),
        )?;
        // Every capability the kernel knows, until it says there are no more.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return check("dropping the bounding capabilities", -1);
            }
        }
        check(
            "dropping supplementary groups",
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
        )?;
        check(
            "setresgid",
            libc::syscall(libc::SYS_setresgid, gid, gid, gid),
        )?;
        check(
            "setresuid",
            libc::syscall(libc::SYS_setresuid, uid, uid, uid),
        )?;
    }
    no_capability_left()
}

/// Switches this whole process, every thread of it, to `uid` and `gid` for good (a server
/// after its start-up): its only group `gid`, real, effective and saved ids changed, which
/// clears every capability of every thread (none is kept), and not dumpable. The glibc
/// wrappers used here apply each change to all threads.
pub fn switch_user(uid: libc::uid_t, gid: libc::gid_t) -> Result<(), ConfineError> {
    // SAFETY: credential calls through glibc (which applies them to every thread) with a
    // one-element group list that outlives the call; prctl on this process.
    unsafe {
        check("setgroups", libc::setgroups(1, &gid).into())?;
        check("setresgid", libc::setresgid(gid, gid, gid).into())?;
        check("setresuid", libc::setresuid(uid, uid, uid).into())?;
        check(
            "clearing the dumpable flag",
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0).into(),
        )?;
    }
    no_capability_left()
}

/// Checks that the calling thread has no effective or permitted capability left.
fn no_capability_left() -> Result<(), ConfineError> {
    let (effective, permitted) = capabilities().map_err(|source| ConfineError::Step {
        step: "reading the capabilities",
        source,
    })?;
    if effective != 0 || permitted != 0 {
        return Err(ConfineError::CapsLeft {
            effective,
            permitted,
        });
    }
    Ok(())
}

/// Sets no_new_privs for this process's calling thread and the threads and processes it
/// starts from now on (call it while single-threaded): nothing it executes gains privileges.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor of this process from `first` up (`close_range`): what a new
/// process was not meant to inherit, before it opens anything of its own.
pub fn close_from(first: u32) {
    // SAFETY: closes descriptors of this process only; the caller holds none from `first` up.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
}

/// The calling thread's effective and permitted capability sets (capget, version 3).
pub fn capabilities() -> io::Result<(u64, u64)> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget fills two Data structs (version 3) for the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(d[0].effective, d[1].effective),
        join(d[0].permitted, d[1].permitted),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process with another thread is refused before any step: that thread would keep the
    /// root, the credentials and the capabilities the steps take away from the caller.
    #[test]
    fn a_process_with_other_threads_is_not_confined() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let e = confine(&Confinement {
            mount_point: std::env::temp_dir(),
            uid: 1000,
            gid: 1000,
            limits: Vec::new(),
        })
        .expect_err("another thread runs");
        assert!(matches!(e, ConfineError::Threads(n) if n >= 2), "{e}");
        assert!(e.to_string().contains("before it starts any"), "{e}");
        drop(tx);
        let _ = other.join();
    }
}
