//! Emulated devices. Port-I/O devices (serial, i8042) and MMIO devices (virtio-mmio) are driven
//! synchronously from the vCPU thread on the matching VM exit, through the buses the device
//! manager builds ([`crate::device_manager`]).

pub mod console;
pub mod i8042;
pub mod persist;
pub mod serial;
pub mod virtio;

/// A device on the MMIO bus: a [`crate::device_manager::BusDevice`].
pub use crate::device_manager::BusDevice as MmioDevice;
