//! Tests of the transport: register semantics against a synchronous test device, and the
//! worker plumbing (queue access, stale handles, joins) against one with a thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::regs::*;
use super::state::rings_in_memory;
use super::*;
use crate::devices::virtio::log_limit::BURST;
use crate::devices::virtio::testing::{
    bring_up, count_warnings, eventfd, memory, r, read_reg, w, warning_bound, write_reg,
    DriverQueue, BUF_BASE, MEM_SIZE, QUEUE_BASE,
};
use crate::devices::virtio::{
    ActivateError, Activation, DeviceInfo, QueueAccess, QueueAccessError, VIRTIO_F_VERSION_1,
};

const ACK: u32 = S_ACKNOWLEDGE;
const DRV: u32 = S_ACKNOWLEDGE | S_DRIVER;
const FOK: u32 = DRV | S_FEATURES_OK;
const DOK: u32 = FOK | S_DRIVER_OK;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 5) | (1 << 3);

#[derive(Default)]
struct TestDevice {
    info: DeviceInfo,
    config_writes: Vec<(u64, Vec<u8>)>,
    activated_with: Option<u64>,
    resets: usize,
    notified: Vec<usize>,
    fail_activate: bool,
}

impl VirtioDevice for TestDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.activated_with = Some(activation.features);
        Ok(())
    }
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
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
    let config: Vec<u8> = (1..=8).collect();
    let dev = TestDevice {
        info: DeviceInfo::new(42, &[16, 256], FEATURES).with_config(&config),
        ..Default::default()
    };
    MmioTransport::new(dev, mem.clone(), eventfd()).expect("transport")
}

/// A test device brought up by the driver, with queue 0 (8 entries) at [`QUEUE_BASE`].
fn live_transport() -> (GuestMemoryMmap, MmioTransport<TestDevice>) {
    let mem = memory();
    let mut t = transport_on(&mem);
    bring_up(&mut t, &[&DriverQueue::new(&mem, QUEUE_BASE, 8)]);
    (mem, t)
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
        info: DeviceInfo::new(42, &[16], 1 << 5),
        ..Default::default()
    };
    assert!(matches!(
        MmioTransport::new(legacy, memory(), eventfd()),
        Err(MmioError::NotModern(42))
    ));
    let odd = TestDevice {
        info: DeviceInfo::new(42, &[16, 100], VIRTIO_F_VERSION_1),
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
    let (mem, mut t) = live_transport();
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
    let (_, mut t) = live_transport();
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
    let counts = t.lock().log_counts();
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
    fn info(&self) -> &DeviceInfo {
        static INFO: DeviceInfo = DeviceInfo::new(43, &[16, 16], VIRTIO_F_VERSION_1);
        &INFO
    }
    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError> {
        let access = activation.access;
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

/// Issue 13: a live transport saved and put back into a fresh one for the same device reads
/// the same registers and queues, is live again (its device activated with the restored
/// queues) and goes on from the same ring indices; damaged bytes are refused.
#[test]
fn a_saved_transport_restores_live_into_a_fresh_one() {
    let (mem, mut a) = live_transport();
    let mut dq = DriverQueue::new(&mem, QUEUE_BASE, 8);
    dq.add_chain(&[r(BUF_BASE, 16)]);
    write_reg(&mut a, QUEUE_NOTIFY, 0);
    assert_eq!(dq.used_idx(), 1);
    let saved = a.lock().save();
    let mut b = transport_on(&mem);
    b.lock().restore(&saved).expect("restore");
    assert!(b.lock().is_activated(), "not live after the restore");
    assert_eq!(b.lock().device().activated_with, Some(FEATURES));
    for reg in [STATUS, QUEUE_SEL, INTERRUPT_STATUS] {
        assert_eq!(
            read_reg(&mut a, reg),
            read_reg(&mut b, reg),
            "register {reg:#x}"
        );
    }
    assert_eq!(rings(&a, 0), rings(&b, 0));
    assert_eq!(
        a.lock().queues()[0].next_used(),
        b.lock().queues()[0].next_used()
    );
    // It goes on where the saved one was: the next chain is used at index 1.
    dq.add_chain(&[r(BUF_BASE, 16)]);
    write_reg(&mut b, QUEUE_NOTIFY, 0);
    assert_eq!(dq.used_idx(), 2);
    // Damaged: cut short, a queue too many, into a live transport.
    let c = transport_on(&mem);
    assert!(c.lock().restore(&saved[..saved.len() - 1]).is_err());
    let mut more = saved.clone();
    more[28..32].copy_from_slice(&3u32.to_le_bytes());
    assert!(c.lock().restore(&more).is_err());
    assert!(
        b.lock().restore(&saved).is_err(),
        "restored over a live transport"
    );
}
