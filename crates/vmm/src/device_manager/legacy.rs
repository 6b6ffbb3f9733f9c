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

impl crate::devices::persist::Persist for SerialPorts {
    const NAME: &'static str = "serial";
    type Host = (EventFd, ConsoleWriter);

    /// The UART's registers and its receive FIFO: nine register bytes, then the FIFO.
    fn save(&self) -> Vec<u8> {
        let s = self.0.state();
        let mut b = vec![
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ];
        b.extend_from_slice(&s.in_buffer);
        b
    }

    fn restore(
        (irq, out): Self::Host,
        b: &[u8],
    ) -> Result<Self, crate::devices::persist::PersistError> {
        let refuse = |reason: String| crate::devices::persist::PersistError {
            device: Self::NAME,
            reason,
        };
        if b.len() < 9 {
            return Err(refuse(format!("{} bytes, at least 9", b.len())));
        }
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: b[0],
            baud_divisor_high: b[1],
            interrupt_enable: b[2],
            interrupt_identification: b[3],
            line_control: b[4],
            line_status: b[5],
            modem_control: b[6],
            modem_status: b[7],
            scratch: b[8],
            in_buffer: b[9..].to_vec(),
        };
        let serial = vm_superio::Serial::from_state(
            &state,
            serial::IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| refuse(format!("{e:?}")))?;
        Ok(SerialPorts(serial))
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

    fn keeps_state(&self) -> bool {
        true
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        Some(crate::devices::persist::Persist::save(self))
    }

    /// Rebuilt from the saved state around this port's own interrupt and output.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), String> {
        let irq = self
            .0
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("duplicating the serial interrupt: {e}"))?;
        let out = ConsoleWriter(self.0.writer().0.clone());
        *self = crate::devices::persist::Persist::restore((irq, out), bytes)
            .map_err(|e| e.to_string())?;
        Ok(())
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

    /// What the guest set in the UART (line control, interrupt enable, scratch, the divisor
    /// latch) reads back the same from a UART rebuilt from its saved state; a FIFO longer
    /// than the UART's is refused.
    #[test]
    fn the_serial_ports_state_survives_a_save_and_restore() {
        use crate::devices::console::{Console, ConsoleWriter};
        use crate::devices::persist::Persist;
        use std::sync::{Arc, Mutex};
        let host = || {
            (
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ConsoleWriter(Arc::new(Mutex::new(Console::new(
                    std::time::Instant::now(),
                    None,
                )))),
            )
        };
        let (irq, out) = host();
        let mut a = SerialPorts::new(irq, out);
        a.write(3, &[0x80]); // LCR: divisor latch access
        a.write(0, &[0x0c]); // divisor low: 9600 baud
        a.write(3, &[0x03]); // LCR: 8N1
        a.write(1, &[0x02]); // IER: THR empty
        a.write(7, &[0x5a]); // scratch
        let saved = a.save();
        let mut b = SerialPorts::restore(host(), &saved).unwrap();
        for reg in [1u64, 3, 7] {
            let (mut x, mut y) = ([0u8], [0u8]);
            a.read(reg, &mut x);
            b.read(reg, &mut y);
            assert_eq!(x, y, "register {reg}");
        }
        b.write(3, &[0x83]);
        let mut lo = [0u8];
        b.read(0, &mut lo);
        assert_eq!(lo, [0x0c], "the divisor latch");
        let mut long = saved.clone();
        long.extend(std::iter::repeat_n(b'x', 1000));
        assert!(SerialPorts::restore(host(), &long).is_err());
        assert!(SerialPorts::restore(host(), &[1, 2]).is_err());
    }

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
