//! The legacy PC devices on the port bus: COM1 (8250 UART) and the i8042's reset command.

use std::sync::mpsc::Sender;

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::devices::console::ConsoleWriter;
use crate::devices::i8042::I8042;
use crate::devices::serial::{self, SerialDevice};
use crate::layout::{I8042_COMMAND_PORT, I8042_DATA_PORT};
use crate::vm::VmEvent;

/// COM1's eight ports.
pub struct SerialPorts(SerialDevice);

impl SerialPorts {
    /// An 8250 whose output goes to `out` and whose interrupt writes `irq`.
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        SerialPorts(serial::new(irq, out))
    }
}

impl BusDevice for SerialPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.0.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.0.write(off, *b) {
                tracing::warn!("serial: {e:?}");
            }
        }
    }
}

/// The i8042 at ports 0x60-0x64 (data at offset 0, command at 4; 0x61-0x63 between them
/// read as 0 and ignore writes, as before there was a bus).
pub struct I8042Ports {
    dev: I8042,
    events: Sender<VmEvent>,
}

/// The ports the i8042 range covers (data port through command port).
pub const I8042_PORTS: u64 = (I8042_COMMAND_PORT - I8042_DATA_PORT + 1) as u64;

impl I8042Ports {
    /// An i8042 whose reset command sends [`VmEvent::Reset`] on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042Ports { dev: I8042, events }
    }
}

impl BusDevice for I8042Ports {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let is_port = offset == 0 || offset == I8042_PORTS - 1;
        if let (Some(b), true) = (data.first_mut(), is_port) {
            *b = self.dev.read();
        }
    }

    /// Only the command port's reset command does anything: it ends the VM.
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_PORTS - 1 && data.first().is_some_and(|v| self.dev.write_command(*v)) {
            let _ = self.events.send(VmEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_command_ports_reset_ends_the_vm() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut d = I8042Ports::new(tx);
        d.write(0, &[0xfe]); // data port
        d.write(4, &[0xd1]);
        assert!(rx.try_recv().is_err());
        d.write(4, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset)));
        let mut b = [9u8];
        d.read(4, &mut b);
        assert_eq!(b, [0]);
    }
}
