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

/// vm-superio's 8250: interrupt on an irqfd, output to the [`super::console::Console`].
pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>;

/// A COM1 UART whose interrupt writes `irq` and whose output goes to `out`.
pub fn new(irq: EventFd, out: ConsoleWriter) -> SerialDevice {
    Serial::new(IrqTrigger(irq), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console::Console;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    const THR: u8 = 0;
    const IER: u8 = 1;
    const LSR: u8 = 5;
    const IER_THR_EMPTY: u8 = 0x2;
    const LSR_THR_EMPTY: u8 = 0x20;

    fn setup() -> (SerialDevice, Arc<Mutex<Console>>, EventFd) {
        let console = Arc::new(Mutex::new(Console::new(Instant::now(), None)));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = new(evt.try_clone().unwrap(), ConsoleWriter(console.clone()));
        (serial, console, evt)
    }

    #[test]
    fn bytes_written_by_the_guest_become_console_lines() {
        let (mut s, console, _) = setup();
        for b in b"Hello!\n" {
            s.write(THR, *b).unwrap();
        }
        let text = console.lock().unwrap().text();
        assert!(text.ends_with(" Hello!\n"), "{text:?}");
        // The transmitter is always ready: the guest never waits on us.
        assert_ne!(s.read(LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn transmit_interrupt_reaches_the_irqfd() {
        let (mut s, _, evt) = setup();
        assert!(
            evt.read().is_err(),
            "no interrupt before the guest enables it"
        );
        s.write(IER, IER_THR_EMPTY).unwrap();
        s.write(THR, b'x').unwrap();
        assert!(evt.read().unwrap() >= 1, "THR-empty interrupt signalled");
    }
}
