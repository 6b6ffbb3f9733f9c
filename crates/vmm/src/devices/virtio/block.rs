//! A read-only virtio-blk device backed by a disk image file.
//!
//! One request queue. Requests are served synchronously with positional reads (`pread`) from the
//! image, copied into guest memory through a bounce buffer. Supported requests: IN (read),
//! FLUSH (a no-op: nothing is ever written) and GET_ID; OUT fails with IOERR (the device is
//! read-only and offers VIRTIO_BLK_F_RO), anything else gets UNSUPP.
//!
//! Request layout: the first descriptor is device-readable and starts with the 16-byte request
//! header (it may carry data after it); the last byte of the last descriptor, which must be
//! device-writable, is the status byte (that descriptor may carry data before it); everything in
//! between is data, whose direction must match the request. A chain that has no usable header
//! or status byte is returned to the driver with a used length of 0 and no status written.
//!
//! Per-request guest errors are logged at `debug` (a hostile guest could otherwise flood the
//! log); they never panic.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions,
};

use super::queue::serve_chains;
use super::{ActivateError, QueueAccess, VirtioDevice, VIRTIO_F_VERSION_1};

/// Sector size of the virtio-blk protocol (independent of the advertised block size).
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;
/// Device id string returned by GET_ID unless [`Block::with_id`] sets another.
pub const DEFAULT_DEVICE_ID: &str = "xcgi-rootfs";
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Longest descriptor chain we accept.
const MAX_SEGMENTS: usize = QUEUE_SIZE as usize;
/// Bytes of the request header (`struct virtio_blk_outhdr`: type, ioprio, sector).
const HEADER_LEN: u32 = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bounce buffer between the image and guest memory.
const BOUNCE_LEN: usize = 64 * 1024;
/// Configuration space we expose: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_LEN: usize = 24;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of the {SECTOR_SIZE}-byte sector")]
    UnalignedSize { path: PathBuf, size: u64 },
}

/// Why a request could not be served. Only logged; the guest sees a status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    // The chain is unusable: no status can be written.
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error("request header descriptor is device-writable")]
    HeaderNotReadable,
    #[error("request header descriptor is {0} bytes, need {HEADER_LEN}")]
    HeaderTooShort(u32),
    #[error("cannot read the request header: {0}")]
    HeaderRead(#[source] GuestMemoryError),
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    // The request is answered with a status.
    #[error("data descriptor direction does not match request type {0}")]
    DataDirection(u32),
    #[error("data length {0} is not a multiple of the sector size")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} beyond capacity {capacity}")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("data buffer at {addr:#x}+{len} is outside guest memory")]
    BadBuffer { addr: u64, len: u32 },
    #[error("guest memory: {0}")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("reading the disk image: {0}")]
    Io(#[source] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        let status = match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }
}

/// One piece of a descriptor chain.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// A parsed request: `Block::segments[data]` is its data.
struct Request {
    kind: u32,
    sector: u64,
    data: std::ops::Range<usize>,
    status: GuestAddress,
}

/// Read-only virtio-blk device.
pub struct Block {
    file: File,
    path: PathBuf,
    capacity: u64,
    id: [u8; ID_LEN],
    config: [u8; CONFIG_LEN],
    /// Scratch: the current chain's descriptors (reused to avoid an allocation per request).
    segments: Vec<Segment>,
    /// Scratch: bounce buffer for image reads.
    bounce: Vec<u8>,
}

impl Block {
    /// Open `path` read-only. Its size must be a whole number of 512-byte sectors.
    pub fn open(path: &Path) -> Result<Block, BlockError> {
        let mut file = File::open(path).map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
        // Seeking to the end works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize {
                path: path.to_owned(),
                size,
            });
        }
        let capacity = size >> SECTOR_SHIFT;

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (8..12) stays 0: not offered. seg_max: room for header and status.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // geometry (16..20) stays 0: not offered.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());

        debug!(path = %path.display(), capacity, "virtio-blk: opened disk image");
        Ok(Block {
            file,
            path: path.to_owned(),
            capacity,
            id: id_bytes(DEFAULT_DEVICE_ID),
            config,
            segments: Vec::new(),
            bounce: Vec::new(),
        })
    }

    /// Set the GET_ID string (truncated to 20 bytes).
    pub fn with_id(mut self, id: &str) -> Block {
        self.id = id_bytes(id);
        self
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Serve one chain; returns the used length to report.
    fn process_chain(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> u32 {
        let head = chain.head_index();
        self.segments.clear();
        // virtio-queue bounds a chain by the size of its table (and breaks loops that way); we
        // do not offer indirect descriptors, so nothing legitimate is longer than our queue.
        // The iterator also ends early, silently, at a `next` index outside the table: a chain
        // whose last descriptor still says NEXT is broken, and its "last" byte is not the status.
        let mut broken = false;
        self.segments.extend(chain.take(MAX_SEGMENTS + 1).map(|d| {
            broken = d.has_next();
            Segment {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            }
        }));
        if broken && self.segments.len() <= MAX_SEGMENTS {
            debug!(
                head,
                "virtio-blk: broken descriptor chain (next index out of range); returned unserved"
            );
            return 0;
        }
        if self.segments.len() > MAX_SEGMENTS {
            debug!(
                head,
                "virtio-blk: descriptor chain too long; returned unserved"
            );
            return 0;
        }

        let request = match self.parse(mem) {
            Ok(r) => r,
            Err(e) => {
                debug!(head, error = %e, "virtio-blk: malformed request; returned unserved");
                return 0;
            }
        };

        let writable_data: u64 = self.segments[request.data.clone()]
            .iter()
            .filter(|s| s.writable)
            .map(|s| u64::from(s.len))
            .sum();
        let (status, written) = match self.execute(&request, mem) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                debug!(
                    head,
                    kind = request.kind,
                    sector = request.sector,
                    error = %e,
                    "virtio-blk: request failed"
                );
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(status, request.status) {
            debug!(head, error = %e, "virtio-blk: cannot write the status byte");
            return 0;
        }
        // The used length counts the bytes written from the start of the device-writable part;
        // the status byte only counts when everything before it was written too.
        let used = if written == writable_data {
            written + 1
        } else {
            written
        };
        u32::try_from(used).unwrap_or(0)
    }

    /// Find the header, data and status byte in `self.segments` (trimming the first and last
    /// segments to their data parts).
    fn parse(&mut self, mem: &GuestMemoryMmap) -> Result<Request, RequestError> {
        let n = self.segments.len();
        let first = *self.segments.first().ok_or(RequestError::EmptyChain)?;
        if first.writable {
            return Err(RequestError::HeaderNotReadable);
        }
        if first.len < HEADER_LEN {
            return Err(RequestError::HeaderTooShort(first.len));
        }
        let last = self.segments[n - 1];
        if n < 2 || !last.writable || last.len == 0 {
            return Err(RequestError::NoStatus);
        }
        let status = last
            .addr
            .checked_add(u64::from(last.len - 1))
            .ok_or(RequestError::NoStatus)?;

        let mut header = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut header, first.addr)
            .map_err(RequestError::HeaderRead)?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);

        let mut data = 1..n - 1;
        if first.len > HEADER_LEN {
            // Data right after the header, in the same descriptor.
            let addr = first
                .addr
                .checked_add(u64::from(HEADER_LEN))
                .ok_or(RequestError::HeaderTooShort(first.len))?;
            self.segments[0] = Segment {
                addr,
                len: first.len - HEADER_LEN,
                writable: false,
            };
            data.start = 0;
        }
        if last.len > 1 {
            // Data right before the status byte, in the same descriptor.
            self.segments[n - 1].len = last.len - 1;
            data.end = n;
        }
        Ok(Request {
            kind,
            sector,
            data,
            status,
        })
    }

    /// Carry out a parsed request; returns the number of data bytes written to the guest.
    fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Result<u64, RequestError> {
        let data = &self.segments[req.data.clone()];
        match req.kind {
            VIRTIO_BLK_T_IN => {
                if data.iter().any(|s| !s.writable) {
                    return Err(RequestError::DataDirection(req.kind));
                }
                let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
                if !total.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::UnalignedLength(total));
                }
                let count = total >> SECTOR_SHIFT;
                let out_of_range = RequestError::OutOfRange {
                    sector: req.sector,
                    count,
                    capacity: self.capacity,
                };
                match req.sector.checked_add(count) {
                    Some(end) if end <= self.capacity => {}
                    _ => return Err(out_of_range),
                }
                // Cannot overflow: sector <= capacity = image size / 512.
                let offset = req.sector << SECTOR_SHIFT;
                // Check every buffer before reading anything, so a bad one fails cleanly.
                if let Some(bad) = data
                    .iter()
                    .find(|s| !mem.check_range(s.addr, s.len as usize, Permissions::Write))
                {
                    return Err(RequestError::BadBuffer {
                        addr: bad.addr.0,
                        len: bad.len,
                    });
                }
                self.read_into_guest(req, offset, mem)?;
                Ok(total)
            }
            VIRTIO_BLK_T_OUT => Err(RequestError::ReadOnly),
            // Nothing is ever written, so there is nothing to flush.
            VIRTIO_BLK_T_FLUSH => Ok(0),
            VIRTIO_BLK_T_GET_ID => {
                if data.iter().any(|s| !s.writable) {
                    return Err(RequestError::DataDirection(req.kind));
                }
                let mut id: &[u8] = &self.id;
                let mut written = 0u64;
                for seg in data {
                    if id.is_empty() {
                        break;
                    }
                    let n = id.len().min(seg.len as usize);
                    mem.write_slice(&id[..n], seg.addr)
                        .map_err(RequestError::GuestMemory)?;
                    id = &id[n..];
                    written += n as u64;
                }
                Ok(written)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Copy the image, from byte `offset`, into the request's data buffers.
    fn read_into_guest(
        &mut self,
        req: &Request,
        mut offset: u64,
        mem: &GuestMemoryMmap,
    ) -> Result<(), RequestError> {
        if self.bounce.len() < BOUNCE_LEN {
            self.bounce.resize(BOUNCE_LEN, 0);
        }
        for seg in &self.segments[req.data.clone()] {
            let mut addr = seg.addr;
            let mut left = seg.len as usize;
            while left > 0 {
                let n = left.min(BOUNCE_LEN);
                let buf = &mut self.bounce[..n];
                self.file
                    .read_exact_at(buf, offset)
                    .map_err(RequestError::Io)?;
                mem.write_slice(buf, addr)
                    .map_err(RequestError::GuestMemory)?;
                left -= n;
                offset += n as u64;
                // In range: check_range covered [seg.addr, seg.addr + seg.len).
                addr = GuestAddress(addr.0 + n as u64);
            }
        }
        Ok(())
    }
}

fn id_bytes(id: &str) -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    let n = id.len().min(ID_LEN);
    out[..n].copy_from_slice(&id.as_bytes()[..n]);
    out
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | (1 << VIRTIO_BLK_F_RO)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "virtio-blk: write to read-only config space ignored"
        );
    }

    /// All the work is done on the vCPU thread: `access` is not needed.
    fn activate(
        &mut self,
        _acked_features: u64,
        queues: &[Queue],
        _access: QueueAccess,
    ) -> Result<(), ActivateError> {
        if !queues.first().is_some_and(|q| q.ready()) {
            return Err(ActivateError::QueueNotReady(0));
        }
        debug!(path = %self.path.display(), "virtio-blk: activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if index != 0 {
            // The transport only notifies queues that exist (and rate-limits its warning about
            // the others).
            debug!(index, "virtio-blk: notify for a queue that does not exist");
            return false;
        }
        serve_chains("virtio-blk", queue, mem, |chain| {
            self.process_chain(chain, mem)
        })
    }

    fn reset(&mut self) {
        self.segments.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::devices::virtio::testing::{
        bring_up, eventfd, memory, r, read_reg, w, write_reg, Desc, DriverQueue, BUF_BASE,
        MEM_SIZE, QUEUE_BASE,
    };
    use crate::devices::virtio::MmioTransport;
    use crate::devices::MmioDevice;

    const HDR: u64 = BUF_BASE;
    const DATA: u64 = BUF_BASE + 0x1000;
    const STATUS: u64 = BUF_BASE + 0x10000;
    const QUEUE_NOTIFY: u64 = 0x50;
    const INTERRUPT_STATUS: u64 = 0x60;
    const POISON: u8 = 0xee;

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
        assert_eq!(read_reg(t, 0x08), VIRTIO_ID_BLOCK);
        write_reg(t, 0x14, 0);
        let low = read_reg(t, 0x10);
        assert_ne!(low & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(low & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        write_reg(t, 0x14, 1);
        assert_eq!(read_reg(t, 0x10), 1); // VERSION_1
        assert_eq!(
            t.lock().acked_features() & (1 << VIRTIO_BLK_F_RO),
            1 << VIRTIO_BLK_F_RO
        );
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
        assert_eq!(read_reg(t, 0x34), u32::from(QUEUE_SIZE));
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
        fx.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert!(fx.submit(&[r(HDR, 16 + 512), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
    }

    #[test]
    fn write_fails_on_read_only_device() {
        let mut fx = Fixture::new(4);
        fx.header(HDR, VIRTIO_BLK_T_OUT, 0);
        fx.mem
            .write_slice(&[0x55; 512], GuestAddress(DATA))
            .expect("data");
        assert!(fx.submit(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.last_used().1, 1);
        assert_eq!(std::fs::read(fx.file.path()).expect("reread"), fx.image);
    }

    #[test]
    fn out_of_range_reads_fail() {
        let mut fx = Fixture::new(4);
        // Straddles the end.
        fx.header(HDR, VIRTIO_BLK_T_IN, 3);
        assert!(fx.submit(&[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.last_used().1, 0);
        assert_eq!(fx.bytes(DATA, 1024), vec![POISON; 1024]);
        // Starts past the end; overflowing sector numbers.
        for sector in [4, 5, u64::MAX, u64::MAX >> 9, (u64::MAX >> 9) + 1] {
            fx.mem
                .write_obj(POISON, GuestAddress(STATUS))
                .expect("reset status");
            fx.header(HDR, VIRTIO_BLK_T_IN, sector);
            assert!(fx.submit(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]));
            assert_eq!(fx.status(), S_IOERR, "sector {sector}");
        }
        assert_eq!(fx.bytes(DATA, 512), vec![POISON; 512]);
        // The last sector itself is fine.
        fx.header(HDR, VIRTIO_BLK_T_IN, 3);
        assert!(fx.submit(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_OK);
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
        fx.header(HDR, VIRTIO_BLK_T_IN, 1);
        assert!(fx.submit(&[r(HDR, 16), w(data, len), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.bytes(data, len as usize), vec![POISON; len as usize]);
    }

    #[test]
    fn partial_sector_and_bad_buffers_fail() {
        let mut fx = Fixture::new(4);
        fx.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert!(fx.submit(&[r(HDR, 16), w(DATA, 100), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.bytes(DATA, 100), vec![POISON; 100]);

        // A data buffer running off the end of guest memory: nothing is written.
        fx.mem
            .write_obj(POISON, GuestAddress(STATUS))
            .expect("reset status");
        assert!(fx.submit(&[
            r(HDR, 16),
            w(DATA, 512),
            w(MEM_SIZE - 256, 512),
            w(STATUS, 1)
        ]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.bytes(DATA, 512), vec![POISON; 512]);
        // Far outside, and wrapping the address space.
        for addr in [1 << 40, u64::MAX - 100] {
            fx.mem
                .write_obj(POISON, GuestAddress(STATUS))
                .expect("reset status");
            assert!(fx.submit(&[r(HDR, 16), w(addr, 512), w(STATUS, 1)]));
            assert_eq!(fx.status(), S_IOERR);
        }
    }

    #[test]
    fn get_id_flush_and_unsupported() {
        let mut fx = Fixture::new(4);
        fx.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        assert!(fx.submit(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_OK);
        assert_eq!(fx.last_used().1, 21);
        let mut want = b"xcgi-rootfs".to_vec();
        want.resize(20, 0);
        assert_eq!(fx.bytes(DATA, 20), want);

        fx.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        fx.mem
            .write_obj(POISON, GuestAddress(STATUS))
            .expect("reset status");
        assert!(fx.submit(&[r(HDR, 16), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_OK);
        assert_eq!(fx.last_used().1, 1);

        for kind in [VIRTIO_BLK_T_GET_ID + 1, 11, 13, u32::MAX] {
            fx.header(HDR, kind, 0);
            fx.mem
                .write_obj(POISON, GuestAddress(STATUS))
                .expect("reset status");
            assert!(fx.submit(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]));
            assert_eq!(fx.status(), S_UNSUPP, "type {kind}");
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
            assert_eq!(fx.bytes(DATA, 512), vec![POISON; 512], "case {i}");
        }
        // Status byte outside guest memory.
        assert!(fx.submit(&[r(HDR, 16), w(DATA, 512), w(1 << 40, 1)]));
        assert_eq!(fx.last_used().1, 0);
    }

    #[test]
    fn read_only_data_descriptor_for_in_is_rejected() {
        let mut fx = Fixture::new(4);
        fx.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert!(fx.submit(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.bytes(DATA, 512), vec![POISON; 512]);
        // Mixed directions too.
        fx.mem
            .write_obj(POISON, GuestAddress(STATUS))
            .expect("reset status");
        assert!(fx.submit(&[r(HDR, 16), w(DATA, 512), r(DATA + 512, 512), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.bytes(DATA, 512), vec![POISON; 512]);
        // GET_ID into a read-only buffer.
        fx.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
        fx.mem
            .write_obj(POISON, GuestAddress(STATUS))
            .expect("reset status");
        assert!(fx.submit(&[r(HDR, 16), r(DATA, 20), w(STATUS, 1)]));
        assert_eq!(fx.status(), S_IOERR);
        assert_eq!(fx.bytes(DATA, 20), vec![POISON; 20]);
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
        assert_eq!(fx.bytes(DATA, 512), vec![POISON; 512], "nothing written");

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
}
