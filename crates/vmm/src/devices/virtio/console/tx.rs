//! virtio-console's transmit path, on the vCPU thread: each chain the driver published on the
//! transmit queue is sent to the socket (waiting for room while the stop flag is clear) and
//! returned with a used length of 0.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{debug, warn};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::device::Counters;
use super::TX_WAIT_SLICE;
use crate::devices::virtio::chain::IoChain;
use crate::devices::virtio::queue::serve_chains;
use crate::devices::virtio::sys::wait_writable;

/// Stops a device's transmit waits from any thread: once stopped, a vCPU waiting for room in the
/// socket gives up on its chain within [`TX_WAIT_SLICE`], and later chains are sent only as far
/// as the socket takes them without waiting. Permanent: for the end of the VM.
#[derive(Debug, Clone)]
pub struct ConsoleStopper(Arc<AtomicBool>);

impl ConsoleStopper {
    /// Set the stop flag.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the stop flag is set.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The transmit side of a virtio-console device.
pub(super) struct ConsoleTx {
    socket: Arc<OwnedFd>,
    stats: Arc<Counters>,
    /// Set by a [`ConsoleStopper`] or when the device goes away: TX stops waiting for room.
    stop: Arc<AtomicBool>,
    /// The peer is gone (`EPIPE`, `ECONNRESET`, another hard error): TX discards everything.
    peer_gone: bool,
}

impl ConsoleTx {
    pub(super) fn new(socket: Arc<OwnedFd>, stats: Arc<Counters>) -> ConsoleTx {
        ConsoleTx {
            socket,
            stats,
            stop: Arc::default(),
            peer_gone: false,
        }
    }

    /// A handle on the stop flag.
    pub(super) fn stopper(&self) -> ConsoleStopper {
        ConsoleStopper(self.stop.clone())
    }

    /// Sets the stop flag (the device is going away).
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Sends every chain the driver published; returns whether to interrupt it.
    pub(super) fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut chain = IoChain::default();
        serve_chains("virtio-console", queue, mem, |desc_chain| {
            let head = desc_chain.head_index();
            match chain.load_readable(desc_chain, mem, 0, u64::MAX) {
                Ok(()) => self.send(&mut chain),
                Err(e) => {
                    debug!(head, error = %e, "virtio-console: malformed TX chain; returned unsent");
                    self.stats.tx_malformed.add(1);
                }
            }
            0
        })
    }

    /// Send `chain` (guest memory) to the socket, waiting for room while the stop flag is clear.
    fn send(&mut self, chain: &mut IoChain) {
        let fd = self.socket.as_raw_fd();
        let total = chain.size();
        let mut sent = 0u64;
        while sent < total && !chain.is_drained() {
            if self.peer_gone {
                self.stats.tx_discarded_bytes.add(total - sent);
                return;
            }
            let e = match chain.send_to(fd, libc::MSG_NOSIGNAL) {
                Ok(n) if n > 0 => {
                    sent += n;
                    self.stats.tx_bytes.add(n);
                    continue;
                }
                // Not for a non-empty stream send; wait and retry rather than spin.
                Ok(_) => io::Error::from(io::ErrorKind::WouldBlock),
                Err(e) => e,
            };
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    if self.stop.load(Ordering::SeqCst) {
                        debug!(
                            unsent = total - sent,
                            "virtio-console: stopped while the socket is full; TX chain dropped"
                        );
                        self.stats.tx_abandoned.add(1);
                        self.stats.tx_discarded_bytes.add(total - sent);
                        return;
                    }
                    wait_writable(fd, TX_WAIT_SLICE);
                }
                _ => {
                    // The peer closing its end is how a request ends; anything else is odd.
                    if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) {
                        debug!(error = %e, "virtio-console: peer gone; discarding output");
                    } else {
                        warn!(error = %e, "virtio-console: cannot send; discarding output");
                    }
                    self.peer_gone = true;
                }
            }
        }
    }
}
