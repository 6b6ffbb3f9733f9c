//! One virtio-blk request: finding the header, data and status byte in a descriptor chain,
//! carrying it out against the image, and the used length to return the chain with.

use std::io;

use tracing::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions,
};

use super::backend::DiskImage;
use super::{ID_LEN, QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE};

/// Longest descriptor chain we accept.
const MAX_SEGMENTS: usize = QUEUE_SIZE as usize;
/// Bytes of the request header (`struct virtio_blk_outhdr`: type, ioprio, sector).
const HEADER_LEN: u32 = 16;
/// Bounce buffer between the image and guest memory.
pub(super) const BOUNCE_LEN: usize = 64 * 1024;

/// What requests are served from: the image and the GET_ID answer.
pub(super) struct Disk {
    pub image: DiskImage,
    pub id: [u8; ID_LEN],
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
        status_byte(status)
    }
}

/// One piece of a descriptor chain.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// A parsed request: `Requests::segments[data]` is its data.
struct Request {
    kind: u32,
    sector: u64,
    data: std::ops::Range<usize>,
    status: GuestAddress,
}

/// Scratch space for serving requests, reused from one to the next (no allocation per
/// request).
#[derive(Default)]
pub(super) struct Requests {
    /// The current chain's descriptors.
    segments: Vec<Segment>,
    /// Bounce buffer for image reads.
    bounce: Vec<u8>,
}

impl Requests {
    /// Forgets the chain being served (the device was reset).
    pub(super) fn clear(&mut self) {
        self.segments.clear();
    }

    /// Serve one chain from `disk`; returns the used length to report.
    pub(super) fn serve(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        disk: &Disk,
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
        let (status, written) = match self.execute(&request, mem, disk) {
            Ok(written) => (status_byte(VIRTIO_BLK_S_OK), written),
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
    fn execute(
        &mut self,
        req: &Request,
        mem: &GuestMemoryMmap,
        disk: &Disk,
    ) -> Result<u64, RequestError> {
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
                    capacity: disk.image.capacity(),
                };
                match req.sector.checked_add(count) {
                    Some(end) if end <= disk.image.capacity() => {}
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
                self.read_into_guest(req, offset, mem, &disk.image)?;
                Ok(total)
            }
            VIRTIO_BLK_T_OUT => Err(RequestError::ReadOnly),
            // Nothing is ever written, so there is nothing to flush.
            VIRTIO_BLK_T_FLUSH => Ok(0),
            VIRTIO_BLK_T_GET_ID => {
                if data.iter().any(|s| !s.writable) {
                    return Err(RequestError::DataDirection(req.kind));
                }
                let mut id: &[u8] = &disk.id;
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
        image: &DiskImage,
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
                image.read_exact_at(buf, offset).map_err(RequestError::Io)?;
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

/// A virtio-blk status (`VIRTIO_BLK_S_*`, all below 256) as the byte the device writes.
fn status_byte(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(VIRTIO_BLK_S_IOERR_BYTE)
}

/// `VIRTIO_BLK_S_IOERR` as a byte (the fallback of [`status_byte`]).
const VIRTIO_BLK_S_IOERR_BYTE: u8 = 1;
