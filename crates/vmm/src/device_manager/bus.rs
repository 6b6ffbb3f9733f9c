//! An address bus: ranges of guest addresses (MMIO) or ports (PIO), each served by one
//! device behind a lock of its own. A vCPU's exit locks only the device it touches, so a
//! device that is slow to answer (the CGI channel waiting for room in its socket) holds up
//! no other device and no other vCPU's access elsewhere.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a [`Bus`]. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`: fill `data` (the vCPU loop zeroes it
    /// first, so what is left untouched reads as 0).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// The device's state for a debug dump (numbers only, several lines), if it has any to
    /// tell. Called after the vCPUs stopped; must not wait long for anything.
    fn describe(&self) -> Option<String> {
        None
    }
    /// Whether the device keeps guest-visible state for a snapshot: then
    /// [`BusDevice::save_state`] returns it (always Some).
    fn keeps_state(&self) -> bool {
        false
    }
    /// The device's guest-visible state for a snapshot (issue 13), if it keeps any. Called
    /// after the vCPUs stopped.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
    /// Puts back what [`BusDevice::save_state`] wrote, into this device built fresh for a
    /// restored VM (before its first KVM_RUN).
    fn restore_state(&mut self, _bytes: &[u8]) -> Result<(), String> {
        Err("this device keeps no state to restore".into())
    }
}

/// Why [`Bus::insert`] refused a range.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty, runs past the end of the address space, or overlaps a device.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps a device already there")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// One bus entry: its length and the device.
#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges → devices. Built before the vCPUs start, then only read (shared by every
/// vCPU thread without a lock of its own).
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    /// Puts `device` at `[base, base + len)`. A range that overlaps another is refused.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |end: u64| {
            self.devices
                .range(..end)
                .next_back()
                .is_some_and(|(b, e)| b + e.len > base)
        };
        match end {
            Some(end) if !overlaps(end) => {
                self.devices.insert(base, Entry { len, device });
                Ok(())
            }
            _ => Err(BusError::Overlap { base, len }),
        }
    }

    /// The device whose range holds `addr`, and `addr`'s offset in it.
    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, e) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < e.len).then_some((offset, &e.device))
    }

    /// Reads from the device at `addr`; false (and `data` untouched) when there is none. A
    /// device whose lock is poisoned (it panicked) reads as nothing.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, dev)) = self.find(addr) else {
            return false;
        };
        match dev.lock() {
            Ok(mut d) => {
                d.read(offset, data);
                true
            }
            Err(_) => false,
        }
    }

    /// Every device's [`BusDevice::describe`], with its base address, in address order.
    pub fn describe(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|(base, e)| {
                let text = match e.device.lock() {
                    Ok(d) => d.describe(),
                    Err(p) => p.into_inner().describe(),
                }?;
                Some(format!("@{base:#x} {text}"))
            })
            .collect()
    }

    /// Every device's [`BusDevice::save_state`] that has one, with its base address, in
    /// address order.
    pub fn save_states(&self) -> Vec<(u64, Vec<u8>)> {
        self.devices
            .iter()
            .filter_map(|(base, e)| {
                let state = match e.device.lock() {
                    Ok(d) => d.save_state(),
                    Err(p) => p.into_inner().save_state(),
                }?;
                Some((*base, state))
            })
            .collect()
    }

    /// Restores each saved state into the device at the same base address. The bus must hold
    /// exactly the devices that were saved (the restoring VM attaches the same devices in the
    /// same order): a device without a state, or a state without its device, is refused.
    pub fn restore_states(&self, saved: &[(u64, Vec<u8>)]) -> Result<(), String> {
        let keeps_state: Vec<u64> = self
            .devices
            .iter()
            .filter(|(_, e)| e.device.lock().is_ok_and(|d| d.keeps_state()))
            .map(|(b, _)| *b)
            .collect();
        let bases: Vec<u64> = saved.iter().map(|(b, _)| *b).collect();
        if keeps_state != bases {
            return Err(format!(
                "the snapshot has device states at {bases:#x?}, this VM has devices at {keeps_state:#x?}"
            ));
        }
        for (base, bytes) in saved {
            let e = self
                .devices
                .get(base)
                .ok_or_else(|| format!("no device at {base:#x}"))?;
            let mut d = e
                .device
                .lock()
                .map_err(|_| format!("the device at {base:#x} is poisoned"))?;
            d.restore_state(bytes)
                .map_err(|why| format!("the device at {base:#x}: {why}"))?;
        }
        Ok(())
    }

    /// Writes to the device at `addr`; false when there is none (or it is poisoned).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, dev)) = self.find(addr) else {
            return false;
        };
        match dev.lock() {
            Ok(mut d) => {
                d.write(offset, data);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Remembers the last write; reads return its base tag and the offset.
    struct Probe {
        tag: u8,
        last: Vec<u8>,
        /// When set, a write waits for this before returning (a slow device).
        gate: Option<mpsc::Receiver<()>>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.tag;
            data[1] = offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            if let Some(g) = &self.gate {
                let _ = g.recv_timeout(Duration::from_secs(5));
            }
            self.last = data.to_vec();
        }
    }

    fn probe(tag: u8) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(Probe {
            tag,
            last: Vec::new(),
            gate: None,
        }))
    }

    #[test]
    fn ranges_route_to_their_device_and_overlaps_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x1000, 0x100, probe(1)).unwrap();
        bus.insert(0x1100, 0x100, probe(2)).unwrap();
        for (base, len) in [
            (0x10ff, 2),
            (0x1000, 0x100),
            (0x0f00, 0x101),
            (0x1050, 1),
            (5, 0),
        ] {
            assert!(
                bus.insert(base, len, probe(9)).is_err(),
                "{base:#x}+{len:#x}"
            );
        }
        assert!(bus.insert(u64::MAX, 2, probe(9)).is_err());
        let mut d = [0u8; 2];
        assert!(bus.read(0x1000, &mut d));
        assert_eq!(d, [1, 0]);
        assert!(bus.read(0x11ff, &mut d));
        assert_eq!(d, [2, 0xff]);
        assert!(!bus.read(0x1200, &mut d));
        assert!(!bus.read(0xfff, &mut d));
        assert!(bus.write(0x1104, &[7]));
        assert!(!bus.write(0x2000, &[7]));
    }

    /// The point of a lock per device: while one device's write is stuck, another device on
    /// the same bus still answers at once (with one lock for the bus it waited).
    #[test]
    fn a_stuck_device_does_not_hold_up_another() {
        let (release, gate) = mpsc::channel();
        let slow: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Probe {
            tag: 1,
            last: Vec::new(),
            gate: Some(gate),
        }));
        let mut bus = Bus::default();
        bus.insert(0x1000, 0x100, slow).unwrap();
        bus.insert(0x2000, 0x100, probe(2)).unwrap();
        let bus = Arc::new(bus);
        let b = Arc::clone(&bus);
        let stuck = std::thread::spawn(move || b.write(0x1000, &[1]));
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let mut d = [0u8; 2];
        assert!(bus.read(0x2000, &mut d));
        assert_eq!(d[0], 2);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        release.send(()).unwrap();
        assert!(stuck.join().unwrap());
    }
}
