//! Addressing: one /30 per VM slot, carved from a configurable pool.
//!
//! Slot `i` of a pool with base `B` owns `B+4i .. B+4i+3`: the host side of the TAP is
//! `B+4i+1`, the guest is `B+4i+2`, the netmask is 255.255.255.252. The guest MAC is
//! `06:00:` followed by the four bytes of the guest address (locally administered, unicast),
//! so it is unique per guest address and readable in `ip neigh` output.

use std::fmt;
use std::net::Ipv4Addr;

use thiserror::Error;

/// Default pool base: 172.16.0.0 (private, RFC 1918). The addresses live only inside xcgi's
/// own network namespace, so they cannot clash with the host's networks.
pub const DEFAULT_BASE: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 0);
/// Default number of slots (concurrent VMs with a NIC).
pub const DEFAULT_SIZE: u32 = 64;
/// Prefix length of each slot's subnet.
pub const SLOT_PREFIX_LEN: u8 = 30;
/// Netmask of each slot's subnet.
pub const SLOT_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 252);

/// Errors validating an address plan or looking up one of its slots.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddrError {
    /// The base's last two bits are not zero.
    #[error("network pool base {base} is not the start of a /30 (its last two bits must be 0)")]
    Unaligned {
        /// The rejected base.
        base: Ipv4Addr,
    },
    /// The base is 0.0.0.0, loopback, multicast, or in 240.0.0.0/4 (which holds broadcast).
    #[error("network pool base {base} is not a unicast address usable for guests")]
    NotUnicast {
        /// The rejected base.
        base: Ipv4Addr,
    },
    /// The pool size is 0.
    #[error("network pool size must be at least 1")]
    Empty,
    /// `size` slots of 4 addresses would run past the end of the /16 that holds `base`.
    #[error(
        "network pool size {size} does not fit in the /16 of base {base}: at most {max} slots \
         (4 addresses each) fit from that base"
    )]
    TooLarge {
        /// The pool base.
        base: Ipv4Addr,
        /// The requested number of slots.
        size: u32,
        /// The most slots that fit from `base`.
        max: u32,
    },
    /// A slot index at or past the pool size.
    #[error("slot {slot} is outside the network pool (size {size})")]
    NoSuchSlot {
        /// The requested slot.
        slot: u32,
        /// The pool size (number of slots).
        size: u32,
    },
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// The validated address plan of a pool: base and number of /30 slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrPlan {
    base: Ipv4Addr,
    size: u32,
}

impl AddrPlan {
    /// Checks that `base` starts a /30, is unicast, and that `size` slots fit inside the /16
    /// that contains `base`.
    pub fn new(base: Ipv4Addr, size: u32) -> Result<Self, AddrError> {
        let b = u32::from(base);
        if b & 3 != 0 {
            return Err(AddrError::Unaligned { base });
        }
        if base.is_unspecified()
            || base.is_loopback()
            || base.is_multicast()
            || base.is_broadcast()
            || b >= 0xf000_0000
        {
            return Err(AddrError::NotUnicast { base });
        }
        if size == 0 {
            return Err(AddrError::Empty);
        }
        let max = (0x1_0000 - (b & 0xffff)) / 4;
        if size > max {
            return Err(AddrError::TooLarge { base, size, max });
        }
        Ok(AddrPlan { base, size })
    }

    /// The pool's first address (the network address of slot 0).
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    /// Number of /30 slots.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The addresses of slot `slot`.
    pub fn slot(&self, slot: u32) -> Result<SlotAddrs, AddrError> {
        if slot >= self.size {
            return Err(AddrError::NoSuchSlot {
                slot,
                size: self.size,
            });
        }
        let net = u32::from(self.base) + 4 * slot;
        let host = Ipv4Addr::from(net + 1);
        let guest = Ipv4Addr::from(net + 2);
        let g = guest.octets();
        Ok(SlotAddrs {
            slot,
            host,
            guest,
            mac: MacAddr([0x06, 0x00, g[0], g[1], g[2], g[3]]),
        })
    }
}

/// The addresses of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAddrs {
    /// Index of the slot in its pool (0-based).
    pub slot: u32,
    /// Host side of the TAP (the guest's gateway).
    pub host: Ipv4Addr,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The guest NIC's MAC: `06:00:` and the four bytes of `guest`.
    pub mac: MacAddr,
}

impl SlotAddrs {
    /// Always [`SLOT_NETMASK`] (255.255.255.252).
    pub fn netmask(&self) -> Ipv4Addr {
        SLOT_NETMASK
    }

    /// The guest kernel's static configuration:
    /// `ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>`.
    pub fn kernel_ip_param(&self) -> String {
        format!(
            "ip={}::{}:{}::eth0:off",
            self.guest, self.host, SLOT_NETMASK
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slots() {
        let plan = AddrPlan::new(DEFAULT_BASE, DEFAULT_SIZE).expect("default plan is valid");
        let s0 = plan.slot(0).expect("slot 0");
        assert_eq!(s0.host, Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(s0.guest, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(s0.mac.to_string(), "06:00:ac:10:00:02");
        assert_eq!(
            s0.kernel_ip_param(),
            "ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off"
        );
        let last = plan.slot(63).expect("slot 63");
        assert_eq!(last.host, Ipv4Addr::new(172, 16, 0, 253));
        assert_eq!(last.guest, Ipv4Addr::new(172, 16, 0, 254));
        assert_eq!(
            plan.slot(64),
            Err(AddrError::NoSuchSlot { slot: 64, size: 64 })
        );
    }

    #[test]
    fn slots_cross_octets_and_macs_stay_unique() {
        let plan = AddrPlan::new(DEFAULT_BASE, 16384).expect("a whole /16 fits");
        let s = plan.slot(64).expect("slot 64");
        assert_eq!(s.guest, Ipv4Addr::new(172, 16, 1, 2));
        assert_eq!(s.mac.0, [6, 0, 172, 16, 1, 2]);
        let last = plan.slot(16383).expect("last slot");
        assert_eq!(last.guest, Ipv4Addr::new(172, 16, 255, 254));
        let mut macs: Vec<_> = (0..16384)
            .map(|i| plan.slot(i).map(|s| s.mac.0))
            .collect::<Result<_, _>>()
            .expect("all slots");
        macs.sort_unstable();
        macs.dedup();
        assert_eq!(macs.len(), 16384);
        // Locally administered, unicast.
        assert_eq!(last.mac.0[0] & 0b11, 0b10);
    }

    #[test]
    fn size_is_bounded_by_the_base_slash16() {
        assert_eq!(
            AddrPlan::new(DEFAULT_BASE, 16385),
            Err(AddrError::TooLarge {
                base: DEFAULT_BASE,
                size: 16385,
                max: 16384
            })
        );
        let high = Ipv4Addr::new(10, 9, 255, 0);
        assert!(AddrPlan::new(high, 64).is_ok());
        assert!(matches!(
            AddrPlan::new(high, 65),
            Err(AddrError::TooLarge { max: 64, .. })
        ));
        assert_eq!(AddrPlan::new(DEFAULT_BASE, 0), Err(AddrError::Empty));
        assert!(matches!(
            AddrPlan::new(Ipv4Addr::new(172, 16, 0, 2), 4),
            Err(AddrError::Unaligned { .. })
        ));
        assert!(matches!(
            AddrPlan::new(Ipv4Addr::new(127, 0, 0, 0), 4),
            Err(AddrError::NotUnicast { .. })
        ));
        let msg = AddrError::TooLarge {
            base: DEFAULT_BASE,
            size: 20000,
            max: 16384,
        }
        .to_string();
        assert!(msg.contains("16384"), "{msg}");
    }
}
