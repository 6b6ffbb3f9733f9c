//! xcgi's own network namespace.
//!
//! The xcgi process stays in the namespace it was started in. The namespace exists as a file
//! descriptor (and, when named, as a bind mount at `/run/netns/<name>`, the convention of
//! `ip netns`); work that must happen inside it runs on a short-lived thread that `setns()`es
//! into it ([`NetNs::run`]). Sockets and TAP descriptors keep the namespace they were created
//! in, so they can be used from any thread afterwards.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::netlink::{Netlink, NetlinkError};
use crate::sys;
use crate::NetError;

/// Where named namespaces are bind-mounted (same as `ip netns add`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Sysctls written in every namespace xcgi creates, in this order. Paths under /proc/sys.
///
/// - IPv4 forwarding off: guests cannot reach each other through the namespace. A new
///   namespace copies the IPv4 settings of the initial namespace (sysctl
///   `net.core.devconf_inherit_init_net` = 0, the default), so on a host that forwards this
///   would be on: it is written, not assumed.
/// - Strict reverse-path filtering: a guest cannot send with another slot's address as source.
const IPV4_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "0"),
    ("net/ipv4/conf/all/forwarding", "0"),
    ("net/ipv4/conf/default/forwarding", "0"),
    ("net/ipv4/conf/all/rp_filter", "1"),
    ("net/ipv4/conf/default/rp_filter", "1"),
];

/// IPv6 off (when the kernel has it): guests are configured with IPv4 only; this keeps the
/// host side from sending router solicitations, MLD reports and DAD probes into each new TAP,
/// and leaves no IPv6 link-local path between a guest and the namespace.
const IPV6_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/disable_ipv6", "1"),
    ("net/ipv6/conf/default/disable_ipv6", "1"),
];

/// Errors creating or using a network namespace.
#[derive(Debug, Error)]
pub enum NetnsError {
    /// The name is empty, 256 bytes or longer, `.` or `..`, or contains `/` or NUL.
    #[error(
        "invalid network namespace name {name:?}: it must be non-empty, shorter than 256 \
         bytes, contain no '/' and not be '.' or '..'"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// `/run/netns/<name>` already exists.
    #[error(
        "a network namespace named {name:?} already exists ({path}); choose another name, or \
         remove a stale one with `ip netns del {name}`"
    )]
    NameInUse {
        /// The requested name.
        name: String,
        /// The existing file.
        path: PathBuf,
    },
    /// `unshare(CLONE_NEWNET)` failed (EPERM: no CAP_SYS_ADMIN).
    #[error("cannot create a network namespace (unshare CLONE_NEWNET): {source}{}", cap_hint(.source, "CAP_SYS_ADMIN"))]
    Unshare {
        /// The OS error from unshare(2).
        #[source]
        source: io::Error,
    },
    /// Entering the namespace with `setns` failed.
    #[error("cannot enter the network namespace (setns): {source}{}", cap_hint(.source, "CAP_SYS_ADMIN"))]
    Enter {
        /// The OS error from setns(2).
        #[source]
        source: io::Error,
    },
    /// Opening the new namespace's `/proc/thread-self/ns/net` failed.
    #[error("cannot open the new network namespace's file {path}: {source}")]
    OpenNs {
        /// The file that could not be opened.
        path: &'static str,
        /// The OS error from open(2).
        #[source]
        source: io::Error,
    },
    /// Creating [`NETNS_RUN_DIR`] or the namespace's file in it failed.
    #[error("cannot create {path}: {source}")]
    RunDir {
        /// The directory or file that could not be created.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Bind-mounting the namespace at its file failed.
    #[error("cannot bind-mount the network namespace at {path}: {source}{}", cap_hint(.source, "CAP_SYS_ADMIN"))]
    Mount {
        /// The mount point, `/run/netns/<name>`.
        path: PathBuf,
        /// The OS error from mount(2).
        #[source]
        source: io::Error,
    },
    /// Opening netlink in the new namespace or setting `lo` up failed.
    #[error("cannot bring up the loopback device in the new namespace: {source}")]
    Loopback {
        /// What netlink reported.
        #[source]
        source: NetlinkError,
    },
    /// Reading or writing a sysctl inside the namespace failed.
    #[error("cannot set sysctl {key} in the network namespace: {source}")]
    Sysctl {
        /// Path under /proc/sys, e.g. `net/ipv4/ip_forward`.
        key: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A thread to create or enter the namespace could not be spawned.
    #[error("cannot start a thread to enter the network namespace: {source}")]
    Thread {
        /// The error from spawning the thread.
        #[source]
        source: io::Error,
    },
}

fn cap_hint(err: &io::Error, cap: &str) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) => format!(" (xcgi needs {cap}: run it as root or grant it {cap})"),
        _ => String::new(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 256
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

/// A network namespace created by xcgi. Dropping it removes its bind mount (if named); the
/// namespace itself goes away when the last descriptor into it (this one, TAPs, sockets)
/// is closed.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    name: Option<String>,
    /// The bind mount, once it exists (None once released to another process).
    mount: std::sync::Mutex<Option<PathBuf>>,
}

impl NetNs {
    /// Creates a new network namespace: loopback up, IPv4 forwarding off, strict
    /// reverse-path filtering, IPv6 disabled. With a name, it is also bind-mounted at
    /// `/run/netns/<name>` so that `ip netns exec <name> ...` works; a name already in use is
    /// refused.
    pub fn create(name: Option<&str>) -> Result<NetNs, NetError> {
        if let Some(n) = name {
            if !valid_name(n) {
                return Err(NetnsError::InvalidName {
                    name: n.to_string(),
                }
                .into());
            }
        }
        let name = name.map(str::to_string);
        let handle = std::thread::Builder::new()
            .name("xcgi-netns-new".into())
            .spawn(move || create_on_this_thread(name))
            .map_err(|source| NetnsError::Thread { source })?;
        match handle.join() {
            Ok(r) => r.map_err(NetError::from),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Runs `f` on a new thread inside this namespace and returns its result. Sockets and
    /// devices `f` creates belong to this namespace. A panic in `f` is resumed here.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.fd.as_raw_fd();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("xcgi-netns".into())
                .spawn_scoped(s, move || -> Result<T, NetnsError> {
                    enter(fd)?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread { source })?;
            match handle.join() {
                Ok(r) => r.map_err(NetError::from),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// The name given at creation.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The bind mount (`/run/netns/<name>`), for named namespaces.
    pub fn path(&self) -> Option<PathBuf> {
        self.mount.lock().ok().and_then(|m| m.clone())
    }

    /// The namespace of `fd` (a descriptor of another process's [`NetNs`]); removes the bind
    /// mount at `mount` when dropped (see [`NetNs::release_mount`]).
    pub fn from_fd(fd: OwnedFd, mount: Option<PathBuf>) -> NetNs {
        NetNs {
            fd,
            name: None,
            mount: std::sync::Mutex::new(mount),
        }
    }

    /// Gives up the bind mount: this value no longer removes it when dropped (another
    /// process, given the path, does). Returns it.
    pub fn release_mount(&self) -> Option<PathBuf> {
        self.mount.lock().ok().and_then(|mut m| m.take())
    }

    /// Opens a NETLINK_ROUTE socket inside this namespace (usable from any thread).
    pub fn netlink(&self) -> Result<Netlink, NetError> {
        Ok(self.run(Netlink::open)??)
    }

    /// Reads a sysctl as seen inside this namespace; `key` is the path under /proc/sys, e.g.
    /// `net/ipv4/ip_forward`. The value is returned without its trailing newline.
    pub fn sysctl(&self, key: &str) -> Result<String, NetError> {
        let key_owned = key.to_string();
        let r = self.run(move || fs::read_to_string(Path::new("/proc/sys").join(&key_owned)))?;
        r.map(|s| s.trim_end().to_string()).map_err(|source| {
            NetnsError::Sysctl {
                key: key.to_string(),
                source,
            }
            .into()
        })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let Some(path) = self.mount.get_mut().ok().and_then(|m| m.take()) else {
            tracing::debug!("network namespace closed");
            return;
        };
        match CString::new(path.as_os_str().as_bytes()) {
            Ok(cpath) => {
                // SAFETY: umount2 with a valid NUL-terminated path.
                let ret = unsafe { libc::umount2(cpath.as_ptr(), libc::MNT_DETACH) };
                if ret != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        error = %io::Error::last_os_error(),
                        "cannot unmount the network namespace"
                    );
                }
            }
            Err(_) => tracing::warn!(path = %path.display(), "namespace path contains NUL"),
        }
        if let Err(error) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), %error, "cannot remove the namespace file");
        }
        tracing::debug!(path = %path.display(), "network namespace removed");
    }
}

/// `setns(fd, CLONE_NEWNET)` for the calling thread.
fn enter(fd: RawFd) -> Result<(), NetnsError> {
    // SAFETY: setns on a descriptor we own for the duration of the call.
    sys::cvt(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })
        .map(|_| ())
        .map_err(|source| NetnsError::Enter { source })
}

fn create_on_this_thread(name: Option<String>) -> Result<NetNs, NetnsError> {
    // SAFETY: unshare affects only this thread's network namespace.
    sys::cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })
        .map_err(|source| NetnsError::Unshare { source })?;
    const SELF_NS: &str = "/proc/thread-self/ns/net";
    let self_ns = c"/proc/thread-self/ns/net";
    // SAFETY: open with a valid path; the descriptor is owned right away.
    let raw = unsafe { libc::open(self_ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let raw = sys::cvt(raw).map_err(|source| NetnsError::OpenNs {
        path: SELF_NS,
        source,
    })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // From here on, dropping `ns` undoes whatever has been set up.
    let mut ns = NetNs {
        fd,
        name: name.clone(),
        mount: std::sync::Mutex::new(None),
    };
    if let Some(name) = &name {
        ns.mount = std::sync::Mutex::new(Some(bind_mount(name, self_ns)?));
    }
    let mut nl = Netlink::open().map_err(|source| NetnsError::Loopback { source })?;
    nl.set_link_up_by_name("lo")
        .map_err(|source| NetnsError::Loopback { source })?;
    for (key, value) in IPV4_SYSCTLS {
        write_sysctl(key, value)?;
    }
    if Path::new("/proc/sys/net/ipv6").exists() {
        for (key, value) in IPV6_SYSCTLS {
            write_sysctl(key, value)?;
        }
    }
    tracing::info!(name = ?ns.name, "network namespace created");
    Ok(ns)
}

fn write_sysctl(key: &str, value: &str) -> Result<(), NetnsError> {
    fs::write(Path::new("/proc/sys").join(key), value).map_err(|source| NetnsError::Sysctl {
        key: key.to_string(),
        source,
    })
}

/// Creates `/run/netns/<name>` (refusing an existing one) and bind-mounts the calling
/// thread's namespace there. On error nothing is left behind.
fn bind_mount(name: &str, self_ns: &std::ffi::CStr) -> Result<PathBuf, NetnsError> {
    let dir = Path::new(NETNS_RUN_DIR);
    if let Err(source) = fs::create_dir_all(dir) {
        return Err(NetnsError::RunDir {
            path: dir.to_path_buf(),
            source,
        });
    }
    let path = dir.join(name);
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| NetnsError::InvalidName {
        name: name.to_string(),
    })?;
    // SAFETY: open with a valid path; the descriptor is closed right away.
    let raw = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o444 as libc::c_uint,
        )
    };
    match sys::cvt(raw) {
        // SAFETY: a fresh descriptor, closed by dropping it.
        Ok(raw) => drop(unsafe { OwnedFd::from_raw_fd(raw) }),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Err(NetnsError::NameInUse {
                name: name.to_string(),
                path,
            })
        }
        Err(source) => return Err(NetnsError::RunDir { path, source }),
    }
    // SAFETY: mount(2) with valid NUL-terminated strings; no data argument.
    let ret = unsafe {
        libc::mount(
            self_ns.as_ptr(),
            cpath.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if let Err(source) = sys::cvt(ret) {
        if let Err(error) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), %error, "cannot remove the namespace file");
        }
        return Err(NetnsError::Mount { path, source });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("xcgi"));
        assert!(valid_name("xcgi-test.1"));
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"x".repeat(256)));
    }

    #[test]
    fn eperm_hint_names_the_capability() {
        let e = NetnsError::Unshare {
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
        let e = NetnsError::Unshare {
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        assert!(!e.to_string().contains("CAP_"), "{e}");
    }
}
