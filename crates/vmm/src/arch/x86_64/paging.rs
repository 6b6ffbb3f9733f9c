//! Identity page tables for the 64-bit entry: the first 1 GiB mapped with 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// The entries to write: (address, value) pairs; kept separate from the writing for tests.
pub fn entries() -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(514);
    out.push((PML4_ADDR, PDPT_ADDR | PRESENT_RW));
    out.push((PDPT_ADDR, PD_ADDR | PRESENT_RW));
    for i in 0..512u64 {
        out.push((PD_ADDR + i * 8, (i << 21) | PRESENT_RW | PAGE_SIZE_2M));
    }
    out
}

/// Writes the tables; returns the value for CR3.
pub fn write<M: GuestMemoryBackend>(mem: &M) -> Result<u64, vm_memory::GuestMemoryError> {
    for (addr, value) in entries() {
        mem.write_obj(value, GuestAddress(addr))?;
    }
    Ok(PML4_ADDR)
}

/// Walks the tables in `mem` like the MMU would for `vaddr` (tests and debugging).
pub fn translate<M: GuestMemoryBackend>(mem: &M, cr3: u64, vaddr: u64) -> Option<u64> {
    let pml4e: u64 = mem
        .read_obj(GuestAddress(cr3 + ((vaddr >> 39) & 0x1ff) * 8))
        .ok()?;
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte: u64 = mem
        .read_obj(GuestAddress((pml4e & !0xfff) + ((vaddr >> 30) & 0x1ff) * 8))
        .ok()?;
    if pdpte & 1 == 0 {
        return None;
    }
    let pde: u64 = mem
        .read_obj(GuestAddress((pdpte & !0xfff) + ((vaddr >> 21) & 0x1ff) * 8))
        .ok()?;
    if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff) | (vaddr & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn identity_maps_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write(&mem).unwrap();
        assert_eq!(cr3, PML4_ADDR);
        for va in [0u64, 0x1000, 0x100_0000, 0x123_4567, (1 << 30) - 1] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 1 << 30), None);
    }
}
