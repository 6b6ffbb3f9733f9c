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
//! The worker is told to stop on device reset and joined by [`MmioTransport`] once it has
//! released the lock; dropping the transport (or a bare [`VirtioConsole`]) stops and joins it
//! too. No thread outlives the device.
//! The thread, its life (epoll, kick, stop, join) and the batch loop are `rx_worker`'s, and the
//! chain rules `chain::IoChain`'s, shared by virtio-net and virtio-console; this module says
//! what the bytes are and how they are counted.
//!
//! Per-chain guest errors are logged at `debug` (a hostile guest could otherwise flood the log)
//! and counted in [`ConsoleStats`]; nothing the guest writes can panic the device.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::chain::IoChain;
use super::mmio::{MmioError, MmioTransport};
use super::queue::serve_chains;
use super::rx_worker::{Batch, RxDevice, RxWorkers, Source};
use super::stats::device_stats;
use super::sys::{set_nonblocking, wait_writable, SysError};
use super::{ActivateError, QueueAccess, VirtioDevice, VIRTIO_F_VERSION_1};

pub use super::rx_worker::RX_BATCH;

/// Size of each virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Longest single wait for room in the socket before TX looks at the stop flag again.
pub const TX_WAIT_SLICE: Duration = Duration::from_millis(10);

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// `struct virtio_console_config`: cols, rows (u16), max_nr_ports, emerg_wr (u32); all zero.
const CONFIG: [u8; 12] = [0; 12];

/// Errors setting up a virtio-console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("the console channel is not a socket (need a connected SOCK_STREAM Unix socket)")]
    NotASocket,
    #[error(
        "the console channel is a socket of type {0} ({name}), need SOCK_STREAM",
        name = socket_type_name(*.0)
    )]
    NotStream(i32),
    #[error("cannot configure the console channel ({what}): {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("virtio-console transport: {0}")]
    Transport(#[from] MmioError),
}

impl From<SysError> for ConsoleError {
    fn from(e: SysError) -> ConsoleError {
        ConsoleError::Socket {
            what: e.what,
            source: e.source,
        }
    }
}

device_stats! {
    /// Counters of a virtio-console device.
    pub struct ConsoleStats {
        /// Bytes the guest sent that reached the socket.
        pub tx_bytes: u64,
        /// Bytes the guest sent that were dropped: the peer was gone, or the device was stopped
        /// while waiting for room.
        pub tx_discarded_bytes: u64,
        /// Transmit chains given up on (partly or wholly unsent) because the stop flag was set
        /// while the socket was full.
        pub tx_abandoned: u64,
        /// Transmit chains returned unsent because they were malformed.
        pub tx_malformed: u64,
        /// Bytes delivered to the guest.
        pub rx_bytes: u64,
        /// Receive chains returned unused (used length 0) because they were malformed.
        pub rx_malformed: u64,
        /// The RX worker read end-of-file (or an error) from the socket and stopped watching it.
        pub rx_closed: bool,
    }
    counters: Counters,
    reader: ConsoleStatsReader,
}

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

/// virtio-console device (one port, `/dev/hvc0`) on a connected stream socket.
pub struct VirtioConsole {
    socket: Arc<OwnedFd>,
    stats: Arc<Counters>,
    /// Set by a [`ConsoleStopper`] or when the device goes away: TX stops waiting for room.
    stop: Arc<AtomicBool>,
    /// The peer is gone (`EPIPE`, `ECONNRESET`, another hard error): TX discards everything.
    peer_gone: bool,
    /// The RX worker (joined on drop).
    rx: RxWorkers,
}

/// Build a virtio-console device on `socket` behind a virtio-mmio transport, ready for the
/// MMIO bus. `irq` is written on every interrupt and must be registered as a KVM irqfd for the
/// device's GSI. Take the device's [`ConsoleStopper`] through `lock().device().stopper()`.
pub fn attach_console(
    socket: OwnedFd,
    mem: GuestMemoryMmap,
    irq: EventFd,
) -> Result<MmioTransport<VirtioConsole>, ConsoleError> {
    let console = VirtioConsole::new(socket)?;
    Ok(MmioTransport::new(console, mem, irq)?)
}

impl VirtioConsole {
    /// A device on `socket`, which must be a connected `SOCK_STREAM` socket. Puts the descriptor
    /// in non-blocking mode (on its open file description: every duplicate shares it).
    pub fn new(socket: OwnedFd) -> Result<VirtioConsole, ConsoleError> {
        check_stream_socket(socket.as_raw_fd())?;
        set_nonblocking(socket.as_raw_fd())?;
        debug!("virtio-console: created");
        Ok(VirtioConsole {
            socket: Arc::new(socket),
            stats: Arc::default(),
            stop: Arc::default(),
            peer_gone: false,
            rx: RxWorkers::new("virtio-console", RX_QUEUE),
        })
    }

    /// The device's counters so far.
    pub fn stats(&self) -> ConsoleStats {
        self.stats.snapshot()
    }

    /// A handle to read the counters later, e.g. after the transport went onto the MMIO bus.
    pub fn stats_reader(&self) -> ConsoleStatsReader {
        ConsoleStatsReader::new(self.stats.clone())
    }

    /// A handle that releases a vCPU waiting in TX for room in the socket, usable from any
    /// thread while the device sits on the MMIO bus (the VM sets it when it ends).
    pub fn stopper(&self) -> ConsoleStopper {
        ConsoleStopper(self.stop.clone())
    }

    /// Whether an RX worker is running (the device is activated).
    pub fn has_worker(&self) -> bool {
        self.rx.is_running()
    }

    /// Kernel thread id of the running RX worker, once it has started (for diagnostics).
    pub fn worker_tid(&self) -> Option<i32> {
        self.rx.tid()
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
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

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        // Then `rx` stops and joins the worker.
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&CONFIG, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "virtio-console: write to read-only config space ignored"
        );
    }

    fn activate(
        &mut self,
        _acked_features: u64,
        queues: &[Queue],
        access: QueueAccess,
    ) -> Result<(), ActivateError> {
        for index in [RX_QUEUE, TX_QUEUE] {
            if !queues.get(index).is_some_and(|q| q.ready()) {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        let source = Source {
            fd: self.socket.clone(),
            events: EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
            // After end-of-file there is nothing to watch (a worker of an earlier activation
            // saw it).
            watch: !self.stats.rx_closed.get(),
        };
        let stats = self.stats.clone();
        let rx = move || ConsoleRx { stats };
        self.rx
            .start(source, access, rx)
            .map_err(ActivateError::Worker)?;
        debug!("virtio-console: activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX_QUEUE => {
                // New receive buffers: wake the worker, which fills them under the lock later.
                self.rx.kick();
                false
            }
            TX_QUEUE => self.process_tx(queue, mem),
            _ => {
                // The transport only notifies queues that exist (and rate-limits its warning
                // about the others).
                debug!(
                    index,
                    "virtio-console: notify for a queue that does not exist"
                );
                false
            }
        }
    }

    /// Stops the RX worker. The TX stop flag is left alone: TX runs under the same transport
    /// lock as a reset, so a reset never finds it waiting, and the flag is permanent (a driver
    /// resets the device while probing it, before any output).
    fn reset(&mut self) {
        self.rx.stop();
    }

    fn stop_workers(&mut self) {
        // The transport is going away; nothing should wait for the socket any more.
        self.stop.store(true, Ordering::SeqCst);
        self.rx.stop();
    }

    fn take_stopped_workers(&mut self) -> Vec<JoinHandle<()>> {
        self.rx.take_stopped()
    }
}

/// virtio-console's receive side: whatever the socket holds into each receive chain (a
/// stream: a partial fill is fine).
struct ConsoleRx {
    stats: Arc<Counters>,
}

impl RxDevice for ConsoleRx {
    const NAME: &'static str = "virtio-console";
    /// A readv into nothing returns 0, which would read as end-of-file.
    const MIN_CHAIN: u64 = 1;
    /// End of file: stop reading.
    const AT_EOF: Batch = Batch::Closed;

    fn received(
        &mut self,
        _chain: &IoChain,
        _mem: &GuestMemoryMmap,
        _head: u16,
        n: u64,
    ) -> Option<u32> {
        self.stats.rx_bytes.add(n);
        // n <= the chain's capacity, which 256 descriptors of u32 bound: fits.
        Some(u32::try_from(n).unwrap_or(0))
    }

    fn malformed(&mut self) {
        self.stats.rx_malformed.add(1);
    }

    fn read_failed(&mut self, e: io::Error) -> Batch {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) => {
                debug!(error = %e, "virtio-console: the peer reset the channel");
            }
            _ => warn!(error = %e, "virtio-console: reading the channel failed"),
        }
        Batch::Closed
    }

    fn closed(&mut self) {
        self.stats.rx_closed.set();
        debug!("virtio-console: the peer closed the channel; RX idle");
    }
}

/// Check that `fd` is a socket of type `SOCK_STREAM`.
fn check_stream_socket(fd: RawFd) -> Result<(), ConsoleError> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
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
        return Err(ConsoleError::Socket {
            what: "getsockopt SO_TYPE",
            source,
        });
    }
    if kind != libc::SOCK_STREAM {
        return Err(ConsoleError::NotStream(kind));
    }
    Ok(())
}

fn socket_type_name(kind: i32) -> &'static str {
    match kind {
        libc::SOCK_STREAM => "SOCK_STREAM",
        libc::SOCK_DGRAM => "SOCK_DGRAM",
        libc::SOCK_SEQPACKET => "SOCK_SEQPACKET",
        libc::SOCK_RAW => "SOCK_RAW",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::path::Path;
    use std::thread;
    use std::time::Instant;

    use vm_memory::GuestAddress;

    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::Bytes;

    use super::*;
    use crate::devices::virtio::testing::{
        bring_up, eventfd, memory, r, read_reg, w, wait_for, write_reg, Desc, DriverQueue,
        BUF_BASE, MEM_SIZE, QUEUE_BASE,
    };
    use crate::devices::MmioDevice;

    const DEVICE_ID: u64 = 0x008;
    const DEVICE_FEATURES: u64 = 0x010;
    const DEVICE_FEATURES_SEL: u64 = 0x014;
    const QUEUE_SEL: u64 = 0x030;
    const QUEUE_NUM_MAX: u64 = 0x034;
    const QUEUE_NOTIFY: u64 = 0x050;
    const INTERRUPT_STATUS: u64 = 0x060;
    const STATUS: u64 = 0x070;
    const CONFIG_SPACE: u64 = 0x100;
    const TXQ_BASE: GuestAddress = GuestAddress(0x8000);
    /// Receive buffers go here, 0x1000 apart; transmit buffers above (512 KiB of room).
    const RX_BUF: u64 = BUF_BASE;
    const TX_BUF: u64 = BUF_BASE + 0x4_0000;
    const POISON: u8 = 0xee;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    fn task_alive(tid: i32) -> bool {
        Path::new(&format!("/proc/self/task/{tid}")).exists()
    }

    fn is_nonblocking(fd: RawFd) -> bool {
        // SAFETY: F_GETFL on a descriptor the caller owns.
        unsafe { libc::fcntl(fd, libc::F_GETFL) & libc::O_NONBLOCK != 0 }
    }

    struct Fixture {
        mem: GuestMemoryMmap,
        t: MmioTransport<VirtioConsole>,
        rxq: DriverQueue,
        txq: DriverQueue,
        /// The host side of the channel (the gateway's end), non-blocking.
        peer: UnixStream,
        /// Another descriptor for the device's end (same socket), to peek at or fill it.
        device_end: UnixStream,
        stopper: ConsoleStopper,
    }

    impl Fixture {
        /// A device on a stream socket pair, not brought up yet.
        fn unstarted() -> Fixture {
            let (dev, peer) = UnixStream::pair().expect("socketpair");
            let device_end = dev.try_clone().expect("clone");
            peer.set_nonblocking(true).expect("nonblocking");
            let mem = memory();
            let t = attach_console(OwnedFd::from(dev), mem.clone(), eventfd()).expect("console");
            let stopper = t.lock().device().stopper();
            mem.write_slice(&vec![POISON; 0x8_0000], GuestAddress(BUF_BASE))
                .expect("poison");
            Fixture {
                rxq: DriverQueue::new(&mem, QUEUE_BASE, 16),
                txq: DriverQueue::new(&mem, TXQ_BASE, 16),
                mem,
                t,
                peer,
                device_end,
                stopper,
            }
        }

        /// Brought up, with the RX worker running.
        fn new() -> Fixture {
            let mut f = Fixture::unstarted();
            f.start();
            f
        }

        fn start(&mut self) {
            bring_up(&mut self.t, &[&self.rxq, &self.txq]);
            assert!(self.t.lock().is_activated());
            wait_for("the RX worker to start", || self.tid().is_some());
        }

        fn tid(&self) -> Option<i32> {
            self.t.lock().device().worker_tid()
        }

        fn notify(&mut self, queue: usize) {
            write_reg(&mut self.t, QUEUE_NOTIFY, queue as u32);
        }

        /// Post one receive chain and tell the device.
        fn post_rx(&mut self, chain: &[Desc]) -> u16 {
            let head = self.rxq.add_chain(chain);
            self.notify(RX_QUEUE);
            head
        }

        fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem
                .read_slice(&mut buf, GuestAddress(at))
                .expect("read guest");
            buf
        }

        fn put(&self, at: u64, data: &[u8]) {
            self.mem
                .write_slice(data, GuestAddress(at))
                .expect("write guest");
        }

        /// Everything the device sent that the peer can read now.
        fn sent(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 0x1_0000];
            loop {
                match self.peer.read(&mut buf) {
                    Ok(0) => return out,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }

        /// Bytes waiting in the socket for the device (without taking them).
        fn waiting_for_device(&self) -> usize {
            let mut buf = vec![0u8; 0x1_0000];
            // SAFETY: recv into a valid buffer of its length.
            let n = unsafe {
                libc::recv(
                    self.device_end.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            usize::try_from(n).unwrap_or(0)
        }

        /// Fill the socket towards the peer until it takes no more; returns the bytes queued.
        fn fill_towards_peer(&mut self) -> usize {
            let filler = [0x55u8; 4096];
            let mut queued = 0;
            loop {
                match self.device_end.write(&filler) {
                    Ok(n) => queued += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return queued,
                    Err(e) => panic!("write: {e}"),
                }
                assert!(queued < 64 << 20, "socket never filled up");
            }
        }

        fn irq_fired(&self) -> bool {
            self.t.lock().interrupt_evt().read().is_ok()
        }

        fn stats(&self) -> ConsoleStats {
            self.t.lock().device().stats()
        }
    }

    #[test]
    fn identity_features_and_config() {
        let mut f = Fixture::unstarted();
        let t = &mut f.t;
        assert_eq!(read_reg(t, DEVICE_ID), 3);
        assert_eq!(read_reg(t, DEVICE_FEATURES), 0); // no SIZE, MULTIPORT, EMERG_WRITE
        write_reg(t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(read_reg(t, DEVICE_FEATURES), 1); // VERSION_1 only
        for (sel, max) in [(0, 256), (1, 256), (2, 0)] {
            write_reg(t, QUEUE_SEL, sel);
            assert_eq!(read_reg(t, QUEUE_NUM_MAX), max, "queue {sel}");
        }
        // 12 bytes of zeros, read-only, and zeros beyond.
        let mut config = [0xffu8; 16];
        t.read(CONFIG_SPACE, &mut config);
        assert_eq!(config, [0; 16]);
        t.write(CONFIG_SPACE, &[0xff; 12]);
        t.write(CONFIG_SPACE + 4, &7u32.to_le_bytes());
        let mut config = [0xffu8; 12];
        t.read(CONFIG_SPACE, &mut config);
        assert_eq!(config, [0; 12]);
        assert_eq!(read_reg(t, CONFIG_SPACE + 8), 0);
        let device = t.lock();
        assert!(!device.device().has_worker());
        assert_eq!(device.device().stats(), ConsoleStats::default());
    }

    #[test]
    fn new_refuses_non_stream_descriptors_and_makes_the_fd_nonblocking() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: descriptors we just created and own.
        let (read_end, _write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        match VirtioConsole::new(read_end) {
            Err(e @ ConsoleError::NotASocket) => assert!(e.to_string().contains("not a socket")),
            Err(e) => panic!("pipe refused for another reason: {e}"),
            Ok(_) => panic!("a pipe was accepted"),
        }

        let (dgram, _peer) = UnixDatagram::pair().expect("socketpair");
        match VirtioConsole::new(OwnedFd::from(dgram)) {
            Err(e @ ConsoleError::NotStream(libc::SOCK_DGRAM)) => {
                assert!(e.to_string().contains("SOCK_DGRAM"), "{e}");
            }
            Err(e) => panic!("datagram socket refused for another reason: {e}"),
            Ok(_) => panic!("a datagram socket was accepted"),
        }

        let (dev, _peer) = UnixStream::pair().expect("socketpair");
        let probe = dev.try_clone().expect("clone");
        assert!(!is_nonblocking(probe.as_raw_fd()));
        let console = VirtioConsole::new(OwnedFd::from(dev)).expect("console");
        assert!(is_nonblocking(probe.as_raw_fd()));
        assert_eq!(console.stats(), ConsoleStats::default());
        assert!(!console.stopper().is_stopped());
    }

    #[test]
    fn activation_needs_both_queues() {
        let mut f = Fixture::unstarted();
        bring_up(&mut f.t, &[&f.rxq]);
        assert!(!f.t.lock().is_activated());
        assert!(!f.t.lock().device().has_worker());
        f.start();
        assert!(f.t.lock().device().has_worker());
    }

    #[test]
    fn tx_bytes_reach_the_peer_intact_and_in_order() {
        let mut f = Fixture::new();
        let data = pattern(3000, 1);
        // One chain in three descriptors (an empty one among them), then two single ones.
        f.put(TX_BUF, &data[..100]);
        f.put(TX_BUF + 0x1000, &data[100..1100]);
        f.put(TX_BUF + 0x2000, &data[1100..2000]);
        f.put(TX_BUF + 0x3000, &data[2000..2001]);
        f.put(TX_BUF + 0x4000, &data[2001..]);
        let heads = [
            f.txq.add_chain(&[
                r(TX_BUF, 100),
                r(TX_BUF + 0x1000, 1000),
                r(TX_BUF + 0x5000, 0),
                r(TX_BUF + 0x2000, 900),
            ]),
            f.txq.add_chain(&[r(TX_BUF + 0x3000, 1)]),
            f.txq.add_chain(&[r(TX_BUF + 0x4000, 999)]),
        ];
        f.notify(TX_QUEUE);
        assert_eq!(f.txq.used_idx(), 3);
        for (i, head) in heads.iter().enumerate() {
            assert_eq!(f.txq.used_elem(i as u16), (u32::from(*head), 0));
        }
        assert_eq!(read_reg(&mut f.t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert!(f.irq_fired());
        assert_eq!(f.sent(), data);

        // A later notify continues the stream.
        let more = pattern(500, 9);
        f.put(TX_BUF + 0x6000, &more);
        f.txq.add_chain(&[r(TX_BUF + 0x6000, 500)]);
        f.notify(TX_QUEUE);
        assert_eq!(f.sent(), more);
        let stats = f.stats();
        assert_eq!(stats.tx_bytes, 3500);
        assert_eq!(stats.tx_discarded_bytes + stats.tx_malformed, 0);
        // TX used nothing of the receive side.
        assert_eq!(f.rxq.used_idx(), 0);
    }

    #[test]
    fn tx_larger_than_the_socket_buffer_waits_for_the_reader() {
        let mut f = Fixture::new();
        // 384 KiB in twelve descriptors: more than a Unix socket buffers, so the sends are
        // partial and the vCPU waits for the reader in between.
        let data = pattern(12 * 0x8000, 3);
        f.put(TX_BUF, &data);
        let chain: Vec<Desc> = (0..12).map(|i| r(TX_BUF + i * 0x8000, 0x8000)).collect();
        let head = f.txq.add_chain(&chain);
        let mut reader = f.peer.try_clone().expect("clone");
        let total = data.len();
        let got = thread::scope(|s| {
            let handle = s.spawn(move || {
                let mut got = Vec::with_capacity(total);
                let mut buf = vec![0u8; 0x1000];
                while got.len() < total {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => panic!("read: {e}"),
                    }
                }
                got
            });
            f.notify(TX_QUEUE);
            handle.join().expect("reader")
        });
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the stream arrived altered");
        assert_eq!(f.txq.used_elem(0), (u32::from(head), 0));
        assert_eq!(f.stats().tx_bytes, data.len() as u64);
    }

    #[test]
    fn tx_blocked_on_a_full_socket_is_released_by_the_stopper() {
        let mut f = Fixture::new();
        let queued = f.fill_towards_peer();
        let data = pattern(100, 5);
        f.put(TX_BUF, &data);
        let head = f.txq.add_chain(&[r(TX_BUF, 60), r(TX_BUF + 60, 40)]);
        let stopper = f.stopper.clone();
        let (started, stopped_at) = thread::scope(|s| {
            let handle = s.spawn(move || {
                thread::sleep(Duration::from_millis(150));
                let at = Instant::now();
                stopper.stop();
                at
            });
            let started = Instant::now();
            f.notify(TX_QUEUE); // blocks until the stop flag is set
            let returned = Instant::now();
            let stopped_at = handle.join().expect("stopper thread");
            assert!(
                returned.duration_since(stopped_at) < Duration::from_millis(500),
                "the vCPU was released {:?} after the stop",
                returned.duration_since(stopped_at)
            );
            (started, stopped_at)
        });
        assert!(stopped_at.duration_since(started) >= Duration::from_millis(100));
        assert_eq!(f.txq.used_idx(), 1);
        assert_eq!(f.txq.used_elem(0), (u32::from(head), 0));
        let stats = f.stats();
        assert_eq!(
            (stats.tx_abandoned, stats.tx_discarded_bytes, stats.tx_bytes),
            (1, 100, 0)
        );
        assert!(f.stopper.is_stopped());

        // Only the filler got through. With room again, stopped or not, bytes still go out.
        assert_eq!(f.sent().len(), queued);
        f.txq.add_chain(&[r(TX_BUF, 100)]);
        f.notify(TX_QUEUE);
        assert_eq!(f.sent(), data);
        // Full again: once stopped, nothing waits at all.
        f.fill_towards_peer();
        f.txq.add_chain(&[r(TX_BUF, 100)]);
        let t0 = Instant::now();
        f.notify(TX_QUEUE);
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert_eq!(f.txq.used_idx(), 3);
        let stats = f.stats();
        assert_eq!((stats.tx_abandoned, stats.tx_discarded_bytes), (2, 200));
        assert_eq!(stats.tx_bytes, 100);
        // The same numbers through a reader taken from the device.
        let reader = f.t.lock().device().stats_reader();
        assert_eq!(reader.get(), f.stats());
    }

    /// SIGPIPE blocked in this thread, so that one raised by a send stays pending (even though
    /// the test harness ignores SIGPIPE) and can be looked for.
    struct SigpipeBlocked {
        old: libc::sigset_t,
    }

    impl SigpipeBlocked {
        fn new() -> SigpipeBlocked {
            // SAFETY: sigset_t manipulation on local values; pthread_sigmask changes only this
            // thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                let mut old: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGPIPE);
                assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old), 0);
                SigpipeBlocked { old }
            }
        }

        /// Whether a SIGPIPE is pending; takes it if so.
        fn take_pending(&self) -> bool {
            // SAFETY: as above; sigtimedwait with a zero timeout only consumes a pending
            // SIGPIPE (it is blocked, so it can be waited for).
            unsafe {
                let mut pending: libc::sigset_t = std::mem::zeroed();
                assert_eq!(libc::sigpending(&mut pending), 0);
                if libc::sigismember(&pending, libc::SIGPIPE) != 1 {
                    return false;
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGPIPE);
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::sigtimedwait(&set, std::ptr::null_mut(), &zero);
                true
            }
        }
    }

    impl Drop for SigpipeBlocked {
        fn drop(&mut self) {
            self.take_pending();
            // SAFETY: restores this thread's previous mask.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
        }
    }

    #[test]
    fn tx_after_the_peer_closed_discards_without_sigpipe() {
        let mut f = Fixture::new();
        let sigpipe = SigpipeBlocked::new();
        let (_, dead_peer) = UnixStream::pair().expect("socketpair");
        let peer = std::mem::replace(&mut f.peer, dead_peer);
        drop(peer);
        f.put(TX_BUF, &pattern(200, 7));
        let heads = [
            f.txq.add_chain(&[r(TX_BUF, 50)]),
            f.txq.add_chain(&[r(TX_BUF + 50, 70), r(TX_BUF + 120, 80)]),
        ];
        f.notify(TX_QUEUE);
        f.txq.add_chain(&[r(TX_BUF, 30)]);
        f.notify(TX_QUEUE);
        assert_eq!(f.txq.used_idx(), 3);
        for (i, head) in heads.iter().enumerate() {
            assert_eq!(f.txq.used_elem(i as u16), (u32::from(*head), 0));
        }
        let stats = f.stats();
        assert_eq!((stats.tx_bytes, stats.tx_discarded_bytes), (0, 230));
        assert_eq!(stats.tx_abandoned + stats.tx_malformed, 0);
        assert!(!sigpipe.take_pending(), "the device raised SIGPIPE");

        // Control: a send without MSG_NOSIGNAL on the same socket does raise it.
        // SAFETY: send one byte from a valid buffer.
        let n = unsafe { libc::send(f.device_end.as_raw_fd(), b"x".as_ptr().cast(), 1, 0) };
        assert_eq!(n, -1);
        assert!(sigpipe.take_pending(), "the SIGPIPE check does not work");
    }

    #[test]
    fn malformed_tx_chains_are_returned_unsent() {
        let mut f = Fixture::new();
        let chains: [&[Desc]; 5] = [
            // Device-writable.
            &[w(TX_BUF, 64)],
            // Readable then writable.
            &[r(TX_BUF, 12), w(TX_BUF + 0x100, 64)],
            // Runs out of guest memory; wraps around the address space.
            &[r(MEM_SIZE - 16, 64)],
            &[r(u64::MAX - 8, 64)],
            // Over 4 GiB: virtio-queue stops after the first descriptor, which says "next".
            &[r(TX_BUF, 12), r(TX_BUF + 0x100, u32::MAX)],
        ];
        let mut heads: Vec<u16> = chains.iter().map(|c| f.txq.add_chain(c)).collect();
        // A chain whose next index is outside the table.
        f.txq
            .write_desc(15, TX_BUF, 12, VRING_DESC_F_NEXT as u16, 99);
        f.txq.publish(15);
        heads.push(15);
        // A chain that loops onto itself: longer than the queue.
        f.txq
            .write_desc(14, TX_BUF, 12, VRING_DESC_F_NEXT as u16, 14);
        f.txq.publish(14);
        heads.push(14);
        f.notify(TX_QUEUE);
        assert_eq!(f.txq.used_idx(), heads.len() as u16);
        for (i, head) in heads.iter().enumerate() {
            assert_eq!(
                f.txq.used_elem(i as u16),
                (u32::from(*head), 0),
                "chain {i}"
            );
        }
        assert_eq!(f.sent(), b"");
        let stats = f.stats();
        assert_eq!(stats.tx_malformed, heads.len() as u64);
        assert_eq!(stats.tx_bytes + stats.tx_discarded_bytes, 0);
        assert!(f.irq_fired());

        // The queue still works.
        f.put(TX_BUF, b"still here");
        f.txq.add_chain(&[r(TX_BUF, 10)]);
        f.notify(TX_QUEUE);
        assert_eq!(f.sent(), b"still here");
    }

    #[test]
    fn rx_bytes_land_in_a_posted_buffer() {
        let mut f = Fixture::new();
        let head = f.post_rx(&[w(RX_BUF, 8), w(RX_BUF + 0x100, 2000)]);
        let data = pattern(50, 2);
        f.peer.write_all(&data).expect("write");
        wait_for("the bytes to be used", || f.rxq.used_idx() == 1);
        assert_eq!(f.rxq.used_elem(0), (u32::from(head), 50));
        assert_eq!(f.bytes(RX_BUF, 8), data[..8]);
        assert_eq!(f.bytes(RX_BUF + 0x100, 42), data[8..]);
        // Nothing written past them.
        assert_eq!(f.bytes(RX_BUF + 0x100 + 42, 16), [POISON; 16]);
        wait_for("the interrupt", || f.irq_fired());
        assert_ne!(
            read_reg(&mut f.t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
            0
        );
        assert_eq!(f.stats().rx_bytes, 50);
        assert_eq!(f.waiting_for_device(), 0);
    }

    #[test]
    fn rx_bytes_wait_in_the_socket_until_buffers_are_posted() {
        let mut f = Fixture::new();
        let data = pattern(100, 4);
        f.peer.write_all(&data).expect("write");
        thread::sleep(Duration::from_millis(100));
        assert_eq!(f.rxq.used_idx(), 0);
        assert!(!f.irq_fired());
        assert_eq!(f.waiting_for_device(), 100);

        // A buffer smaller than what waits: filled, the rest stays in the socket.
        let head = f.post_rx(&[w(RX_BUF, 64)]);
        wait_for("the first part", || f.rxq.used_idx() == 1);
        assert_eq!(f.rxq.used_elem(0), (u32::from(head), 64));
        assert_eq!(f.bytes(RX_BUF, 64), data[..64]);
        wait_for("the interrupt", || f.irq_fired());
        thread::sleep(Duration::from_millis(50));
        assert_eq!(f.rxq.used_idx(), 1);
        assert_eq!(f.waiting_for_device(), 36);

        let head = f.post_rx(&[w(RX_BUF + 0x1000, 64)]);
        wait_for("the rest", || f.rxq.used_idx() == 2);
        assert_eq!(f.rxq.used_elem(1), (u32::from(head), 36));
        assert_eq!(f.bytes(RX_BUF + 0x1000, 36), data[64..]);
        assert_eq!(f.waiting_for_device(), 0);
        assert_eq!(f.stats().rx_bytes, 100);
    }

    #[test]
    fn rx_one_mib_through_4k_buffers_in_order_then_eof() {
        let mut f = Fixture::new();
        const SLOTS: u64 = 16;
        const BUF: u32 = 0x1000;
        for i in 0..SLOTS {
            f.rxq.add_chain(&[w(RX_BUF + i * 0x1000, BUF)]);
        }
        f.notify(RX_QUEUE);
        let data = pattern(1 << 20, 6);
        let mut writer = f.peer.try_clone().expect("clone");
        writer.set_nonblocking(false).expect("blocking");
        let mut got = Vec::with_capacity(data.len());
        thread::scope(|s| {
            let data = &data;
            s.spawn(move || {
                writer.write_all(data).expect("write");
                writer
                    .shutdown(std::net::Shutdown::Write)
                    .expect("shutdown");
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut seen: u16 = 0;
            while got.len() < data.len() {
                let used = f.rxq.used_idx();
                if used == seen {
                    assert!(Instant::now() < deadline, "stuck at {} bytes", got.len());
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
                while seen != used {
                    let (id, len) = f.rxq.used_elem(seen);
                    // Buffers come back in the order they were posted.
                    assert_eq!(u64::from(id), u64::from(seen) % SLOTS);
                    assert!(len > 0 && len <= BUF, "used length {len}");
                    let at = RX_BUF + u64::from(id) * 0x1000;
                    got.extend_from_slice(&f.bytes(at, len as usize));
                    seen = seen.wrapping_add(1);
                    let head = f.rxq.add_chain(&[w(at, BUF)]);
                    assert_eq!(u32::from(head), id);
                }
                f.notify(RX_QUEUE);
            }
        });
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the stream arrived altered");
        // End of file: the worker stops reading but runs on, and returns no more buffers.
        wait_for("end of file", || f.stats().rx_closed);
        let used = f.rxq.used_idx();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(f.rxq.used_idx(), used);
        let stats = f.stats();
        assert_eq!((stats.rx_bytes, stats.rx_malformed), (1 << 20, 0));
        let tid = f.tid().expect("worker tid");
        assert!(task_alive(tid));
        // Kicks after end-of-file are harmless.
        f.notify(RX_QUEUE);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(f.rxq.used_idx(), used);
    }

    #[test]
    fn malformed_rx_chains_are_returned_unused() {
        let mut f = Fixture::new();
        let mut bad = vec![
            f.post_rx(&[r(RX_BUF, 2048)]),                      // device-readable
            f.post_rx(&[w(RX_BUF, 64), r(RX_BUF + 0x100, 64)]), // writable then readable
            f.post_rx(&[w(MEM_SIZE - 16, 2048)]),               // outside guest memory
            f.post_rx(&[w(RX_BUF, 0)]),                         // no room at all
            f.post_rx(&[w(RX_BUF, 64), w(RX_BUF + 0x100, u32::MAX)]), // over 4 GiB
        ];
        // A chain whose next index is outside the table.
        f.rxq.write_desc(
            15,
            RX_BUF,
            64,
            (VRING_DESC_F_NEXT | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE) as u16,
            99,
        );
        f.rxq.publish(15);
        bad.push(15);
        let good = f.post_rx(&[w(RX_BUF + 0x2000, 2048)]);
        f.peer.write_all(b"hello").expect("write");
        wait_for("all chains used", || {
            f.rxq.used_idx() == bad.len() as u16 + 1
        });
        for (i, head) in bad.iter().enumerate() {
            assert_eq!(
                f.rxq.used_elem(i as u16),
                (u32::from(*head), 0),
                "chain {i}"
            );
        }
        assert_eq!(f.rxq.used_elem(bad.len() as u16), (u32::from(good), 5));
        assert_eq!(f.bytes(RX_BUF + 0x2000, 5), b"hello");
        let stats = f.stats();
        assert_eq!((stats.rx_malformed, stats.rx_bytes), (bad.len() as u64, 5));
        assert!(!stats.rx_closed);
    }

    #[test]
    fn reset_stops_the_worker_and_drop_joins_it() {
        let mut f = Fixture::new();
        let tid = f.tid().expect("worker tid");
        assert!(task_alive(tid));

        write_reg(&mut f.t, STATUS, 0);
        // The write returned after joining the worker.
        assert!(!f.t.lock().device().has_worker());
        wait_for("the worker's task to go", || !task_alive(tid));
        // A reset does not stop TX for good.
        assert!(!f.stopper.is_stopped());

        // A reset device receives nothing: bytes wait in the socket.
        f.peer.write_all(b"after reset").expect("write");
        thread::sleep(Duration::from_millis(50));
        assert_eq!(f.waiting_for_device(), 11);

        // Up again (fresh rings, as a driver would after a reset): a new worker delivers them.
        f.rxq = DriverQueue::new(&f.mem, QUEUE_BASE, 16);
        f.txq = DriverQueue::new(&f.mem, TXQ_BASE, 16);
        f.start();
        let tid2 = f.tid().expect("second worker tid");
        assert_ne!(tid2, tid);
        let head = f.post_rx(&[w(RX_BUF, 2048)]);
        wait_for("the waiting bytes", || f.rxq.used_idx() == 1);
        assert_eq!(f.rxq.used_elem(0), (u32::from(head), 11));

        // Dropping the transport joins the worker, sets the stop flag and closes the socket.
        let Fixture {
            t,
            mut peer,
            device_end,
            stopper,
            ..
        } = f;
        drop(t);
        wait_for("the second worker's task to go", || !task_alive(tid2));
        assert!(stopper.is_stopped());
        drop(device_end);
        peer.set_nonblocking(false).expect("blocking");
        let mut buf = [0u8; 1];
        assert_eq!(
            peer.read(&mut buf).expect("read"),
            0,
            "the device's end is open"
        );
    }

    #[test]
    fn dropping_an_idle_device_joins_its_worker() {
        let f = Fixture::new();
        let tid = f.tid().expect("worker tid");
        drop(f);
        wait_for("the worker's task to go", || !task_alive(tid));
    }
}
