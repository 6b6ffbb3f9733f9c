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
    walk(mem, cr3, vaddr).map(|m| m.gpa)
}

/// Where a guest-virtual address leads through 4-level page tables, and what the walk allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The guest-physical address.
    pub gpa: u64,
    /// Every level allows writes (R/W set).
    pub writable: bool,
    /// Every level allows user mode (U/S set): a user page, which supervisor accesses may not
    /// touch under SMAP.
    pub user: bool,
}

const PTE_PRESENT: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
/// Bits 12-51 of an entry: the next table's or the page's address.
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Walks 4-level page tables rooted at `cr3` in `mem` for `va`, as the MMU would: 4 KiB,
/// 2 MiB and 1 GiB pages; None where an entry is not present or a table lies outside `mem`.
pub fn walk<M: GuestMemoryBackend>(mem: &M, cr3: u64, va: u64) -> Option<Mapping> {
    let mut table = cr3 & PTE_ADDR;
    let (mut writable, mut user) = (true, true);
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        writable &= entry & PTE_RW != 0;
        user &= entry & PTE_USER != 0;
        let addr = entry & PTE_ADDR;
        if (level == 1 || level == 2) && entry & PAGE_SIZE_2M != 0 {
            let size = 1u64 << shift;
            return Some(Mapping {
                gpa: (addr & !(size - 1)) + (va & (size - 1)),
                writable,
                user,
            });
        }
        table = addr;
    }
    Some(Mapping {
        gpa: table + (va & 0xfff),
        writable,
        user,
    })
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
