//! Virtio devices over the virtio-mmio transport (virtio 1.1+, MMIO register layout version 2,
//! "modern" only).
//!
//! Devices: [`block`] (the root disk, all on the vCPU thread), [`net`] (a TAP; RX on a worker
//! thread) and [`console`] (the CGI channel, `/dev/hvc0` in the guest, bridged to a Unix stream
//! socket; RX on a worker thread).
//!
//! [`MmioTransport`] implements the register file and owns the virtqueues; a device model
//! implements [`VirtioDevice`] and is called back synchronously, on the vCPU thread, when the
//! driver writes QueueNotify (the block device does all its work there). It is the one
//! transport type: every device goes on the MMIO bus in one, whether it runs threads or not.
//!
//! # Layout
//!
//! Each device is a folder in the same shape: `device.rs` (the [`VirtioDevice`]
//! implementation: its [`DeviceInfo`], activation, queue dispatch, counters), the data paths
//! (`tx.rs` and `rx.rs` for net and console, `request.rs` for block), `backend.rs` (what is
//! behind the device on the host: the TAP, the Unix socket, the image file) and `tests.rs`.
//! What they share is written once, here:
//!
//! - [`mmio`]: the transport (`mmio/state.rs` the register file, `mmio/regs.rs` the offsets);
//! - `queue.rs`: taking the chains the driver published and returning them, and the loop a
//!   device runs on QueueNotify (`serve_chains`);
//! - `chain.rs`: a descriptor chain resolved to host iovecs for one system call, and the rules
//!   every such chain must follow, both directions (`IoChain`);
//! - `rx_worker.rs`: the receive worker thread of an fd-backed device (epoll on the source, the
//!   kick and stop eventfds) and the batch loop it runs under the transport lock; a device only
//!   says what a read means (`RxDevice`);
//! - `sys.rs`: the descriptor helpers (non-blocking mode, waiting for room, the thread id);
//! - `stats.rs`: counters the device and its worker bump, read as one snapshot from anywhere
//!   (`device_stats!`);
//! - `log_limit.rs`: rate limiting for every line a guest can trigger;
//! - `testing.rs` (tests only): a driver for split virtqueues, and one fixture (and the tests
//!   they share) for every device on a socket.
//!
//! A new device implements [`VirtioDevice`] in such a folder: its [`DeviceInfo`], `activate`
//! (start workers, if any, with the [`Activation`]'s access, and say where they are in
//! [`VirtioDevice::workers`]) and `process_queue` (usually `serve_chains` over one chain
//! handler); it goes on the bus in an [`MmioTransport`].
//!
//! # Devices with their own threads
//!
//! Some work does not start with a guest exit: a network frame arriving on a TAP (or bytes on the
//! console's socket) must reach the guest while every vCPU is busy elsewhere. Such a device runs
//! worker threads, and those need the virtqueues, guest memory and the interrupt, all of which
//! live in the transport. So:
//!
//! - The transport is shared: [`MmioTransport`] wraps `Arc<Mutex<TransportState<D>>>` and is
//!   what goes on the MMIO bus. Register accesses lock it; so do workers.
//! - On DRIVER_OK the transport calls [`VirtioDevice::activate`] with a [`QueueAccess`]: a weak
//!   handle on the transport (no reference cycle) tagged with the activation it belongs to. A
//!   device without workers ignores it; one with workers hands it to them. No device can end
//!   up behind a transport that cannot serve its workers: there is no other kind.
//!   [`QueueAccess::with_queue`] locks the transport, runs a closure on one queue and, when the
//!   closure says a buffer was used and the driver wants to hear about it, raises the used-buffer
//!   interrupt exactly like the synchronous path (InterruptStatus bit 0, then the irq eventfd).
//! - After a device reset, or once the transport is gone, a `QueueAccess` is *stale*:
//!   `with_queue` refuses to run, so a worker that has not noticed it was told to stop can never
//!   touch queues the driver is reconfiguring.
//! - Stopping: [`VirtioDevice::reset`] (called under the lock) and
//!   [`VirtioDevice::stop_workers`] only *tell* workers to stop; their join handles are collected
//!   with [`VirtioDevice::take_stopped_workers`] and joined by [`MmioTransport`] after it has
//!   released the lock (a stopping worker may be waiting for that very lock). A register write
//!   that resets the device therefore returns only once the device's workers have exited, and
//!   dropping the `MmioTransport` joins every worker before the device itself is dropped.
//!
//! Lock order: the VMM's device-bus lock, then a transport lock. Workers take only their
//! transport's lock and never block while holding it (their file descriptors are non-blocking).

// Numbers from the guest (indices, lengths, addresses) cross into host types here: no cast
// may silently truncate, wrap or lose a sign (tests build their fixtures freely).
#![cfg_attr(
    not(test),
    deny(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss
    )
)]

pub mod block;
mod chain;
pub mod console;
pub(crate) mod log_limit;
pub mod mmio;
pub mod net;
mod queue;
mod rx_worker;
mod stats;
mod sys;

#[cfg(test)]
pub(crate) mod testing;

use std::io;
use std::sync::{Mutex, PoisonError, Weak};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use block::{Block, BlockError};
pub use console::{ConsoleError, ConsoleStopper, VirtioConsole};
pub use mmio::{MmioError, MmioTransport, TransportState};
pub use net::{Net, NetError};
pub use queue::pending_chains;
pub use rx_worker::RxWorkers;

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
    /// A worker thread (or what it waits on) could not be set up.
    #[error("cannot start the device's worker thread: {0}")]
    Worker(#[source] io::Error),
}

/// Why [`QueueAccess::with_queue`] did not run its closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueAccessError {
    /// The transport is gone, or the device was reset (or is being dropped) since the activation
    /// this access was given for. The worker should exit.
    #[error("the device was reset or its transport is gone")]
    Stale,
    /// The queue does not exist or the driver stopped it (QueueReady = 0).
    #[error("virtqueue {0} does not exist or is not ready")]
    NotReady(usize),
}

/// What a transport offers to [`QueueAccess`]: run a closure on a queue of a given activation.
pub(crate) trait QueueHost: Send {
    /// Run `f` on queue `index` if `epoch` is the current activation and the queue is ready;
    /// raise the used-buffer interrupt if `f` returns true.
    fn with_queue_at(
        &mut self,
        epoch: u64,
        index: usize,
        f: &mut dyn FnMut(&mut Queue, &GuestMemoryMmap) -> bool,
    ) -> Result<(), QueueAccessError>;
}

/// A device worker thread's handle on its transport's virtqueues, valid for one activation.
///
/// Cheap to clone; holds only a weak reference, so it never keeps the transport alive.
#[derive(Clone)]
pub struct QueueAccess {
    host: Weak<Mutex<dyn QueueHost>>,
    epoch: u64,
}

impl QueueAccess {
    pub(crate) fn new(host: Weak<Mutex<dyn QueueHost>>, epoch: u64) -> Self {
        QueueAccess { host, epoch }
    }

    /// Lock the transport and run `f` on queue `index` with the guest's memory. If `f` returns
    /// true (it used buffers and the queue asks for a notification, see
    /// `Queue::needs_notification`), the transport raises the used-buffer interrupt.
    ///
    /// `f` runs with the transport locked: vCPUs touching this device wait meanwhile, so it must
    /// not block and should bound its work.
    pub fn with_queue<F>(&self, index: usize, f: F) -> Result<(), QueueAccessError>
    where
        F: FnOnce(&mut Queue, &GuestMemoryMmap) -> bool,
    {
        let host = self.host.upgrade().ok_or(QueueAccessError::Stale)?;
        let mut f = Some(f);
        let mut guard = host.lock().unwrap_or_else(PoisonError::into_inner);
        guard.with_queue_at(self.epoch, index, &mut |q, mem| {
            f.take().is_some_and(|f| f(q, mem))
        })
    }
}

/// A virtio device model, driven by a transport ([`MmioTransport`]).
///
/// Every method is called with the transport's lock held, from a vCPU thread (or, for the worker
/// hooks, from whoever drops the [`MmioTransport`]). Nothing here may panic on
/// guest-controlled input.
pub trait VirtioDevice: Send {
    /// What the device is, as the driver sees it.
    fn info(&self) -> &DeviceInfo;

    /// Read from the device-specific configuration space. `offset` is relative to the start of
    /// the configuration space; bytes past its end read as zero. The default serves
    /// [`DeviceInfo::config`].
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.info().config, offset, data);
    }

    /// Write to the device-specific configuration space. The default is for a read-only
    /// configuration: the write is ignored (and logged at `debug`: the driver can repeat it).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            device_type = self.info().device_type,
            offset,
            len = data.len(),
            "virtio: write to read-only config space ignored"
        );
    }

    /// The driver set DRIVER_OK: start. A device refuses with an error, which the transport
    /// reports to the driver as NEEDS_RESET.
    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError>;

    /// Process the available buffers of queue `index`, one of the device's queues (the
    /// transport checks), after the driver wrote QueueNotify. Returns whether the driver must
    /// be interrupted (a buffer was used and the ring asks for it).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;

    /// The device's own state for a debug dump (counters, workers), one line; empty when there
    /// is nothing beyond the transport's.
    fn describe(&self) -> String {
        String::new()
    }

    /// The device's worker threads, if it runs any: the default [`reset`](Self::reset),
    /// [`stop_workers`](Self::stop_workers) and
    /// [`take_stopped_workers`](Self::take_stopped_workers) tell them to stop and hand them
    /// over, which is all a device with workers needs of those three.
    fn workers(&mut self) -> Option<&mut RxWorkers> {
        None
    }

    /// The driver wrote 0 to Status: drop any state negotiated since the last reset. A device
    /// with worker threads tells them to stop here, without waiting for them (see
    /// [`take_stopped_workers`](Self::take_stopped_workers)); that is the default.
    fn reset(&mut self) {
        if let Some(workers) = self.workers() {
            workers.stop();
        }
    }

    /// The transport is going away: tell every worker thread to stop (without waiting for it).
    fn stop_workers(&mut self) {
        if let Some(workers) = self.workers() {
            workers.stop();
        }
    }

    /// Worker threads told to stop (by [`reset`](Self::reset) or
    /// [`stop_workers`](Self::stop_workers)) and not joined yet. The caller joins them after
    /// releasing the transport lock, which a stopping worker may be waiting for.
    fn take_stopped_workers(&mut self) -> Vec<JoinHandle<()>> {
        self.workers()
            .map(RxWorkers::take_stopped)
            .unwrap_or_default()
    }
}

/// What a device is, as the driver sees it: its identity and queues (fixed for the device's
/// life: the transport reads them once), the features it offers and its configuration space.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Virtio device id (`VIRTIO_ID_*`, e.g. 2 for block).
    pub device_type: u32,
    /// Maximum size of each virtqueue; the length is the number of queues. Every size must be
    /// a power of two no larger than 32768.
    pub queue_max_sizes: &'static [u16],
    /// Feature bits the device offers. Must include [`VIRTIO_F_VERSION_1`].
    pub features: u64,
    /// The device-specific configuration space, as the default
    /// [`VirtioDevice::read_config`] serves it (read-only). Empty (all zeros) unless the device
    /// has one.
    pub config: Vec<u8>,
}

impl DeviceInfo {
    /// A device of type `device_type` with `queue_max_sizes` queues, offering `features`, with
    /// an empty configuration space.
    pub const fn new(device_type: u32, queue_max_sizes: &'static [u16], features: u64) -> Self {
        DeviceInfo {
            device_type,
            queue_max_sizes,
            features,
            config: Vec::new(),
        }
    }

    /// The same with `config` as the configuration space.
    pub fn with_config(self, config: &[u8]) -> Self {
        DeviceInfo {
            config: config.to_vec(),
            ..self
        }
    }
}

/// What a device is given when the driver sets DRIVER_OK.
pub struct Activation<'a> {
    /// The features the driver accepted.
    pub features: u64,
    /// The virtqueues; the ready ones have been checked to lie in guest memory.
    pub queues: &'a [Queue],
    /// Lets the device's worker threads, if it has any, reach its virtqueues until the next
    /// reset; a device without workers ignores it.
    pub access: QueueAccess,
}

impl Activation<'_> {
    /// Refuses activation unless the driver made every queue in `indices` ready.
    pub fn require_ready(&self, indices: &[usize]) -> Result<(), ActivateError> {
        match indices
            .iter()
            .find(|&&index| !self.queues.get(index).is_some_and(|q| q.ready()))
        {
            Some(&index) => Err(ActivateError::QueueNotReady(index)),
            None => Ok(()),
        }
    }
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

/// Reads `data.len()` bytes of a device's config space at `offset`; bytes past its end (and
/// an offset that does not fit) read as zero, as the guest may probe anywhere.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
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
