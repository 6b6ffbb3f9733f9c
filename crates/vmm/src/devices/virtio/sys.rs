//! File-descriptor helpers shared by the fd-backed devices (virtio-net on a TAP, virtio-console
//! on a socket): the few system calls they make besides moving data, which [`chain`](super::chain)
//! does.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Most iovecs a single `readv`/`writev`/`sendmsg` may take (Linux's `UIO_MAXIOV`).
pub(crate) const MAX_IOVECS: usize = 1024;

/// A device's setup error type, which has a variant for a system call on the device's
/// descriptor that failed.
pub(crate) trait SyscallError {
    /// `what` (the call, and what it was for, e.g. `F_SETFL O_NONBLOCK`) failed with `source`.
    fn syscall(what: &'static str, source: io::Error) -> Self;

    /// `what` failed with the calling thread's `errno`.
    fn last_os_error(what: &'static str) -> Self
    where
        Self: Sized,
    {
        Self::syscall(what, io::Error::last_os_error())
    }
}

/// Just the `errno`, for callers that need no more.
impl SyscallError for io::Error {
    fn syscall(_what: &'static str, source: io::Error) -> io::Error {
        source
    }
}

/// Puts `fd` in non-blocking mode (on its open file description: every duplicate shares it).
pub(crate) fn set_nonblocking<E: SyscallError>(fd: RawFd) -> Result<(), E> {
    // SAFETY: F_GETFL on a descriptor the caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(E::last_os_error("F_GETFL"));
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(E::last_os_error("F_SETFL O_NONBLOCK"));
        }
    }
    Ok(())
}

/// Waits until `fd` may take more bytes, for at most `timeout` (a signal, an error or a hang-up
/// end it early; the caller's next send tells which).
pub(crate) fn wait_writable(fd: RawFd, timeout: Duration) {
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    poll_one(fd, libc::POLLOUT, ms);
}

/// Whether `fd` has data to read right now (for diagnostics).
pub(crate) fn readable_now(fd: RawFd) -> bool {
    poll_one(fd, libc::POLLIN, 0) & libc::POLLIN != 0
}

/// Polls one descriptor for `events`, for at most `ms` milliseconds; the events that came (none
/// on a timeout or an error).
fn poll_one(fd: RawFd, events: libc::c_short, ms: libc::c_int) -> libc::c_short {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n > 0 {
        pfd.revents
    } else {
        0
    }
}

/// The calling thread's kernel thread id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// A non-negative byte count from `readv`/`writev`/`sendmsg`, or `errno` for -1.
pub(crate) fn byte_count(n: isize) -> io::Result<u64> {
    u64::try_from(n).map_err(|_| io::Error::last_os_error())
}
