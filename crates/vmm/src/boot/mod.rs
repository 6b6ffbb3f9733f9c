//! Everything the x86-64 Linux boot protocol needs from the VMM.

pub mod cpu;
pub mod gdt;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod params;
