//! The virtio-blk device model: identity, features (read-only), the configuration space, and
//! queue dispatch (every request is served on the vCPU thread).

use std::path::Path;

use tracing::debug;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::backend::{BlockError, DiskImage};
use super::request::{Disk, Requests};
use super::{DEFAULT_DEVICE_ID, ID_LEN, QUEUE_SIZE, SECTOR_SIZE};

/// The sector size as the config space's `u32` field (512 fits).
#[allow(clippy::cast_possible_truncation)]
const SECTOR_SIZE_U32: u32 = SECTOR_SIZE as u32;
use crate::devices::virtio::queue::serve_chains;
use crate::devices::virtio::{
    ActivateError, Activation, DeviceInfo, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Feature bits the device offers.
const FEATURES: u64 = VIRTIO_F_VERSION_1
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_BLK_SIZE);
/// Configuration space we expose: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_LEN: usize = 24;

/// Read-only virtio-blk device.
pub struct Block {
    /// One request queue; the configuration space holds the capacity.
    info: DeviceInfo,
    disk: Disk,
    /// Scratch for serving requests.
    requests: Requests,
}

impl Block {
    /// Open `path` read-only. Its size must be a whole number of 512-byte sectors.
    pub fn open(path: &Path) -> Result<Block, BlockError> {
        let image = DiskImage::open(path)?;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&image.capacity().to_le_bytes());
        // size_max (8..12) stays 0: not offered. seg_max: room for header and status.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // geometry (16..20) stays 0: not offered.
        config[20..24].copy_from_slice(&SECTOR_SIZE_U32.to_le_bytes());
        Ok(Block {
            info: DeviceInfo::new(VIRTIO_ID_BLOCK, &[QUEUE_SIZE], FEATURES).with_config(&config),
            disk: Disk {
                image,
                id: id_bytes(DEFAULT_DEVICE_ID),
            },
            requests: Requests::default(),
        })
    }

    /// Set the GET_ID string (truncated to 20 bytes).
    pub fn with_id(mut self, id: &str) -> Block {
        self.disk.id = id_bytes(id);
        self
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.image.capacity()
    }
}

fn id_bytes(id: &str) -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    let n = id.len().min(ID_LEN);
    out[..n].copy_from_slice(&id.as_bytes()[..n]);
    out
}

impl VirtioDevice for Block {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// All the work is done on the vCPU thread: the worker access is not needed.
    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError> {
        activation.require_ready(&[0])?;
        debug!(path = %self.disk.image.path().display(), "virtio-blk: activated");
        Ok(())
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let (requests, disk) = (&mut self.requests, &self.disk);
        serve_chains("virtio-blk", queue, mem, |chain| {
            requests.serve(chain, mem, disk)
        })
    }

    fn reset(&mut self) {
        self.requests.clear();
    }
}
