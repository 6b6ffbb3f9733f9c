//! Virtio devices over the virtio-mmio transport (virtio 1.1+, MMIO register layout version 2,
//! "modern" only).
//!
//! [`MmioTransport`] implements the register file and owns the virtqueues; a device model
//! implements [`VirtioDevice`] and is called back synchronously, on the vCPU thread, when the
//! driver writes QueueNotify. There is no I/O thread.

pub mod block;
pub mod mmio;

#[cfg(test)]
pub(crate) mod testing;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub use block::{Block, BlockError};
pub use mmio::{MmioError, MmioTransport};

/// Feature bit every device offers and every driver must accept: we are "modern" only.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why a device refused to start when the driver set DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device cannot work without was not made ready by the driver.
    #[error("virtqueue {0} is required but was not set up by the driver")]
    QueueNotReady(usize),
    /// The queue's rings do not lie in guest memory.
    #[error("virtqueue {0} has rings outside guest memory")]
    InvalidQueue(usize),
}

/// A virtio device model, driven by a transport ([`MmioTransport`]).
///
/// Every method is called with the transport's lock held (`&mut self` on the MMIO bus), from a
/// vCPU thread. Nothing here may panic on guest-controlled input.
pub trait VirtioDevice: Send {
    /// Virtio device id (`VIRTIO_ID_*`, e.g. 2 for block).
    fn device_type(&self) -> u32;

    /// Maximum size of each virtqueue; the length is the number of queues. Every size must be a
    /// power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers. Must include [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;

    /// Read from the device-specific configuration space. `offset` is relative to the start of
    /// the configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write to the device-specific configuration space. Devices with a read-only configuration
    /// ignore this.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK after negotiating `acked_features`. The ready queues have already
    /// been checked to lie in guest memory.
    fn activate(&mut self, acked_features: u64, queues: &[Queue]) -> Result<(), ActivateError>;

    /// Process the available buffers of queue `index` (the driver wrote QueueNotify). Returns
    /// whether the driver must be interrupted (a buffer was used and the ring asks for it).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;

    /// The driver wrote 0 to Status: drop any state negotiated since the last reset.
    fn reset(&mut self);
}

/// Kernel command-line parameter that declares one virtio-mmio device to Linux
/// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), e.g. `virtio_mmio.device=4K@0xd0000000:5`.
pub fn cmdline_param(base: u64, size: u64, irq: u32) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    let size = match size {
        0 => "0".to_string(),
        s if s.is_multiple_of(GIB) => format!("{}G", s / GIB),
        s if s.is_multiple_of(MIB) => format!("{}M", s / MIB),
        s if s.is_multiple_of(KIB) => format!("{}K", s / KIB),
        s => s.to_string(),
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_param_formats_like_linux_expects() {
        assert_eq!(
            cmdline_param(0xd000_0000, 0x1000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            cmdline_param(0xd000_1000, 0x1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(
            cmdline_param(0x1_0000_0000, 2 << 20, 12),
            "virtio_mmio.device=2M@0x100000000:12"
        );
        assert_eq!(
            cmdline_param(0x1000, 0x200, 7),
            "virtio_mmio.device=512@0x1000:7"
        );
    }
}
