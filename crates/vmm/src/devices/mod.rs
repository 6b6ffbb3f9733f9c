//! Emulated devices. Port-I/O devices (serial, i8042) and MMIO devices (virtio-mmio) are driven
//! synchronously from the vCPU thread on the matching VM exit.

pub mod console;
pub mod i8042;
pub mod serial;
pub mod virtio;

/// A device on the MMIO bus. `offset` is relative to the device's base address.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}
