//! The device manager: builds a VM's buses. Legacy devices go at their fixed ports; each
//! virtio device goes through [`DeviceManager::attach_virtio_device`], which gives it the next
//! MMIO window and interrupt line, wires the interrupt (an irqfd), puts it on the MMIO bus and
//! adds its `virtio_mmio.device=` entry to the kernel command line. Adding a device is a
//! device model and one call; nothing here, in the VM builder or in the address and GSI
//! arithmetic changes.

pub mod bus;
pub mod legacy;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use bus::{Bus, BusDevice, BusError};

use crate::devices::console::ConsoleWriter;
use crate::devices::virtio;
use crate::hypervisor::{HypervisorError, Vm};
use crate::layout::*;
use crate::vm::VmEvent;

/// The highest GSI a device may use: the IOAPIC has 24 pins.
const MAX_GSI: u32 = 23;

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Creating the device's interrupt eventfd failed.
    #[error("creating an eventfd for {name} failed: {source}")]
    EventFd {
        /// The device.
        name: &'static str,
        /// The error from eventfd.
        #[source]
        source: std::io::Error,
    },
    /// Registering the eventfd as an irqfd for the device's GSI failed.
    #[error("wiring the interrupt of {name}: {source}")]
    Irq {
        /// The device.
        name: &'static str,
        /// The hypervisor's error.
        #[source]
        source: HypervisorError,
    },
    /// The device model or its transport could not be built.
    #[error("{name}: {source}")]
    Create {
        /// The device.
        name: &'static str,
        /// The builder's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Every virtio GSI (5 to 23) is taken.
    #[error("no room for {name}: at most {} virtio devices", MAX_GSI - VIRTIO_IRQ_BASE + 1)]
    TooMany {
        /// The device that did not fit.
        name: &'static str,
    },
    /// The bus refused the device's range.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Where an attached virtio device went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Guest-physical base of its MMIO window ([`VIRTIO_MMIO_SIZE`] bytes).
    pub base: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

/// A VM's devices while it is being built.
#[derive(Debug, Default)]
pub struct DeviceManager {
    mmio: Bus,
    pio: Bus,
    virtio_count: u32,
    cmdline: Vec<String>,
}

/// The buses of a built VM, shared by its vCPU threads.
#[derive(Debug, Default)]
pub struct Buses {
    /// Guest-physical addresses: the virtio-mmio devices.
    pub mmio: Bus,
    /// I/O ports: COM1 and the i8042.
    pub pio: Bus,
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// COM1 (its output to `console`, its interrupt on [`SERIAL_IRQ`]) and the i8042 (its
    /// reset command sends [`VmEvent::Reset`] on `events`).
    pub fn attach_legacy(
        &mut self,
        vm: &dyn Vm,
        console: ConsoleWriter,
        events: Sender<VmEvent>,
    ) -> Result<(), DeviceError> {
        let evt = new_irq(vm, "serial", SERIAL_IRQ)?;
        let serial = legacy::SerialPorts::new(evt, console);
        self.pio
            .insert(u64::from(SERIAL_PORT_BASE), 8, Arc::new(Mutex::new(serial)))?;
        self.pio.insert(
            u64::from(I8042_DATA_PORT),
            legacy::I8042_PORTS,
            Arc::new(Mutex::new(legacy::I8042Ports::new(events))),
        )?;
        Ok(())
    }

    /// Attaches a virtio device: the next MMIO window and GSI, an irqfd for it, the
    /// transport `make` builds from the guest memory and that irqfd, and its command-line
    /// entry.
    pub fn attach_virtio_device<T, E>(
        &mut self,
        vm: &dyn Vm,
        mem: &GuestMemoryMmap,
        name: &'static str,
        make: impl FnOnce(GuestMemoryMmap, EventFd) -> Result<T, E>,
    ) -> Result<VirtioSlot, DeviceError>
    where
        T: BusDevice + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let gsi = VIRTIO_IRQ_BASE + self.virtio_count;
        if gsi > MAX_GSI {
            return Err(DeviceError::TooMany { name });
        }
        let base = VIRTIO_MMIO_BASE + u64::from(self.virtio_count) * VIRTIO_MMIO_SIZE;
        let evt = new_irq(vm, name, gsi)?;
        let device = make(mem.clone(), evt).map_err(|e| DeviceError::Create {
            name,
            source: e.into(),
        })?;
        self.mmio
            .insert(base, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(device)))?;
        self.virtio_count += 1;
        self.cmdline
            .push(virtio::cmdline_param(base, VIRTIO_MMIO_SIZE, gsi));
        Ok(VirtioSlot { base, gsi })
    }

    /// Adds a kernel parameter a device needs (e.g. `ip=` for the NIC).
    pub fn add_cmdline(&mut self, param: String) {
        self.cmdline.push(param);
    }

    /// The kernel parameters the devices need, in attach order.
    pub fn cmdline(&self) -> &[String] {
        &self.cmdline
    }

    /// Puts a snapshot's device states ([`Buses::save_states`]) into this VM's devices, which
    /// must be the same devices at the same places.
    pub fn restore_states(&self, saved: &[(String, Vec<u8>)]) -> Result<(), String> {
        restore_bus(&self.pio, "pio", saved)?;
        restore_bus(&self.mmio, "mmio", saved)
    }

    /// The finished buses.
    pub fn into_buses(self) -> Buses {
        Buses {
            mmio: self.mmio,
            pio: self.pio,
        }
    }
}

impl Buses {
    /// Every device's state for a snapshot, named by its bus and base address
    /// (`pio@0x3f8`, `mmio@0xd0000000`). Called with the vCPUs stopped.
    pub fn save_states(&self) -> Vec<(String, Vec<u8>)> {
        let named = |bus: &Bus, kind: &str| {
            bus.save_states()
                .into_iter()
                .map(|(base, b)| (format!("{kind}@{base:#x}"), b))
                .collect::<Vec<_>>()
        };
        let mut out = named(&self.pio, "pio");
        out.extend(named(&self.mmio, "mmio"));
        out
    }
}

/// The states named `kind@base` among `saved` into `bus`'s devices.
fn restore_bus(bus: &Bus, kind: &str, saved: &[(String, Vec<u8>)]) -> Result<(), String> {
    let mut mine = Vec::new();
    for (name, bytes) in saved {
        let Some(base) = name.strip_prefix(kind).and_then(|r| r.strip_prefix("@0x")) else {
            continue;
        };
        let base = u64::from_str_radix(base, 16)
            .map_err(|_| format!("a device state with a bad name ({name:?})"))?;
        mine.push((base, bytes.clone()));
    }
    bus.restore_states(&mine)
        .map_err(|e| format!("{kind} bus: {e}"))
}

/// An eventfd wired to `gsi`.
fn new_irq(vm: &dyn Vm, name: &'static str, gsi: u32) -> Result<EventFd, DeviceError> {
    let evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { name, source })?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|source| DeviceError::Irq { name, source })?;
    Ok(evt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::kvm::KvmHypervisor;
    use crate::hypervisor::Hypervisor;

    struct Nothing;
    impl BusDevice for Nothing {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    /// Windows and GSIs are handed out in order, each device adds its command-line entry,
    /// a failing constructor names the device, and the 20th device does not fit.
    #[test]
    fn virtio_devices_get_consecutive_windows_and_gsis() {
        let vm = KvmHypervisor::get().unwrap().create_vm().unwrap();
        vm.create_irqchip().unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let mut dm = DeviceManager::new();
        let a = dm
            .attach_virtio_device(&*vm, &mem, "a", |_, _| Ok::<_, std::io::Error>(Nothing))
            .unwrap();
        let b = dm
            .attach_virtio_device(&*vm, &mem, "b", |_, _| Ok::<_, std::io::Error>(Nothing))
            .unwrap();
        assert_eq!(
            a,
            VirtioSlot {
                base: VIRTIO_MMIO_BASE,
                gsi: VIRTIO_IRQ_BASE
            }
        );
        assert_eq!(b.base, VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE);
        assert_eq!(b.gsi, VIRTIO_IRQ_BASE + 1);
        assert_eq!(dm.cmdline().len(), 2);
        assert!(
            dm.cmdline()[1].contains("@0xd0001000:6"),
            "{:?}",
            dm.cmdline()
        );
        let e = dm
            .attach_virtio_device(&*vm, &mem, "broken", |_, _| {
                Err::<Nothing, _>(std::io::Error::other("no such file"))
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "broken: no such file");
        while dm.virtio_count <= MAX_GSI - VIRTIO_IRQ_BASE {
            dm.attach_virtio_device(&*vm, &mem, "x", |_, _| Ok::<_, std::io::Error>(Nothing))
                .unwrap();
        }
        let e = dm
            .attach_virtio_device(&*vm, &mem, "one too many", |_, _| {
                Ok::<_, std::io::Error>(Nothing)
            })
            .unwrap_err();
        assert!(matches!(e, DeviceError::TooMany { .. }), "{e}");
    }
}
