//! The boot GDT. The 64-bit boot protocol wants flat descriptors at __BOOT_CS (0x10) and
//! __BOOT_DS (0x18); the kernel loads its own GDT almost at once.

use crate::hypervisor::Segment;

/// Selector of the flat 64-bit code segment (__BOOT_CS).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the flat data segment (__BOOT_DS), loaded into DS, ES, FS, GS and SS.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS loaded into TR.
pub const BOOT_TSS: u16 = 0x20;

/// Builds one 8-byte descriptor from access/flags (`0xF0FF` mask: flags nibble, access byte).
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((flags & 0x0000_f0ff) << 40)
}

/// null, null, 64-bit code, data, TSS.
pub fn table() -> [u64; 5] {
    [
        0,
        0,
        entry(0xa09b, 0, 0xfffff), // code: G, L, P, DPL0, exec/read, accessed
        entry(0xc093, 0, 0xfffff), // data: G, D/B, P, DPL0, read/write, accessed
        entry(0x808b, 0, 0xfffff), // TSS: G, P, busy 64-bit TSS
    ]
}

/// The KVM segment register state matching descriptor `desc` loaded with `selector`.
pub fn segment(desc: u64, selector: u16) -> Segment {
    let base = ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000);
    let raw_limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((desc >> 47) & 1) as u8;
    Segment {
        base,
        limit,
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present,
        dpl: ((desc >> 45) & 0x3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_64bit() {
        let t = table();
        let cs = segment(t[2], BOOT_CS);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.s, cs.present, cs.dpl),
            (1, 0, 1, 1, 1, 0)
        );
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.selector, 0x10);
    }

    #[test]
    fn data_segment_is_flat_rw() {
        let ds = segment(table()[3], BOOT_DS);
        assert_eq!(
            (ds.base, ds.limit, ds.type_, ds.db, ds.l),
            (0, 0xffff_ffff, 0x3, 1, 0)
        );
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let d = entry(0x4093, 0x1234_5678, 0xabcde);
        let s = segment(d, 0);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
