//! The virtio-mmio transport, register layout version 2 (virtio 1.1+ "modern" devices only).
//!
//! One transport type for every device, [`MmioTransport`]: it owns the virtqueues and the
//! device model, in a [`TransportState`] behind a mutex. Register accesses arrive synchronously
//! from a vCPU thread and lock it; a write to QueueNotify processes that queue right away and,
//! when a buffer was used, sets bit 0 of InterruptStatus and writes the irq eventfd (which the
//! VMM registers as a KVM irqfd for the device's GSI).
//!
//! A device with worker threads (virtio-net's and virtio-console's RX) needs nothing else: on
//! activation every device gets a [`QueueAccess`], through which its workers reach the queues
//! ([`TransportState::with_queue`], which raises the interrupt the same way); a device without
//! workers (virtio-blk) ignores it. There is no second transport to put a device in by mistake.
//! See the [module docs](super) for the threading model.
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

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;

use tracing::{debug, error};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::log_limit::{limited, LogLimiter};
use super::{QueueAccess, QueueAccessError, QueueHost, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::MmioDevice;

/// "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version: 2 is the virtio 1.0+ ("modern") layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id: "xcgi" in little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"xcgi");
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

// Register offsets (virtio 1.2, 4.2.2). The bindings define these as u32; the bus hands us u64.
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const SHM_BASE_LOW: u64 = 0x0b8;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

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
        index: usize,
        size: u16,
        #[source]
        source: virtio_queue::Error,
    },
    /// The device model does not offer VIRTIO_F_VERSION_1; this transport is modern-only.
    #[error("device type {0} does not offer VIRTIO_F_VERSION_1")]
    NotModern(u32),
}

/// A virtio device behind a virtio-mmio register window: the state behind an [`MmioTransport`]'s
/// lock, reached through [`MmioTransport::lock`].
pub struct TransportState<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    /// What [`QueueAccess`] handles point to: this state's own mutex.
    host: Weak<Mutex<dyn QueueHost>>,
    /// Bumped on every activation, reset and shutdown: a [`QueueAccess`] is only good for the
    /// epoch it was handed out in.
    epoch: u64,
    /// Every warning the driver can provoke goes through this.
    log: LogLimiter,
}

impl<D: VirtioDevice> TransportState<D> {
    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The eventfd written on every interrupt (to register as a KVM irqfd).
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.irq
    }

    /// The device status register, as the driver last left it (plus NEEDS_RESET if the device
    /// failed to activate).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver set DRIVER_OK and the device accepted it.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// The virtqueues, as configured by the driver.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Run `f` on queue `index` with the guest's memory, if the device is live (activated, not
    /// NEEDS_RESET) and the queue is ready; returns whether `f` ran. If `f` returns true (it used
    /// buffers and `Queue::needs_notification` says so), raise the used-buffer interrupt, exactly
    /// as after a QueueNotify.
    ///
    /// This is how work that does not start with a guest exit (a device's worker thread, through
    /// [`QueueAccess`]) completes buffers.
    pub fn with_queue(
        &mut self,
        index: usize,
        f: impl FnOnce(&mut Queue, &GuestMemoryMmap) -> bool,
    ) -> bool {
        if !self.activated || self.status & S_NEEDS_RESET != 0 {
            return false;
        }
        let Some(queue) = self.queues.get_mut(index).filter(|q| q.ready()) else {
            return false;
        };
        if f(queue, &self.mem) {
            self.raise_interrupt(VIRTIO_MMIO_INT_VRING);
        }
        true
    }

    /// Tell the driver the device configuration space changed: bump ConfigGeneration and raise
    /// the configuration-change interrupt.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise_interrupt(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.irq.write(1) {
            // Once broken, broken for every interrupt the driver asks for.
            limited!(
                self.log,
                error,
                device_type = self.device.device_type(),
                error = %e,
                "virtio-mmio: failed to signal the irq eventfd"
            );
        }
    }

    fn reset(&mut self) {
        debug!(
            device_type = self.device.device_type(),
            "virtio-mmio: device reset"
        );
        // Outstanding QueueAccess handles go stale before the device even hears of the reset.
        self.epoch = self.epoch.wrapping_add(1);
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.activated = false;
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    /// Run `f` on the selected queue if the driver may configure queues now: after FEATURES_OK,
    /// before DRIVER_OK, not failed, and only while the queue is not ready. `f` gets the log
    /// limiter for its own complaints.
    fn configure_queue(&mut self, what: &str, f: impl FnOnce(&mut Queue, &mut LogLimiter)) {
        let phase = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK;
        let mask = phase | S_DRIVER_OK | S_FAILED | S_NEEDS_RESET;
        if self.status & mask != phase {
            limited!(
                self.log,
                warn,
                status = self.status,
                register = what,
                "virtio-mmio: queue configured outside the FEATURES_OK phase; ignored"
            );
            return;
        }
        let sel = self.queue_sel;
        match usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        {
            Some(q) if q.ready() => limited!(
                self.log,
                warn,
                queue = sel,
                register = what,
                "virtio-mmio: queue configured while ready; ignored"
            ),
            Some(q) => f(q, &mut self.log),
            None => limited!(
                self.log,
                warn,
                queue = sel,
                register = what,
                "virtio-mmio: no such queue; write ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let mask = S_DRIVER | S_FEATURES_OK | S_FAILED;
        if self.status & mask != S_DRIVER {
            limited!(
                self.log,
                warn,
                status = self.status,
                "virtio-mmio: DriverFeatures written outside feature negotiation; ignored"
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel => debug!(
                sel,
                value, "virtio-mmio: DriverFeatures page out of range; ignored"
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // NEEDS_RESET is the device's to set; keep it whatever the driver writes.
        let mut new = (value & !S_NEEDS_RESET) | (old & S_NEEDS_RESET);
        if new & old != old {
            limited!(
                self.log,
                warn,
                old,
                new = value,
                "virtio-mmio: driver cleared status bits without a reset; ignored"
            );
            return;
        }
        let added = new & !old;
        if added & S_FAILED != 0 {
            limited!(
                self.log,
                warn,
                device_type = self.device.device_type(),
                "virtio-mmio: driver gave up on the device (FAILED)"
            );
        }
        if added & S_DRIVER != 0 && new & S_ACKNOWLEDGE == 0 {
            limited!(
                self.log,
                warn,
                "virtio-mmio: DRIVER set before ACKNOWLEDGE; ignored"
            );
            new &= !S_DRIVER;
        }
        if added & S_FEATURES_OK != 0 && !self.features_acceptable(new) {
            // Leaving FEATURES_OK clear tells the driver the subset is not supported.
            new &= !S_FEATURES_OK;
        }
        if added & S_DRIVER_OK != 0 {
            if new & S_FEATURES_OK == 0 || new & (S_FAILED | S_NEEDS_RESET) != 0 {
                limited!(
                    self.log,
                    warn,
                    status = new,
                    "virtio-mmio: DRIVER_OK set out of order; ignored"
                );
                new &= !S_DRIVER_OK;
            } else {
                self.status = new;
                self.activate();
                return;
            }
        }
        self.status = new;
    }

    fn features_acceptable(&mut self, status: u32) -> bool {
        let offered = self.device.device_features();
        if status & S_DRIVER == 0 {
            limited!(self.log, warn, "virtio-mmio: FEATURES_OK set before DRIVER");
            false
        } else if self.driver_features & !offered != 0 {
            limited!(
                self.log,
                warn,
                acked = self.driver_features,
                offered,
                "virtio-mmio: driver accepted features the device does not offer"
            );
            false
        } else if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            limited!(
                self.log,
                warn,
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy driver?)"
            );
            false
        } else {
            true
        }
    }

    /// Called with DRIVER_OK just set in `self.status`.
    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let result = match self
            .queues
            .iter()
            .position(|q| q.ready() && !rings_in_memory(q, &self.mem))
        {
            Some(index) => Err(super::ActivateError::InvalidQueue(index)),
            None => {
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
                self.epoch = self.epoch.wrapping_add(1);
                let access = QueueAccess::new(self.host.clone(), self.epoch);
                self.device
                    .activate(self.driver_features, &self.queues, access)
            }
        };
        match result {
            Ok(()) => {
                debug!(
                    device_type = self.device.device_type(),
                    features = self.driver_features,
                    "virtio-mmio: device activated"
                );
                self.activated = true;
            }
            Err(e) => {
                // A driver can fail activation at will (rings outside memory), over and over.
                limited!(
                    self.log,
                    error,
                    device_type = self.device.device_type(),
                    error = %e,
                    "virtio-mmio: device activation failed"
                );
                self.status |= S_NEEDS_RESET;
                self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn queue_notify(&mut self, value: u32) {
        if !self.activated || self.status & S_NEEDS_RESET != 0 {
            debug!(
                queue = value,
                "virtio-mmio: notify before the device is live; ignored"
            );
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the value is just the queue index.
        let index = value as usize;
        let Some(queue) = self.queues.get_mut(index) else {
            limited!(
                self.log,
                warn,
                queue = value,
                "virtio-mmio: notify for a queue that does not exist"
            );
            return;
        };
        if !queue.ready() {
            debug!(
                queue = value,
                "virtio-mmio: notify for a queue that is not ready"
            );
            return;
        }
        if self.device.process_queue(index, queue, &self.mem) {
            self.raise_interrupt(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// QueueDesc/QueueDriver/QueueDevice Low/High: replace one 32-bit half of a ring address.
    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let high = offset & 0x4 != 0;
        let ring = match offset & !0x4 {
            QUEUE_DESC_LOW => Ring::Desc,
            QUEUE_DRIVER_LOW => Ring::Avail,
            _ => Ring::Used,
        };
        self.configure_queue(ring.register_name(high), |q, log| {
            let old = match ring {
                Ring::Desc => q.desc_table(),
                Ring::Avail => q.avail_ring(),
                Ring::Used => q.used_ring(),
            };
            let value = u64::from(value);
            let addr = GuestAddress(if high {
                (old & 0xffff_ffff) | (value << 32)
            } else {
                (old & !0xffff_ffff) | value
            });
            let result = match ring {
                Ring::Desc => q.try_set_desc_table_address(addr),
                Ring::Avail => q.try_set_avail_ring_address(addr),
                Ring::Used => q.try_set_used_ring_address(addr),
            };
            if let Err(e) = result {
                limited!(
                    log,
                    warn,
                    address = addr.0,
                    register = ring.register_name(high),
                    error = %e,
                    "virtio-mmio: misaligned queue address; ignored"
                );
            }
        });
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => {
                let features = self.device.device_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            // No shared memory regions: a length (and base) of all ones means "none".
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!(
                    offset,
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM => self.configure_queue("QueueNum", |q, log| {
                if let Ok(size) = u16::try_from(value) {
                    if q.try_set_size(size).is_ok() {
                        return;
                    }
                }
                limited!(
                    log,
                    warn,
                    size = value,
                    "virtio-mmio: invalid queue size; ignored"
                );
            }),
            QUEUE_READY => match value {
                1 => self.configure_queue("QueueReady", |q, _| q.set_ready(true)),
                // Stopping a queue is always allowed; we simply stop processing it.
                0 => {
                    let sel = self.queue_sel;
                    if let Some(q) = usize::try_from(sel)
                        .ok()
                        .and_then(|i| self.queues.get_mut(i))
                    {
                        q.set_ready(false);
                    }
                }
                _ => limited!(
                    self.log,
                    warn,
                    value,
                    "virtio-mmio: invalid QueueReady value; ignored"
                ),
            },
            QUEUE_NOTIFY => self.queue_notify(value),
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.write_status(value),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => self.write_queue_address(offset, value),
            // We expose no shared memory regions; the selector has nothing to select.
            SHM_SEL => {}
            _ => debug!(
                offset,
                value, "virtio-mmio: write to a read-only or unknown register; ignored"
            ),
        }
    }
}

/// The transport's name in its log lines, by device type.
fn transport_name(device_type: u32) -> &'static str {
    match device_type {
        1 => "virtio-mmio (net)",
        2 => "virtio-mmio (blk)",
        3 => "virtio-mmio (console)",
        _ => "virtio-mmio",
    }
}

/// Whether the rings of `q` (at its current size) lie in guest memory. This is
/// `Queue::is_valid` for a ready queue, without its log line: virtio-queue logs every refusal
/// through the `log` crate at error level, and a driver can have activation refused at will.
fn rings_in_memory(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    // Sizes from the virtio spec (2.7): 16-byte descriptors; flags, idx, the ring and
    // used_event/avail_event around 2- and 8-byte ring elements.
    let size = u64::from(q.size());
    let rings = [
        (q.desc_table(), 16 * size, Permissions::Read),
        (q.avail_ring(), 6 + 2 * size, Permissions::Read),
        (q.used_ring(), 6 + 8 * size, Permissions::Write),
    ];
    rings.into_iter().all(|(addr, len, access)| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, access))
    })
}

#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

impl Ring {
    fn register_name(self, high: bool) -> &'static str {
        match (self, high) {
            (Ring::Desc, false) => "QueueDescLow",
            (Ring::Desc, true) => "QueueDescHigh",
            (Ring::Avail, false) => "QueueDriverLow",
            (Ring::Avail, true) => "QueueDriverHigh",
            (Ring::Used, false) => "QueueDeviceLow",
            (Ring::Used, true) => "QueueDeviceHigh",
        }
    }
}

impl<D: VirtioDevice> TransportState<D> {
    /// A register (or configuration space) read, with the lock held: what
    /// [`MmioTransport`]'s [`MmioDevice::read`] does.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non 32-bit register read; reads as 0"
            );
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    /// A register (or configuration space) write, with the lock held. Unlike
    /// [`MmioTransport`]'s [`MmioDevice::write`], it does not join workers a reset stopped:
    /// those are joined at the transport's next write, or when it is dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non 32-bit register write; ignored"
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl<D: VirtioDevice> QueueHost for TransportState<D> {
    fn with_queue_at(
        &mut self,
        epoch: u64,
        index: usize,
        f: &mut dyn FnMut(&mut Queue, &GuestMemoryMmap) -> bool,
    ) -> Result<(), QueueAccessError> {
        if epoch != self.epoch || !self.activated {
            return Err(QueueAccessError::Stale);
        }
        if self.with_queue(index, f) {
            Ok(())
        } else {
            // Live and current: the only reason left is the queue itself (or NEEDS_RESET, which
            // activation of this epoch cannot have set after the fact).
            Err(QueueAccessError::NotReady(index))
        }
    }
}

/// A virtio device on the MMIO bus: the virtio-mmio transport, shared between vCPU threads
/// (through the MMIO bus, where this goes) and the device's worker threads (through
/// [`QueueAccess`]).
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
    /// [`QueueAccess`] for its workers.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: EventFd) -> Result<Self, MmioError> {
        let device_type = device.device_type();
        if device.device_features() & VIRTIO_F_VERSION_1 == 0 {
            return Err(MmioError::NotModern(device_type));
        }
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|source| MmioError::InvalidQueueSize {
                    index,
                    size,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inner = Arc::new_cyclic(|weak: &Weak<Mutex<TransportState<D>>>| {
            let host: Weak<Mutex<dyn QueueHost>> = weak.clone();
            Mutex::new(TransportState {
                device,
                mem,
                irq,
                queues,
                queue_sel: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                status: 0,
                interrupt_status: 0,
                config_generation: 0,
                activated: false,
                host,
                epoch: 0,
                log: LogLimiter::new(transport_name(device_type)),
            })
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
            (t.device.device_type(), t.device.take_stopped_workers())
        };
        // Outside the lock: a stopping worker may be waiting for it.
        Self::join(device_type, stopped);
    }
}

impl<D: VirtioDevice + 'static> Drop for MmioTransport<D> {
    fn drop(&mut self) {
        let (device_type, workers) = {
            let mut t = self.lock();
            t.epoch = t.epoch.wrapping_add(1);
            t.device.stop_workers();
            (t.device.device_type(), t.device.take_stopped_workers())
        };
        Self::join(device_type, workers);
        // Now no worker holds a reference: `inner` is the last one, and the transport and the
        // device are dropped on this thread.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::log_limit::BURST;
    use crate::devices::virtio::testing::{
        bring_up, count_warnings, eventfd, memory, r, read_reg, w, warning_bound, write_reg,
        DriverQueue, BUF_BASE, MEM_SIZE, QUEUE_BASE,
    };
    use crate::devices::virtio::{ActivateError, QueueAccess, QueueAccessError};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const ACK: u32 = S_ACKNOWLEDGE;
    const DRV: u32 = S_ACKNOWLEDGE | S_DRIVER;
    const FOK: u32 = DRV | S_FEATURES_OK;
    const DOK: u32 = FOK | S_DRIVER_OK;
    const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 5) | (1 << 3);

    #[derive(Default)]
    struct TestDevice {
        features: u64,
        sizes: Vec<u16>,
        config: Vec<u8>,
        config_writes: Vec<(u64, Vec<u8>)>,
        activated_with: Option<u64>,
        resets: usize,
        notified: Vec<usize>,
        fail_activate: bool,
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn device_features(&self) -> u64 {
            self.features
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.config.get(o + i))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config_writes.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            acked: u64,
            _queues: &[Queue],
            _access: QueueAccess,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::QueueNotReady(0));
            }
            self.activated_with = Some(acked);
            Ok(())
        }
        fn process_queue(
            &mut self,
            index: usize,
            queue: &mut Queue,
            mem: &GuestMemoryMmap,
        ) -> bool {
            self.notified.push(index);
            let mut used = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                used |= queue.add_used(mem, chain.head_index(), 0).is_ok();
            }
            used
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn transport_on(mem: &GuestMemoryMmap) -> MmioTransport<TestDevice> {
        let dev = TestDevice {
            features: FEATURES,
            sizes: vec![16, 256],
            config: (1..=8).collect(),
            ..Default::default()
        };
        MmioTransport::new(dev, mem.clone(), eventfd()).expect("transport")
    }

    fn transport() -> MmioTransport<TestDevice> {
        transport_on(&memory())
    }

    /// The ring addresses of queue `index`: descriptor table, available and used ring.
    fn rings<D: VirtioDevice>(t: &MmioTransport<D>, index: usize) -> (u64, u64, u64) {
        let t = t.lock();
        let q = &t.queues()[index];
        (q.desc_table(), q.avail_ring(), q.used_ring())
    }

    /// Status up to FEATURES_OK with every offered feature accepted.
    fn negotiate(t: &mut MmioTransport<TestDevice>) {
        write_reg(t, STATUS, ACK);
        write_reg(t, STATUS, DRV);
        write_reg(t, DRIVER_FEATURES_SEL, 0);
        write_reg(t, DRIVER_FEATURES, FEATURES as u32);
        write_reg(t, DRIVER_FEATURES_SEL, 1);
        write_reg(t, DRIVER_FEATURES, (FEATURES >> 32) as u32);
        write_reg(t, STATUS, FOK);
        assert_eq!(read_reg(t, STATUS), FOK);
    }

    #[test]
    fn identity_registers() {
        let mut t = transport();
        assert_eq!(read_reg(&mut t, MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read_reg(&mut t, VERSION), 2);
        assert_eq!(read_reg(&mut t, DEVICE_ID), 42);
        assert_eq!(read_reg(&mut t, VENDOR), VENDOR_ID);
        assert_eq!(read_reg(&mut t, STATUS), 0);
        assert_eq!(read_reg(&mut t, CONFIG_GENERATION), 0);
        // No shared memory regions: length reads as all ones.
        assert_eq!(read_reg(&mut t, SHM_LEN_LOW), u32::MAX);
        assert_eq!(read_reg(&mut t, SHM_LEN_HIGH), u32::MAX);
    }

    #[test]
    fn new_rejects_bad_devices() {
        let legacy = TestDevice {
            features: 1 << 5,
            sizes: vec![16],
            ..Default::default()
        };
        assert!(matches!(
            MmioTransport::new(legacy, memory(), eventfd()),
            Err(MmioError::NotModern(42))
        ));
        let odd = TestDevice {
            features: VIRTIO_F_VERSION_1,
            sizes: vec![16, 100],
            ..Default::default()
        };
        assert!(matches!(
            MmioTransport::new(odd, memory(), eventfd()),
            Err(MmioError::InvalidQueueSize {
                index: 1,
                size: 100,
                ..
            })
        ));
    }

    #[test]
    fn device_features_are_paged() {
        let mut t = transport();
        assert_eq!(read_reg(&mut t, DEVICE_FEATURES), FEATURES as u32);
        write_reg(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(read_reg(&mut t, DEVICE_FEATURES), 1); // VERSION_1 is bit 32
        write_reg(&mut t, DEVICE_FEATURES_SEL, 2);
        assert_eq!(read_reg(&mut t, DEVICE_FEATURES), 0);
        write_reg(&mut t, DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(read_reg(&mut t, DEVICE_FEATURES), 0);
        write_reg(&mut t, DEVICE_FEATURES_SEL, 0);
        assert_eq!(read_reg(&mut t, DEVICE_FEATURES), FEATURES as u32);
    }

    #[test]
    fn feature_negotiation() {
        let mut t = transport();
        // Before DRIVER, DriverFeatures writes are ignored.
        write_reg(&mut t, DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.lock().acked_features(), 0);

        write_reg(&mut t, STATUS, ACK);
        write_reg(&mut t, STATUS, DRV);
        // Accepting a feature that was not offered: FEATURES_OK does not stick.
        write_reg(&mut t, DRIVER_FEATURES_SEL, 1);
        write_reg(&mut t, DRIVER_FEATURES, 1);
        write_reg(&mut t, DRIVER_FEATURES_SEL, 0);
        write_reg(&mut t, DRIVER_FEATURES, (1 << 5) | (1 << 7));
        write_reg(&mut t, STATUS, FOK);
        assert_eq!(read_reg(&mut t, STATUS), DRV);

        // Not accepting VERSION_1 (a legacy driver): refused too.
        write_reg(&mut t, DRIVER_FEATURES, 1 << 5);
        write_reg(&mut t, DRIVER_FEATURES_SEL, 1);
        write_reg(&mut t, DRIVER_FEATURES, 0);
        write_reg(&mut t, STATUS, FOK);
        assert_eq!(read_reg(&mut t, STATUS), DRV);

        // A subset including VERSION_1 is fine; pages beyond 1 are ignored.
        write_reg(&mut t, DRIVER_FEATURES, 1);
        write_reg(&mut t, DRIVER_FEATURES_SEL, 2);
        write_reg(&mut t, DRIVER_FEATURES, 0xffff_ffff);
        write_reg(&mut t, STATUS, FOK);
        assert_eq!(read_reg(&mut t, STATUS), FOK);
        assert_eq!(t.lock().acked_features(), VIRTIO_F_VERSION_1 | (1 << 5));

        // After FEATURES_OK the features are frozen.
        write_reg(&mut t, DRIVER_FEATURES_SEL, 0);
        write_reg(&mut t, DRIVER_FEATURES, 1 << 3);
        assert_eq!(t.lock().acked_features(), VIRTIO_F_VERSION_1 | (1 << 5));
    }

    #[test]
    fn queue_setup() {
        let mut t = transport();
        // Queue registers are ignored before FEATURES_OK.
        write_reg(&mut t, QUEUE_NUM, 8);
        write_reg(&mut t, QUEUE_READY, 1);
        assert_eq!(t.lock().queues()[0].size(), 16);
        assert!(!t.lock().queues()[0].ready());

        negotiate(&mut t);
        assert_eq!(read_reg(&mut t, QUEUE_NUM_MAX), 16);
        write_reg(&mut t, QUEUE_SEL, 1);
        assert_eq!(read_reg(&mut t, QUEUE_NUM_MAX), 256);
        write_reg(&mut t, QUEUE_SEL, 2);
        assert_eq!(read_reg(&mut t, QUEUE_NUM_MAX), 0);
        assert_eq!(read_reg(&mut t, QUEUE_READY), 0);
        write_reg(&mut t, QUEUE_NUM, 8); // no such queue: ignored, no panic
        write_reg(&mut t, QUEUE_READY, 1);

        write_reg(&mut t, QUEUE_SEL, 0);
        // Sizes that are not a power of two, zero, or above the max are ignored.
        for bad in [0, 3, 32, 0x1_0000 + 8] {
            write_reg(&mut t, QUEUE_NUM, bad);
            assert_eq!(t.lock().queues()[0].size(), 16, "size {bad}");
        }
        write_reg(&mut t, QUEUE_NUM, 8);
        assert_eq!(t.lock().queues()[0].size(), 8);

        write_reg(&mut t, QUEUE_DESC_LOW, 0x1000);
        write_reg(&mut t, QUEUE_DESC_HIGH, 0x1);
        write_reg(&mut t, QUEUE_DRIVER_LOW, 0x2000);
        write_reg(&mut t, QUEUE_DRIVER_HIGH, 0x2);
        write_reg(&mut t, QUEUE_DEVICE_LOW, 0x3000);
        write_reg(&mut t, QUEUE_DEVICE_HIGH, 0x3);
        assert_eq!(rings(&t, 0), (0x1_0000_1000, 0x2_0000_2000, 0x3_0000_3000));

        // Misaligned addresses are ignored.
        write_reg(&mut t, QUEUE_DESC_LOW, 0x1008);
        write_reg(&mut t, QUEUE_DRIVER_LOW, 0x2001);
        write_reg(&mut t, QUEUE_DEVICE_LOW, 0x3002);
        assert_eq!(rings(&t, 0), (0x1_0000_1000, 0x2_0000_2000, 0x3_0000_3000));

        // Queue registers are write-only.
        assert_eq!(read_reg(&mut t, QUEUE_NUM), 0);
        assert_eq!(read_reg(&mut t, QUEUE_DESC_LOW), 0);

        write_reg(&mut t, QUEUE_READY, 1);
        assert_eq!(read_reg(&mut t, QUEUE_READY), 1);
        // While ready, the queue cannot be reconfigured.
        write_reg(&mut t, QUEUE_NUM, 4);
        write_reg(&mut t, QUEUE_DESC_LOW, 0x4000);
        assert_eq!(t.lock().queues()[0].size(), 8);
        assert_eq!(t.lock().queues()[0].desc_table(), 0x1_0000_1000);
        // The other queue is untouched.
        assert!(!t.lock().queues()[1].ready());
        // Invalid QueueReady values are ignored; 0 stops the queue.
        write_reg(&mut t, QUEUE_READY, 2);
        assert_eq!(read_reg(&mut t, QUEUE_READY), 1);
        write_reg(&mut t, QUEUE_READY, 0);
        assert_eq!(read_reg(&mut t, QUEUE_READY), 0);
    }

    #[test]
    fn status_zero_resets_device_and_queues() {
        let mem = memory();
        let mut t = transport_on(&mem);
        let q = DriverQueue::new(&mem, QUEUE_BASE, 8);
        bring_up(&mut t, &[&q]);
        assert_eq!(read_reg(&mut t, STATUS), DOK);
        assert!(t.lock().is_activated());
        assert_eq!(t.lock().device().activated_with, Some(FEATURES));
        t.lock().notify_config_change();
        assert_ne!(read_reg(&mut t, INTERRUPT_STATUS), 0);
        write_reg(&mut t, QUEUE_SEL, 1);

        write_reg(&mut t, STATUS, 0);
        assert_eq!(read_reg(&mut t, STATUS), 0);
        assert!(!t.lock().is_activated());
        assert_eq!(t.lock().device().resets, 2); // bring_up starts with a reset too
        assert_eq!(t.lock().acked_features(), 0);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);
        // QueueSel back to 0, queue back to its defaults.
        assert_eq!(read_reg(&mut t, QUEUE_NUM_MAX), 16);
        assert!(!t.lock().queues()[0].ready());
        assert_eq!(t.lock().queues()[0].size(), 16);
        assert_eq!(rings(&t, 0), (0, 0, 0));

        // And it can be brought up again.
        let q = DriverQueue::new(&mem, QUEUE_BASE, 8);
        bring_up(&mut t, &[&q]);
        assert_eq!(read_reg(&mut t, STATUS), DOK);
    }

    #[test]
    fn status_rules() {
        let mut t = transport();
        // DRIVER without ACKNOWLEDGE is dropped.
        write_reg(&mut t, STATUS, S_DRIVER);
        assert_eq!(read_reg(&mut t, STATUS), 0);
        negotiate(&mut t);
        // Clearing a bit without writing 0 is ignored.
        write_reg(&mut t, STATUS, ACK);
        assert_eq!(read_reg(&mut t, STATUS), FOK);
        // DRIVER_OK needs FEATURES_OK; FAILED is accepted.
        write_reg(&mut t, STATUS, FOK | S_FAILED);
        assert_eq!(read_reg(&mut t, STATUS), FOK | S_FAILED);
        write_reg(&mut t, STATUS, FOK | S_FAILED | S_DRIVER_OK);
        assert!(!t.lock().is_activated());
        assert_eq!(read_reg(&mut t, STATUS) & S_DRIVER_OK, 0);
    }

    #[test]
    fn bad_offsets_read_zero_and_ignore_writes() {
        let mem = memory();
        let mut t = transport_on(&mem);
        let q = DriverQueue::new(&mem, QUEUE_BASE, 8);
        bring_up(&mut t, &[&q]);
        for offset in [
            0x001, 0x018, 0x028, 0x02c, 0x040, 0x048, 0x054, 0x068, 0x0a8, 0x0c0, 0x0f8, 0x0fd,
        ] {
            assert_eq!(read_reg(&mut t, offset), 0, "offset {offset:#x}");
            write_reg(&mut t, offset, 0xffff_ffff);
        }
        // Write-only registers read as zero.
        for offset in [
            DEVICE_FEATURES_SEL,
            DRIVER_FEATURES,
            DRIVER_FEATURES_SEL,
            QUEUE_SEL,
            QUEUE_NOTIFY,
            INTERRUPT_ACK,
        ] {
            assert_eq!(read_reg(&mut t, offset), 0, "offset {offset:#x}");
        }
        // Read-only registers ignore writes.
        for offset in [
            MAGIC_VALUE,
            VERSION,
            DEVICE_ID,
            VENDOR,
            QUEUE_NUM_MAX,
            INTERRUPT_STATUS,
        ] {
            write_reg(&mut t, offset, 0x1234_5678);
        }
        write_reg(&mut t, CONFIG_GENERATION, 7);
        assert_eq!(read_reg(&mut t, MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(read_reg(&mut t, DEVICE_ID), 42);
        assert_eq!(read_reg(&mut t, QUEUE_NUM_MAX), 16);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);
        assert_eq!(read_reg(&mut t, CONFIG_GENERATION), 0);
        assert_eq!(read_reg(&mut t, STATUS), DOK);
        assert!(t.lock().is_activated());
        assert_eq!(t.lock().device().resets, 1); // only bring_up's initial reset
    }

    #[test]
    fn common_registers_need_32_bit_access() {
        let mut t = transport();
        for len in [1usize, 2, 3, 8] {
            let mut data = vec![0xaau8; len];
            t.read(MAGIC_VALUE, &mut data);
            assert!(data.iter().all(|&b| b == 0), "read of {len} bytes");
        }
        // Writes of other sizes are ignored: status stays 0, features sel stays 0.
        t.write(STATUS, &[ACK as u8]);
        t.write(STATUS, &u16::to_le_bytes(ACK as u16));
        t.write(STATUS, &u64::to_le_bytes(u64::from(ACK)));
        assert_eq!(read_reg(&mut t, STATUS), 0);
        t.write(DEVICE_FEATURES_SEL, &[1]);
        assert_eq!(read_reg(&mut t, DEVICE_FEATURES), FEATURES as u32);
        t.write(STATUS, &[]);
        t.read(STATUS, &mut []);
        assert_eq!(read_reg(&mut t, STATUS), 0);
    }

    #[test]
    fn config_space_any_size() {
        let mut t = transport();
        let mut b = [0u8; 1];
        t.read(CONFIG_SPACE_OFFSET + 2, &mut b);
        assert_eq!(b, [3]);
        let mut h = [0u8; 2];
        t.read(CONFIG_SPACE_OFFSET + 6, &mut h);
        assert_eq!(h, [7, 8]);
        assert_eq!(read_reg(&mut t, CONFIG_SPACE_OFFSET + 4), 0x0807_0605);
        // Past the device's config: zeros.
        let mut q = [0xffu8; 8];
        t.read(CONFIG_SPACE_OFFSET + 6, &mut q);
        assert_eq!(q, [7, 8, 0, 0, 0, 0, 0, 0]);
        t.read(u64::MAX, &mut q);
        assert_eq!(q, [0; 8]);
        t.write(CONFIG_SPACE_OFFSET + 1, &[9, 9]);
        assert_eq!(t.lock().device().config_writes, vec![(1, vec![9, 9])]);
    }

    #[test]
    fn config_change_interrupt() {
        let mut t = transport();
        t.lock().notify_config_change();
        assert_eq!(read_reg(&mut t, CONFIG_GENERATION), 1);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(t.lock().interrupt_evt().read().expect("irq signalled"), 1);
        write_reg(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);
    }

    #[test]
    fn notify_processes_queue_and_interrupts() {
        let mem = memory();
        let mut t = transport_on(&mem);
        let mut q0 = DriverQueue::new(&mem, QUEUE_BASE, 8);
        let q1 = DriverQueue::new(&mem, GuestAddress(0x8000), 4);
        // Nothing happens before DRIVER_OK.
        write_reg(&mut t, QUEUE_NOTIFY, 0);
        assert!(t.lock().device().notified.is_empty());

        bring_up(&mut t, &[&q0, &q1]);
        let head = q0.add_chain(&[r(BUF_BASE, 16), w(BUF_BASE + 16, 1)]);
        write_reg(&mut t, QUEUE_NOTIFY, 0);
        assert_eq!(t.lock().device().notified, vec![0]);
        assert_eq!(q0.used_idx(), 1);
        assert_eq!(q0.used_elem(0), (u32::from(head), 0));
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(t.lock().interrupt_evt().read().expect("irq signalled"), 1);
        write_reg(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);

        // Nothing used: no interrupt.
        write_reg(&mut t, QUEUE_NOTIFY, 1);
        assert_eq!(t.lock().device().notified, vec![0, 1]);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);
        assert!(t.lock().interrupt_evt().read().is_err(), "no irq expected");

        // Queues that do not exist or are stopped are not processed.
        write_reg(&mut t, QUEUE_NOTIFY, 2);
        write_reg(&mut t, QUEUE_NOTIFY, u32::MAX);
        write_reg(&mut t, QUEUE_SEL, 1);
        write_reg(&mut t, QUEUE_READY, 0);
        write_reg(&mut t, QUEUE_NOTIFY, 1);
        assert_eq!(t.lock().device().notified, vec![0, 1]);
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let mem = memory();
        // Rings outside guest memory.
        let mut t = transport_on(&mem);
        negotiate(&mut t);
        write_reg(&mut t, QUEUE_DESC_HIGH, 0x10);
        write_reg(&mut t, QUEUE_READY, 1);
        write_reg(&mut t, STATUS, DOK);
        assert!(!t.lock().is_activated());
        assert_eq!(t.lock().device().activated_with, None);
        assert_eq!(read_reg(&mut t, STATUS), DOK | S_NEEDS_RESET);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(t.lock().interrupt_evt().read().expect("irq signalled"), 1);
        write_reg(&mut t, QUEUE_NOTIFY, 0);
        assert!(t.lock().device().notified.is_empty());
        // The driver cannot clear NEEDS_RESET except by resetting.
        write_reg(&mut t, STATUS, DOK | S_FAILED);
        assert_eq!(read_reg(&mut t, STATUS), DOK | S_FAILED | S_NEEDS_RESET);
        write_reg(&mut t, STATUS, 0);
        assert_eq!(read_reg(&mut t, STATUS), 0);

        // The device itself refusing.
        t.lock().device_mut().fail_activate = true;
        let q = DriverQueue::new(&mem, QUEUE_BASE, 8);
        bring_up(&mut t, &[&q]);
        assert!(!t.lock().is_activated());
        assert_eq!(read_reg(&mut t, STATUS), DOK | S_NEEDS_RESET);
    }

    #[test]
    fn a_guest_misusing_registers_cannot_flood_the_log() {
        let mem = memory();
        let mut t = transport_on(&mem);
        let q = DriverQueue::new(&mem, QUEUE_BASE, 8);
        const ROUNDS: usize = 5_000;
        let start = Instant::now();
        let (lines, ()) = count_warnings(|| {
            for _ in 0..ROUNDS {
                write_reg(&mut t, STATUS, 0);
                write_reg(&mut t, QUEUE_NUM, 8); // before FEATURES_OK
                write_reg(&mut t, DRIVER_FEATURES, 1); // before DRIVER
                write_reg(&mut t, STATUS, S_DRIVER); // DRIVER before ACKNOWLEDGE
                write_reg(&mut t, STATUS, ACK | S_FEATURES_OK); // FEATURES_OK before DRIVER
                write_reg(&mut t, STATUS, DRV); // (ACK already set: fine)
                write_reg(&mut t, DRIVER_FEATURES, 1 << 7); // not offered...
                write_reg(&mut t, STATUS, FOK); // ...so refused
                write_reg(&mut t, DRIVER_FEATURES, 1 << 5); // no VERSION_1...
                write_reg(&mut t, STATUS, FOK); // ...refused
                write_reg(&mut t, STATUS, DRV | S_DRIVER_OK); // DRIVER_OK out of order
                write_reg(&mut t, STATUS, 0);
                negotiate(&mut t);
                write_reg(&mut t, QUEUE_NUM, 3); // not a power of two
                write_reg(&mut t, QUEUE_READY, 2); // not 0 or 1
                write_reg(&mut t, QUEUE_DESC_LOW, 0x1001); // misaligned
                write_reg(&mut t, QUEUE_SEL, 7);
                write_reg(&mut t, QUEUE_NUM, 8); // no such queue
                write_reg(&mut t, QUEUE_SEL, 0);
                write_reg(&mut t, QUEUE_DESC_HIGH, 0x10); // outside guest memory...
                write_reg(&mut t, QUEUE_READY, 1);
                write_reg(&mut t, STATUS, DOK); // ...activation fails
                bring_up(&mut t, &[&q]);
                write_reg(&mut t, QUEUE_NOTIFY, 99); // no such queue
                write_reg(&mut t, QUEUE_NUM, 4); // while ready
                write_reg(&mut t, STATUS, ACK); // clearing bits
                write_reg(&mut t, STATUS, DOK | S_FAILED); // giving up
            }
        });
        let elapsed = start.elapsed();
        // The first lines get through; then at most a burst and a summary per window.
        assert!(lines >= BURST as usize, "{lines} lines");
        assert!(
            lines <= warning_bound(elapsed),
            "{lines} lines in {elapsed:?} for {ROUNDS} rounds"
        );
        // Everything was counted: 16 complaints a round.
        let counts = t.lock().log.counts();
        assert_eq!(counts.allowed + counts.suppressed, 16 * ROUNDS as u64);
        assert!(counts.summaries as usize <= warning_bound(elapsed) / (BURST as usize + 1));
        // And the device still works.
        bring_up(&mut t, &[&q]);
        assert!(t.lock().is_activated());
    }

    #[test]
    fn ring_check_agrees_with_virtio_queue() {
        let mem = memory();
        let top = MEM_SIZE;
        // (desc, avail, used) at size 8: 128, 22 and 70 bytes.
        let cases = [
            ((0x1000, 0x2000, 0x3000), true),
            (
                (top - 128, top - 128 - 22 - 2, top - 128 - 22 - 2 - 72),
                true,
            ),
            ((top - 112, 0x2000, 0x3000), false),
            ((0x1000, top - 20, 0x3000), false),
            ((0x1000, 0x2000, top - 68), false),
            ((0x1000, 0x2000, u64::MAX - 3), false),
            ((u64::MAX - 15, 0x2000, 0x3000), false),
            ((0x1000, (1 << 32) + 0x2000, 0x3000), false),
        ];
        for ((desc, avail, used), want) in cases {
            let mut q = Queue::new(16).expect("queue");
            q.try_set_size(8).expect("size");
            q.try_set_desc_table_address(GuestAddress(desc))
                .expect("desc");
            q.try_set_avail_ring_address(GuestAddress(avail))
                .expect("avail");
            q.try_set_used_ring_address(GuestAddress(used))
                .expect("used");
            q.set_ready(true);
            assert_eq!(
                rings_in_memory(&q, &mem),
                want,
                "{desc:#x} {avail:#x} {used:#x}"
            );
            assert_eq!(
                q.is_valid(&mem),
                want,
                "virtio-queue: {desc:#x} {avail:#x} {used:#x}"
            );
        }
    }

    /// A device with a worker thread, to test the shared transport.
    #[derive(Default)]
    struct AsyncDevice {
        access: Option<QueueAccess>,
        activations: usize,
        /// Start a worker on activation that polls its queue until its access goes stale.
        spawn_worker: bool,
        worker_exited: Arc<AtomicBool>,
        worker_polls: Arc<AtomicUsize>,
        worker: Option<JoinHandle<()>>,
        stopping: Vec<JoinHandle<()>>,
        stop_workers_calls: usize,
    }

    impl VirtioDevice for AsyncDevice {
        fn device_type(&self) -> u32 {
            43
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _acked: u64,
            _queues: &[Queue],
            access: QueueAccess,
        ) -> Result<(), ActivateError> {
            self.activations += 1;
            if self.spawn_worker {
                let worker_access = access.clone();
                let exited = self.worker_exited.clone();
                let polls = self.worker_polls.clone();
                exited.store(false, Ordering::SeqCst);
                // This worker is never told to stop: it only notices that its access went
                // stale, which needs the transport lock.
                self.worker = Some(std::thread::spawn(move || loop {
                    polls.fetch_add(1, Ordering::SeqCst);
                    if worker_access.with_queue(0, |_, _| false) == Err(QueueAccessError::Stale) {
                        exited.store(true, Ordering::SeqCst);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }));
            }
            self.access = Some(access);
            Ok(())
        }
        fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> bool {
            false
        }
        fn reset(&mut self) {
            self.access = None;
            self.stopping.extend(self.worker.take());
        }
        fn stop_workers(&mut self) {
            self.stop_workers_calls += 1;
            self.stopping.extend(self.worker.take());
        }
        fn take_stopped_workers(&mut self) -> Vec<JoinHandle<()>> {
            std::mem::take(&mut self.stopping)
        }
    }

    fn access_of(t: &MmioTransport<AsyncDevice>) -> QueueAccess {
        t.lock()
            .device()
            .access
            .clone()
            .expect("activated with access")
    }

    #[test]
    fn shared_transport_gives_workers_queue_access() {
        let mem = memory();
        let mut t =
            MmioTransport::new(AsyncDevice::default(), mem.clone(), eventfd()).expect("transport");
        let mut q0 = DriverQueue::new(&mem, QUEUE_BASE, 8);
        let q1 = DriverQueue::new(&mem, GuestAddress(0x8000), 8);
        // Before activation there is nothing to hand out.
        assert!(t.lock().device().access.is_none());
        bring_up(&mut t, &[&q0, &q1]);
        assert!(t.lock().is_activated());
        assert_eq!(t.lock().device().activations, 1);
        let access = access_of(&t);

        // A worker completes a buffer: used ring updated, interrupt raised.
        let head = q0.add_chain(&[w(BUF_BASE, 64)]);
        let mut popped = None;
        access
            .with_queue(0, |q, m| {
                let chain = q.pop_descriptor_chain(m).expect("a chain");
                popped = Some(chain.head_index());
                q.add_used(m, chain.head_index(), 7).expect("add_used");
                true
            })
            .expect("queue 0 is live");
        assert_eq!(popped, Some(head));
        assert_eq!(q0.used_idx(), 1);
        assert_eq!(q0.used_elem(0), (u32::from(head), 7));
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(t.lock().interrupt_evt().read().expect("irq signalled"), 1);
        write_reg(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);

        // The closure says no interrupt: none.
        access.with_queue(1, |_, _| false).expect("queue 1 is live");
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);
        assert!(t.lock().interrupt_evt().read().is_err(), "no irq expected");

        // Queues that do not exist or were stopped: the closure does not run.
        let mut ran = false;
        assert_eq!(
            access.with_queue(2, |_, _| {
                ran = true;
                true
            }),
            Err(QueueAccessError::NotReady(2))
        );
        write_reg(&mut t, QUEUE_SEL, 1);
        write_reg(&mut t, QUEUE_READY, 0);
        assert_eq!(
            access.with_queue(1, |_, _| {
                ran = true;
                true
            }),
            Err(QueueAccessError::NotReady(1))
        );
        assert!(!ran);
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);

        // The transport's own entry point does the same, for whoever holds the lock.
        assert!(t.lock().with_queue(0, |_, _| true));
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert!(!t.lock().with_queue(1, |_, _| true));
    }

    #[test]
    fn queues_are_only_live_while_activated() {
        let mem = memory();
        let mut t = transport_on(&mem);
        assert!(!t.lock().with_queue(0, |_, _| true));
        let q = DriverQueue::new(&mem, QUEUE_BASE, 8);
        bring_up(&mut t, &[&q]);
        assert!(t.lock().with_queue(0, |_, _| false));
        write_reg(&mut t, STATUS, 0);
        assert!(!t.lock().with_queue(0, |_, _| true));
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_access_goes_stale_on_reset_and_drop() {
        let mem = memory();
        let mut t =
            MmioTransport::new(AsyncDevice::default(), mem.clone(), eventfd()).expect("transport");
        let q0 = DriverQueue::new(&mem, QUEUE_BASE, 8);
        let q1 = DriverQueue::new(&mem, GuestAddress(0x8000), 8);
        bring_up(&mut t, &[&q0, &q1]);
        let first = access_of(&t);
        assert_eq!(first.with_queue(0, |_, _| false), Ok(()));

        write_reg(&mut t, STATUS, 0);
        assert_eq!(
            first.with_queue(0, |_, _| true),
            Err(QueueAccessError::Stale)
        );
        // Still stale after the driver brings the device up again: the new activation has
        // its own access.
        bring_up(&mut t, &[&q0, &q1]);
        let second = access_of(&t);
        assert_eq!(
            first.with_queue(0, |_, _| true),
            Err(QueueAccessError::Stale)
        );
        assert_eq!(second.with_queue(0, |_, _| false), Ok(()));
        assert_eq!(read_reg(&mut t, INTERRUPT_STATUS), 0);

        // Once the transport is gone, every handle is stale (they never kept it alive).
        drop(t);
        assert_eq!(
            second.with_queue(0, |_, _| true),
            Err(QueueAccessError::Stale)
        );
    }

    #[test]
    fn workers_are_joined_outside_the_lock_on_reset_and_drop() {
        let mem = memory();
        let dev = AsyncDevice {
            spawn_worker: true,
            ..Default::default()
        };
        let exited = dev.worker_exited.clone();
        let polls = dev.worker_polls.clone();
        let mut t = MmioTransport::new(dev, mem.clone(), eventfd()).expect("transport");
        let q0 = DriverQueue::new(&mem, QUEUE_BASE, 8);
        let q1 = DriverQueue::new(&mem, GuestAddress(0x8000), 8);

        // Run the register writes on another thread so that a deadlock fails the test instead
        // of hanging it.
        let (done_tx, done_rx) = mpsc::channel();
        let driver = std::thread::spawn(move || {
            bring_up(&mut t, &[&q0, &q1]);
            // Let the worker hammer the lock for a while.
            let start = polls.load(Ordering::SeqCst);
            while polls.load(Ordering::SeqCst) < start + 20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(!exited.load(Ordering::SeqCst));
            write_reg(&mut t, STATUS, 0);
            // The write returned: the worker has been joined.
            assert!(
                exited.load(Ordering::SeqCst),
                "worker still running after reset"
            );
            assert!(t.lock().device().stopping.is_empty());

            bring_up(&mut t, &[&q0, &q1]);
            let start = polls.load(Ordering::SeqCst);
            while polls.load(Ordering::SeqCst) < start + 20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(!exited.load(Ordering::SeqCst));
            drop(t);
            assert!(
                exited.load(Ordering::SeqCst),
                "worker still running after drop"
            );
            done_tx.send(()).expect("report");
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("reset or drop deadlocked");
        driver.join().expect("driver thread");
    }
}
