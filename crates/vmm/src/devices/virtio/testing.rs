//! Test helpers: a tiny driver side for split virtqueues in a `GuestMemoryMmap`, a way to bring
//! a transport up through its registers the way Linux does, and [`Fixture`], one test bench for
//! every device on a socket (virtio-net, virtio-console) with the tests they share.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::mmio::regs::{
    DEVICE_FEATURES, DEVICE_FEATURES_SEL, DEVICE_ID, QUEUE_NOTIFY, QUEUE_NUM_MAX, QUEUE_SEL, STATUS,
};
use super::mmio::MmioTransport;
use super::sys::set_nonblocking;
use super::VirtioDevice;
use crate::devices::MmioDevice;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

/// 1 MiB of guest memory at 0.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where test queues live.
pub const QUEUE_BASE: GuestAddress = GuestAddress(0x1000);
/// Where test data buffers may go (well clear of the queue).
pub const BUF_BASE: u64 = 0x4_0000;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("test guest memory")
}

pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// One descriptor as the driver describes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Device-readable buffer.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// Device-writable buffer.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// The driver's view of a split virtqueue laid out at `base`.
pub struct DriverQueue {
    mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    pub fn new(mem: &GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + 16 * u64::from(size));
        let used_unaligned = avail.0 + 6 + 2 * u64::from(size);
        let used = GuestAddress((used_unaligned + 3) & !3);
        let q = DriverQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        };
        let ring_bytes = used.0 + 6 + 8 * u64::from(size) - base.0;
        q.mem
            .write_slice(&vec![0u8; ring_bytes as usize], base)
            .expect("clear rings");
        q
    }

    /// Write descriptor `index` of the table.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.0 + 16 * u64::from(index);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .expect("write descriptor");
    }

    /// Put `descs` in the table as one chain (consecutive slots) and publish it. Returns the
    /// head index.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = 0u16;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            self.write_desc(index, d.addr, d.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Put `head` in the available ring and bump its index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail.0 + 4 + 2 * slot))
            .expect("avail ring entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Overwrite the available ring index (to play a misbehaving driver).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail.0 + 2))
            .expect("avail idx");
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(self.used.0 + 2))
                .expect("used idx"),
        )
    }

    /// Used ring element `i`: (descriptor head, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used.0 + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (u32::from_le(id), u32::from_le(len))
    }
}

pub fn read_reg<T: MmioDevice>(dev: &mut T, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    dev.read(offset, &mut data);
    u32::from_le_bytes(data)
}

pub fn write_reg<T: MmioDevice>(dev: &mut T, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

/// Negotiate features (accepting everything offered) and set up queue `index` from `q`,
/// the way Linux's virtio_mmio driver does, ending with DRIVER_OK.
pub fn bring_up<T: MmioDevice>(t: &mut T, queues: &[&DriverQueue]) {
    let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    let drv = ack | VIRTIO_CONFIG_S_DRIVER;
    let fok = drv | VIRTIO_CONFIG_S_FEATURES_OK;
    write_reg(t, 0x70, 0);
    write_reg(t, 0x70, ack);
    write_reg(t, 0x70, drv);
    for sel in 0..2 {
        write_reg(t, 0x14, sel);
        let features = read_reg(t, 0x10);
        write_reg(t, 0x24, sel);
        write_reg(t, 0x20, features);
    }
    write_reg(t, 0x70, fok);
    assert_eq!(read_reg(t, 0x70), fok, "device refused FEATURES_OK");
    for (i, q) in queues.iter().enumerate() {
        write_reg(t, 0x30, i as u32);
        assert_eq!(read_reg(t, 0x44), 0);
        write_reg(t, 0x38, u32::from(q.size));
        write_reg(t, 0x80, q.desc.0 as u32);
        write_reg(t, 0x84, (q.desc.0 >> 32) as u32);
        write_reg(t, 0x90, q.avail.0 as u32);
        write_reg(t, 0x94, (q.avail.0 >> 32) as u32);
        write_reg(t, 0xa0, q.used.0 as u32);
        write_reg(t, 0xa4, (q.used.0 >> 32) as u32);
        write_reg(t, 0x44, 1);
    }
    write_reg(t, 0x70, fok | VIRTIO_CONFIG_S_DRIVER_OK);
}

/// Poll `cond` until it holds; panic with `what` after 5 seconds (for work done by other threads).
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Most warning lines one [`LogLimiter`](super::log_limit::LogLimiter) lets through in
/// `elapsed`: a burst and a summary per window begun.
pub fn warning_bound(elapsed: Duration) -> usize {
    use super::log_limit::{BURST, WINDOW};
    let windows = (elapsed.as_nanos() / WINDOW.as_nanos()) as usize + 1;
    windows * (BURST as usize + 1)
}

/// Run `f` on this thread with a tracing subscriber that counts the events at WARN or ERROR
/// level (what reaches an operator's log by default); returns that count and `f`'s result.
pub fn count_warnings<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let counter = WarnCounter::default();
    let count = counter.0.clone();
    let result = tracing::subscriber::with_default(counter, f);
    (count.load(std::sync::atomic::Ordering::SeqCst), result)
}

#[derive(Default)]
struct WarnCounter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        // ERROR < WARN < ... < TRACE in tracing's order.
        if *event.metadata().level() <= tracing::Level::WARN {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Whether thread `tid` of this process still exists.
pub fn task_alive(tid: i32) -> bool {
    Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// Checks the identification registers: device id, the two feature pages, and the maximum size
/// of each queue (and 0 for the one after the last).
pub fn assert_identity<T: MmioDevice>(t: &mut T, device_id: u32, features: u64, queues: &[u16]) {
    assert_eq!(read_reg(t, DEVICE_ID), device_id);
    for sel in 0..2 {
        write_reg(t, DEVICE_FEATURES_SEL, sel);
        let want = (features >> (32 * sel)) as u32;
        assert_eq!(read_reg(t, DEVICE_FEATURES), want, "feature page {sel}");
    }
    let sizes = queues.iter().copied().chain([0]);
    for (sel, max) in (0u32..).zip(sizes) {
        write_reg(t, QUEUE_SEL, sel);
        assert_eq!(read_reg(t, QUEUE_NUM_MAX), u32::from(max), "queue {sel}");
    }
}

/// A device on one end of a Unix socket pair, for [`Fixture`]: virtio-net (a datagram socket
/// standing in for the TAP) and virtio-console (the stream socket the gateway hands over).
/// Both have a receive queue 0 filled by a worker and a transmit queue 1.
pub trait SocketDevice: VirtioDevice + Sized + 'static {
    /// One end of the pair: `UnixDatagram` or `UnixStream`.
    type Socket: From<OwnedFd> + AsFd + AsRawFd;
    /// `SOCK_DGRAM` or `SOCK_STREAM`.
    const SOCKET_TYPE: libc::c_int;
    /// The device on `socket`, behind a transport.
    fn attach(socket: OwnedFd, mem: GuestMemoryMmap) -> MmioTransport<Self>;
}

/// Where a [`Fixture`]'s transmit queue lives (its receive queue is at [`QUEUE_BASE`]).
pub const TXQ_BASE: GuestAddress = GuestAddress(0x8000);
/// Receive buffers go here, 0x1000 apart; transmit buffers above (512 KiB in all).
pub const RX_BUF: u64 = BUF_BASE;
pub const TX_BUF: u64 = BUF_BASE + 0x4_0000;
/// What the buffer area holds until the device writes it.
pub const POISON: u8 = 0xee;
/// The receive queue of a socket device (its transmit queue is 1).
pub const RXQ: usize = 0;

/// A socket device behind its transport, with the driver's two queues and both ends of the
/// socket.
pub struct Fixture<D: SocketDevice> {
    pub mem: GuestMemoryMmap,
    pub t: MmioTransport<D>,
    pub rxq: DriverQueue,
    pub txq: DriverQueue,
    /// The host side (non-blocking).
    pub peer: D::Socket,
    /// Another descriptor for the device's end (same socket), to peek at or fill it.
    pub device_end: D::Socket,
}

impl<D: SocketDevice> Fixture<D> {
    /// The device on a socket pair, not brought up yet.
    pub fn unstarted() -> Fixture<D> {
        let (dev, peer) = socket_pair(D::SOCKET_TYPE);
        let device_end = D::Socket::from(dev.try_clone().expect("dup"));
        let mem = memory();
        let t = D::attach(dev, mem.clone());
        mem.write_slice(&vec![POISON; 0x8_0000], GuestAddress(BUF_BASE))
            .expect("poison");
        Fixture {
            rxq: DriverQueue::new(&mem, QUEUE_BASE, 16),
            txq: DriverQueue::new(&mem, TXQ_BASE, 16),
            mem,
            t,
            peer: D::Socket::from(peer),
            device_end,
        }
    }

    /// Brought up, with the RX worker running.
    pub fn new() -> Fixture<D> {
        let mut f = Fixture::unstarted();
        f.start();
        f
    }

    /// Brings the device up on the fixture's queues and waits for its RX worker.
    pub fn start(&mut self) {
        bring_up(&mut self.t, &[&self.rxq, &self.txq]);
        assert!(self.t.lock().is_activated());
        wait_for("the RX worker to start", || self.tid().is_some());
    }

    /// Kernel thread id of the running RX worker, once it has started.
    pub fn tid(&self) -> Option<i32> {
        self.t.lock().device_mut().workers().and_then(|w| w.tid())
    }

    pub fn has_worker(&self) -> bool {
        let mut t = self.t.lock();
        t.device_mut().workers().is_some_and(|w| w.is_running())
    }

    pub fn notify(&mut self, queue: usize) {
        write_reg(&mut self.t, QUEUE_NOTIFY, queue as u32);
    }

    /// Post one receive chain and tell the device.
    pub fn post_rx(&mut self, chain: &[Desc]) -> u16 {
        let head = self.rxq.add_chain(chain);
        self.notify(RXQ);
        head
    }

    pub fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(at))
            .expect("read guest");
        buf
    }

    pub fn put(&self, at: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(at))
            .expect("write guest");
    }

    /// Whether the irq eventfd fired (since the last look).
    pub fn irq_fired(&self) -> bool {
        self.t.lock().interrupt_evt().read().is_ok()
    }

    /// Sends `data` from the host side, whole (one datagram, or stream bytes).
    pub fn send_from_peer(&self, data: &[u8]) {
        assert_eq!(
            send(&self.peer, data),
            Some(data.len()),
            "send from the peer"
        );
    }

    /// Bytes waiting in the socket for the device (the next datagram's, or the stream's, up to
    /// 64 KiB), without taking them.
    pub fn waiting_for_device(&self) -> usize {
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
}

impl<D: SocketDevice> Fixture<D> {
    /// Publishes chains that break the rules every transmit chain must follow (`chain.rs`),
    /// then the device's own `extra` ones, and notifies once: every one must come back unsent,
    /// with a used length of 0, and the driver be interrupted. Returns how many there were.
    pub fn send_malformed_tx(&mut self, extra: &[&[Desc]]) -> u64 {
        let common: [&[Desc]; 5] = [
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
        let chains = common.iter().chain(extra);
        let mut heads: Vec<u16> = chains.map(|c| self.txq.add_chain(c)).collect();
        // A chain whose next index is outside the table; one that loops onto itself, longer
        // than the queue.
        for (index, next) in [(15, 99), (14, 14)] {
            let flags = VRING_DESC_F_NEXT as u16;
            self.txq.write_desc(index, TX_BUF, 12, flags, next);
            self.txq.publish(index);
            heads.push(index);
        }
        self.notify(RXQ + 1);
        assert_returned(&self.txq, 0, &heads);
        assert!(self.irq_fired());
        heads.len() as u64
    }

    /// Posts receive chains that break the rules every receive chain must follow
    /// (`chain.rs`), then the device's own `extra` ones, then a good one of 2 KiB at
    /// `RX_BUF + 0x2000`, and sends `data` from the host: the bad ones must come back unused,
    /// the good one with `data.len()` bytes. Returns how many bad ones there were.
    pub fn post_malformed_rx(&mut self, extra: &[&[Desc]], data: &[u8]) -> u64 {
        let common: [&[Desc]; 4] = [
            // Device-readable.
            &[r(RX_BUF, 2048)],
            // Writable then readable.
            &[w(RX_BUF, 64), r(RX_BUF + 0x100, 64)],
            // Outside guest memory.
            &[w(MEM_SIZE - 16, 2048)],
            // Over 4 GiB.
            &[w(RX_BUF, 64), w(RX_BUF + 0x100, u32::MAX)],
        ];
        let chains = common.iter().chain(extra);
        let mut heads: Vec<u16> = chains.map(|c| self.post_rx(c)).collect();
        // A chain whose next index is outside the table.
        let flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
        self.rxq.write_desc(15, RX_BUF, 64, flags, 99);
        self.rxq.publish(15);
        heads.push(15);
        let good = self.post_rx(&[w(RX_BUF + 0x2000, 2048)]);
        self.send_from_peer(data);
        let all = heads.len() as u16 + 1;
        wait_for("all chains used", || self.rxq.used_idx() == all);
        assert_returned(&self.rxq, 0, &heads);
        let good_len = data.len() as u32;
        assert_eq!(self.rxq.used_elem(all - 1), (u32::from(good), good_len));
        heads.len() as u64
    }
}

/// Checks that the used ring of `q` holds `heads` from entry `first` on, each with a used
/// length of 0.
fn assert_returned(q: &DriverQueue, first: u16, heads: &[u16]) {
    assert!(
        q.used_idx() >= first + heads.len() as u16,
        "not all returned"
    );
    for (i, head) in (first..).zip(heads) {
        assert_eq!(q.used_elem(i), (u32::from(*head), 0), "chain {i}");
    }
}

/// A connected pair of Unix sockets of `kind`: the device's end, and the host's end
/// (non-blocking).
fn socket_pair(kind: libc::c_int) -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both were just created and are owned by nobody else.
    let (dev, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_nonblocking::<std::io::Error>(peer.as_raw_fd()).expect("nonblocking");
    (dev, peer)
}

/// One `send` on `socket` (never raising SIGPIPE); the byte count, or None on an error.
fn send(socket: &impl AsRawFd, data: &[u8]) -> Option<usize> {
    // SAFETY: send from a valid buffer of its length.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).ok()
}

/// Writes the tests every [`SocketDevice`] shares as `#[test]` functions of the module that
/// invokes it: `socket_device_tests!(Net, rx_data: frame)`, where `rx_data` is what the host
/// sends while the device is reset (it must reach the guest whole once it is up again).
macro_rules! socket_device_tests {
    ($device:ty, rx_data: $data:expr) => {
        #[test]
        fn activation_needs_both_queues() {
            $crate::devices::virtio::testing::activation_needs_both_queues::<$device>();
        }

        #[test]
        fn reset_stops_the_worker_and_drop_joins_it() {
            let data = $data;
            $crate::devices::virtio::testing::reset_stops_the_worker_and_drop_joins_it::<$device>(
                &data,
            );
        }

        #[test]
        fn dropping_an_idle_device_joins_its_worker() {
            $crate::devices::virtio::testing::dropping_an_idle_device_joins_its_worker::<$device>();
        }
    };
}
pub(crate) use socket_device_tests;

/// Shared test: the device refuses DRIVER_OK (NEEDS_RESET, no worker) unless the driver set up
/// both queues; after a reset, a proper bring-up works.
pub fn activation_needs_both_queues<D: SocketDevice>() {
    let mut f = Fixture::<D>::unstarted();
    bring_up(&mut f.t, &[&f.rxq]);
    assert!(!f.t.lock().is_activated());
    assert_ne!(read_reg(&mut f.t, STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(!f.has_worker());
    f.start();
    assert!(f.has_worker());
}

/// Shared test: a reset stops the RX worker (the register write returns once it is joined) and
/// `data` from the host waits in the socket; brought up again, a new worker delivers it;
/// dropping the transport joins that worker and closes the device's socket.
pub fn reset_stops_the_worker_and_drop_joins_it<D: SocketDevice>(data: &[u8]) {
    let mut f = Fixture::<D>::new();
    let tid = f.tid().expect("worker tid");
    assert!(task_alive(tid));

    write_reg(&mut f.t, STATUS, 0);
    // The write returned after joining the worker.
    assert!(!f.has_worker());
    wait_for("the worker's task to go", || !task_alive(tid));

    // A reset device receives nothing: the data waits in the socket.
    f.send_from_peer(data);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(f.waiting_for_device(), data.len());

    // Up again (fresh rings, as a driver would after a reset): a new worker delivers it.
    f.rxq = DriverQueue::new(&f.mem, QUEUE_BASE, 16);
    f.txq = DriverQueue::new(&f.mem, TXQ_BASE, 16);
    f.start();
    let tid2 = f.tid().expect("second worker tid");
    assert_ne!(tid2, tid);
    let head = f.post_rx(&[w(RX_BUF, 2048)]);
    wait_for("the waiting data", || f.rxq.used_idx() == 1);
    assert_eq!(f.rxq.used_elem(0), (u32::from(head), data.len() as u32));

    // Dropping the transport joins the worker and closes the device's socket.
    let Fixture {
        t,
        peer,
        device_end,
        ..
    } = f;
    drop(t);
    wait_for("the second worker's task to go", || !task_alive(tid2));
    assert!(
        send(&peer, b"x").is_some(),
        "device_end keeps the socket open"
    );
    drop(device_end);
    assert!(
        send(&peer, b"x").is_none(),
        "the device's end is still open"
    );
}

/// Shared test: dropping a device whose worker waits for data joins the worker.
pub fn dropping_an_idle_device_joins_its_worker<D: SocketDevice>() {
    let f = Fixture::<D>::new();
    let tid = f.tid().expect("worker tid");
    drop(f);
    wait_for("the worker's task to go", || !task_alive(tid));
}
