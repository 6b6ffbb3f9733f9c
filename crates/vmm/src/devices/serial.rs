//! 8250 UART at COM1 (vm-superio), its interrupt delivered through a KVM irqfd.

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleWriter;

/// Raises the serial interrupt by writing the irqfd registered for its GSI.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>;

pub fn new(irq: EventFd, out: ConsoleWriter) -> SerialDevice {
    Serial::new(IrqTrigger(irq), out)
}
