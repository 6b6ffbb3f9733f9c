//! The socket side of virtio-console: what [`VirtioConsole::new`](super::VirtioConsole::new)
//! checks of the descriptor it is given (the gateway's end of a socket pair).

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;

use super::ConsoleError;
use crate::devices::virtio::rx_worker::Source;
use crate::devices::virtio::sys::{set_nonblocking, SyscallError};

/// Checks that `fd` is a stream socket and puts it in non-blocking mode (on its open file
/// description: every duplicate shares it).
pub(super) fn prepare_socket(fd: RawFd) -> Result<(), ConsoleError> {
    check_stream_socket(fd)?;
    set_nonblocking(fd)
}

impl SyscallError for ConsoleError {
    fn syscall(what: &'static str, source: io::Error) -> ConsoleError {
        ConsoleError::Socket { what, source }
    }
}

/// What the RX worker watches: the socket, readable or closed by the peer (edge-triggered);
/// not at all unless `watch`.
pub(super) fn rx_source(socket: &Arc<OwnedFd>, watch: bool) -> Source {
    Source {
        fd: socket.clone(),
        events: EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
        watch,
    }
}

/// Check that `fd` is a socket of type `SOCK_STREAM`.
fn check_stream_socket(fd: RawFd) -> Result<(), ConsoleError> {
    let mut kind: libc::c_int = 0;
    let mut len: libc::socklen_t = SOCKLEN_INT;
    // SAFETY: SO_TYPE writes one int to the pointer, which is valid for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::addr_of_mut!(kind).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENOTSOCK) {
            return Err(ConsoleError::NotASocket);
        }
        return Err(ConsoleError::syscall("getsockopt SO_TYPE", source));
    }
    if kind != libc::SOCK_STREAM {
        return Err(ConsoleError::NotStream(kind));
    }
    Ok(())
}

pub(super) fn socket_type_name(kind: i32) -> &'static str {
    match kind {
        libc::SOCK_STREAM => "SOCK_STREAM",
        libc::SOCK_DGRAM => "SOCK_DGRAM",
        libc::SOCK_SEQPACKET => "SOCK_SEQPACKET",
        libc::SOCK_RAW => "SOCK_RAW",
        _ => "unknown",
    }
}

/// `sizeof(int)` as a `socklen_t` (4).
const SOCKLEN_INT: libc::socklen_t = 4;
