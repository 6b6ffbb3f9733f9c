//! Everything the x86-64 Linux boot protocol needs from the VMM: the kernel and initramfs
//! loaded, boot parameters, MP table, page tables, GDT, and the vCPU state of the 64-bit
//! entry (set through [`crate::hypervisor::Vcpu`]).

pub mod cpu;
pub mod gdt;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod params;
