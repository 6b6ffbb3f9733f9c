//! vCPU state for the 64-bit Linux entry: CPUID, MSRs, FPU, general and special registers,
//! local APIC LINT pins.

use crate::hypervisor::{CpuId, Fpu, HypervisorError, MsrEntry, Regs, SpecialRegs, Vcpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt;
use crate::layout::{BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, ZERO_PAGE_ADDR};

/// Why setting up a vCPU's boot state failed.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// KVM_SET_CPUID2 failed.
    #[error("setting CPUID: {0}")]
    SetCpuid(HypervisorError),
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs (the first refused is {first_refused:#x})")]
    /// KVM_SET_MSRS accepted only some of [`boot_msrs`] (it stops at the first it refuses).
    SetMsrs {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
        /// Index of the first MSR refused (0 if unknown).
        first_refused: u32,
    },
    /// The KVM_SET_MSRS ioctl itself failed.
    #[error("setting MSRs: {0}")]
    SetMsrsIoctl(HypervisorError),
    #[error("vCPU registers ({what}): {source}")]
    /// Getting or setting a register set failed.
    Regs {
        /// Which set and direction ("regs", "get sregs", "fpu", "lapic", ...).
        what: &'static str,
        /// The hypervisor's error.
        source: HypervisorError,
    },
    /// Writing the GDT or IDT into guest memory failed.
    #[error("writing GDT/IDT/page tables into guest memory failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
/// CR0.PG: paging on.
pub(crate) const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
/// EFER.LMA: long mode active.
pub(crate) const EFER_LMA: u64 = 0x400;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// Adjusts the host-supported CPUID for vCPU `id` of `count`.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0x1 => {
                // Initial APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= 1 << 31; // running under a hypervisor
                                  // TSC-deadline timer: KVM emulates it in the in-kernel LAPIC but lists it only
                                  // among emulated features. Without it the guest calibrates the LAPIC timer
                                  // against the PIT at boot (slow, and it can fail under nesting).
                e.ecx |= 1 << 24;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: several logical processors
                }
            }
            0xb | 0x1f => e.edx = u32::from(id), // x2APIC id
            _ => {}
        }
    }
}

/// Sets on `vcpu` the host-supported `cpuid`, adjusted by [`patch_cpuid`] for vCPU `id` of
/// `count`.
pub fn setup_cpuid(vcpu: &dyn Vcpu, mut cpuid: CpuId, id: u8, count: u8) -> Result<(), CpuError> {
    patch_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid(&cpuid).map_err(CpuError::SetCpuid)
}

/// The MSRs set on every vCPU at boot: syscall/sysenter MSRs and the TSC zeroed, fast
/// strings enabled, MTRRs enabled with write-back as the default type.
pub fn boot_msrs() -> Vec<MsrEntry> {
    let e = |index, data| MsrEntry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

/// Sets [`boot_msrs`] on `vcpu`; every one must be accepted.
pub fn setup_msrs(vcpu: &dyn Vcpu) -> Result<(), CpuError> {
    let entries = boot_msrs();
    let set = vcpu.set_msrs(&entries).map_err(CpuError::SetMsrsIoctl)?;
    if set != entries.len() {
        return Err(CpuError::SetMsrs {
            set,
            wanted: entries.len(),
            first_refused: entries.get(set).map(|e| e.index).unwrap_or(0),
        });
    }
    Ok(())
}

/// Sets the FPU to its reset state (FCW 0x37f, MXCSR 0x1f80).
pub fn setup_fpu(vcpu: &dyn Vcpu) -> Result<(), CpuError> {
    let fpu = Fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| CpuError::Regs {
        what: "fpu",
        source,
    })
}

/// General registers for the boot CPU: entry point, stack, zero page in %rsi.
pub fn boot_regs(entry: u64) -> Regs {
    Regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// Sets the boot CPU's general registers ([`boot_regs`]) for the 64-bit entry point `entry`.
pub fn setup_regs(vcpu: &dyn Vcpu, entry: u64) -> Result<(), CpuError> {
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|source| CpuError::Regs {
            what: "regs",
            source,
        })
}

/// Writes the GDT and IDT into guest memory and returns special registers for long mode.
pub fn write_tables_and_sregs<M: GuestMemoryBackend>(
    mem: &M,
    mut sregs: SpecialRegs,
    cr3: u64,
) -> Result<SpecialRegs, CpuError> {
    let table = gdt::table();
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;

    let code = gdt::segment(table[(gdt::BOOT_CS / 8) as usize], gdt::BOOT_CS);
    let data = gdt::segment(table[(gdt::BOOT_DS / 8) as usize], gdt::BOOT_DS);
    let tss = gdt::segment(table[(gdt::BOOT_TSS / 8) as usize], gdt::BOOT_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// Writes the GDT and IDT into `mem` and sets the boot CPU's special registers for long
/// mode with page tables at `cr3` ([`write_tables_and_sregs`]).
pub fn setup_sregs<M: GuestMemoryBackend>(
    vcpu: &dyn Vcpu,
    mem: &M,
    cr3: u64,
) -> Result<(), CpuError> {
    let sregs = vcpu.sregs().map_err(|source| CpuError::Regs {
        what: "get sregs",
        source,
    })?;
    let sregs = write_tables_and_sregs(mem, sregs, cr3)?;
    vcpu.set_sregs(&sregs).map_err(|source| CpuError::Regs {
        what: "sregs",
        source,
    })
}

/// LINT0 as ExtINT (the 8259 reaches the CPU), LINT1 as NMI: the wiring of a PC.
pub fn setup_lint(vcpu: &dyn Vcpu) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.lapic().map_err(|source| CpuError::Regs {
        what: "get lapic",
        source,
    })?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|source| CpuError::Regs {
        what: "lapic",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::CpuIdEntry;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn cpuid_leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[
            CpuIdEntry {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
        ])
        .unwrap();
        patch_cpuid(&mut c, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_ne!(s[0].ecx & (1 << 24), 0, "TSC-deadline timer offered");
        assert_eq!(s[1].edx, 3);
    }

    #[test]
    fn long_mode_sregs() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let s = write_tables_and_sregs(&mem, SpecialRegs::default(), 0x9000).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(s.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.selector, 0x18);
        // The GDT in memory holds the code descriptor at 0x10.
        let d: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 0x10)).unwrap();
        assert_eq!(d, gdt::entry(0xa09b, 0, 0xfffff));
    }

    #[test]
    fn the_whole_gdt_is_in_memory_and_the_idt_after_it() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let s = write_tables_and_sregs(&mem, SpecialRegs::default(), 0x9000).unwrap();
        // Every descriptor reads back, the TSS (the last) too: the IDT once sat on it.
        for (i, d) in gdt::table().iter().enumerate() {
            let got: u64 = mem.read_obj(GuestAddress(GDT_ADDR + i as u64 * 8)).unwrap();
            assert_eq!(got, *d, "GDT entry {i}");
        }
        assert!(
            s.idt.base > s.gdt.base + u64::from(s.gdt.limit),
            "the IDT overlaps the GDT"
        );
    }

    #[test]
    fn regs_point_at_zero_page() {
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_ADDR, 2));
    }

    #[test]
    fn msr_list_has_unique_indices() {
        let m = boot_msrs();
        let mut idx: Vec<u32> = m.iter().map(|e| e.index).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), m.len());
    }
}
