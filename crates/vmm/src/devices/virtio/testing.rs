//! Test helpers: a tiny driver side for split virtqueues in a `GuestMemoryMmap`, and a way to
//! bring a transport up through its registers the way Linux does.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use std::time::{Duration, Instant};

use crate::devices::MmioDevice;

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
