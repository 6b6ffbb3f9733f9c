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
//! Files: `device.rs` (the [`VirtioDevice`](super::VirtioDevice) implementation,
//! configuration space, features), `request.rs` (parsing and serving one request),
//! `backend.rs` (the image file), `tests.rs`.
//!
//! Per-request guest errors are logged at `debug` (a hostile guest could otherwise flood the
//! log); they never panic.

mod backend;
mod device;
mod request;

#[cfg(test)]
mod tests;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

pub use backend::BlockError;
pub use device::Block;

/// Sector size of the virtio-blk protocol (independent of the advertised block size).
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;
/// Device id string returned by GET_ID unless [`Block::with_id`] sets another.
pub const DEFAULT_DEVICE_ID: &str = "xcgi-rootfs";
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of a GET_ID answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
