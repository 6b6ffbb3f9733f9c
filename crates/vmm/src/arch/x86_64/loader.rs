//! Loading the guest kernel (ELF vmlinux or bzImage) and the initramfs into guest memory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{BZIMAGE_LOAD_ADDR, HIGH_MEMORY_START, INITRD_ADDR_MAX};
use crate::memory::HUGE_PAGE_SIZE as HUGE_PAGE;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
const PAGE: u64 = 4096;

/// Why the kernel or the initramfs could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open kernel {path}: {source}; pass a vmlinux or bzImage built by `xcgi kernel build`")]
    /// The kernel file could not be opened or stat'ed.
    OpenKernel {
        /// The kernel file.
        path: PathBuf,
        /// The error from open or stat.
        source: io::Error,
    },
    #[error("{path} is not a Linux kernel (neither an ELF vmlinux nor a bzImage); build one with `xcgi kernel build`")]
    /// The file is a directory or has neither the ELF nor the bzImage magic.
    NotAKernel {
        /// The file given as kernel.
        path: PathBuf,
    },
    #[error("{path} is an ELF file but not a 64-bit x86 kernel ({detail})")]
    /// An ELF file that is not a loadable little-endian x86-64 executable.
    WrongElf {
        /// The kernel file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    #[error(
        "kernel {path} is truncated or damaged: {detail}; rebuild it with `xcgi kernel build`"
    )]
    /// The file ends before what its headers describe (or is a bzImage too short to load).
    Truncated {
        /// The kernel file.
        path: PathBuf,
        /// What is missing.
        detail: String,
    },
    #[error("kernel {path} does not fit: it needs guest memory up to {needed_mib} MiB; give the VM more memory (--mem)")]
    /// A kernel segment (or a bzImage's decompression space) does not lie within one guest
    /// RAM region.
    TooBig {
        /// The kernel file.
        path: PathBuf,
        /// Guest-physical end it needs, in MiB (rounded up).
        needed_mib: u64,
    },
    #[error("loading bzImage {path} failed: {source}")]
    /// linux-loader refused the bzImage.
    BzImage {
        /// The kernel file.
        path: PathBuf,
        /// linux-loader's error.
        source: linux_loader::loader::Error,
    },
    #[error("cannot open initramfs {path}: {source}")]
    /// The initramfs file could not be opened or stat'ed.
    OpenInitrd {
        /// The initramfs file.
        path: PathBuf,
        /// The error from open or stat.
        source: io::Error,
    },
    #[error("initramfs {path} ({size_mib} MiB) does not fit in guest memory above the kernel; give the VM more memory (--mem)")]
    /// The initramfs does not fit between the kernel's end and the top of low RAM
    /// (capped at [`INITRD_ADDR_MAX`]).
    InitrdTooBig {
        /// The initramfs file.
        path: PathBuf,
        /// Its size in MiB (rounded up).
        size_mib: u64,
    },
    #[error("reading {path} failed: {source}")]
    /// Reading the kernel or initramfs failed.
    Read {
        /// The file being read.
        path: PathBuf,
        /// The read error.
        source: io::Error,
    },
    /// Copying into guest memory failed.
    #[error("writing into guest memory failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the kernel went and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// 64-bit entry point (guest physical).
    pub entry: u64,
    /// First byte after the kernel image, bss included.
    pub end: u64,
    /// The bzImage's setup header, to copy into the zero page (None for ELF).
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ElfImage {
    entry: u64,
    segments: Vec<Segment>,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Parses and validates the ELF headers of a vmlinux against the file's length.
fn parse_elf(
    head: &[u8],
    file: &File,
    file_len: u64,
    path: &Path,
) -> Result<ElfImage, LoaderError> {
    let table = ProgramHeaders::parse(head, file_len, path)?;
    let segments = load_segments(&table, file, file_len, path)?;
    let entry = table.entry;
    if !segments
        .iter()
        .any(|s| entry >= s.paddr && entry < s.paddr + s.memsz)
    {
        return Err(wrong_elf(
            path,
            &format!("entry point {entry:#x} is outside every segment"),
        ));
    }
    Ok(ElfImage { entry, segments })
}

fn wrong_elf(path: &Path, detail: &str) -> LoaderError {
    LoaderError::WrongElf {
        path: path.into(),
        detail: detail.into(),
    }
}

fn truncated(path: &Path, detail: String) -> LoaderError {
    LoaderError::Truncated {
        path: path.into(),
        detail,
    }
}

/// Where the program header table is, from the ELF header.
struct ProgramHeaders {
    entry: u64,
    /// File offset of the table.
    offset: u64,
    /// Size of one entry.
    entry_size: u64,
    count: u64,
}

impl ProgramHeaders {
    /// Checks the ELF header (`head`: the file's first bytes) is a little-endian 64-bit x86
    /// executable whose program header table lies within the file.
    fn parse(head: &[u8], file_len: u64, path: &Path) -> Result<ProgramHeaders, LoaderError> {
        let wrong = |detail: &str| wrong_elf(path, detail);
        if head.len() < 64 {
            return Err(truncated(path, format!("only {} bytes", head.len())));
        }
        if head[4] != 2 {
            return Err(wrong("32-bit ELF"));
        }
        if head[5] != 1 {
            return Err(wrong("big-endian ELF"));
        }
        let e_type = u16_at(head, 16);
        if e_type != 2 {
            return Err(wrong(&format!("ELF type {e_type}, a kernel is an executable (type 2); is this a program rather than a vmlinux?")));
        }
        let machine = u16_at(head, 18);
        if machine != EM_X86_64 {
            return Err(wrong(&format!(
                "machine {machine}, expected x86-64 ({EM_X86_64})"
            )));
        }
        let t = ProgramHeaders {
            entry: u64_at(head, 24),
            offset: u64_at(head, 32),
            entry_size: u16_at(head, 54) as u64,
            count: u16_at(head, 56) as u64,
        };
        if t.entry_size < 56 || t.count == 0 {
            return Err(wrong("no program headers"));
        }
        let end = t
            .offset
            .checked_add(t.entry_size * t.count)
            .ok_or_else(|| truncated(path, "program header table overflows".into()))?;
        if end > file_len {
            return Err(truncated(
                path,
                format!("program headers end at {end} but the file has {file_len} bytes"),
            ));
        }
        Ok(t)
    }
}

/// Reads the program header table and returns its PT_LOAD segments, each checked to lie
/// within the file; at least one.
fn load_segments(
    t: &ProgramHeaders,
    file: &File,
    file_len: u64,
    path: &Path,
) -> Result<Vec<Segment>, LoaderError> {
    let mut table = vec![0u8; (t.entry_size * t.count) as usize];
    file.read_exact_at(&mut table, t.offset)
        .map_err(|source| LoaderError::Read {
            path: path.into(),
            source,
        })?;
    let mut segments = Vec::new();
    for i in 0..t.count as usize {
        let p = &table[i * t.entry_size as usize..];
        if u32_at(p, 0) != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: u64_at(p, 8),
            paddr: u64_at(p, 24),
            filesz: u64_at(p, 32),
            memsz: u64_at(p, 40),
        };
        let end = seg.offset.saturating_add(seg.filesz);
        if end > file_len {
            return Err(truncated(
                path,
                format!("segment {i} needs bytes up to {end} but the file has {file_len}"),
            ));
        }
        if seg.memsz < seg.filesz {
            return Err(wrong_elf(path, "segment memory size below its file size"));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(wrong_elf(path, "no loadable segments"));
    }
    Ok(segments)
}

fn check_fits(mem: &GuestMemoryMmap, start: u64, len: u64, path: &Path) -> Result<(), LoaderError> {
    let end = start.saturating_add(len);
    let fits = len == 0
        || (mem.address_in_range(GuestAddress(start))
            && mem.address_in_range(GuestAddress(end - 1))
            && mem.find_region(GuestAddress(start)).map(|r| r.start_addr())
                == mem
                    .find_region(GuestAddress(end - 1))
                    .map(|r| r.start_addr()));
    if fits {
        Ok(())
    } else {
        Err(LoaderError::TooBig {
            path: path.into(),
            needed_mib: end.div_ceil(1 << 20),
        })
    }
}

/// How file contents get into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LoadMode {
    /// Map whole pages copy-on-write from the file (falls back to copying where it cannot).
    #[default]
    Map,
    /// Copy everything into guest memory at setup.
    Copy,
}

/// Loads a kernel image (ELF vmlinux or bzImage, told apart by content).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    mode: LoadMode,
) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(|source| LoaderError::OpenKernel {
        path: path.into(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| LoaderError::OpenKernel {
        path: path.into(),
        source,
    })?;
    if meta.is_dir() {
        return Err(LoaderError::NotAKernel { path: path.into() });
    }
    let file_len = meta.len();
    let mut head = vec![0u8; 64.min(file_len as usize)];
    file.read_exact(&mut head)
        .map_err(|source| LoaderError::Read {
            path: path.into(),
            source,
        })?;
    if head.len() >= 4 && &head[0..4] == ELF_MAGIC {
        let elf = parse_elf(&head, &file, file_len, path)?;
        return load_elf(mem, &file, &elf, path, mode);
    }
    let mut magic = [0u8; 4];
    let is_bz = file_len > BZIMAGE_MAGIC_OFFSET + 4
        && file.read_exact_at(&mut magic, BZIMAGE_MAGIC_OFFSET).is_ok()
        && &magic == BZIMAGE_MAGIC;
    if !is_bz {
        return Err(LoaderError::NotAKernel { path: path.into() });
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|source| LoaderError::Read {
            path: path.into(),
            source,
        })?;
    let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START))).map_err(
        |source| match source {
            linux_loader::loader::Error::Bzimage(_) if file_len < 64 * 1024 => {
                LoaderError::Truncated {
                    path: path.into(),
                    detail: format!("{file_len} bytes"),
                }
            }
            source => LoaderError::BzImage {
                path: path.into(),
                source,
            },
        },
    )?;
    let hdr = res.setup_header.unwrap_or_default();
    // The compressed kernel decompresses in place; it needs init_size bytes from the load address.
    check_fits(
        mem,
        BZIMAGE_LOAD_ADDR,
        u64::from(hdr.init_size).max(res.kernel_end - BZIMAGE_LOAD_ADDR),
        path,
    )?;
    Ok(LoadedKernel {
        // 64-bit entry of the protected-mode part is 0x200 past its start.
        entry: res.kernel_load.0 + 0x200,
        end: res
            .kernel_end
            .max(BZIMAGE_LOAD_ADDR + u64::from(hdr.init_size)),
        setup_header: Some(hdr),
    })
}

fn load_elf(
    mem: &GuestMemoryMmap,
    file: &File,
    elf: &ElfImage,
    path: &Path,
    mode: LoadMode,
) -> Result<LoadedKernel, LoaderError> {
    for seg in &elf.segments {
        check_fits(mem, seg.paddr, seg.memsz, path)?;
    }
    let mut window = None;
    if mode == LoadMode::Map {
        let lo = elf.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
        let hi = elf
            .segments
            .iter()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(0);
        window = small_page_window(mem, lo, hi);
    }
    let mut end = 0;
    for seg in &elf.segments {
        let done = match mode {
            LoadMode::Map => map_file_pages(mem, file, seg.offset, seg.paddr, seg.filesz, window),
            LoadMode::Copy => None,
        }
        .unwrap_or(0);
        if seg.filesz > done {
            copy_from_file(
                mem,
                file,
                seg.offset + done,
                seg.paddr + done,
                seg.filesz - done,
                path,
            )?;
        }
        end = end.max(seg.paddr + seg.memsz);
    }
    Ok(LoadedKernel {
        entry: elf.entry,
        end: end.div_ceil(PAGE) * PAGE,
        setup_header: None,
    })
}

/// In huge-page RAM, turns the 2 MiB pages that cover guest-physical `[start, end)` into
/// ordinary anonymous 4 KiB pages (zero, private, reserved nothing), so that file pages can be
/// mapped copy-on-write there as in ordinary RAM instead of copied into freshly zeroed huge
/// pages. The rest of RAM keeps its huge pages. Returns the guest-physical window made, or
/// None where RAM is not huge pages or the window cannot be made (RAM is then left as it was).
fn small_page_window(mem: &GuestMemoryMmap, start: u64, end: u64) -> Option<SmallPages> {
    let region = mem.find_region(GuestAddress(start))?;
    if region.is_hugetlbfs() != Some(true) {
        return None;
    }
    let base = region.start_addr().0;
    let lo = (start / HUGE_PAGE * HUGE_PAGE).max(base);
    let hi = end
        .div_ceil(HUGE_PAGE)
        .saturating_mul(HUGE_PAGE)
        .min(base + region.len());
    if hi <= lo || !lo.is_multiple_of(HUGE_PAGE) || !(hi - lo).is_multiple_of(HUGE_PAGE) {
        return None;
    }
    let host = mem.get_host_address(GuestAddress(lo)).ok()?;
    // SAFETY: [host, host + hi - lo) lies inside the guest RAM mapping owned by `mem` and is
    // 2 MiB aligned at both ends (a hugetlb mapping can only be replaced in whole huge pages);
    // MAP_FIXED swaps those huge pages for anonymous pages of the same protection, which `mem`
    // unmaps with the rest of the region on drop. Nothing has been written there yet.
    let addr = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            (hi - lo) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED || addr as u64 != host as u64 {
        tracing::debug!(
            "4 KiB window in huge-page RAM failed ({}); copying",
            io::Error::last_os_error()
        );
        return None;
    }
    Some(SmallPages { start: lo, end: hi })
}

/// A guest-physical range of huge-page RAM turned into 4 KiB pages by [`small_page_window`].
#[derive(Debug, Clone, Copy)]
struct SmallPages {
    start: u64,
    end: u64,
}

/// Maps the whole pages of a segment from the file, copy-on-write, over the anonymous guest
/// RAM: no copy and no page faults until the guest touches a page, which then comes straight
/// from the page cache (and is copied only if the guest writes it). Guest writes never reach
/// the file. Returns how many bytes were mapped (None where this does not apply: huge pages
/// without a 4 KiB window, unaligned offsets, less than a page).
fn map_file_pages(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    paddr: u64,
    filesz: u64,
    window: Option<SmallPages>,
) -> Option<u64> {
    use std::os::fd::AsRawFd;
    if !paddr.is_multiple_of(PAGE) || !offset.is_multiple_of(PAGE) {
        return None;
    }
    let region = mem.find_region(GuestAddress(paddr))?;
    let len = filesz / PAGE * PAGE;
    if len == 0 {
        return None;
    }
    let host = mem.get_host_address(GuestAddress(paddr)).ok()?;
    match (region.is_hugetlbfs(), window) {
        (Some(false), _) => {}
        // Huge-page RAM: only inside a 4 KiB window, never over huge pages.
        (Some(true), Some(w)) if w.start <= paddr && paddr + len <= w.end => {}
        _ => return None,
    }
    // SAFETY: [host, host+len) lies inside the guest RAM mapping owned by `mem` (checked by
    // check_fits); MAP_FIXED replaces those anonymous pages with a private file mapping of the
    // same size and protection, which `mem` unmaps with the rest of the region on drop.
    let addr = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if addr == libc::MAP_FAILED || addr as u64 != host as u64 {
        tracing::debug!(
            "mapping kernel segment failed ({}); copying it",
            io::Error::last_os_error()
        );
        return None;
    }
    Some(len)
}

fn copy_from_file(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    paddr: u64,
    len: u64,
    path: &Path,
) -> Result<(), LoaderError> {
    let slice = mem.get_slice(GuestAddress(paddr), len as usize)?;
    // SAFETY: the slice covers exactly `len` bytes of our own mapping; reading the file into
    // it is a plain copy.
    let buf =
        unsafe { std::slice::from_raw_parts_mut(slice.ptr_guard_mut().as_ptr(), len as usize) };
    file.read_exact_at(buf, offset)
        .map_err(|source| LoaderError::Read {
            path: path.into(),
            source,
        })
}

/// Loads the initramfs at the top of low memory; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    mode: LoadMode,
) -> Result<(u64, u64), LoaderError> {
    let file = File::open(path).map_err(|source| LoaderError::OpenInitrd {
        path: path.into(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| LoaderError::OpenInitrd {
            path: path.into(),
            source,
        })?
        .len();
    let low_end = mem
        .find_region(GuestAddress(0))
        .map(|r| r.len())
        .unwrap_or(0)
        .min(INITRD_ADDR_MAX);
    let too_big = || LoaderError::InitrdTooBig {
        path: path.into(),
        size_mib: size.div_ceil(1 << 20),
    };
    let addr = low_end.checked_sub(size).ok_or_else(too_big)? & !(PAGE - 1);
    if addr < kernel_end {
        return Err(too_big());
    }
    let done = match mode {
        LoadMode::Map => {
            // A window must not reach down into the kernel's (it would replace its pages).
            let clear_of_kernel =
                addr / HUGE_PAGE * HUGE_PAGE >= kernel_end.div_ceil(HUGE_PAGE) * HUGE_PAGE;
            let window = clear_of_kernel
                .then(|| small_page_window(mem, addr, addr + size))
                .flatten();
            map_file_pages(mem, &file, 0, addr, size, window)
        }
        LoadMode::Copy => None,
    }
    .unwrap_or(0);
    if size > done {
        copy_from_file(mem, &file, done, addr + done, size - done, path)?;
    }
    Ok((addr, size))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    /// Asserts that every mapping of this process overlapping one of `ranges` (host address,
    /// length) is private (`p` in /proc/self/maps, never `s`); returns how many there are.
    pub(crate) fn assert_private_mappings(ranges: &[(u64, u64)]) -> usize {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut found = 0;
        for &(start, len) in ranges {
            for line in maps.lines() {
                let mut f = line.split_whitespace();
                let (range, perms) = (f.next().unwrap(), f.next().unwrap());
                let (lo, hi) = range.split_once('-').unwrap();
                let lo = u64::from_str_radix(lo, 16).unwrap();
                let hi = u64::from_str_radix(hi, 16).unwrap();
                if lo < start + len && hi > start {
                    assert_eq!(&perms[3..4], "p", "shared mapping in guest RAM: {line}");
                    found += 1;
                }
            }
        }
        found
    }

    /// A minimal 64-bit x86 ELF with one PT_LOAD segment at 16 MiB.
    pub(crate) fn tiny_elf(payload: &[u8], bss: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(ELF_MAGIC);
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let p = 64;
        f[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[p + 8..p + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
        f[p + 16..p + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes()); // vaddr
        f[p + 24..p + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // paddr
        f[p + 32..p + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        f[p + 40..p + 48].copy_from_slice(&(payload.len() as u64 + bss).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub(crate) fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        t
    }

    #[test]
    fn loads_elf_segments_at_their_physical_address() {
        let m = mem(32);
        let t = write_tmp(&tiny_elf(b"\xf4kernel-bytes", 0x2000));
        let k = load_kernel(&m, t.path(), LoadMode::Map).unwrap();
        assert_eq!(k.entry, 0x100_0000);
        assert!(k.end >= 0x100_0000 + 13 + 0x2000);
        let mut got = [0u8; 13];
        m.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&got, b"\xf4kernel-bytes");
        assert!(k.setup_header.is_none());
    }

    #[test]
    fn elf_pages_are_mapped_copy_on_write() {
        let m = crate::memory::create(&crate::memory::MemoryConfig {
            size_mib: 32,
            ..Default::default()
        })
        .unwrap();
        let payload: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        let t = write_tmp(&tiny_elf(&payload, 4096));
        let k = load_kernel(&m, t.path(), LoadMode::Map).unwrap();
        let mut got = vec![0u8; payload.len()];
        m.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(got, payload, "whole pages mapped and the tail copied");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            maps.contains(t.path().to_str().unwrap()),
            "kernel pages are a file mapping"
        );
        // bss after the file bytes reads as zero.
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0x100_0000 + payload.len() as u64))
                .unwrap(),
            0
        );
        assert!(k.end >= 0x100_0000 + payload.len() as u64 + 4096);
        // A guest write stays private: the file is unchanged.
        m.write_obj(0xffu8, GuestAddress(0x100_0000)).unwrap();
        let on_disk = std::fs::read(t.path()).unwrap();
        assert_eq!(on_disk[0x1000], payload[0]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100_0000)).unwrap(), 0xff);
    }

    /// Issue 5's guarantee: two VMs started from the same kernel and initramfs files share no
    /// writable memory. Every host mapping behind either guest's RAM is private (`p` in
    /// /proc/self/maps, never `s`), and a write by one guest to every kernel and initrd page is
    /// seen neither by the other guest nor in the files.
    #[test]
    fn two_guests_from_the_same_files_share_no_writable_memory() {
        use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
        let new_mem = || {
            crate::memory::create(&crate::memory::MemoryConfig {
                size_mib: 64,
                ..Default::default()
            })
            .unwrap()
        };
        let payload: Vec<u8> = (0..8 * 4096).map(|i| (i % 253) as u8).collect();
        let kfile = write_tmp(&tiny_elf(&payload, 4096));
        let ifile = write_tmp(&payload);
        let (a, b) = (new_mem(), new_mem());
        let ka = load_kernel(&a, kfile.path(), LoadMode::Map).unwrap();
        let kb = load_kernel(&b, kfile.path(), LoadMode::Map).unwrap();
        let ia = load_initrd(&a, ifile.path(), ka.end, LoadMode::Map).unwrap();
        let ib = load_initrd(&b, ifile.path(), kb.end, LoadMode::Map).unwrap();
        assert_eq!((ia.0, ia.1), (ib.0, ib.1));

        // Every mapping overlapping either guest's RAM is private.
        let ranges: Vec<(u64, u64)> = [&a, &b]
            .iter()
            .flat_map(|m| m.iter().map(|r| (r.as_ptr() as u64, r.len())))
            .collect();
        let checked = assert_private_mappings(&ranges);
        assert!(
            checked >= 4,
            "found only {checked} mappings behind the two guests"
        );

        // Guest A scribbles over every kernel and initrd page; B and the files are untouched.
        let kernel_at = GuestAddress(0x100_0000);
        let initrd_at = GuestAddress(ia.0);
        for off in (0..payload.len() as u64).step_by(512) {
            a.write_obj(0xAAu8, kernel_at.unchecked_add(off)).unwrap();
            a.write_obj(0xAAu8, initrd_at.unchecked_add(off)).unwrap();
        }
        let mut got = vec![0u8; payload.len()];
        b.read_slice(&mut got, kernel_at).unwrap();
        assert_eq!(got, payload, "guest B's kernel changed");
        b.read_slice(&mut got, initrd_at).unwrap();
        assert_eq!(got, payload, "guest B's initrd changed");
        a.read_slice(&mut got, kernel_at).unwrap();
        assert_eq!(got[0], 0xAA);
        assert_eq!(
            &std::fs::read(kfile.path()).unwrap()[4096..4096 + 16],
            &payload[..16]
        );
        assert_eq!(std::fs::read(ifile.path()).unwrap(), payload);
    }

    /// Huge-page RAM: the kernel and the initramfs are mapped copy-on-write in 4 KiB windows
    /// instead of copied into huge pages; loading them touches no huge page, the rest of RAM
    /// stays huge pages, and two guests still share nothing writable.
    #[test]
    fn huge_page_ram_maps_kernel_and_initrd_in_small_page_windows() {
        use vm_memory::{Address, GuestMemoryBackend};
        let _lock = crate::memory::HUGE_PAGE_TESTS.lock();
        let _pool = crate::memory::HugePagePool::raise_to(64)
            .expect("raising vm.nr_hugepages (the test runs as root)");
        let available = crate::memory::free_huge_pages().unwrap_or(0);
        assert!(
            available >= 64,
            "only {available} huge pages could be reserved"
        );
        let new_mem = || {
            crate::memory::create(&crate::memory::MemoryConfig {
                size_mib: 64,
                hugepages: true,
                populate: false,
            })
            .unwrap()
        };
        let payload: Vec<u8> = (0..8 * 4096).map(|i| (i % 251) as u8).collect();
        let kfile = write_tmp(&tiny_elf(&payload, 3 * 4096));
        let ifile = write_tmp(&payload);
        let (a, b) = (new_mem(), new_mem());
        let ka = load_kernel(&a, kfile.path(), LoadMode::Map).unwrap();
        load_kernel(&b, kfile.path(), LoadMode::Map).unwrap();
        let ia = load_initrd(&a, ifile.path(), ka.end, LoadMode::Map).unwrap();
        load_initrd(&b, ifile.path(), ka.end, LoadMode::Map).unwrap();

        let used = crate::memory::usage(&a).unwrap();
        assert_eq!(
            used.guest_huge_pages, 0,
            "loading touched huge pages: {used:?}"
        );
        let kernel_at = GuestAddress(0x100_0000);
        let initrd_at = GuestAddress(ia.0);
        let mut got = vec![0u8; payload.len()];
        a.read_slice(&mut got, kernel_at).unwrap();
        assert_eq!(got, payload);
        a.read_slice(&mut got, initrd_at).unwrap();
        assert_eq!(got, payload);
        // bss is zero.
        let bss: u64 = a
            .read_obj(kernel_at.unchecked_add(payload.len() as u64))
            .unwrap();
        assert_eq!(bss, 0);
        let used = crate::memory::usage(&a).unwrap();
        assert_eq!(used.guest_huge_pages, 0, "{used:?}");
        assert_eq!(
            used.guest_shared_file_kib,
            2 * 32,
            "kernel and initrd pages come from the page cache: {used:?}"
        );
        // Below the kernel, RAM is still huge pages.
        a.write_obj(1u8, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(crate::memory::usage(&a).unwrap().guest_huge_pages, 1);
        for m in [&a, &b] {
            assert!(
                std::fs::read_to_string("/proc/self/maps")
                    .unwrap()
                    .contains(kfile.path().to_str().unwrap()),
                "the kernel is a file mapping"
            );
            assert!(m.num_regions() == 1);
        }

        // A's writes reach neither B nor the files.
        for off in (0..payload.len() as u64).step_by(512) {
            a.write_obj(0xAAu8, kernel_at.unchecked_add(off)).unwrap();
            a.write_obj(0xAAu8, initrd_at.unchecked_add(off)).unwrap();
        }
        b.read_slice(&mut got, kernel_at).unwrap();
        assert_eq!(got, payload, "guest B's kernel changed");
        b.read_slice(&mut got, initrd_at).unwrap();
        assert_eq!(got, payload, "guest B's initrd changed");
        assert_eq!(std::fs::read(ifile.path()).unwrap(), payload);
    }

    #[test]
    fn copy_mode_copies_instead_of_mapping() {
        let m = crate::memory::create(&crate::memory::MemoryConfig {
            size_mib: 32,
            ..Default::default()
        })
        .unwrap();
        let payload: Vec<u8> = (0..2 * 4096).map(|i| (i % 13) as u8).collect();
        let t = write_tmp(&tiny_elf(&payload, 0));
        load_kernel(&m, t.path(), LoadMode::Copy).unwrap();
        let mut got = vec![0u8; payload.len()];
        m.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(got, payload);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            !maps.contains(t.path().to_str().unwrap()),
            "no file mapping in copy mode"
        );
    }

    #[test]
    fn truncated_elf_is_named_truncated() {
        let full = tiny_elf(&[0x90; 4096], 0);
        let t = write_tmp(&full[..full.len() - 100]);
        let e = load_kernel(&mem(32), t.path(), LoadMode::Map).unwrap_err();
        assert!(matches!(e, LoaderError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"));
    }

    #[test]
    fn text_file_is_not_a_kernel() {
        let t = write_tmp(b"#!/bin/sh\necho hello\n");
        let e = load_kernel(&mem(32), t.path(), LoadMode::Map).unwrap_err();
        assert!(matches!(e, LoaderError::NotAKernel { .. }), "{e}");
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let e =
            load_kernel(&mem(32), Path::new("/nonexistent/vmlinux"), LoadMode::Map).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn host_program_is_not_taken_for_a_kernel() {
        // /bin/true is a 64-bit x86 ELF, but a position-independent program, not a kernel.
        let e = load_kernel(&mem(32), Path::new("/bin/true"), LoadMode::Map).unwrap_err();
        assert!(matches!(e, LoaderError::WrongElf { .. }), "{e}");
    }

    #[test]
    fn kernel_beyond_memory_is_too_big() {
        let t = write_tmp(&tiny_elf(b"x", 64 << 20));
        let e = load_kernel(&mem(32), t.path(), LoadMode::Map).unwrap_err();
        assert!(matches!(e, LoaderError::TooBig { .. }), "{e}");
    }

    #[test]
    fn initrd_goes_to_top_of_low_memory() {
        let m = mem(64);
        let t = write_tmp(&vec![0xab; 10_000]);
        let (addr, size) = load_initrd(&m, t.path(), 0x200_0000, LoadMode::Map).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE, 0);
        assert!(addr + size <= 64 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr + 9_999)).unwrap(), 0xab);
    }

    #[test]
    fn initrd_overlapping_kernel_is_refused() {
        let m = mem(32);
        let t = write_tmp(&vec![0; 20 << 20]);
        assert!(matches!(
            load_initrd(&m, t.path(), 0x100_0000, LoadMode::Map),
            Err(LoaderError::InitrdTooBig { .. })
        ));
    }
}
