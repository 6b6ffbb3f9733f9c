//! The guests' network as a server uses it: the namespace, its TAP pool, and a thread inside
//! the namespace that makes TCP sockets for connecting to guests (a socket belongs to the
//! namespace it was created in; the server's own threads stay in the host's).

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{NetError, NetNs, Pool, PoolConfig};

/// What the socket thread hands back: a fresh, unconnected, nonblocking TCP socket.
pub type SocketReply = Box<dyn FnOnce(std::io::Result<std::net::TcpStream>) + Send>;

/// A namespace with its TAP pool and socket thread.
pub struct GuestNet {
    /// The namespace's TAP pool; lease one TAP per VM from it.
    pub pool: Pool,
    sockets: Option<Sender<SocketReply>>,
    /// The socket thread; it holds the namespace, so it is joined on drop (before the process
    /// exits, the namespace's bind mount must be gone).
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for GuestNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestNet").finish_non_exhaustive()
    }
}

impl Drop for GuestNet {
    fn drop(&mut self) {
        self.sockets = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl GuestNet {
    /// Creates the namespace `name` (removed when this is dropped), its pool, and the socket
    /// thread.
    pub fn new(name: &str, pool: PoolConfig) -> Result<GuestNet, NetError> {
        let ns = Arc::new(NetNs::create(Some(name))?);
        let pool = Pool::new(Arc::clone(&ns), pool)?;
        let (tx, rx) = mpsc::channel::<SocketReply>();
        let thread = std::thread::Builder::new()
            .name("xcgi-netns-sock".into())
            .spawn(move || {
                let _ = ns.run(move || {
                    while let Ok(reply) = rx.recv() {
                        reply(new_tcp_socket());
                    }
                });
            })
            .map_err(NetError::Thread)?;
        Ok(GuestNet {
            pool,
            sockets: Some(tx),
            thread: Some(thread),
        })
    }

    /// Asks for a fresh, unconnected, nonblocking TCP socket in the guests' namespace;
    /// `reply` gets it on the socket thread (or an error at once when the thread is gone).
    pub fn socket(&self, reply: SocketReply) {
        let gone = || std::io::Error::other("the guest network's socket thread is gone");
        match &self.sockets {
            Some(tx) => {
                if let Err(mpsc::SendError(reply)) = tx.send(reply) {
                    reply(Err(gone()));
                }
            }
            None => reply(Err(gone())),
        }
    }
}

fn new_tcp_socket() -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the fd is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}
