//! Just enough of the i8042 keyboard controller for a guest to reboot: the CPU reset command
//! (0xFE to the command port) ends the VM. Reads return 0: "no data, ready for a command".

/// The command byte that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; it has no state.
#[derive(Debug, Default)]
pub struct I8042;

impl I8042 {
    /// Returns true when the guest asked for a reset.
    pub fn write_command(&mut self, value: u8) -> bool {
        value == CMD_RESET_CPU
    }

    /// A read of the data or status port: always 0.
    pub fn read(&self) -> u8 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_is_recognised() {
        let mut d = I8042;
        assert!(d.write_command(0xfe));
        assert!(!d.write_command(0xd1));
        assert_eq!(d.read(), 0);
    }
}
