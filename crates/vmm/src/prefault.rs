//! A clone's working set, touched before its request (issue 13).
//!
//! A clone's memory is its snapshot's file mapped copy-on-write, and its second-level page
//! tables (EPT/NPT) start empty: the first touch of each page costs the guest an exit to the
//! hypervisor, which maps the page (and copies it on a first write). A CGI request touches
//! about a thousand pages that way: microseconds each on hardware, ~80 µs each in the lab,
//! where the exit is emulated (docs/benchmarks.md §5).
//!
//! So the pages a served clone touched are recorded when it ends ([`record`]: the pages its
//! process's mapping holds, from /proc/self/pagemap, opened when the clone was prepared) into
//! the template's directory ([`WORKING_SET_FILE`]), and every clone prepared after that
//! touches them before its request arrives ([`touch`], all at once or a part at a time): the
//! vCPU runs a loop of our own, reading each page (writing the pages that were written, with a
//! locked OR of zero, which keeps their bytes), and the saved state is set back. The request
//! then finds its pages mapped.
//!
//! The loop runs in kernel mode with the guest's own page tables, through the kernel's direct
//! map, written into a kernel page (the one at the saved instruction pointer, or the kernel's
//! divide-error handler's for a vCPU saved in user mode; its bytes are put back afterwards),
//! with interrupts masked and an empty IDT: an exception cannot reach guest code, it ends the
//! loop with a triple fault and the whole saved state is set again. Setting other control
//! registers would drop the hypervisor's page tables, so only the IDT (and in user mode CS and
//! SS), the general registers and the MP state change, and are set back.
//!
//! The recording comes from a clone that ran a request, so it is as untrusted as the guest:
//! it is capped ([`MAX_PAGES`]), checked against the guest's memory, and only ever decides
//! which pages are touched, never what they hold.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::cpu::{EFER_LMA, X86_CR0_PG as CR0_PG};
use crate::arch::x86_64::paging;
use crate::hypervisor::{HypervisorError, Vcpu, VcpuExit, VcpuState};

/// The working set's file in a snapshot's directory.
pub const WORKING_SET_FILE: &str = "working-set";

/// The flag of a page that was written (the low bit of its page-aligned address).
pub const WRITE: u64 = 1;

/// The most pages a working set holds (16 MiB of 4 KiB pages; a CGI greeting touches ~1000).
pub const MAX_PAGES: usize = 4096;

/// The file's first bytes.
const MAGIC: &[u8; 8] = b"xcgi-ws1";

/// The port the touching loop writes to when it is done (no device has it).
const DONE_PORT: u16 = 0x510;

/// The loop: for each entry at RSI (RCX of them), a read of its page, or a locked OR of zero
/// when the entry's low bit says the page was written; then `out dx, al` to [`DONE_PORT`].
const LOOP: [u8; 0x23] = [
    0x48, 0x8b, 0x3e, // 00: mov rdi, [rsi]
    0x40, 0xf6, 0xc7, 0x01, // 03: test dil, 1
    0x75, 0x04, // 07: jnz 0d
    0x8a, 0x07, // 09: mov al, [rdi]
    0xeb, 0x08, // 0b: jmp 15
    0x48, 0x83, 0xe7, 0xfe, // 0d: and rdi, -2
    0xf0, 0x80, 0x0f, 0x00, // 11: lock or byte [rdi], 0
    0x48, 0x83, 0xc6, 0x08, // 15: add rsi, 8
    0x48, 0xff, 0xc9, // 19: dec rcx
    0x75, 0xe2, // 1c: jnz 00
    0x66, 0xba, 0x10, 0x05, // 1e: mov dx, 0x510
    0xee, // 22: out dx, al
];

/// Where the entries start in the loop's page, and how many fit.
const LIST_OFFSET: usize = 64;
const LIST_CAP: usize = (4096 - LIST_OFFSET) / 8;

/// Why a working set could not be read, or touched.
#[derive(Debug, thiserror::Error)]
pub enum PrefaultError {
    /// The file could not be read or written.
    #[error("the working set file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not a working set for this memory.
    #[error("the working set is malformed: {0}")]
    Malformed(String),
    /// The saved vCPU is not somewhere the loop can run (the clone is left as restored).
    #[error("the working set cannot be touched: {0}")]
    NotApplicable(&'static str),
    /// The loop did not end as it should; the saved state was set again.
    #[error("touching the working set stopped: {0}; the clone's saved state was set again")]
    Stopped(String),
    /// The loop failed and the clone could not be put back as restored: it is unusable.
    #[error("touching the working set failed and the clone is unusable: {0}")]
    Broken(String),
}

/// The guest-physical pages a clone touched, each with [`WRITE`] when it was written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkingSet {
    pages: Vec<u64>,
}

impl WorkingSet {
    /// A working set of `pages` (page-aligned guest-physical addresses, [`WRITE`] allowed),
    /// checked against a guest memory of `memory_size` bytes.
    pub fn new(pages: Vec<u64>, memory_size: u64) -> Result<WorkingSet, PrefaultError> {
        if pages.len() > MAX_PAGES {
            return Err(PrefaultError::Malformed(format!(
                "{} pages, more than {MAX_PAGES}",
                pages.len()
            )));
        }
        if let Some(bad) = pages
            .iter()
            .find(|&&p| p & 0xffe != 0 || p & !0xfff >= memory_size)
        {
            return Err(PrefaultError::Malformed(format!(
                "page {bad:#x} is not a page of {} MiB of guest memory",
                memory_size >> 20
            )));
        }
        Ok(WorkingSet { pages })
    }

    /// The pages, each with [`WRITE`] when it was written.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// The pages in `range` of [`WorkingSet::pages`], as a working set of their own.
    pub fn part(&self, range: std::ops::Range<usize>) -> WorkingSet {
        WorkingSet {
            pages: self.pages.get(range).unwrap_or_default().to_vec(),
        }
    }

    /// The file's bytes: the magic, the count (u32 LE), the pages (u64 LE each).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.pages.len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for p in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out
    }

    /// What [`WorkingSet::encode`] wrote, checked as [`WorkingSet::new`] checks.
    pub fn decode(b: &[u8], memory_size: u64) -> Result<WorkingSet, PrefaultError> {
        let bad = |what: &str| PrefaultError::Malformed(what.to_string());
        let rest = b
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("not a working set"))?;
        let (count, rest) = rest.split_at_checked(4).ok_or_else(|| bad("cut short"))?;
        let count = u32::from_le_bytes(count.try_into().map_err(|_| bad("cut short"))?);
        if count as usize > MAX_PAGES {
            return Err(bad(&format!("{count} pages, more than {MAX_PAGES}")));
        }
        if rest.len() != count as usize * 8 {
            return Err(bad(&format!("{count} pages in {} bytes", rest.len())));
        }
        let pages = rest
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        WorkingSet::new(pages, memory_size)
    }

    /// The working set in snapshot directory `dir`, if it has one.
    pub fn read(dir: &Path, memory_size: u64) -> Result<Option<WorkingSet>, PrefaultError> {
        let path = dir.join(WORKING_SET_FILE);
        match std::fs::read(&path) {
            Ok(b) => WorkingSet::decode(&b, memory_size).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PrefaultError::Io { path, source }),
        }
    }

    /// Writes it into snapshot directory `dir` (following the link it may be) unless one is
    /// there: written aside, then linked into place, so a reader sees all of it or nothing.
    /// Returns whether it was written.
    pub fn write_new(&self, dir: &Path) -> Result<bool, PrefaultError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PrefaultError::Io { path, source }
        };
        let dir = dir.canonicalize().map_err(io_err(dir))?;
        let path = dir.join(WORKING_SET_FILE);
        if path.exists() {
            return Ok(false);
        }
        let tmp = dir.join(format!(
            ".working-set.{}.{}",
            std::process::id(),
            crate::vm::monotonic_ns()
        ));
        let written = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .and_then(|mut f| io::Write::write_all(&mut f, &self.encode()))
        };
        // Linked into place: all of it or nothing, and never over one that is there.
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(PrefaultError::Io { path, source }),
        }
    }
}

/// The working set of a clone that ran: the pages its memory mapping holds now
/// ([`crate::memory::touched_pages`], through `pagemap`, this process's /proc/self/pagemap),
/// at most [`MAX_PAGES`].
pub fn record(
    mem: &GuestMemoryMmap,
    huge: bool,
    pagemap: &std::fs::File,
) -> io::Result<WorkingSet> {
    Ok(WorkingSet {
        pages: crate::memory::touched_pages(mem, huge, pagemap, MAX_PAGES)?,
    })
}

/// What [`touch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touched {
    /// Pages touched.
    pub pages: usize,
    /// Pages left out: outside guest memory, or not mapped (writable, for a written page)
    /// in the kernel's direct map.
    pub skipped: usize,
    /// Runs of the loop (up to [`LIST_CAP`] pages each).
    pub runs: usize,
}

const CR4_LA57: u64 = 1 << 12;
const CR4_PKS: u64 = 1 << 24;

/// Touches `set`'s pages in the clone whose vCPU `vcpu` was just given `saved` (and whose
/// memory is `mem`), before its first run, then sets `saved` back (see the module's
/// comment). Only the boot vCPU of a one-vCPU clone: nothing else may run meanwhile.
pub fn touch(
    vcpu: &mut dyn Vcpu,
    mem: &GuestMemoryMmap,
    saved: &VcpuState,
    set: &WorkingSet,
    deadline: Instant,
) -> Result<Touched, PrefaultError> {
    applicable(saved)?;
    let cr3 = saved.sregs.cr3;
    let last = set.pages.iter().map(|p| p & !WRITE).max().unwrap_or(0);
    let base = direct_map(mem, cr3, last).ok_or(PrefaultError::NotApplicable(
        "no direct map of guest memory in the guest's page tables",
    ))?;
    let mut entries = Vec::with_capacity(set.pages.len());
    for &p in &set.pages {
        let (gpa, write) = (p & !WRITE, p & WRITE != 0);
        let va = base.wrapping_add(gpa);
        let usable = mem.address_in_range(GuestAddress(gpa))
            && paging::walk(mem, cr3, va)
                .is_some_and(|m| m.gpa == gpa && !m.user && (m.writable || !write));
        if usable {
            entries.push(va | u64::from(write));
        }
    }
    let skipped = set.pages.len() - entries.len();
    if entries.is_empty() {
        return Ok(Touched {
            pages: 0,
            skipped,
            runs: 0,
        });
    }
    let (code_va, sregs) = loop_context(mem, saved)?;
    let code = paging::walk(mem, cr3, code_va)
        .filter(|m| !m.user && mem.address_in_range(GuestAddress(m.gpa)))
        .ok_or(PrefaultError::NotApplicable(
            "the loop's page is not a kernel page of guest memory",
        ))?
        .gpa;
    let mut original = [0u8; 4096];
    mem.read_slice(&mut original, GuestAddress(code))
        .map_err(|_| PrefaultError::NotApplicable("the loop's page cannot be read"))?;
    let ran = run_loop(
        vcpu,
        mem,
        saved,
        &sregs,
        (code, code_va),
        &entries,
        deadline,
    );
    // The page's own bytes go back whatever happened (the loop's writes keep bytes).
    if let Err(e) = mem.write_slice(&original, GuestAddress(code)) {
        return Err(PrefaultError::Broken(format!(
            "putting the loop's page back: {e}"
        )));
    }
    match ran {
        Ok(runs) => match set_back(vcpu, saved) {
            Ok(()) => Ok(Touched {
                pages: entries.len(),
                skipped,
                runs,
            }),
            Err(e) => reset(
                vcpu,
                saved,
                format!("setting the saved registers back: {e}"),
            ),
        },
        Err(why) => reset(vcpu, saved, why),
    }
}

/// After a failed loop: the whole saved state set again.
fn reset(vcpu: &dyn Vcpu, saved: &VcpuState, why: String) -> Result<Touched, PrefaultError> {
    match vcpu.set_state(saved) {
        Ok(()) => Err(PrefaultError::Stopped(why)),
        Err(e) => Err(PrefaultError::Broken(format!(
            "{why}; setting the saved state again: {e}"
        ))),
    }
}

/// Refuses a saved vCPU the loop cannot run from: not in 64-bit mode with 4-level paging, supervisor protection keys on, or an event on its way in (it would be delivered
/// through the loop's empty IDT).
fn applicable(saved: &VcpuState) -> Result<(), PrefaultError> {
    let s = &saved.sregs;
    let e = &saved.events;
    let no = PrefaultError::NotApplicable;
    if s.efer & EFER_LMA == 0 || s.cr0 & CR0_PG == 0 || s.cs.l == 0 {
        return Err(no("the vCPU is not in 64-bit mode"));
    }
    if s.cr4 & (CR4_LA57 | CR4_PKS) != 0 {
        return Err(no("5-level paging or supervisor protection keys"));
    }
    let events = e.exception.injected != 0
        || e.exception.pending != 0
        || e.interrupt.injected != 0
        || e.nmi.injected != 0
        || e.nmi.pending != 0
        || s.interrupt_bitmap.iter().any(|&w| w != 0);
    if events {
        return Err(no("an exception, interrupt or NMI is on its way in"));
    }
    Ok(())
}

/// The guest-virtual base of the kernel's direct map of guest memory (virtual = base +
/// physical, as a supervisor mapping), found in the page tables at `cr3`: the first 1 GiB
/// boundary, kernel half first, that maps physical 0 and `last` alike.
fn direct_map(mem: &GuestMemoryMmap, cr3: u64, last: u64) -> Option<u64> {
    let pml4 = cr3 & !0xfff;
    for i in (256..512u64).chain(0..256) {
        let entry: u64 = mem.read_obj(GuestAddress(pml4 + i * 8)).ok()?;
        if entry & 1 == 0 {
            continue;
        }
        for j in 0..512u64 {
            let mut va = (i << 39) | (j << 30);
            if i >= 256 {
                va |= 0xffff_0000_0000_0000; // canonical
            }
            let maps = |gpa: u64| {
                paging::walk(mem, cr3, va.wrapping_add(gpa))
                    .is_some_and(|m| m.gpa == gpa && !m.user)
            };
            if maps(0) && maps(last) {
                return Some(va);
            }
        }
    }
    None
}

/// Where the loop runs: the page it is written into (guest-virtual, a kernel page) and the
/// special registers it runs with. Those are the saved ones with an empty IDT (an exception
/// ends in a triple fault, an exit, never in the guest's handlers), in kernel mode: a vCPU
/// saved in kernel mode keeps its segments and the loop goes into the page it was at; one
/// saved in user mode gets the kernel's code segment and the page of the kernel's
/// divide-error handler, both from its IDT's first gate. The control registers stay: new
/// ones would drop the hypervisor's page tables.
fn loop_context(
    mem: &GuestMemoryMmap,
    saved: &VcpuState,
) -> Result<(u64, crate::hypervisor::SpecialRegs), PrefaultError> {
    let mut sregs = saved.sregs;
    sregs.idt.limit = 0;
    let s = &saved.sregs;
    if s.cs.dpl == 0 && s.cs.selector & 3 == 0 && s.ss.dpl == 0 {
        return Ok((saved.regs.rip & !0xfff, sregs));
    }
    let no = PrefaultError::NotApplicable;
    if s.idt.limit < 15 {
        return Err(no("a vCPU in user mode with no IDT"));
    }
    let gate: [u8; 16] = paging::walk(mem, s.cr3, s.idt.base)
        .filter(|m| !m.user && m.gpa & 0xfff <= 0x1000 - 16)
        .and_then(|m| mem.read_obj(GuestAddress(m.gpa)).ok())
        .ok_or(no("a vCPU in user mode whose IDT cannot be read"))?;
    let word = |at: usize| u16::from_le_bytes([gate[at], gate[at + 1]]);
    let selector = word(2);
    let handler = u64::from(word(0))
        | u64::from(word(6)) << 16
        | u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]])) << 32;
    if selector & 3 != 0 || selector == 0 {
        return Err(no("a vCPU in user mode whose IDT has no kernel gate"));
    }
    let flat = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        present: 1,
        dpl: 0,
        s: 1,
        g: 1,
        ..Default::default()
    };
    // 64-bit code, and data (Linux's kernel data segment follows its code segment).
    sregs.cs = kvm_bindings::kvm_segment {
        selector,
        type_: 0xb,
        l: 1,
        ..flat
    };
    sregs.ss = kvm_bindings::kvm_segment {
        selector: selector + 8,
        type_: 0x3,
        db: 1,
        ..flat
    };
    Ok((handler & !0xfff, sregs))
}

/// Runs the loop over `entries` (virtual addresses, [`WRITE`] on written pages) with
/// `sregs`, from the page `code` (guest-physical, guest-virtual), [`LIST_CAP`] entries a
/// run. Returns the runs, or why one did not end at [`DONE_PORT`]; a run still going at
/// `deadline` is stopped there once the vCPU is kicked (its thread's kicks bound).
fn run_loop(
    vcpu: &mut dyn Vcpu,
    mem: &GuestMemoryMmap,
    saved: &VcpuState,
    sregs: &crate::hypervisor::SpecialRegs,
    (code, code_va): (u64, u64),
    entries: &[u64],
    deadline: Instant,
) -> Result<usize, String> {
    vcpu.set_sregs(sregs).map_err(|e| e.to_string())?;
    vcpu.set_mp_state(crate::hypervisor::MpState {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(|e| e.to_string())?;
    let mut runs = 0;
    for chunk in entries.chunks(LIST_CAP) {
        let mut page = [0u8; 4096];
        page[..LOOP.len()].copy_from_slice(&LOOP);
        for (k, e) in chunk.iter().enumerate() {
            let at = LIST_OFFSET + k * 8;
            page[at..at + 8].copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(code))
            .map_err(|e| format!("writing the loop: {e}"))?;
        let regs = crate::hypervisor::Regs {
            rip: code_va,
            rsi: code_va + LIST_OFFSET as u64,
            rcx: chunk.len() as u64,
            rflags: 0x2, // interrupts masked
            ..saved.regs
        };
        vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
        loop {
            match vcpu.run().map_err(|e| e.to_string())? {
                VcpuExit::IoOut { port, .. } if port == DONE_PORT => break,
                VcpuExit::Interrupted if Instant::now() < deadline => {}
                VcpuExit::Interrupted => {
                    return Err(format!(
                        "the loop had not ended by its deadline ({runs} runs)"
                    ))
                }
                other => return Err(format!("the loop's vCPU exited: {other:?}")),
            }
        }
        // The port write is finished without running the guest (its registers are set next).
        vcpu.complete_pending().map_err(|e| e.to_string())?;
        runs += 1;
    }
    Ok(runs)
}

/// The saved IDT, registers and MP state back (the control registers never changed).
fn set_back(vcpu: &dyn Vcpu, saved: &VcpuState) -> Result<(), HypervisorError> {
    vcpu.set_sregs(&saved.sregs)?;
    vcpu.set_regs(&saved.regs)?;
    vcpu.set_mp_state(saved.mp_state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A working set round-trips through its file's bytes; sets that are too big, not of
    /// pages, outside memory, cut short or not a working set at all are refused, naming why.
    #[test]
    fn a_working_set_is_checked_when_made_and_read() {
        let mib = 1 << 20;
        let set = WorkingSet::new(vec![0, 0x1000 | WRITE, 63 * mib], 64 * mib).expect("set");
        let bytes = set.encode();
        assert_eq!(WorkingSet::decode(&bytes, 64 * mib).expect("decode"), set);
        for (bad, why) in [
            (
                WorkingSet::new(vec![0; MAX_PAGES + 1], 64 * mib),
                "more than",
            ),
            (WorkingSet::new(vec![0x1800], 64 * mib), "not a page"),
            (WorkingSet::new(vec![0x1002], 64 * mib), "not a page"),
            (
                WorkingSet::new(vec![64 * mib], 64 * mib),
                "not a page of 64 MiB",
            ),
            (WorkingSet::decode(&bytes, 32 * mib), "not a page of 32 MiB"),
            (
                WorkingSet::decode(&bytes[..bytes.len() - 1], 64 * mib),
                "in 23 bytes",
            ),
            (WorkingSet::decode(&bytes[..10], 64 * mib), "cut short"),
            (
                WorkingSet::decode(b"xcgi-ws2\0\0\0\0", 64 * mib),
                "not a working set",
            ),
        ] {
            let e = bad.expect_err(why).to_string();
            assert!(e.contains(why), "{e}");
        }
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(&(MAX_PAGES as u32 + 1).to_le_bytes());
        let e = WorkingSet::decode(&big, 64 * mib)
            .expect_err("count")
            .to_string();
        assert!(e.contains("more than"), "{e}");
    }

    /// Written once into a snapshot directory (through the link to it), never over one that
    /// is there, readable by others, with nothing left aside; a directory without one has
    /// none.
    #[test]
    fn a_working_set_is_written_once_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let mib = 1 << 20;
        let top = tempfile::tempdir().expect("tempdir");
        let dir = top.path().join("snapshot-1");
        std::fs::create_dir(&dir).expect("dir");
        let link = top.path().join("snapshot");
        std::os::unix::fs::symlink(&dir, &link).expect("link");
        assert_eq!(WorkingSet::read(&link, 64 * mib).expect("read"), None);
        let first = WorkingSet::new(vec![0x1000], 64 * mib).expect("set");
        let second = WorkingSet::new(vec![0x2000 | WRITE], 64 * mib).expect("set");
        assert!(first.write_new(&link).expect("write"));
        assert!(!second.write_new(&link).expect("write again"));
        assert_eq!(
            WorkingSet::read(&link, 64 * mib).expect("read"),
            Some(first)
        );
        let file = dir.join(WORKING_SET_FILE);
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [WORKING_SET_FILE]);
        std::fs::write(&file, b"junk").expect("write junk");
        let e = WorkingSet::read(&link, 64 * mib)
            .expect_err("junk")
            .to_string();
        assert!(e.contains("not a working set"), "{e}");
    }
}
