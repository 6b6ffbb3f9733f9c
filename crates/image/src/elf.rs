//! A small reader of ELF headers and program headers: enough to tell whether a file can run
//! as a guest's `/init` (architecture, executable or not, static or dynamic) and which
//! interpreter and libraries a dynamic one needs.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_FLAGS_1: u64 = 0x6fff_fffb;
const DF_1_PIE: u64 = 0x0800_0000;

/// Largest file [`inspect`] reads (a guest program bigger than this is refused).
pub const MAX_PROGRAM_SIZE: u64 = 1 << 30;

/// Errors reading a program.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// Opening or reading the file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The data does not start with `\x7fELF`.
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    /// A header, table or string is cut off or inconsistent; the text names which.
    #[error("truncated or corrupt ELF file: {0}")]
    Truncated(&'static str),
    /// Not a little-endian ELF32 or ELF64 file; the text says what it is instead.
    #[error("unsupported ELF {0}")]
    Unsupported(String),
    /// The file is larger than [`MAX_PROGRAM_SIZE`].
    #[error("{path}: {size} bytes is too big for a guest program (limit {MAX_PROGRAM_SIZE})")]
    TooBig {
        /// The file.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
}

/// The CPU architecture of an ELF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `EM_X86_64` in an ELF64 file.
    X86_64,
    /// `EM_386` in an ELF32 file.
    I386,
    /// Any other `e_machine` (with its ELF class: 32 or 64).
    Other {
        /// The `e_machine` value.
        machine: u16,
        /// 32 or 64, from the ELF class.
        bits: u8,
    },
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::X86_64 => f.write_str("x86-64"),
            Arch::I386 => f.write_str("i386 (32-bit x86)"),
            Arch::Other { machine, bits } => write!(f, "{bits}-bit machine type {machine}"),
        }
    }
}

/// What kind of ELF object it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfKind {
    /// `ET_EXEC`: a fixed-address executable.
    Executable,
    /// `ET_DYN` that runs as a program: a PIE (with an interpreter) or a static PIE.
    PieExecutable,
    /// `ET_DYN` with no entry point and no PIE flag: a shared library.
    SharedLibrary,
    /// Relocatable object, core dump, ...: the `e_type`.
    Other(u16),
}

/// What [`parse`] learned about an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// The machine and class it is for.
    pub arch: Arch,
    /// Executable, PIE, shared library or other (see [`ElfKind`]).
    pub kind: ElfKind,
    /// The program interpreter (`PT_INTERP`), e.g. `/lib64/ld-linux-x86-64.so.2`; `None` for a
    /// statically linked program.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` libraries (empty for static programs).
    pub needed: Vec<String>,
}

impl ElfInfo {
    /// A program the kernel can `execve` (not a library or object file).
    pub fn is_executable(&self) -> bool {
        matches!(self.kind, ElfKind::Executable | ElfKind::PieExecutable)
    }

    /// Dynamically linked (needs an interpreter).
    pub fn is_dynamic(&self) -> bool {
        self.interpreter.is_some()
    }
}

/// What a candidate `/init` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// An ELF file whose headers parse (it may still be a library or object file).
    Elf(ElfInfo),
    /// A `#!` script, with its interpreter path (first word after `#!`).
    Script {
        /// The interpreter path, e.g. `/bin/sh`.
        interpreter: String,
    },
    /// Anything else (text, data, an ELF file that does not parse: see the reason).
    Other {
        /// Why it is neither a script nor a parsable ELF file.
        reason: String,
    },
}

/// Reads `path` and classifies it. I/O errors are errors; unparseable contents are
/// [`FileKind::Other`] with the reason.
pub fn inspect(path: &Path) -> Result<FileKind, ElfError> {
    let io_err = |source| ElfError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > MAX_PROGRAM_SIZE {
        return Err(ElfError::TooBig {
            path: path.display().to_string(),
            size: len,
        });
    }
    let mut data = Vec::with_capacity(len as usize);
    file.take(MAX_PROGRAM_SIZE)
        .read_to_end(&mut data)
        .map_err(io_err)?;
    Ok(classify(&data))
}

/// Classifies file contents (see [`inspect`]).
pub fn classify(data: &[u8]) -> FileKind {
    if let Some(rest) = data.strip_prefix(b"#!") {
        let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = String::from_utf8_lossy(&rest[..line_end]);
        return match line.split_whitespace().next() {
            Some(interp) => FileKind::Script {
                interpreter: interp.to_string(),
            },
            None => FileKind::Other {
                reason: "a `#!` line without an interpreter".into(),
            },
        };
    }
    match parse(data) {
        Ok(info) => FileKind::Elf(info),
        Err(e) => FileKind::Other {
            reason: e.to_string(),
        },
    }
}

/// Little-endian field reader for one ELF class.
struct Reader<'a> {
    data: &'a [u8],
    is64: bool,
}

impl Reader<'_> {
    fn bytes(&self, off: u64, len: u64, what: &'static str) -> Result<&[u8], ElfError> {
        let start = usize::try_from(off).map_err(|_| ElfError::Truncated(what))?;
        let len = usize::try_from(len).map_err(|_| ElfError::Truncated(what))?;
        let end = start.checked_add(len).ok_or(ElfError::Truncated(what))?;
        self.data.get(start..end).ok_or(ElfError::Truncated(what))
    }
    fn u16(&self, off: u64, what: &'static str) -> Result<u16, ElfError> {
        let b = self.bytes(off, 2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, off: u64, what: &'static str) -> Result<u32, ElfError> {
        let b = self.bytes(off, 4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, off: u64, what: &'static str) -> Result<u64, ElfError> {
        let b = self.bytes(off, 8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// An address-sized field: 8 bytes in ELF64, 4 in ELF32.
    fn word(&self, off: u64, what: &'static str) -> Result<u64, ElfError> {
        if self.is64 {
            self.u64(off, what)
        } else {
            self.u32(off, what).map(u64::from)
        }
    }
}

struct Segment {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Parses an ELF header and program headers (little-endian ELF32/ELF64).
pub fn parse(data: &[u8]) -> Result<ElfInfo, ElfError> {
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    if data.len() < 16 {
        return Err(ElfError::Truncated("ELF identification"));
    }
    let is64 = match data[4] {
        1 => false,
        2 => true,
        c => return Err(ElfError::Unsupported(format!("class {c}"))),
    };
    if data[5] != 1 {
        return Err(ElfError::Unsupported(
            "byte order: big-endian (x86 is little-endian)".into(),
        ));
    }
    let r = Reader { data, is64 };
    let e_type = r.u16(16, "ELF header")?;
    let machine = r.u16(18, "ELF header")?;
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            r.u64(24, "ELF header")?,
            r.u64(32, "ELF header")?,
            r.u16(54, "ELF header")?,
            r.u16(56, "ELF header")?,
        )
    } else {
        (
            u64::from(r.u32(24, "ELF header")?),
            u64::from(r.u32(28, "ELF header")?),
            r.u16(42, "ELF header")?,
            r.u16(44, "ELF header")?,
        )
    };
    let arch = match (machine, is64) {
        (EM_X86_64, true) => Arch::X86_64,
        (EM_386, false) => Arch::I386,
        (m, _) => Arch::Other {
            machine: m,
            bits: if is64 { 64 } else { 32 },
        },
    };
    let min_phent = if is64 { 56 } else { 32 };
    if phnum > 0 && u64::from(phentsize) < min_phent {
        return Err(ElfError::Truncated("program header size"));
    }
    let mut segments = Vec::with_capacity(usize::from(phnum));
    for i in 0..u64::from(phnum) {
        let base = phoff
            .checked_add(i * u64::from(phentsize))
            .ok_or(ElfError::Truncated("program headers"))?;
        let what = "program headers";
        let seg = if is64 {
            Segment {
                p_type: r.u32(base, what)?,
                offset: r.u64(base + 8, what)?,
                vaddr: r.u64(base + 16, what)?,
                filesz: r.u64(base + 32, what)?,
            }
        } else {
            Segment {
                p_type: r.u32(base, what)?,
                offset: u64::from(r.u32(base + 4, what)?),
                vaddr: u64::from(r.u32(base + 8, what)?),
                filesz: u64::from(r.u32(base + 16, what)?),
            }
        };
        segments.push(seg);
    }

    let interpreter = match segments.iter().find(|s| s.p_type == PT_INTERP) {
        Some(s) => {
            let raw = r.bytes(s.offset, s.filesz, "interpreter path")?;
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            Some(String::from_utf8_lossy(&raw[..end]).into_owned())
        }
        None => None,
    };
    let (needed, flags_1) = match segments.iter().find(|s| s.p_type == PT_DYNAMIC) {
        Some(dynamic) => read_dynamic(&r, dynamic, &segments)?,
        None => (Vec::new(), 0),
    };
    let kind = match e_type {
        ET_EXEC => ElfKind::Executable,
        ET_DYN if interpreter.is_some() || flags_1 & DF_1_PIE != 0 || entry != 0 => {
            ElfKind::PieExecutable
        }
        ET_DYN => ElfKind::SharedLibrary,
        t => ElfKind::Other(t),
    };
    Ok(ElfInfo {
        arch,
        kind,
        interpreter,
        needed,
    })
}

/// Reads `DT_NEEDED` names and `DT_FLAGS_1` from the dynamic segment.
fn read_dynamic(
    r: &Reader<'_>,
    dynamic: &Segment,
    segments: &[Segment],
) -> Result<(Vec<String>, u64), ElfError> {
    let entsize: u64 = if r.is64 { 16 } else { 8 };
    let half = entsize / 2;
    let mut needed_offsets = Vec::new();
    let mut strtab_vaddr = None;
    let mut flags_1 = 0;
    let count = dynamic.filesz / entsize;
    for i in 0..count {
        let base = dynamic.offset + i * entsize;
        let tag = r.word(base, "dynamic section")?;
        let val = r.word(base + half, "dynamic section")?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_offsets.push(val),
            DT_STRTAB => strtab_vaddr = Some(val),
            DT_FLAGS_1 => flags_1 = val,
            _ => {}
        }
    }
    let mut needed = Vec::new();
    if let Some(vaddr) = strtab_vaddr {
        // DT_STRTAB is an address: find the file offset through the PT_LOAD that maps it.
        let strtab_off = segments
            .iter()
            .filter(|s| s.p_type == PT_LOAD)
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
            .and_then(|s| s.offset.checked_add(vaddr - s.vaddr))
            .ok_or(ElfError::Truncated("dynamic string table"))?;
        for off in needed_offsets {
            let start = strtab_off
                .checked_add(off)
                .ok_or(ElfError::Truncated("dynamic string table"))?;
            let rest = r.bytes(
                start,
                (r.data.len() as u64).saturating_sub(start),
                "library name",
            )?;
            let end = rest
                .iter()
                .position(|&b| b == 0)
                .ok_or(ElfError::Truncated("library name"))?;
            needed.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        }
    }
    Ok((needed, flags_1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn gcc(dir: &Path, name: &str, src: &str, flags: &[&str]) -> Option<std::path::PathBuf> {
        let c = dir.join(format!("{name}.c"));
        std::fs::write(&c, src).unwrap();
        let out = dir.join(name);
        let res = Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(&c)
            .output()
            .expect("gcc is needed for these tests (scripts/setup.sh)");
        if !res.status.success() {
            eprintln!(
                "gcc {flags:?} failed: {}",
                String::from_utf8_lossy(&res.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
        }
        res.status.success().then_some(out)
    }

    #[test]
    fn bin_true_is_dynamic_x86_64() {
        let FileKind::Elf(info) = inspect(Path::new("/bin/true")).unwrap() else {
            panic!("/bin/true is not ELF?");
        };
        assert_eq!(info.arch, Arch::X86_64);
        assert!(info.is_executable());
        assert!(info.is_dynamic());
        assert_eq!(
            info.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert!(info.needed.iter().any(|n| n == "libc.so.6"), "{info:?}");
    }

    #[test]
    fn static_programs_have_no_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let src = "int main(void){return 3;}\n";
        let st = gcc(dir.path(), "st", src, &["-static", "-O2"]).unwrap();
        let FileKind::Elf(info) = inspect(&st).unwrap() else {
            panic!("not ELF");
        };
        assert_eq!(info.arch, Arch::X86_64);
        assert!(info.is_executable(), "{info:?}");
        assert!(!info.is_dynamic());
        assert!(info.needed.is_empty());

        let pie = gcc(dir.path(), "spie", src, &["-static-pie", "-O2"]).unwrap();
        let FileKind::Elf(info) = inspect(&pie).unwrap() else {
            panic!("not ELF");
        };
        assert_eq!(info.kind, ElfKind::PieExecutable);
        assert!(!info.is_dynamic());
    }

    #[test]
    fn shared_library_is_not_an_executable() {
        let dir = tempfile::tempdir().unwrap();
        let lib = gcc(
            dir.path(),
            "libx.so",
            "int f(void){return 1;}\n",
            &["-shared", "-fPIC", "-nostdlib"],
        )
        .unwrap();
        let FileKind::Elf(info) = inspect(&lib).unwrap() else {
            panic!("not ELF");
        };
        assert_eq!(info.kind, ElfKind::SharedLibrary);
        assert!(!info.is_executable());
    }

    #[test]
    fn i386_programs_are_recognised_when_gcc_can_build_them() {
        let dir = tempfile::tempdir().unwrap();
        // Needs gcc-multilib; a hand-made header covers the parser when it is missing.
        if let Some(p) = gcc(
            dir.path(),
            "m32",
            "int main(void){return 0;}\n",
            &["-m32", "-static"],
        ) {
            let FileKind::Elf(info) = inspect(&p).unwrap() else {
                panic!("not ELF");
            };
            assert_eq!(info.arch, Arch::I386);
        }
        let mut h = vec![0u8; 52];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1; // ELFCLASS32
        h[5] = 1; // little-endian
        h[6] = 1;
        h[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        h[18..20].copy_from_slice(&EM_386.to_le_bytes());
        let info = parse(&h).unwrap();
        assert_eq!(info.arch, Arch::I386);
        assert_eq!(info.kind, ElfKind::Executable);
        assert!(!info.is_dynamic());
    }

    #[test]
    fn text_and_scripts() {
        assert!(matches!(classify(b"hello world\n"), FileKind::Other { .. }));
        assert_eq!(
            classify(b"#!/bin/sh -e\necho hi\n"),
            FileKind::Script {
                interpreter: "/bin/sh".into()
            }
        );
        assert!(matches!(classify(b"#!\n"), FileKind::Other { .. }));
        assert!(matches!(parse(b"hello"), Err(ElfError::NotElf)));
    }

    #[test]
    fn truncated_files_are_rejected_not_panicking() {
        let data = std::fs::read("/bin/true").unwrap();
        for len in [5, 16, 20, 63, 64, 100, 300, 1000] {
            match classify(&data[..len]) {
                FileKind::Other { reason } => assert!(reason.contains("truncated"), "{reason}"),
                k => panic!("{len} bytes classified as {k:?}"),
            }
        }
        // A header pointing program headers past the end.
        let mut d = data[..64].to_vec();
        d[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&d), Err(ElfError::Truncated(_))));
    }

    #[test]
    fn a_load_segment_offset_near_the_end_of_u64_is_rejected_not_panicking() {
        // Every PT_LOAD of /bin/true moved to an offset near u64::MAX: finding the dynamic
        // string table through them must fail cleanly, not overflow.
        let mut d = std::fs::read("/bin/true").unwrap();
        let u16_at = |d: &[u8], o: usize| usize::from(u16::from_le_bytes([d[o], d[o + 1]]));
        let phoff = u64::from_le_bytes(d[32..40].try_into().unwrap()) as usize;
        let (size, count) = (u16_at(&d, 54), u16_at(&d, 56));
        let mut moved = 0;
        for i in 0..count {
            let ph = phoff + i * size;
            if u32::from_le_bytes(d[ph..ph + 4].try_into().unwrap()) == PT_LOAD {
                d[ph + 8..ph + 16].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
                moved += 1;
            }
        }
        assert!(moved > 0, "no PT_LOAD in /bin/true?");
        assert!(
            matches!(parse(&d), Err(ElfError::Truncated(_))),
            "{:?}",
            parse(&d)
        );
    }

    #[test]
    fn other_machines_are_reported() {
        let mut h = std::fs::read("/bin/true").unwrap();
        h[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        let info = parse(&h).unwrap();
        assert_eq!(
            info.arch,
            Arch::Other {
                machine: 183,
                bits: 64
            }
        );
        h[5] = 2;
        assert!(matches!(parse(&h), Err(ElfError::Unsupported(_))));
    }
}
