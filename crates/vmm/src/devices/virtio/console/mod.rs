//! A virtio-console device: the byte channel between the host and the guest that carries CGI
//! requests and responses.
//!
//! The guest sees one port, `/dev/hvc0` (Linux's `hvc` over virtio_console, which the guest puts
//! in raw mode); the host end is a connected `SOCK_STREAM` socket (a Unix socket pair end handed
//! over by the gateway), which [`VirtioConsole::new`] checks and puts in non-blocking mode. Bytes
//! move between guest memory and the socket with one `readv`/`sendmsg` per buffer, without a
//! bounce buffer. Not to be confused with [`crate::devices::console`], the serial log capture.
//!
//! Features offered: VIRTIO_F_VERSION_1 only: no SIZE, MULTIPORT or EMERG_WRITE. The
//! configuration space (`struct virtio_console_config`: `cols`, `rows`, `max_nr_ports`,
//! `emerg_wr`, 12 bytes) reads as zeros; writes are ignored. Without MULTIPORT there is no
//! control queue and no port open/close messages: the guest cannot tell the host it closed the
//! port, and the host's end reads end-of-file only once the VM (and every duplicate of the
//! descriptor) is gone.
//!
//! Queues (256 entries each): 0 = receiveq (host to guest), 1 = transmitq (guest to host).
//!
//! - **TX** runs on the vCPU thread, synchronously on QueueNotify for queue 1. Linux's
//!   `put_chars` busy-waits until the host returns the buffer, so finishing it within the exit
//!   is the fastest way. Each chain's device-readable descriptors are sent with `sendmsg`
//!   (`MSG_NOSIGNAL`: the peer may be gone, and SIGPIPE must not kill the VMM), partial sends
//!   resumed where they stopped. When the socket is full (`EAGAIN`) the vCPU waits in `poll` for
//!   room, in slices of at most [`TX_WAIT_SLICE`], and gives up on the chain (its remaining bytes
//!   counted as discarded) once the stop flag is set: by a [`ConsoleStopper`] (which the VM sets
//!   when its deadline passes or it is cancelled, so a vCPU blocked on a peer that does not read
//!   is released) or when the device is dropped. After `EPIPE`/`ECONNRESET` (or any other hard
//!   error) the peer is taken as gone: further output is discarded and counted, never an error.
//!   Every chain is returned with a used length of 0. Malformed chains (a device-writable
//!   descriptor, out of guest memory, a broken chain, longer than the queue) are returned
//!   without sending anything.
//! - **RX** runs on a worker thread started on activation (see the
//!   [module docs](super) for the threading model), as virtio-net's does. It waits in
//!   `epoll` for the socket (edge-triggered `EPOLLIN | EPOLLRDHUP`), a kick eventfd written when
//!   the driver notifies queue 0, and a stop eventfd. Under the transport lock it pops a receive
//!   chain, `readv`s whatever the socket holds into its writable descriptors (a stream: a partial
//!   fill is fine, the used length is the byte count), adds it to the used ring and, once per
//!   batch, raises the interrupt. When no receive buffer is available it leaves the bytes in the
//!   socket (the peer's writes block once the socket buffer is full), re-enables driver
//!   notifications and waits for a kick. At end-of-file (or a read error) it stops watching the
//!   socket, but runs on until told to stop. At most [`RX_BATCH`] chains are filled per lock
//!   acquisition.
//!
//! Note that a vCPU blocked in TX holds the transport lock (and the VMM's device-bus lock): the RX
//! worker and every other device exit wait meanwhile. A peer must therefore keep reading while
//! it writes (the gateway does both asynchronously); otherwise only the stop flag ends the wait.
//!
//! The worker is told to stop on device reset and joined by the
//! [`MmioTransport`](super::MmioTransport) once it has released the lock; dropping the transport
//! (or a bare [`VirtioConsole`]) stops and joins it too. No thread outlives the device.
//! The thread, its life (epoll, kick, stop, join) and the batch loop are `rx_worker`'s, and the
//! chain rules `chain::IoChain`'s, shared by virtio-net and virtio-console; this module says
//! what the bytes are and how they are counted.
//!
//! Files: `device.rs` (the [`VirtioDevice`](super::VirtioDevice) implementation, features,
//! counters), `tx.rs` (the transmit path and its stop flag), `rx.rs` (what the RX worker does
//! with the socket's bytes), `backend.rs` (the socket's checks), `tests.rs`.
//!
//! Per-chain guest errors are logged at `debug` (a hostile guest could otherwise flood the log)
//! and counted in [`ConsoleStats`]; nothing the guest writes can panic the device.

mod backend;
mod device;
mod rx;
mod tx;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use super::rx_worker::RX_BATCH;
pub use device::{attach_console, ConsoleError, ConsoleStats, ConsoleStatsReader, VirtioConsole};
pub use tx::ConsoleStopper;

/// Size of each virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Longest single wait for room in the socket before TX looks at the stop flag again.
pub const TX_WAIT_SLICE: Duration = Duration::from_millis(10);
