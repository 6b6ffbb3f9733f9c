//! virtio-mmio register offsets (virtio 1.2, 4.2.2), relative to a device's MMIO window. The
//! bindings define these as u32; the bus hands us u64.

/// MagicValue (R): 0x74726976, "virt".
pub const MAGIC_VALUE: u64 = 0x000;
/// Version (R): the register layout version, 2.
pub const VERSION: u64 = 0x004;
/// DeviceID (R): the virtio device type (1 net, 2 block, 3 console, ...).
pub const DEVICE_ID: u64 = 0x008;
/// VendorID (R): ours is [`super::VENDOR_ID`], "xcgi".
pub const VENDOR: u64 = 0x00c;
/// DeviceFeatures (R): 32 feature bits of the device, the word DeviceFeaturesSel picks.
pub const DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel (W): which 32-bit word of the device features DeviceFeatures shows.
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures (W): 32 feature bits the driver accepts, the word DriverFeaturesSel picks.
pub const DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel (W): which 32-bit word of the driver features DriverFeatures sets.
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// QueueSel (W): the queue the Queue* registers refer to.
pub const QUEUE_SEL: u64 = 0x030;
/// QueueNumMax (R): the selected queue's maximum size (0: no such queue).
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum (W): the selected queue's size, chosen by the driver.
pub const QUEUE_NUM: u64 = 0x038;
/// QueueReady (RW): the selected queue is set up and may be used.
pub const QUEUE_READY: u64 = 0x044;
/// QueueNotify (W): the driver has new buffers in the queue whose index it writes.
pub const QUEUE_NOTIFY: u64 = 0x050;
/// InterruptStatus (R): bit 0 used buffer, bit 1 configuration change.
pub const INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK (W): clears the InterruptStatus bits written.
pub const INTERRUPT_ACK: u64 = 0x064;
/// Status (RW): the device status bits (ACKNOWLEDGE, DRIVER, FEATURES_OK, ...); 0 resets.
pub const STATUS: u64 = 0x070;
/// QueueDescLow (W): low 32 bits of the selected queue's descriptor table address.
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh (W): high 32 bits of the descriptor table address.
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow (W): low 32 bits of the selected queue's driver (available) ring address.
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh (W): high 32 bits of the driver ring address.
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow (W): low 32 bits of the selected queue's device (used) ring address.
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh (W): high 32 bits of the device ring address.
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// SHMSel (W): the shared memory region SHMLen/SHMBase describe.
pub const SHM_SEL: u64 = 0x0ac;
/// SHMLenLow (R): low 32 bits of the selected shared memory region's length.
pub const SHM_LEN_LOW: u64 = 0x0b0;
/// SHMLenHigh (R): high 32 bits of the region's length.
pub const SHM_LEN_HIGH: u64 = 0x0b4;
/// SHMBaseLow (R): low 32 bits of the selected shared memory region's address.
pub const SHM_BASE_LOW: u64 = 0x0b8;
/// SHMBaseHigh (R): high 32 bits of the region's address.
pub const SHM_BASE_HIGH: u64 = 0x0bc;
/// ConfigGeneration (R): changes whenever the configuration space changes.
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;
