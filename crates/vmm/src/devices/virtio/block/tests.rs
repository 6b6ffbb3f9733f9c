//! virtio-blk against temporary image files.

use std::io::Write;
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::BOUNCE_LEN;
use super::*;
use crate::devices::virtio::mmio::regs::{INTERRUPT_STATUS, QUEUE_NOTIFY};
use crate::devices::virtio::testing::{
    assert_identity, bring_up, eventfd, memory, r, read_reg, w, write_reg, Desc, DriverQueue,
    BUF_BASE, MEM_SIZE, POISON, QUEUE_BASE,
};
use crate::devices::virtio::MmioTransport;
use crate::devices::MmioDevice;

const HDR: u64 = BUF_BASE;
const DATA: u64 = BUF_BASE + 0x1000;
const STATUS: u64 = BUF_BASE + 0x10000;

fn image_bytes(sectors: u64) -> Vec<u8> {
    (0..sectors * SECTOR_SIZE)
        .map(|i| (i % 251) as u8 ^ (i / SECTOR_SIZE) as u8)
        .collect()
}

fn image_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(bytes).expect("write image");
    f
}

struct Fixture {
    mem: GuestMemoryMmap,
    t: MmioTransport<Block>,
    q: DriverQueue,
    image: Vec<u8>,
    file: tempfile::NamedTempFile,
}

impl Fixture {
    fn new(sectors: u64) -> Fixture {
        let image = image_bytes(sectors);
        let file = image_file(&image);
        let block = Block::open(file.path()).expect("open image");
        let mem = memory();
        let mut t = MmioTransport::new(block, mem.clone(), eventfd()).expect("transport");
        let q = DriverQueue::new(&mem, QUEUE_BASE, 16);
        bring_up(&mut t, &[&q]);
        assert!(t.lock().is_activated());
        // Poison the buffer area so we can tell what the device wrote.
        mem.write_slice(&vec![POISON; 0x2_0000], GuestAddress(BUF_BASE))
            .expect("poison");
        Fixture {
            mem,
            t,
            q,
            image,
            file,
        }
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).expect("header");
    }

    /// Publish `chain`, notify, and return whether the irq eventfd fired.
    fn submit(&mut self, chain: &[Desc]) -> bool {
        self.q.add_chain(chain);
        self.notify()
    }

    fn notify(&mut self) -> bool {
        write_reg(&mut self.t, QUEUE_NOTIFY, 0);
        self.t.lock().interrupt_evt().read().is_ok()
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).expect("read");
        v
    }

    fn status(&self) -> u8 {
        self.bytes(STATUS, 1)[0]
    }

    /// Submits a request of `kind` for `sector` as `chain` (header at [`HDR`]) with the
    /// status byte at [`STATUS`] poisoned first; returns the status the device wrote there and
    /// the used length it returned the chain with.
    fn request(&mut self, kind: u32, sector: u64, chain: &[Desc]) -> (u8, u32) {
        self.mem
            .write_obj(POISON, GuestAddress(STATUS))
            .expect("reset status");
        self.header(HDR, kind, sector);
        assert!(self.submit(chain), "the driver must be interrupted");
        (self.status(), self.last_used().1)
    }

    /// Submits a read of `sector` as `chain`, which must fail (IOERR, used length 0) before
    /// writing any of the `len` bytes at `at`.
    fn read_fails(&mut self, sector: u64, chain: &[Desc], (at, len): (u64, usize)) {
        let reply = self.request(VIRTIO_BLK_T_IN, sector, chain);
        assert_eq!(reply, (S_IOERR, 0), "sector {sector}");
        assert!(self.untouched(at, len), "data written by a failed read");
    }

    /// Whether the device left `len` bytes at `at` alone.
    fn untouched(&self, at: u64, len: usize) -> bool {
        self.bytes(at, len) == vec![POISON; len]
    }

    /// The last used element: (head, len).
    fn last_used(&self) -> (u32, u32) {
        let idx = self.q.used_idx();
        assert!(idx > 0, "nothing used");
        self.q.used_elem(idx - 1)
    }
}

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn open_checks_the_image() {
    let f = image_file(&image_bytes(8));
    assert_eq!(Block::open(f.path()).expect("open").capacity(), 8);
    let empty = image_file(&[]);
    assert_eq!(Block::open(empty.path()).expect("open").capacity(), 0);

    let odd = image_file(&[0u8; 1000]);
    let err = Block::open(odd.path()).err().expect("must fail");
    assert!(
        matches!(err, BlockError::UnalignedSize { size: 1000, .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("not a multiple of the 512-byte sector"));

    let missing = Path::new("/nonexistent/xcgi/disk.img");
    assert!(matches!(Block::open(missing), Err(BlockError::Open { .. })));
}

#[test]
fn identity_features_and_config() {
    let mut fx = Fixture::new(8);
    let t = &mut fx.t;
    let features = (1 << 32)
        | [VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE]
            .iter()
            .fold(0, |f, bit| f | (1 << bit));
    assert_identity(t, VIRTIO_ID_BLOCK, features, &[QUEUE_SIZE]);
    assert_eq!(t.lock().acked_features(), features);
    // capacity, as Linux reads a u64: two 32-bit reads.
    assert_eq!(read_reg(t, 0x100), 8);
    assert_eq!(read_reg(t, 0x104), 0);
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    assert_eq!(read_reg(t, 0x10c), u32::from(QUEUE_SIZE) - 2); // seg_max
    assert_eq!(read_reg(t, 0x114), 512); // blk_size
    assert_eq!(read_reg(t, 0x200), 0);
    // Config space is read-only.
    write_reg(t, 0x100, 99);
    assert_eq!(read_reg(t, 0x100), 8);
}

#[test]
fn read_returns_file_bytes() {
    let mut fx = Fixture::new(8);
    fx.header(HDR, VIRTIO_BLK_T_IN, 1);
    let head = fx.q.add_chain(&[
        r(HDR, 16),
        w(DATA, 512),
        w(DATA + 0x800, 1024),
        w(STATUS, 1),
    ]);
    assert!(fx.notify(), "irq eventfd must be signalled");
    assert_eq!(read_reg(&mut fx.t, INTERRUPT_STATUS), 1);
    assert_eq!(fx.status(), S_OK);
    assert_eq!(fx.last_used(), (u32::from(head), 512 + 1024 + 1));
    assert_eq!(fx.bytes(DATA, 512), fx.image[512..1024]);
    assert_eq!(fx.bytes(DATA + 0x800, 1024), fx.image[1024..2048]);
    // Nothing written around the buffers.
    assert_eq!(fx.bytes(DATA + 512, 1), [POISON]);
    assert_eq!(fx.bytes(DATA + 0x800 + 1024, 1), [POISON]);
}

#[test]
fn read_whole_image_larger_than_bounce_buffer() {
    let sectors = 2 * (BOUNCE_LEN as u64 / SECTOR_SIZE) + 3;
    let mut fx = Fixture::new(sectors);
    let len = (sectors * SECTOR_SIZE) as u32;
    let data = 0x8_0000;
    assert!(data + u64::from(len) < MEM_SIZE);
    fx.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert!(fx.submit(&[r(HDR, 16), w(data, len), w(STATUS, 1)]));
    assert_eq!(fx.status(), S_OK);
    assert_eq!(fx.last_used().1, len + 1);
    assert_eq!(fx.bytes(data, len as usize), fx.image);
}

#[test]
fn header_with_data_and_data_with_status_share_descriptors() {
    let mut fx = Fixture::new(4);
    // Header and status in their own descriptors' edges: [hdr] [data..., status].
    fx.header(HDR, VIRTIO_BLK_T_IN, 3);
    assert!(fx.submit(&[r(HDR, 16), w(DATA, 513)]));
    assert_eq!(fx.bytes(DATA, 512), fx.image[1536..2048]);
    assert_eq!(fx.bytes(DATA + 512, 1), [S_OK]);
    assert_eq!(fx.last_used().1, 513);

    // An IN whose header descriptor also carries readable bytes: direction mismatch.
    let chain = [r(HDR, 16 + 512), w(STATUS, 1)];
    assert_eq!(fx.request(VIRTIO_BLK_T_IN, 0, &chain), (S_IOERR, 1));
}

#[test]
fn write_fails_on_read_only_device() {
    let mut fx = Fixture::new(4);
    fx.mem
        .write_slice(&[0x55; 512], GuestAddress(DATA))
        .expect("data");
    let chain = [r(HDR, 16), r(DATA, 512), w(STATUS, 1)];
    assert_eq!(fx.request(VIRTIO_BLK_T_OUT, 0, &chain), (S_IOERR, 1));
    assert_eq!(std::fs::read(fx.file.path()).expect("reread"), fx.image);
}

#[test]
fn out_of_range_reads_fail() {
    let mut fx = Fixture::new(4);
    // Straddles the end.
    fx.read_fails(3, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)], (DATA, 1024));
    // Starts past the end; overflowing sector numbers.
    let chain = [r(HDR, 16), w(DATA, 512), w(STATUS, 1)];
    for sector in [4, 5, u64::MAX, u64::MAX >> 9, (u64::MAX >> 9) + 1] {
        fx.read_fails(sector, &chain, (DATA, 512));
    }
    // The last sector itself is fine.
    assert_eq!(fx.request(VIRTIO_BLK_T_IN, 3, &chain), (S_OK, 513));
    assert_eq!(fx.bytes(DATA, 512), fx.image[1536..]);
}

#[test]
fn out_of_range_is_rejected_before_any_data_moves() {
    // One sector more than the bounce buffer: a read that straddles the end would fill
    // the first 64 KiB of the buffer before hitting end-of-file if it were not checked.
    let sectors = BOUNCE_LEN as u64 / SECTOR_SIZE + 1;
    let mut fx = Fixture::new(sectors);
    let data = 0x8_0000;
    let len = (sectors * SECTOR_SIZE) as u32;
    fx.mem
        .write_slice(&vec![POISON; len as usize], GuestAddress(data))
        .expect("poison");
    let chain = [r(HDR, 16), w(data, len), w(STATUS, 1)];
    fx.read_fails(1, &chain, (data, len as usize));
}

#[test]
fn partial_sector_and_bad_buffers_fail() {
    let mut fx = Fixture::new(4);
    fx.read_fails(0, &[r(HDR, 16), w(DATA, 100), w(STATUS, 1)], (DATA, 100));
    // A data buffer running off the end of guest memory, far outside, or wrapping the address
    // space: nothing is written.
    for addr in [MEM_SIZE - 256, 1 << 40, u64::MAX - 100] {
        let chain = [r(HDR, 16), w(DATA, 512), w(addr, 512), w(STATUS, 1)];
        fx.read_fails(0, &chain, (DATA, 512));
    }
}

#[test]
fn get_id_flush_and_unsupported() {
    let mut fx = Fixture::new(4);
    let chain = [r(HDR, 16), w(DATA, 20), w(STATUS, 1)];
    assert_eq!(fx.request(VIRTIO_BLK_T_GET_ID, 0, &chain), (S_OK, 21));
    let mut want = b"xcgi-rootfs".to_vec();
    want.resize(20, 0);
    assert_eq!(fx.bytes(DATA, 20), want);

    let chain = [r(HDR, 16), w(STATUS, 1)];
    assert_eq!(fx.request(VIRTIO_BLK_T_FLUSH, 0, &chain), (S_OK, 1));

    let chain = [r(HDR, 16), w(DATA, 512), w(STATUS, 1)];
    for kind in [VIRTIO_BLK_T_GET_ID + 1, 11, 13, u32::MAX] {
        assert_eq!(fx.request(kind, 0, &chain), (S_UNSUPP, 0), "type {kind}");
    }
}

#[test]
fn custom_id_is_truncated_to_20_bytes() {
    let image = image_file(&image_bytes(1));
    let block = Block::open(image.path())
        .expect("open")
        .with_id("a-very-long-device-identifier");
    let mem = memory();
    let mut t = MmioTransport::new(block, mem.clone(), eventfd()).expect("transport");
    let mut q = DriverQueue::new(&mem, QUEUE_BASE, 16);
    bring_up(&mut t, &[&q]);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).expect("header");
    mem.write_slice(&[POISON; 32], GuestAddress(DATA))
        .expect("poison");
    q.add_chain(&[r(HDR, 16), w(DATA, 32), w(STATUS, 1)]);
    write_reg(&mut t, QUEUE_NOTIFY, 0);
    let mut got = [0u8; 32];
    mem.read_slice(&mut got, GuestAddress(DATA)).expect("read");
    assert_eq!(&got[..20], b"a-very-long-device-i");
    assert_eq!(got[20..], [POISON; 12]);
    // Only 20 of the 32 data bytes were written, so the status byte is not counted.
    assert_eq!(q.used_elem(0).1, 20);
}

#[test]
fn malformed_chains_are_returned_without_status() {
    let mut fx = Fixture::new(4);
    fx.header(HDR, VIRTIO_BLK_T_IN, 0);
    let cases: [&[Desc]; 6] = [
        // No status descriptor at all.
        &[r(HDR, 16)],
        // Last descriptor not writable.
        &[r(HDR, 16), w(DATA, 512), r(STATUS, 1)],
        // Zero-length status descriptor.
        &[r(HDR, 16), w(DATA, 512), w(STATUS, 0)],
        // Header device-writable.
        &[w(HDR, 16), w(DATA, 512), w(STATUS, 1)],
        // Header too short.
        &[r(HDR, 8), w(DATA, 512), w(STATUS, 1)],
        // Header outside guest memory.
        &[r(1 << 40, 16), w(DATA, 512), w(STATUS, 1)],
    ];
    for (i, chain) in cases.iter().enumerate() {
        let before = fx.q.used_idx();
        assert!(fx.submit(chain), "case {i}: chain must still be returned");
        assert_eq!(fx.q.used_idx(), before.wrapping_add(1), "case {i}");
        assert_eq!(fx.last_used().1, 0, "case {i}");
        assert_eq!(fx.status(), POISON, "case {i}: no status written");
        assert!(fx.untouched(DATA, 512), "case {i}");
    }
    // Status byte outside guest memory.
    assert!(fx.submit(&[r(HDR, 16), w(DATA, 512), w(1 << 40, 1)]));
    assert_eq!(fx.last_used().1, 0);
}

#[test]
fn read_only_data_descriptor_for_in_is_rejected() {
    let mut fx = Fixture::new(4);
    let chains: [(u32, &[Desc]); 3] = [
        (VIRTIO_BLK_T_IN, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
        // Mixed directions too.
        (
            VIRTIO_BLK_T_IN,
            &[r(HDR, 16), w(DATA, 512), r(DATA + 512, 512), w(STATUS, 1)],
        ),
        // GET_ID into a read-only buffer.
        (
            VIRTIO_BLK_T_GET_ID,
            &[r(HDR, 16), r(DATA, 20), w(STATUS, 1)],
        ),
    ];
    for (i, (kind, chain)) in chains.into_iter().enumerate() {
        assert_eq!(fx.request(kind, 0, chain).0, S_IOERR, "chain {i}");
        assert!(fx.untouched(DATA, 512), "chain {i}");
    }
}

#[test]
fn hostile_rings_do_not_panic_or_hang() {
    let mut fx = Fixture::new(4);
    fx.header(HDR, VIRTIO_BLK_T_IN, 0);

    // A head index past the end of the table: nothing can be used, no interrupt.
    fx.q.publish(200);
    assert!(!fx.notify());
    assert_eq!(fx.q.used_idx(), 0);

    // A descriptor looping on itself: the chain ends after queue-size hops.
    fx.q.write_desc(0, HDR, 16, VRING_DESC_F_NEXT_U16, 1);
    fx.q.write_desc(
        1,
        DATA,
        512,
        VRING_DESC_F_NEXT_U16 | VRING_DESC_F_WRITE_U16,
        1,
    );
    fx.q.publish(0);
    assert!(fx.notify());
    assert_eq!(fx.q.used_idx(), 1);

    // A next index outside the table truncates the chain (no status): returned unserved.
    fx.q.write_desc(2, HDR, 16, VRING_DESC_F_NEXT_U16, 999);
    fx.q.publish(2);
    assert!(fx.notify());
    assert_eq!(fx.q.used_idx(), 2);
    assert_eq!(fx.last_used(), (2, 0));

    // Cut short after a writable data buffer (next index out of range): that buffer must
    // not be taken for the status byte.
    fx.q.write_desc(3, HDR, 16, VRING_DESC_F_NEXT_U16, 4);
    fx.q.write_desc(
        4,
        DATA,
        512,
        VRING_DESC_F_NEXT_U16 | VRING_DESC_F_WRITE_U16,
        999,
    );
    fx.q.publish(3);
    assert!(fx.notify());
    assert_eq!(fx.last_used(), (3, 0));
    assert!(fx.untouched(DATA, 512), "nothing written");

    // An available index far ahead of what was published: ignored.
    fx.q.set_avail_idx(fx.q.used_idx().wrapping_add(100));
    assert!(!fx.notify());
    assert_eq!(fx.q.used_idx(), 3);
}

#[test]
fn several_requests_one_notify() {
    let mut fx = Fixture::new(8);
    let mut heads = Vec::new();
    for i in 0..4u64 {
        let hdr = HDR + 16 * i;
        fx.header(hdr, VIRTIO_BLK_T_IN, 7 - i);
        heads.push(fx.q.add_chain(&[r(hdr, 16), w(DATA + 512 * i, 512), w(STATUS + i, 1)]));
    }
    assert!(fx.notify());
    assert_eq!(fx.q.used_idx(), 4);
    for i in 0..4u64 {
        let sector = (7 - i) as usize;
        assert_eq!(
            fx.q.used_elem(i as u16),
            (u32::from(heads[i as usize]), 513)
        );
        assert_eq!(fx.bytes(STATUS + i, 1), [S_OK]);
        assert_eq!(
            fx.bytes(DATA + 512 * i, 512),
            fx.image[sector * 512..(sector + 1) * 512]
        );
    }
    // A notify with nothing new: no interrupt.
    assert!(!fx.notify());
}

const VRING_DESC_F_NEXT_U16: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE_U16: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
