//! The debug dump ([`crate::RunOptions::debug_dump`]): when a VM ends badly (triple fault,
//! deadline, cancel, a vCPU failure, a panic), what a kernel developer needs to tell a guest
//! bug from a device bug from a lost interrupt, as text:
//!
//! - each vCPU: general and special registers, pending/injected events, MP state, the local
//!   APIC (in-service and requested vectors, the timer's LVT, initial and current count), the
//!   TSC and TSC-deadline MSRs, and the bytes at RIP and the top of the stack (through the
//!   guest's own page tables);
//! - the VM: the IOAPIC's pins (mask, vector, remote IRR, trigger) and request register, both
//!   PICs, the PIT's channel 0, the KVM clock;
//! - every virtio device (the transport's status and interrupt register, each queue's ring
//!   indices as the device counts them and as guest memory holds them, the device's counters
//!   and its RX worker's state);
//! - the last console lines (guest text, escaped);
//! - with a [`Probe`] (`[server] debug_probe`), the guest memory it names: words of guest
//!   kernel data read through the guest's page tables, following pointers, for what the
//!   registers cannot show (which task waits, which buffer was never read).
//!
//! Only numbers come from guest state, so the dump is safe to log; console lines go through
//! [`crate::vm::escape_guest_text`].

use std::fmt::Write as _;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::cpu::X86_CR0_PG as CR0_PG;
use crate::hypervisor::{IrqChip, VcpuState, VmState};

/// Local APIC register offsets (Intel SDM vol. 3, table 11-1).
const APIC_ID: usize = 0x20;
const APIC_TPR: usize = 0x80;
const APIC_PPR: usize = 0xa0;
const APIC_SVR: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_TMR: usize = 0x180;
const APIC_IRR: usize = 0x200;
const APIC_ESR: usize = 0x280;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;

const MSR_TSC: u32 = 0x10;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const MSR_KVM_SYSTEM_TIME: u32 = 0x4b56_4d01;

/// One 32-bit LAPIC register.
fn apic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

/// The vectors set in a 256-bit LAPIC register (ISR, IRR, TMR: eight 32-bit words, 16 bytes
/// apart).
fn apic_vectors(regs: &[std::os::raw::c_char; 1024], base: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for word in 0..8u32 {
        let bits = apic_reg(regs, base + word as usize * 0x10);
        for bit in 0..32 {
            if bits & (1 << bit) != 0 {
                out.push(word * 32 + bit);
            }
        }
    }
    out
}

/// The guest-physical address of guest-virtual `va`, walking the guest's 4-level page tables
/// from `cr3` (identity when paging is off). None when a level is not present or unreadable.
pub fn translate(mem: &GuestMemoryMmap, cr0: u64, cr3: u64, va: u64) -> Option<u64> {
    if cr0 & CR0_PG == 0 {
        return Some(va);
    }
    crate::arch::x86_64::paging::walk(mem, cr3, va).map(|m| m.gpa)
}

/// A `T` of guest-virtual memory at `va` (not across a page boundary), through the guest's
/// page tables; None where unmapped.
fn read_virt<T: ByteValued>(mem: &GuestMemoryMmap, cr0: u64, cr3: u64, va: u64) -> Option<T> {
    let pa = translate(mem, cr0, cr3, va)?;
    if (pa & 0xfff) + std::mem::size_of::<T>() as u64 > 0x1000 {
        return None;
    }
    mem.read_obj(GuestAddress(pa)).ok()
}

/// `len` bytes of guest-virtual memory at `va` as hex, `??` where unmapped.
fn guest_bytes(mem: &GuestMemoryMmap, cr0: u64, cr3: u64, va: u64, len: u64) -> String {
    (0..len)
        .map(
            |i| match read_virt::<u8>(mem, cr0, cr3, va.wrapping_add(i)) {
                Some(b) => format!("{b:02x}"),
                None => "??".to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// `n` 64-bit words of guest-virtual memory at `va`.
fn guest_words(mem: &GuestMemoryMmap, cr0: u64, cr3: u64, va: u64, n: u64) -> String {
    (0..n)
        .map(
            |i| match read_virt::<u64>(mem, cr0, cr3, va.wrapping_add(i * 8)) {
                Some(w) => format!("{w:#018x}"),
                None => "?".repeat(18),
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// One vCPU, several lines.
// Over 80 lines on purpose: one `writeln!` per line of the dump, in the order it is read
// (registers, control registers, events, LAPIC, MSRs, code, stack); split, it would scatter
// the layout without sharing anything.
pub fn describe_vcpu(id: usize, s: &VcpuState, mem: &GuestMemoryMmap) -> String {
    let (r, sr, ev) = (&s.regs, &s.sregs, &s.events);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "vcpu{id}: mp_state={} rip={:#x} rsp={:#x} rflags={:#x} (IF={})",
        s.mp_state.mp_state,
        r.rip,
        r.rsp,
        r.rflags,
        (r.rflags >> 9) & 1
    );
    let _ = writeln!(
        o,
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
    );
    let _ = writeln!(
        o,
        "  r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
    );
    let _ = writeln!(
        o,
        "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} ss={:#x} idt={:#x}+{:#x} gdt={:#x}+{:#x}",
        sr.cr0,
        sr.cr2,
        sr.cr3,
        sr.cr4,
        sr.efer,
        sr.cs.selector,
        sr.ss.selector,
        sr.idt.base,
        sr.idt.limit,
        sr.gdt.base,
        sr.gdt.limit
    );
    let _ = writeln!(
        o,
        "  events: exception injected={} pending={} nr={} error={:#x}; interrupt injected={} nr={} shadow={}; nmi injected={} pending={} masked={}",
        ev.exception.injected,
        ev.exception.pending,
        ev.exception.nr,
        ev.exception.error_code,
        ev.interrupt.injected,
        ev.interrupt.nr,
        ev.interrupt.shadow,
        ev.nmi.injected,
        ev.nmi.pending,
        ev.nmi.masked
    );
    let l = &s.lapic.regs;
    let _ = writeln!(
        o,
        "  lapic: id={:#x} tpr={:#x} ppr={:#x} svr={:#x} esr={:#x} isr={:?} irr={:?} tmr={:?}",
        apic_reg(l, APIC_ID) >> 24,
        apic_reg(l, APIC_TPR),
        apic_reg(l, APIC_PPR),
        apic_reg(l, APIC_SVR),
        apic_reg(l, APIC_ESR),
        apic_vectors(l, APIC_ISR),
        apic_vectors(l, APIC_IRR),
        apic_vectors(l, APIC_TMR)
    );
    let msr = |index: u32| {
        s.msrs
            .iter()
            .find(|m| m.index == index)
            .map_or_else(|| "-".to_owned(), |m| format!("{:#x}", m.data))
    };
    let _ = writeln!(
        o,
        "  timer: lvt={:#x} (mode {}, masked {}) initial={:#x} current={:#x} divide={:#x}; lint0={:#x} lint1={:#x}; tsc={} tsc_deadline={} apic_base={:#x} kvmclock={}",
        apic_reg(l, APIC_LVT_TIMER),
        (apic_reg(l, APIC_LVT_TIMER) >> 17) & 3,
        (apic_reg(l, APIC_LVT_TIMER) >> 16) & 1,
        apic_reg(l, APIC_TMICT),
        apic_reg(l, APIC_TMCCT),
        apic_reg(l, APIC_TDCR),
        apic_reg(l, APIC_LVT_LINT0),
        apic_reg(l, APIC_LVT_LINT1),
        msr(MSR_TSC),
        msr(MSR_TSC_DEADLINE),
        sr.apic_base,
        msr(MSR_KVM_SYSTEM_TIME)
    );
    let _ = writeln!(
        o,
        "  code at rip: {}",
        guest_bytes(mem, sr.cr0, sr.cr3, r.rip, 16)
    );
    let _ = writeln!(o, "  stack: {}", guest_words(mem, sr.cr0, sr.cr3, r.rsp, 6));
    o
}

/// The in-kernel interrupt controllers, the PIT and the clock, several lines.
pub fn describe_vm(s: &VmState) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "ioapic: {}", describe_ioapic(&s.ioapic));
    let _ = writeln!(
        o,
        "pic: master {}; slave {}",
        describe_pic(&s.pic_master),
        describe_pic(&s.pic_slave)
    );
    let c = &s.pit.channels[0];
    let _ = writeln!(
        o,
        "pit: ch0 count={} mode={} gate={} rw_mode={} load_time={}; kvmclock={} flags={:#x}",
        c.count, c.mode, c.gate, c.rw_mode, c.count_load_time, s.clock.clock, s.clock.flags
    );
    o
}

fn describe_ioapic(chip: &IrqChip) -> String {
    // SAFETY: KVM_GET_IRQCHIP for KVM_IRQCHIP_IOAPIC fills the `ioapic` member; every bit
    // pattern is a valid kvm_ioapic_state (plain integers).
    let io = unsafe { chip.chip.ioapic };
    let mut o = format!("irr={:#x}", io.irr);
    for (pin, entry) in io.redirtbl.iter().enumerate() {
        // SAFETY: `bits` is the whole 64-bit entry; every bit pattern is valid.
        let bits = unsafe { entry.bits };
        let masked = bits & (1 << 16) != 0;
        if masked && bits & 0xff == 0 {
            continue;
        }
        let _ = write!(
            o,
            " pin{pin}[vec={} {}{} remote_irr={} pending={}]",
            bits & 0xff,
            if bits & (1 << 15) != 0 {
                "level"
            } else {
                "edge"
            },
            if masked { " masked" } else { "" },
            (bits >> 14) & 1,
            (bits >> 12) & 1
        );
    }
    o
}

fn describe_pic(chip: &IrqChip) -> String {
    // SAFETY: KVM_GET_IRQCHIP for a PIC fills the `pic` member; every bit pattern is valid.
    let p = unsafe { chip.chip.pic };
    format!(
        "irr={:#04x} imr={:#04x} isr={:#04x} base={:#x}",
        p.irr, p.imr, p.isr, p.irq_base
    )
}

/// The last `n` lines of the console, escaped, indented.
pub fn console_tail(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().collect();
    let mut o = String::new();
    for line in &lines[lines.len().saturating_sub(n)..] {
        let _ = writeln!(o, "  | {}", crate::vm::escape_guest_text(line));
    }
    o
}

/// Most lines a [`Probe`] may have, and most bytes one line may read.
pub const PROBE_MAX_LINES: usize = 128;
/// See [`PROBE_MAX_LINES`].
pub const PROBE_MAX_LEN: u64 = 4096;

/// Why a probe text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("debug probe line {line}: {why} (a line is: LABEL ADDRESS [* | +HEX | -HEX]... LENGTH)")]
pub struct ProbeError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub why: String,
}

/// One step from an address to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeOp {
    /// Read the 64-bit word there: a pointer to follow.
    Deref,
    Add(u64),
    Sub(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProbeLine {
    label: String,
    start: u64,
    ops: Vec<ProbeOp>,
    len: u64,
}

/// Guest memory to add to a debug dump: each line a label, a guest-virtual address (hex, e.g. a
/// kernel symbol's from `System.map`), steps (`*` reads a pointer there, `+HEX`/`-HEX` move by
/// a field offset) and a length in bytes (decimal), dumped as 64-bit words. Lines are separated
/// by newlines or `;`; `#` starts a comment line. Read through vCPU 0's page tables when its
/// dump is made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    lines: Vec<ProbeLine>,
}

impl Probe {
    /// Parses a probe text (see [`Probe`]).
    pub fn parse(text: &str) -> Result<Probe, ProbeError> {
        let mut lines = Vec::new();
        for (i, raw) in text.split(['\n', ';']).enumerate() {
            let raw = raw.trim();
            if raw.is_empty() || raw.starts_with('#') {
                continue;
            }
            let bad = |why: String| ProbeError { line: i + 1, why };
            let t: Vec<&str> = raw.split_whitespace().collect();
            if t.len() < 3 {
                return Err(bad("needs at least a label, an address and a length".into()));
            }
            let label = t[0];
            if !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(bad(format!("label {label:?}: letters, digits, _ . - only")));
            }
            let hex = |w: &str| {
                u64::from_str_radix(w.trim_start_matches("0x"), 16)
                    .map_err(|_| bad(format!("{w:?} is not a hex number")))
            };
            let start = hex(t[1])?;
            let mut ops = Vec::new();
            for w in &t[2..t.len() - 1] {
                ops.push(match (*w, w.split_at(1)) {
                    ("*", _) => ProbeOp::Deref,
                    (_, ("+", n)) => ProbeOp::Add(hex(n)?),
                    (_, ("-", n)) => ProbeOp::Sub(hex(n)?),
                    _ => return Err(bad(format!("step {w:?}: use *, +HEX or -HEX"))),
                });
            }
            let last = t[t.len() - 1];
            let len: u64 = last
                .parse()
                .map_err(|_| bad(format!("length {last:?} is not a decimal number")))?;
            if len == 0 || len > PROBE_MAX_LEN {
                return Err(bad(format!("length {len}: 1 to {PROBE_MAX_LEN} bytes")));
            }
            lines.push(ProbeLine {
                label: label.to_owned(),
                start,
                ops,
                len,
            });
            if lines.len() > PROBE_MAX_LINES {
                return Err(bad(format!("more than {PROBE_MAX_LINES} lines")));
            }
        }
        Ok(Probe { lines })
    }

    /// The same probe on one line (`;`-separated), as [`Self::parse`] reads it back.
    pub fn to_line(&self) -> String {
        self.lines
            .iter()
            .map(|l| {
                let mut w = vec![l.label.clone(), format!("{:#x}", l.start)];
                w.extend(l.ops.iter().map(|op| match op {
                    ProbeOp::Deref => "*".to_owned(),
                    ProbeOp::Add(n) => format!("+{n:x}"),
                    ProbeOp::Sub(n) => format!("-{n:x}"),
                }));
                w.push(l.len.to_string());
                w.join(" ")
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Each line's words, four per row, read through the page tables at `cr3`; a line whose
    /// pointer chain leads to unmapped memory says so.
    pub fn describe(&self, mem: &GuestMemoryMmap, cr0: u64, cr3: u64) -> String {
        let mut o = String::new();
        for l in &self.lines {
            let mut addr = Some(l.start);
            for op in &l.ops {
                addr = addr.and_then(|a| match op {
                    ProbeOp::Deref => read_virt::<u64>(mem, cr0, cr3, a),
                    ProbeOp::Add(n) => Some(a.wrapping_add(*n)),
                    ProbeOp::Sub(n) => Some(a.wrapping_sub(*n)),
                });
            }
            let Some(a) = addr else {
                let _ = writeln!(o, "probe {}: a pointer on the way is unmapped", l.label);
                continue;
            };
            let _ = writeln!(o, "probe {} @{a:#x}:", l.label);
            let words = l.len.div_ceil(8);
            for row in (0..words).step_by(4) {
                let n = (words - row).min(4);
                let _ = writeln!(
                    o,
                    "  +{:#05x}: {}",
                    row * 8,
                    guest_words(mem, cr0, cr3, a.wrapping_add(row * 8), n)
                );
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// A page-table entry's large-page bit.
    const PTE_LARGE: u64 = 1 << 7;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    #[test]
    fn translate_walks_4k_and_2m_pages_and_stops_at_holes() {
        let m = mem();
        // PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000; PD[0] a 2 MiB page at 0x200000,
        // PD[1] a page table at 0x4000 whose entry 5 maps 0x5000.
        m.write_obj(0x2000u64 | 3, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x20_0000u64 | 3 | PTE_LARGE, GuestAddress(0x3000))
            .unwrap();
        m.write_obj(0x4000u64 | 3, GuestAddress(0x3008)).unwrap();
        m.write_obj(0x5000u64 | 3, GuestAddress(0x4000 + 5 * 8))
            .unwrap();
        let cr0 = CR0_PG;
        assert_eq!(translate(&m, cr0, 0x1000, 0x1234), Some(0x20_1234));
        assert_eq!(
            translate(&m, cr0, 0x1000, 0x20_0000 + 5 * 0x1000 + 0x10),
            Some(0x5010)
        );
        // PT entry 6 is not present; PML4 entry 1 neither.
        assert_eq!(translate(&m, cr0, 0x1000, 0x20_6000), None);
        assert_eq!(translate(&m, cr0, 0x1000, 1 << 39), None);
        // Paging off: identity.
        assert_eq!(translate(&m, 0, 0x1000, 0x1234), Some(0x1234));
        m.write_slice(&[0x0f, 0x0b], GuestAddress(0x20_1234))
            .unwrap();
        assert_eq!(guest_bytes(&m, cr0, 0x1000, 0x1234, 2), "0f 0b");
        assert_eq!(guest_bytes(&m, cr0, 0x1000, 0x20_6000, 1), "??");
    }

    #[test]
    fn apic_vectors_lists_set_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_IRR] = 1; // vector 0
        regs[APIC_IRR + 0x10 + 1] = 0x02; // word 1, bit 9: vector 41
        assert_eq!(apic_vectors(&regs, APIC_IRR), vec![0, 41]);
        assert!(apic_vectors(&regs, APIC_ISR).is_empty());
    }

    #[test]
    fn a_probe_follows_pointers_through_the_page_tables() {
        let m = mem();
        // Identity-mapped 2 MiB page at 0 (PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000).
        m.write_obj(0x2000u64 | 3, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        m.write_obj(3u64 | PTE_LARGE, GuestAddress(0x3000)).unwrap();
        // A "list head" at 0x8000 points 0x18 into a struct at 0x9000.
        m.write_obj(0x9018u64, GuestAddress(0x8000)).unwrap();
        m.write_obj(0xdead_beefu64, GuestAddress(0x9000)).unwrap();
        m.write_obj(7u64, GuestAddress(0x9008)).unwrap();
        let p = Probe::parse("# a comment\nhead 0x8000 * -18 16; far 8000 +400000 * 8").unwrap();
        let d = p.describe(&m, CR0_PG, 0x1000);
        assert!(
            d.contains("probe head @0x9000:\n  +0x000: 0x00000000deadbeef 0x0000000000000007\n"),
            "{d}"
        );
        assert!(
            d.contains("probe far: a pointer on the way is unmapped"),
            "{d}"
        );
        assert_eq!(Probe::parse(&p.to_line()).unwrap(), p);
    }

    #[test]
    fn a_bad_probe_line_is_refused_naming_it() {
        for (text, line, why) in [
            ("a 0x10 8\nb zz 8", 2, "\"zz\" is not a hex number"),
            ("a 0x10 ^ 8", 1, "step \"^\""),
            ("a 0x10 0", 1, "length 0"),
            ("a 0x10 5000", 1, "length 5000"),
            ("a 0x10", 1, "at least"),
            ("a;b 0x10 8", 1, "at least"),
            ("x\u{1b} 0x10 8", 1, "label"),
        ] {
            let e = Probe::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.why.contains(why), "{text}: {e}");
        }
        let many = "a 0x10 8\n".repeat(PROBE_MAX_LINES + 1);
        assert!(Probe::parse(&many).unwrap_err().why.contains("more than"));
    }

    #[test]
    fn console_tail_escapes_guest_text() {
        let t = console_tail("a\nb\x1b[31m\nc", 2);
        assert_eq!(t, "  | b\\u{1b}[31m\n  | c\n");
    }
}
