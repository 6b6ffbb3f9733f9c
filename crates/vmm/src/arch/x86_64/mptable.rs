//! Intel MultiProcessor Specification 1.4 table. Without ACPI it is how the kernel learns
//! about the CPUs, the IO-APIC and how ISA interrupts are wired to it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_START, IO_APIC_DEFAULT_PHYS_BASE};

/// IO-APIC inputs we describe (all of KVM's in-kernel IO-APIC pins).
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Why the MP table could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The vCPU count is 0 or above 254 (APIC ids 0..n are the CPUs, n the IO-APIC).
    #[error("{0} vCPUs do not fit in the MP table (at most 254)")]
    TooManyCpus(u8),
    /// Writing the table into guest memory failed.
    #[error("writing the MP table into guest memory failed: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table as they will sit at `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus; // APIC ids 0..num_cpus-1 are the CPUs
    let config_addr = base + 16;

    // Configuration table entries.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IO-APIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IO-APIC pin n, as KVM's default GSI routing does.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 = ExtINT (8259), LINT1 = NMI, on every local APIC.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"XCGI    "); // OEM id
    header.extend_from_slice(b"MICROVM     "); // product id
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), 44);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(config_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table at the start of the EBDA, where the kernel scans for it.
pub fn write<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(EBDA_START, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        let t = build(EBDA_START, 2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let cfg = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(cfg, EBDA_START + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        // 2 cpus + bus + ioapic + 24 irqs + 2 lints
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            2 + 1 + 1 + 24 + 2
        );
        // Fits below 640 KiB.
        assert!(EBDA_START + t.len() as u64 <= 0xa0000);
    }

    #[test]
    fn first_cpu_is_bsp_and_others_are_not() {
        let t = build(EBDA_START, 3).unwrap();
        let e = &t[16 + 44..];
        assert_eq!(e[0], 0);
        assert_eq!(e[3], CPU_ENABLED | CPU_BSP);
        assert_eq!(e[20 + 1], 1);
        assert_eq!(e[20 + 3], CPU_ENABLED);
    }

    #[test]
    fn rejects_zero_cpus() {
        assert!(build(EBDA_START, 0).is_err());
    }
}
