//! What depends on the guest's architecture: today x86-64 only (the Linux boot protocol,
//! page tables, MP table, vCPU registers), as in Firecracker's `arch/`.

pub mod x86_64;
