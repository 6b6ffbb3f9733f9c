//! The virtio-mmio transport, register layout version 2 (virtio 1.1+ "modern" devices only).
//!
//! One transport type for every device, [`MmioTransport`]: it owns the virtqueues and the
//! device model, in a [`TransportState`] behind a mutex. Register accesses arrive synchronously
//! from a vCPU thread and lock it; a write to QueueNotify processes that queue right away and,
//! when a buffer was used, sets bit 0 of InterruptStatus and writes the irq eventfd (which the
//! VMM registers as a KVM irqfd for the device's GSI).
//!
//! A device with worker threads (virtio-net's and virtio-console's RX) needs nothing else: on
//! activation every device gets a [`QueueAccess`](super::QueueAccess), through which its
//! workers reach the queues ([`TransportState::with_queue`], which raises the interrupt the
//! same way); a device without workers (virtio-blk) ignores it. There is no second transport
//! to put a device in by mistake. See the [module docs](super) for the threading model.
//!
//! The common registers (below 0x100) accept 4-byte accesses only; any other size reads as zero
//! and is ignored on write, as are unknown offsets and read-only registers. The device
//! configuration space (0x100 and up) accepts any size.
//!
//! The driver is untrusted: every warning it can provoke (a register written out of order, a
//! bad queue size, a notify for a queue that does not exist, a failed activation...) goes
//! through the transport's `LogLimiter`, so a guest looping on a bad register write gets a
//! few lines per window into the host's log, not one per exit; rarer or uninteresting misuse is
//! logged at `debug`.

pub mod regs;
mod state;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;

use tracing::error;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{QueueHost, VirtioDevice};
use crate::devices::MmioDevice;

pub use regs::CONFIG_SPACE_OFFSET;
pub use state::TransportState;

/// "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version: 2 is the virtio 1.0+ ("modern") layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id: "xcgi" in little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"xcgi");
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device model declared a queue size `virtio_queue` rejects.
    #[error("virtqueue {index}: invalid maximum size {size}: {source}")]
    InvalidQueueSize {
        /// The queue's index.
        index: usize,
        /// The maximum size the device declared.
        size: u16,
        /// virtio-queue's error.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device model does not offer VIRTIO_F_VERSION_1; this transport is modern-only.
    #[error("device type {0} does not offer VIRTIO_F_VERSION_1")]
    NotModern(u32),
}

/// A virtio device on the MMIO bus: the virtio-mmio transport, shared between vCPU threads
/// (through the MMIO bus, where this goes) and the device's worker threads (through
/// [`QueueAccess`](super::QueueAccess)).
///
/// Not `Clone`: this is the owner. Dropping it stops and joins the device's workers, then drops
/// the transport and the device. Workers only hold weak references.
pub struct MmioTransport<D: VirtioDevice + 'static> {
    inner: Arc<Mutex<TransportState<D>>>,
}

impl<D: VirtioDevice + 'static> MmioTransport<D> {
    /// Wrap `device`. `mem` is the guest's memory (a cheap clone: the regions are shared);
    /// `irq` is written whenever the device interrupts the driver and must be registered by the
    /// VMM as a KVM irqfd for the device's GSI. On activation the device gets a
    /// [`QueueAccess`](super::QueueAccess) for its workers.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: EventFd) -> Result<Self, MmioError> {
        let queues = state::new_queues(&device)?;
        let inner = Arc::new_cyclic(|weak: &Weak<Mutex<TransportState<D>>>| {
            let host: Weak<Mutex<dyn QueueHost>> = weak.clone();
            Mutex::new(TransportState::new(device, mem, irq, queues, host))
        });
        Ok(MmioTransport { inner })
    }

    /// Lock the transport (to inspect the device or its counters). A worker that panicked
    /// while holding the lock does not make the transport unusable.
    pub fn lock(&self) -> MutexGuard<'_, TransportState<D>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn join(device_type: u32, workers: Vec<JoinHandle<()>>) {
        for worker in workers {
            let name = worker.thread().name().unwrap_or("?").to_owned();
            if worker.join().is_err() {
                error!(device_type, worker = %name, "virtio-mmio: device worker panicked");
            }
        }
    }
}

impl<D: VirtioDevice + 'static> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.lock().read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (device_type, stopped) = {
            let mut t = self.lock();
            t.write(offset, data);
            t.take_stopped_workers()
        };
        // Outside the lock: a stopping worker may be waiting for it.
        Self::join(device_type, stopped);
    }

    fn describe(&self) -> Option<String> {
        // A worker may hold the lock for a batch: wait a little, never forever.
        for _ in 0..100 {
            match self.inner.try_lock() {
                Ok(t) => return Some(t.describe()),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    return Some(p.into_inner().describe())
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
            }
        }
        Some("virtio-mmio: busy (its lock was held for 100 ms)".into())
    }

    fn keeps_state(&self) -> bool {
        true
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        Some(self.lock().save())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.lock().restore(bytes)
    }
}

impl<D: VirtioDevice + 'static> Drop for MmioTransport<D> {
    fn drop(&mut self) {
        let (device_type, workers) = self.lock().shut_down();
        Self::join(device_type, workers);
        // Now no worker holds a reference: `inner` is the last one, and the transport and the
        // device are dropped on this thread.
    }
}
