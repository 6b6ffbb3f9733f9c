//! The two systemd protocols a service needs, without linking libsystemd:
//! - **readiness** (`sd_notify(3)`): datagrams like `READY=1` to `$NOTIFY_SOCKET` (a path, or
//!   an abstract name written `@name`);
//! - **socket activation** (`sd_listen_fds(3)`): listening sockets passed from fd 3 on, with
//!   `$LISTEN_PID` naming this process, `$LISTEN_FDS` their number and `$LISTEN_FDNAMES`
//!   their names (`FileDescriptorName=` in the `.socket` unit).
//!
//! Both are no-ops where the variables are not set.

use std::os::fd::{FromRawFd, RawFd};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// More than this many passed sockets is surely a mistake (xcgi uses two).
const LISTEN_FDS_MAX: usize = 16;

/// Why the sockets passed by the service manager cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// `$LISTEN_FDS` is not a number from 1 to 16; holds its value.
    #[error("$LISTEN_FDS is {0:?}: expected a number of passed sockets (1 to {LISTEN_FDS_MAX})")]
    BadCount(String),
    /// A passed fd is not a listening IPv4 or IPv6 stream socket.
    #[error("passed fd {fd} ({name:?}) is not a listening TCP socket: {why}. Check the .socket unit's ListenStream=")]
    NotListening {
        /// The descriptor.
        fd: RawFd,
        /// Its name from `$LISTEN_FDNAMES` (empty without one).
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// A passed socket with no role: named neither `http` nor `admin`, a role passed twice,
    /// or a third socket without names; holds its name.
    #[error("passed socket {0:?} is not one xcgi uses: name them \"http\" (the serving port) and \"admin\" (FileDescriptorName=)")]
    UnknownName(String),
}

/// Sockets passed by the service manager, by role.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The serving port (named `http`, or the first passed without names).
    pub http: Option<std::net::TcpListener>,
    /// The admin listener (named `admin`, or the second passed without names).
    pub admin: Option<std::net::TcpListener>,
}

/// Takes the sockets passed for this process (once: the variables are removed, so that
/// nothing started later believes they are its own). Call before any thread starts.
pub fn take_listen_fds() -> Result<Inherited, SystemdError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let ours = pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let Some(count) = count.filter(|_| ours) else {
        return Ok(Inherited::default());
    };
    let n = match count.parse::<usize>() {
        Ok(n) if (1..=LISTEN_FDS_MAX).contains(&n) => n,
        _ => return Err(SystemdError::BadCount(count)),
    };
    let names: Vec<String> = match names {
        Some(s) => s.split(':').map(str::to_string).collect(),
        None => Vec::new(),
    };
    // Named (FileDescriptorName=http / admin), or else by order: systemd's default name is
    // the socket unit's own, which says nothing about the role.
    let named = names.iter().any(|n| n == "http" || n == "admin");
    let mut got = Inherited::default();
    for i in 0..n {
        let fd = LISTEN_FDS_START + i as RawFd;
        let name = names.get(i).cloned().unwrap_or_default();
        let slot = match (named, name.as_str(), i) {
            (true, "http", _) | (false, _, 0) => &mut got.http,
            (true, "admin", _) | (false, _, 1) => &mut got.admin,
            _ => return Err(SystemdError::UnknownName(name)),
        };
        if slot.is_some() {
            return Err(SystemdError::UnknownName(format!("{name} (twice)")));
        }
        *slot = Some(claim(fd, &name)?);
    }
    Ok(got)
}

/// Checks that `fd` is a listening TCP socket and takes ownership of it (close-on-exec).
fn claim(fd: RawFd, name: &str) -> Result<std::net::TcpListener, SystemdError> {
    let bad = |why: String| SystemdError::NotListening {
        fd,
        name: name.to_string(),
        why,
    };
    let opt = |level, opt| -> Result<libc::c_int, SystemdError> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, which is that large; an fd
        // that is not open or not a socket only makes it fail.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(bad(std::io::Error::last_os_error().to_string()));
        }
        Ok(v)
    };
    if opt(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(bad("not a stream socket".into()));
    }
    if opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? == 0 {
        return Err(bad("not listening".into()));
    }
    let domain = opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(bad("not an IPv4 or IPv6 socket".into()));
    }
    // SAFETY: fcntl on an open fd (checked above) only changes its flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: systemd passed this fd to this process (LISTEN_PID), it is an open listening
    // TCP socket (checked above), and nothing else in the process owns it: the variables
    // that name it are removed, so it is claimed exactly once.
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    l.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
    Ok(l)
}

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to the service manager. Ok(false) where
/// there is none (`$NOTIFY_SOCKET` unset).
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// READY=1 reaches a listener at the path in $NOTIFY_SOCKET, and an abstract one.
    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // The only test in this crate that sets NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1\nSTATUS=t").unwrap());
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=t");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("xcgi-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        assert!(notify("STOPPING=1").unwrap());
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1").unwrap());
    }

    /// A passed fd that is not a listening socket is refused, naming the fd.
    #[test]
    fn claim_refuses_what_is_not_a_listener() {
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        let e = claim(f.as_raw_fd(), "http").unwrap_err().to_string();
        assert!(e.contains("not a listening TCP socket"), "{e}");
        let unbound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = unbound.as_raw_fd();
        std::mem::forget(unbound); // claim takes ownership
        let l = claim(fd, "http").unwrap();
        assert!(l.local_addr().is_ok());
    }
}
