//! The virtio-mmio transport with each device model behind it (block, net, console), driven by
//! an untrusted guest driver: register reads and writes, guest memory writes, queue notifies,
//! and bytes arriving on the host side of net and console.
//!
//! Input: `[device][memory][ops...]` (see `run`). Guest memory is small (1 MiB in one or two
//! regions, one of them above 4 GiB), filled with zeros or pseudo-random bytes; each region
//! lies between two canary pages, and those between two inaccessible pages. The driver's writes go to memory and to a shadow copy;
//! every byte that differs between the two is the device's doing.
//!
//! Invariants:
//! - no panic, no hang (libFuzzer's `-timeout`), no write outside guest memory (the canary
//!   pages stay intact; past them, the inaccessible pages fault, or make a system call fail);
//! - the device writes guest memory only inside the used rings of its queues and the
//!   device-writable buffers of their descriptor tables (direct or indirect), as the driver
//!   set them up (checked unless the device itself rewrote a descriptor table, after which
//!   nothing tells where the driver meant buffers to be);
//! - the identification registers read what they must, whatever happened before; a write of 0
//!   to Status resets it to 0; registers below the configuration space read 0 unless accessed
//!   with 4 bytes.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use xcgi_vmm::devices::virtio::mmio::{MMIO_MAGIC_VALUE, MMIO_VERSION, VENDOR_ID};
use xcgi_vmm::devices::virtio::{
    Block, MmioTransport, Net, TransportState, VirtioConsole, VirtioDevice,
};
use xcgi_vmm::devices::MmioDevice;

const PAGE: usize = 4096;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// Descriptors read from indirect tables per snapshot before the write check gives up.
const MAX_INDIRECT_SCAN: usize = 1 << 16;

// ---------------------------------------------------------------------------------------------
// Guest memory: fixed layouts, mapped once (see `map_guarded`) and reused by every run.

struct Region {
    guest: u64,
    host: *mut u8,
    len: usize,
}

struct Layout {
    regions: Vec<Region>,
    mem: GuestMemoryMmap,
}

// SAFETY: the raw pointers are mappings that live as long as the process; runs are sequential.
unsafe impl Send for Layout {}
unsafe impl Sync for Layout {}

/// Maps `len` bytes of guest memory as `[no access][canary][memory][canary][no access]`, one
/// page each: the host touching memory a little past a region writes a canary page (checked
/// after every run), further away it faults. Returns the address of the memory.
fn map_guarded(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping; only its inner part is made accessible.
    unsafe {
        let total = len + 4 * PAGE;
        let p = libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap");
        let inner = p.cast::<u8>().add(PAGE);
        assert_eq!(
            libc::mprotect(
                inner.cast(),
                len + 2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE
            ),
            0,
            "mprotect"
        );
        let memory = inner.add(PAGE);
        for canary in [inner, memory.add(len)] {
            std::slice::from_raw_parts_mut(canary, PAGE).copy_from_slice(&CANARY);
        }
        memory
    }
}

/// What the pages around each region hold.
const CANARY: [u8; PAGE] = {
    let mut c = [0u8; PAGE];
    let mut i = 0;
    while i < PAGE {
        c[i] = (i as u8).wrapping_mul(31) ^ 0xa5;
        i += 1;
    }
    c
};

impl Region {
    /// Panics if the host wrote next to the region.
    fn check_canaries(&self) {
        // SAFETY: the canary pages are mapped read-write (see `map_guarded`).
        let (before, after) = unsafe {
            (
                std::slice::from_raw_parts(self.host.sub(PAGE), PAGE),
                std::slice::from_raw_parts(self.host.add(self.len), PAGE),
            )
        };
        for (name, page) in [("before", before), ("after", after)] {
            if page != CANARY {
                let at = page.iter().zip(CANARY).position(|(a, b)| *a != b).unwrap();
                panic!(
                    "host memory {name} guest region {:#x}+{:#x} was written (at byte {at} of \
                     the page {name} it)",
                    self.guest, self.len
                );
            }
        }
    }
}

fn layout(spec: &[(u64, usize)]) -> Layout {
    let regions: Vec<Region> = spec
        .iter()
        .map(|&(guest, len)| Region {
            guest,
            host: map_guarded(len),
            len,
        })
        .collect();
    let mmaps = regions
        .iter()
        .map(|r| {
            // SAFETY: `host..host+len` is a live read-write private anonymous mapping that is
            // never unmapped.
            let m = unsafe {
                MmapRegion::<()>::build_raw(
                    r.host,
                    r.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("guest region");
            GuestRegionMmap::new(m, GuestAddress(r.guest)).expect("guest region address")
        })
        .collect();
    let mem = GuestMemoryMmap::from_regions(mmaps).expect("guest memory");
    Layout { regions, mem }
}

fn layouts() -> &'static [Layout] {
    static L: OnceLock<Vec<Layout>> = OnceLock::new();
    L.get_or_init(|| {
        vec![
            // 1 MiB in one piece.
            layout(&[(0, 1 << 20)]),
            // Contiguous in the guest, two host mappings: buffers and rings may straddle them.
            layout(&[(0, 512 << 10), (512 << 10, 512 << 10)]),
            // A hole, and memory above 4 GiB (the high halves of queue addresses matter).
            layout(&[(0, 512 << 10), (1 << 32, 512 << 10)]),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Disk images for the block device: unlinked files, reopened through /proc/self/fd.

fn images() -> &'static [(File, PathBuf)] {
    static I: OnceLock<Vec<(File, PathBuf)>> = OnceLock::new();
    I.get_or_init(|| {
        [0u64, 1, 9, 128]
            .iter()
            .map(|&sectors| {
                let path = std::env::temp_dir()
                    .join(format!("xcgi-fuzz-{}-{sectors}.img", std::process::id()));
                let mut f = File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .expect("disk image");
                std::fs::remove_file(&path).expect("unlink disk image");
                let data: Vec<u8> = (0..sectors * 512)
                    .map(|i| (i * 7 + i / 512) as u8)
                    .collect();
                f.write_all(&data).expect("write disk image");
                let fd_path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                (f, fd_path)
            })
            .collect()
    })
}

fn socketpair(kind: libc::c_int) -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: both were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

// ---------------------------------------------------------------------------------------------
// The transport under test (every device has the same kind).

struct Transport<D: VirtioDevice + 'static>(MmioTransport<D>);

impl<D: VirtioDevice + 'static> Transport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }
    /// Runs `f` with the transport locked: device workers are held off meanwhile.
    fn locked<R>(&mut self, f: impl FnOnce(&mut TransportState<D>) -> R) -> R {
        f(&mut self.0.lock())
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: guest memory writes (mirrored in the shadow) and what the device may write.

/// The driver's own idea of a queue it set up with the macro ops.
#[derive(Clone, Copy, Default)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    next_desc: u16,
    avail_idx: u16,
}

struct Driver {
    layout: &'static Layout,
    shadow: Vec<Vec<u8>>,
    /// Guest ranges the device may write (used rings, device-writable buffers).
    allowed: Vec<(u64, u64)>,
    /// Descriptor tables (direct and indirect) seen so far.
    tables: Vec<(u64, u64)>,
    /// The device rewrote a descriptor table (or the tables were too many to follow): the
    /// write check is off for this run.
    unsound: bool,
    queues: [DriverQueue; 3],
}

impl Driver {
    fn new(layout: &'static Layout, seed: u8) -> Driver {
        // One page of pseudo-random bytes, repeated (cheaper than 1 MiB of them).
        let mut page = [0u8; PAGE];
        let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for chunk in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let mut shadow = Vec::new();
        for r in &layout.regions {
            // SAFETY: the region's mapping, not shared with a running device (none exists yet).
            let host = unsafe { std::slice::from_raw_parts_mut(r.host, r.len) };
            if seed == 0 {
                host.fill(0);
            } else {
                for chunk in host.chunks_mut(PAGE) {
                    chunk.copy_from_slice(&page[..chunk.len()]);
                }
            }
            let mut copy = take_buffer(r.len);
            copy.copy_from_slice(host);
            shadow.push(copy);
        }
        Driver {
            layout,
            shadow,
            allowed: Vec::new(),
            tables: Vec::new(),
            unsound: false,
            queues: [DriverQueue::default(); 3],
        }
    }

    /// The guest address `sel`/`off` name: an offset into one region (a little past its end
    /// too, to cross into the next one or out of memory).
    fn addr(&self, sel: u8, off: u32) -> u64 {
        let r = &self.layout.regions[usize::from(sel) % self.layout.regions.len()];
        r.guest + u64::from(off) % (r.len as u64 + 64)
    }

    /// Copies guest memory at `addr` into `buf`; false if some of it is not guest memory.
    fn read_guest(&self, addr: u64, buf: &mut [u8]) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let a = addr.wrapping_add(done as u64);
            let Some(r) = self
                .layout
                .regions
                .iter()
                .find(|r| a >= r.guest && a - r.guest < r.len as u64)
            else {
                return false;
            };
            let off = (a - r.guest) as usize;
            let n = (r.len - off).min(buf.len() - done);
            // SAFETY: `off..off+n` lies inside the region's mapping.
            unsafe { std::ptr::copy_nonoverlapping(r.host.add(off), buf[done..].as_mut_ptr(), n) };
            done += n;
        }
        true
    }

    /// For each region, the part of `lo..hi` inside it: (region index, offset, length).
    fn pieces(&self, lo: u64, hi: u64) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for (i, r) in self.layout.regions.iter().enumerate() {
            let start = lo.max(r.guest);
            let end = hi.min(r.guest + r.len as u64);
            if start < end {
                out.push((i, (start - r.guest) as usize, (end - start) as usize));
            }
        }
        out
    }

    /// Checks the device's writes in `lo..hi` so far (bytes that differ from the shadow).
    fn check_range(&mut self, lo: u64, hi: u64) {
        if self.unsound {
            return;
        }
        // Did the device rewrite a descriptor table? Then nothing below can be judged.
        for &(tlo, thi) in &self.tables {
            for (i, off, len) in self.pieces(tlo, thi) {
                let r = &self.layout.regions[i];
                // SAFETY: inside the region's mapping; no device runs during the check.
                let now = unsafe { std::slice::from_raw_parts(r.host.add(off), len) };
                if now != &self.shadow[i][off..off + len] {
                    self.unsound = true;
                    return;
                }
            }
        }
        let mut merged: Option<Vec<(u64, u64)>> = None;
        for (i, off, len) in self.pieces(lo, hi) {
            let r = &self.layout.regions[i];
            // SAFETY: as above.
            let now = unsafe { std::slice::from_raw_parts(r.host.add(off), len) };
            let was = &self.shadow[i][off..off + len];
            if now == was {
                continue;
            }
            // Compare in blocks (memcmp), then bytes in the blocks that differ.
            let blocks = now.chunks(64).zip(was.chunks(64)).enumerate();
            let diffs = blocks.filter(|(_, (n, w))| n != w).flat_map(|(k, (n, w))| {
                n.iter()
                    .zip(w.iter())
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(move |(j, (a, b))| (64 * k + j, *a, *b))
            });
            for (j, a, b) in diffs {
                let addr = r.guest + (off + j) as u64;
                let allowed = merged.get_or_insert_with(|| merge(&self.allowed));
                // The last interval starting at or before `addr` must reach past it.
                let k = allowed.partition_point(|&(s, _)| s <= addr);
                let ok = k > 0 && allowed[k - 1].1 > addr;
                assert!(
                    ok,
                    "device wrote guest memory at {addr:#x} ({b:#04x} -> {a:#04x}) outside the \
                     used rings and device-writable buffers"
                );
            }
        }
    }

    /// The driver writes `bytes` at `addr` (what lies outside guest memory is dropped), with the
    /// device's workers held off. The device's earlier writes there are checked first.
    fn write<D: VirtioDevice>(&mut self, t: &mut Transport<D>, addr: u64, bytes: &[u8]) {
        let hi = addr.saturating_add(bytes.len() as u64);
        t.locked(|_| {
            self.check_range(addr, hi);
            for (i, off, len) in self.pieces(addr, hi) {
                let r = &self.layout.regions[i];
                let from = (r.guest + off as u64 - addr) as usize;
                let src = &bytes[from..from + len];
                // SAFETY: inside the region's mapping; the device's workers wait for the lock.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), r.host.add(off), len) };
                self.shadow[i][off..off + len].copy_from_slice(src);
            }
        });
        self.snapshot(t);
    }

    /// Adds the device-writable buffers of descriptor table `table` (`count` entries).
    fn scan_table(&mut self, table: u64, count: usize, indirect: bool, budget: &mut usize) {
        self.tables
            .push((table, table.saturating_add(16 * count as u64)));
        let mut raw = vec![0u8; 16 * count];
        let whole = self.read_guest(table, &mut raw);
        for i in 0..count {
            let d = &mut raw[16 * i..16 * i + 16];
            if !whole && !self.read_guest(table.wrapping_add(16 * i as u64), d) {
                continue;
            }
            let d = &raw[16 * i..16 * i + 16];
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            if flags & DESC_F_INDIRECT != 0 && !indirect {
                let n = (len / 16) as usize;
                if n > *budget {
                    self.unsound = true;
                    continue;
                }
                *budget -= n;
                self.scan_table(addr, n, true, budget);
            } else if flags & DESC_F_WRITE != 0 {
                self.allowed
                    .push((addr, addr.saturating_add(u64::from(len))));
            }
        }
    }

    /// Records what the device may write given the queues as configured now.
    fn snapshot<D: VirtioDevice>(&mut self, t: &mut Transport<D>) {
        if self.unsound {
            return;
        }
        let queues: Vec<(u16, u64, u64)> = t.locked(|t| {
            t.queues()
                .iter()
                .map(|q| (q.size(), q.desc_table(), q.used_ring()))
                .collect()
        });
        let mut budget = MAX_INDIRECT_SCAN;
        t.locked(|_| {
            for (size, desc, used) in queues {
                let used_end = used.saturating_add(6 + 8 * u64::from(size));
                self.allowed.push((used, used_end));
                self.scan_table(desc, usize::from(size), false, &mut budget);
            }
        });
        self.allowed.sort_unstable();
        self.allowed.dedup();
        self.tables.sort_unstable();
        self.tables.dedup();
    }
}

/// Sorted, disjoint, non-adjacent intervals covering the same ground as `v`.
fn merge(v: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = v.iter().copied().filter(|(s, e)| s < e).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

impl Drop for Driver {
    fn drop(&mut self) {
        let mut pool = POOL.lock().unwrap();
        pool.append(&mut self.shadow);
    }
}

/// Shadow buffers, reused from run to run (fresh 1 MiB allocations cost page faults).
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn take_buffer(len: usize) -> Vec<u8> {
    let mut pool = POOL.lock().unwrap();
    match pool.iter().position(|b| b.len() == len) {
        Some(i) => pool.swap_remove(i),
        None => vec![0; len],
    }
}

// ---------------------------------------------------------------------------------------------
// The input.

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

// Register offsets (virtio 1.2, 4.2.2).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const CONFIG: u64 = 0x100;

const STATUS_VALUES: [u32; 8] = [0, 1, 3, 11, 15, 0x80, 0x40, 7];

/// The host side of the device (net's TAP stand-in, console's socket).
struct Peer {
    fd: Option<OwnedFd>,
}

impl Peer {
    fn send(&self, bytes: &[u8]) {
        if let Some(fd) = &self.fd {
            // SAFETY: a valid buffer; the socket is non-blocking.
            unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
        }
    }
    fn drain(&self) {
        if let Some(fd) = &self.fd {
            let mut buf = [0u8; 4096];
            for _ in 0..256 {
                // SAFETY: a valid buffer; the socket is non-blocking.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    break;
                }
            }
        }
    }
}

/// Reads and checks what the identification registers say.
fn check_identity<D: VirtioDevice>(t: &mut Transport<D>, device_type: u32) {
    assert_eq!(t.read32(MAGIC), MMIO_MAGIC_VALUE);
    assert_eq!(t.read32(VERSION), MMIO_VERSION);
    assert_eq!(t.read32(DEVICE_ID), device_type);
    assert_eq!(t.read32(VENDOR), VENDOR_ID);
}

/// Sets up queue `q` at `desc` (avail and used rings right after it) with `size` entries.
fn setup_queue<D: VirtioDevice>(
    t: &mut Transport<D>,
    d: &mut Driver,
    q: u32,
    size: u16,
    desc: u64,
) {
    let avail = desc + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    t.write32(QUEUE_SEL, q);
    t.write32(QUEUE_NUM, u32::from(size));
    for (i, a) in [desc, avail, used].into_iter().enumerate() {
        let reg = QUEUE_DESC_LOW + 0x10 * i as u64;
        t.write32(reg, a as u32);
        t.write32(reg + 4, (a >> 32) as u32);
    }
    t.write32(QUEUE_READY, 1);
    if let Some(dq) = d.queues.get_mut(q as usize) {
        *dq = DriverQueue {
            size,
            desc,
            avail,
            next_desc: 0,
            avail_idx: 0,
        };
    }
    d.snapshot(t);
}

/// Runs the operations in `input` against `t`. Returns when the input is used up.
fn run<D: VirtioDevice>(mut t: Transport<D>, mut d: Driver, peer: Peer, input: &mut Input) {
    let device_type = t.locked(|t| t.device().info().device_type);
    let nqueues = t.locked(|t| t.queues().len()) as u32;
    check_identity(&mut t, device_type);
    d.snapshot(&mut t);
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 14 {
            // Any register write, 4 bytes (the size Linux uses), offsets mostly aligned.
            0 => {
                let off = u64::from(input.u16() % 0x200);
                let value = input.u32();
                t.write32(off, value);
                d.snapshot(&mut t);
            }
            // Any read, any size.
            1 => {
                let off = u64::from(input.u16() % 0x200);
                let size = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                let mut data = [0xaau8; 8];
                t.read(off, &mut data[..size]);
                if off < CONFIG && size != 4 {
                    assert_eq!(
                        data[..size],
                        [0u8; 8][..size],
                        "{size}-byte read of {off:#x}"
                    );
                }
            }
            // Guest memory write.
            2 => {
                let addr = d.addr(input.u8(), input.u32());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len).to_vec();
                d.write(&mut t, addr, &bytes);
            }
            // Queue notify.
            3 => {
                let q = input.u8();
                let value = if q == 0xff {
                    input.u32()
                } else {
                    u32::from(q % 4)
                };
                t.write32(QUEUE_NOTIFY, value);
            }
            // Status writes, in the values a driver goes through.
            4 => {
                let v = STATUS_VALUES[usize::from(input.u8() % 8)];
                t.write32(STATUS, v);
                if v == 0 {
                    assert_eq!(t.read32(STATUS), 0, "status after reset");
                    assert_eq!(
                        t.read32(INTERRUPT_STATUS),
                        0,
                        "interrupt status after reset"
                    );
                }
            }
            // Set up one queue (after FEATURES_OK, before DRIVER_OK, or it is ignored).
            5 => {
                let q = u32::from(input.u8() % 4);
                let size = match input.u8() {
                    s if s < 0xf0 => 1u16 << (s % 9),
                    _ => input.u16(),
                };
                let desc = d.addr(input.u8(), input.u32()) & !0xf;
                setup_queue(&mut t, &mut d, q, size, desc);
            }
            // Bring the device up the way Linux does, queues side by side.
            6 => {
                let feature_mask = input.u32();
                let size = 1u16 << (input.u8() % 9);
                let base = d.addr(input.u8(), input.u32()) & !0xfff;
                t.write32(STATUS, 0);
                t.write32(STATUS, 1);
                t.write32(STATUS, 3);
                for sel in 0..2 {
                    t.write32(DEVICE_FEATURES_SEL, sel);
                    let offered = t.read32(DEVICE_FEATURES);
                    t.write32(DRIVER_FEATURES_SEL, sel);
                    let keep = if sel == 0 { feature_mask | 1 } else { u32::MAX };
                    t.write32(DRIVER_FEATURES, offered & keep);
                }
                t.write32(STATUS, 11);
                for q in 0..nqueues {
                    let desc =
                        base + u64::from(q) * (16 * u64::from(size) + 0x1000 + 8 * u64::from(size));
                    setup_queue(&mut t, &mut d, q, size, desc & !0xfff);
                }
                t.write32(STATUS, 15);
                d.snapshot(&mut t);
            }
            // Publish a chain on a queue set up by the driver (and maybe notify).
            7 => {
                let q = usize::from(input.u8() % 3);
                let n = usize::from(input.u8() % 8) + 1;
                let notify = input.u8();
                let dq = d.queues[q];
                if dq.size == 0 {
                    continue;
                }
                let head = dq.next_desc;
                for i in 0..n {
                    let index = (head as usize + i) % usize::from(dq.size);
                    let kind = input.u8();
                    let addr = if kind & 0x80 != 0 {
                        d.addr(input.u8(), input.u32())
                    } else {
                        // A buffer in the last quarter of the first region.
                        let r = &d.layout.regions[0];
                        r.guest
                            + (r.len as u64 * 3 / 4)
                            + u64::from(input.u16()) % (r.len as u64 / 4)
                    };
                    let len = match kind & 0x60 {
                        0x60 => input.u32(),
                        _ => u32::from(input.u16() % 0x2000),
                    };
                    let mut flags = 0u16;
                    if i + 1 < n {
                        flags |= DESC_F_NEXT;
                    }
                    if kind & 1 != 0 {
                        flags |= DESC_F_WRITE;
                    }
                    if kind & 0x1e == 0x1e {
                        flags |= DESC_F_INDIRECT;
                    }
                    let next = ((index + 1) % usize::from(dq.size)) as u16;
                    let mut raw = [0u8; 16];
                    raw[0..8].copy_from_slice(&addr.to_le_bytes());
                    raw[8..12].copy_from_slice(&len.to_le_bytes());
                    raw[12..14].copy_from_slice(&flags.to_le_bytes());
                    raw[14..16].copy_from_slice(&next.to_le_bytes());
                    d.write(&mut t, dq.desc + 16 * index as u64, &raw);
                }
                let slot = u64::from(dq.avail_idx % dq.size);
                d.write(&mut t, dq.avail + 4 + 2 * slot, &head.to_le_bytes());
                let idx = dq.avail_idx.wrapping_add(1);
                d.write(&mut t, dq.avail + 2, &idx.to_le_bytes());
                let dq = &mut d.queues[q];
                dq.next_desc = ((usize::from(head) + n) % usize::from(dq.size)) as u16;
                dq.avail_idx = idx;
                if notify & 1 != 0 {
                    t.write32(QUEUE_NOTIFY, q as u32);
                }
            }
            // The host side sends (a frame to net, bytes to the console).
            8 => {
                let len = usize::from(input.u16() % 2048);
                peer.send(input.bytes(len));
            }
            // The host side reads what the guest sent.
            9 => peer.drain(),
            // Give the device's worker a moment.
            10 => std::thread::sleep(Duration::from_micros(u64::from(input.u8() % 8) * 50)),
            // Configuration space, any size.
            11 => {
                let off = CONFIG + u64::from(input.u8());
                let size = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                if input.u8() & 1 == 0 {
                    let mut data = [0u8; 8];
                    t.read(off, &mut data[..size]);
                } else {
                    let data = input.bytes(size).to_vec();
                    t.write(off, &data);
                }
            }
            // Interrupt acknowledge.
            12 => {
                let v = input.u32();
                // Under one lock: a device worker may raise an interrupt any time.
                let left = t.locked(|t| {
                    t.write(INTERRUPT_ACK, &v.to_le_bytes());
                    let mut b = [0u8; 4];
                    t.read(INTERRUPT_STATUS, &mut b);
                    u32::from_le_bytes(b)
                });
                assert_eq!(
                    left & v,
                    0,
                    "interrupt bits {v:#x} acknowledged but still set"
                );
            }
            // A misbehaving driver: the available index moved anywhere.
            13 => {
                let q = usize::from(input.u8() % 3);
                let idx = input.u16();
                let dq = d.queues[q];
                if dq.size != 0 {
                    d.write(&mut t, dq.avail + 2, &idx.to_le_bytes());
                }
            }
            _ => unreachable!(),
        }
    }
    check_identity(&mut t, device_type);
    // Stop and join the device's workers; then every device write is in memory.
    drop(t);
    drop(peer);
    for r in &d.layout.regions {
        r.check_canaries();
    }
    d.check_range(0, u64::MAX);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let device = input.u8();
    let memory = input.u8();
    let layout = &layouts()[usize::from(memory % 3)];
    let seed = if memory & 0x80 != 0 {
        input.u8() | 1
    } else {
        0
    };
    let d = Driver::new(layout, seed);
    let mem = layout.mem.clone();
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    match device % 3 {
        0 => {
            let images = images();
            let (_, path) = &images[usize::from(device >> 5) % images.len()];
            let block = Block::open(path).expect("block device");
            let t = Transport(MmioTransport::new(block, mem, irq).unwrap());
            run(t, d, Peer { fd: None }, &mut input);
        }
        1 => {
            let (tap, peer) = socketpair(libc::SOCK_DGRAM);
            let net = Net::new(tap, [0x52, 0x54, 0, 0x12, 0x34, 0x56]).expect("net device");
            let t = Transport(MmioTransport::new(net, mem, irq).unwrap());
            let peer = Peer {
                fd: (device & 0x20 == 0).then_some(peer),
            };
            run(t, d, peer, &mut input);
        }
        _ => {
            let (sock, peer) = socketpair(libc::SOCK_STREAM);
            let console = VirtioConsole::new(sock).expect("console device");
            // TX never waits for a peer that does not read (the VM sets this at its end).
            console.stopper().stop();
            let t = Transport(MmioTransport::new(console, mem, irq).unwrap());
            let peer = Peer {
                fd: (device & 0x20 == 0).then_some(peer),
            };
            run(t, d, peer, &mut input);
        }
    }
});
