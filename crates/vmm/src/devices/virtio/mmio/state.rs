//! The register file of a virtio-mmio transport and the virtqueues behind it: what the
//! [`MmioTransport`](super::MmioTransport)(super::MmioTransport)'s lock protects.

use std::sync::{Mutex, Weak};
use std::thread::JoinHandle;

use tracing::debug;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::regs::*;
use super::{
    MmioError, MMIO_MAGIC_VALUE, MMIO_VERSION, S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FAILED,
    S_FEATURES_OK, S_NEEDS_RESET, VENDOR_ID,
};
use crate::devices::virtio::log_limit::{limited, LogLimiter};
use crate::devices::virtio::{
    ActivateError, Activation, QueueAccess, QueueAccessError, QueueHost, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// The virtqueues of `device`, at their maximum sizes; an error if the device is not modern or
/// declares a size `virtio_queue` rejects.
pub(super) fn new_queues(device: &impl VirtioDevice) -> Result<Vec<Queue>, MmioError> {
    let info = device.info();
    if info.features & VIRTIO_F_VERSION_1 == 0 {
        return Err(MmioError::NotModern(info.device_type));
    }
    info.queue_max_sizes
        .iter()
        .enumerate()
        .map(|(index, &size)| {
            Queue::new(size).map_err(|source| MmioError::InvalidQueueSize {
                index,
                size,
                source,
            })
        })
        .collect()
}

/// A virtio device behind a virtio-mmio register window: the state behind an
/// [`MmioTransport`](super::MmioTransport)'s lock, reached through
/// [`MmioTransport::lock`](super::MmioTransport::lock).
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
    /// Interrupts raised, and QueueNotify writes per queue (for [`Self::describe`]).
    irqs_raised: u64,
    notifies: Vec<u64>,
}

impl<D: VirtioDevice> TransportState<D> {
    /// The state of a device that was just built, with `queues` from [`new_queues`].
    pub(super) fn new(
        device: D,
        mem: GuestMemoryMmap,
        irq: EventFd,
        queues: Vec<Queue>,
        host: Weak<Mutex<dyn QueueHost>>,
    ) -> Self {
        let log = LogLimiter::new(transport_name(device.info().device_type));
        let notifies = vec![0; queues.len()];
        TransportState {
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
            log,
            irqs_raised: 0,
            notifies,
        }
    }

    /// The transport and its queues as the device sees them and as guest memory holds them,
    /// then the device's own state: several lines for a debug dump (numbers only).
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let info = self.device.info();
        let mut o = format!(
            "{}: status={:#x} activated={} interrupt_status={:#x} irqs_raised={} features={:#x} epoch={}\n",
            transport_name(info.device_type),
            self.status,
            self.activated,
            self.interrupt_status,
            self.irqs_raised,
            self.driver_features,
            self.epoch
        );
        for (i, q) in self.queues.iter().enumerate() {
            let word = |addr: u64, at: u64| {
                addr.checked_add(at)
                    .and_then(|a| self.mem.read_obj::<u16>(GuestAddress(a)).ok())
                    .map_or_else(|| "?".to_owned(), |v| v.to_string())
            };
            let _ = writeln!(
                o,
                "  q{i}: ready={} size={} notifies={} next_avail={} next_used={} | avail.flags={} avail.idx={} used.flags={} used.idx={} | desc={:#x} avail={:#x} used={:#x}",
                q.ready(),
                q.size(),
                self.notifies.get(i).copied().unwrap_or(0),
                q.next_avail(),
                q.next_used(),
                word(q.avail_ring(), 0),
                word(q.avail_ring(), 2),
                word(q.used_ring(), 0),
                word(q.used_ring(), 2),
                q.desc_table(),
                q.avail_ring(),
                q.used_ring()
            );
        }
        let device = self.device.describe();
        if !device.is_empty() {
            let _ = writeln!(o, "  {device}");
        }
        o
    }

    /// Workers the device stopped (on a reset) and not joined yet, with the device type (for
    /// the log line of one that panicked).
    pub(super) fn take_stopped_workers(&mut self) -> (u32, Vec<JoinHandle<()>>) {
        (
            self.device.info().device_type,
            self.device.take_stopped_workers(),
        )
    }

    /// The transport is going away: outstanding [`QueueAccess`] handles go stale, the device
    /// tells its workers to stop; returns them, to join once the lock is released.
    pub(super) fn shut_down(&mut self) -> (u32, Vec<JoinHandle<()>>) {
        self.epoch = self.epoch.wrapping_add(1);
        self.device.stop_workers();
        self.take_stopped_workers()
    }

    /// How many warnings the driver provoked, let through and held back.
    #[cfg(test)]
    pub(super) fn log_counts(&self) -> crate::devices::virtio::log_limit::LogCounts {
        self.log.counts()
    }

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
        self.irqs_raised += 1;
        if let Err(e) = self.irq.write(1) {
            // Once broken, broken for every interrupt the driver asks for.
            self.log_error("failed to signal the irq eventfd", &e);
        }
    }

    /// An error line (through the log limiter) for a failure the driver can repeat at will.
    fn log_error(&mut self, what: &str, error: &dyn std::fmt::Display) {
        let device_type = self.device.info().device_type;
        limited!(
            self.log,
            error,
            device_type,
            error = %error,
            "virtio-mmio: {what}"
        );
    }

    fn reset(&mut self) {
        debug!(
            device_type = self.device.info().device_type,
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
                device_type = self.device.info().device_type,
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
        let offered = self.device.info().features;
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
            Some(index) => Err(ActivateError::InvalidQueue(index)),
            None => {
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
                self.epoch = self.epoch.wrapping_add(1);
                self.device.activate(Activation {
                    features: self.driver_features,
                    queues: &self.queues,
                    access: QueueAccess::new(self.host.clone(), self.epoch),
                })
            }
        };
        match result {
            Ok(()) => {
                debug!(
                    device_type = self.device.info().device_type,
                    features = self.driver_features,
                    "virtio-mmio: device activated"
                );
                self.activated = true;
            }
            Err(e) => {
                // A driver can fail activation at will (rings outside memory), over and over.
                self.log_error("device activation failed", &e);
                self.status |= S_NEEDS_RESET;
                self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    /// The transport's guest-visible state for a snapshot (issue 13): its registers, then
    /// each queue (sizes, ring addresses, ready, the next available and used indices). The
    /// device's own state is the device's to save. Little-endian; see [`Self::restore`].
    pub fn save(&self) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [
            self.queue_sel,
            self.device_features_sel,
            self.driver_features_sel,
            self.status,
            self.interrupt_status,
            self.config_generation,
            u32::from(self.activated),
            u32::try_from(self.queues.len()).unwrap_or(u32::MAX),
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.driver_features.to_le_bytes());
        for q in &self.queues {
            let st = q.state();
            for v in [st.max_size, st.next_avail, st.next_used, st.size] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.push(u8::from(st.event_idx_enabled));
            b.push(u8::from(st.ready));
            for v in [st.desc_table, st.avail_ring, st.used_ring] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// Puts back what [`Self::save`] wrote into this transport, built fresh for the same
    /// device (never activated): the registers, the queues (checked as virtio-queue checks a
    /// driver's values: sizes, alignment) and, if the saved transport was live, the device's
    /// activation with those queues, as DRIVER_OK does. The saved bytes are the server's own,
    /// but are checked as if they were not.
    pub fn restore(&mut self, b: &[u8]) -> Result<(), String> {
        if self.activated {
            return Err("the transport is already live".into());
        }
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let s = b
                .get(at..at + n)
                .ok_or("the saved transport is cut short")?;
            at += n;
            Ok(s)
        };
        let mut u32s = [0u32; 8];
        for v in &mut u32s {
            *v = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "bad bytes")?);
        }
        let [queue_sel, dev_sel, drv_sel, status, interrupt_status, generation, activated, n] =
            u32s;
        let driver_features = u64::from_le_bytes(take(8)?.try_into().map_err(|_| "bad bytes")?);
        if n as usize != self.queues.len() {
            return Err(format!(
                "{n} queues saved, the device has {}",
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, mine) in self.queues.iter().enumerate() {
            let u16at = |s: &[u8], k: usize| u16::from_le_bytes([s[k], s[k + 1]]);
            let u64at = |s: &[u8], k: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&s[k..k + 8]);
                u64::from_le_bytes(a)
            };
            let s = take(8 + 2 + 24)?;
            let st = virtio_queue::QueueState {
                max_size: u16at(s, 0),
                next_avail: u16at(s, 2),
                next_used: u16at(s, 4),
                size: u16at(s, 6),
                event_idx_enabled: s[8] != 0,
                ready: s[9] != 0,
                desc_table: u64at(s, 10),
                avail_ring: u64at(s, 18),
                used_ring: u64at(s, 26),
            };
            if st.max_size != mine.max_size() {
                return Err(format!("queue {i}: saved with another maximum size"));
            }
            queues.push(Queue::try_from(st).map_err(|e| format!("queue {i}: {e}"))?);
        }
        if at != b.len() {
            return Err("bytes after the saved transport".into());
        }
        self.queues = queues;
        self.queue_sel = queue_sel;
        self.device_features_sel = dev_sel;
        self.driver_features_sel = drv_sel;
        self.driver_features = driver_features;
        self.status = status;
        self.interrupt_status = interrupt_status;
        self.config_generation = generation;
        if activated != 0 {
            self.activate();
            if !self.activated {
                return Err("the device refused its activation".into());
            }
        }
        Ok(())
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
        if let Some(n) = self.notifies.get_mut(index) {
            *n += 1;
        }
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
            DEVICE_ID => self.device.info().device_type,
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => {
                let features = self.device.info().features;
                match self.device_features_sel {
                    0 => u32::try_from(features & 0xffff_ffff).unwrap_or(0),
                    1 => u32::try_from(features >> 32).unwrap_or(0),
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
pub(super) fn rings_in_memory(q: &Queue, mem: &GuestMemoryMmap) -> bool {
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
    /// A register (or configuration space) read, with the lock held: what the
    /// [`MmioTransport`](super::MmioTransport)'s
    /// [`MmioDevice::read`](crate::devices::MmioDevice::read) does.
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

    /// A register (or configuration space) write, with the lock held. Unlike the
    /// [`MmioTransport`](super::MmioTransport)'s
    /// [`MmioDevice::write`](crate::devices::MmioDevice::write), it does not join workers a
    /// reset stopped: those are joined at the transport's next write, or when it is dropped.
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
