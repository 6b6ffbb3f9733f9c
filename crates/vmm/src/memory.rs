//! Guest memory: anonymous 4 KiB pages, 2 MiB huge pages, optionally pre-faulted.
//!
//! RAM is split around the 32-bit MMIO hole: `[0, min(size, 3 GiB))` and, for larger guests,
//! `[4 GiB, 4 GiB + rest)`.

use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;
/// Smallest guest we accept: the kernel is loaded at 16 MiB and needs room above it.
pub const MIN_MEM_MIB: u64 = 32;
/// Size of the huge pages guest RAM can be backed with.
pub const HUGE_PAGE_SIZE: u64 = 2 * MIB;

/// Why guest memory could not be validated, mapped, or the huge page pool raised.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size in MiB is below [`MIN_MEM_MIB`].
    #[error("guest memory of {0} MiB is below the minimum of {MIN_MEM_MIB} MiB; pass --mem {MIN_MEM_MIB} or more")]
    TooSmall(u64),
    /// The size in MiB is above 1 TiB.
    #[error("guest memory of {0} MiB is too large for this VMM (at most 1 TiB)")]
    TooLarge(u64),
    /// Huge pages were asked for but the size in MiB is odd.
    #[error("guest memory of {0} MiB is not a multiple of 2 MiB, which huge pages need; use an even --mem")]
    NotHugeAligned(u64),
    /// Huge pages were asked for but too few are available (or the mapping got ENOMEM).
    #[error(
        "huge pages requested: the guest needs {needed} free 2 MiB huge pages but only {free} are free; \
         reserve more with `sysctl -w vm.nr_hugepages={suggest}` (or `echo {suggest} > /proc/sys/vm/nr_hugepages`), \
         or run without --hugepages"
    )]
    HugePagesShort {
        /// 2 MiB pages the guest needs.
        needed: u64,
        /// 2 MiB pages available ([`free_huge_pages`]; 0 when unknown).
        free: u64,
        /// The vm.nr_hugepages value the message suggests.
        suggest: u64,
    },
    #[error(
        "raising vm.nr_hugepages to {want} failed ({source}); it needs root: \
         `echo {want} > /proc/sys/vm/nr_hugepages`"
    )]
    /// Writing vm.nr_hugepages failed ([`HugePagePool::raise_to`]).
    RaiseHugePages {
        /// The value that could not be written.
        want: u64,
        /// The write error (usually permission).
        source: io::Error,
    },
    #[error("mapping {size_mib} MiB of guest memory failed: {source}")]
    /// mmap of guest RAM failed.
    Mmap {
        /// The guest's whole RAM size in MiB.
        size_mib: u64,
        /// The mmap error.
        source: io::Error,
    },
    /// vm-memory refused a region or the region list.
    #[error("building the guest memory map failed: {0}")]
    Layout(String),
    /// Saving guest memory to, or mapping it from, a snapshot's memory file failed.
    #[error("guest memory file {path}: {source}")]
    File {
        /// The memory file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// How guest RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryConfig {
    /// Guest RAM size in MiB (at least [`MIN_MEM_MIB`], at most 1 TiB; even with huge pages).
    pub size_mib: u64,
    /// Back RAM with 2 MiB huge pages (MAP_HUGETLB).
    pub hugepages: bool,
    /// Pre-fault every page at creation (MAP_POPULATE).
    pub populate: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size_mib: 128,
            hugepages: false,
            populate: false,
        }
    }
}

/// Guest-physical RAM ranges for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// 2 MiB huge pages that a new mapping can still get, from /proc/meminfo (None when
/// unknown): free minus reserved. Pages reserved by existing mappings (every huge-page VM
/// reserves all of its pages when it maps them, prepared VMs included) are counted as free
/// until touched, but are not available.
pub fn free_huge_pages() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    available_huge_pages(&info)
}

fn available_huge_pages(meminfo: &str) -> Option<u64> {
    let mut free = None;
    let mut reserved = 0;
    let mut size_kb = None;
    for line in meminfo.lines() {
        let mut it = line.split_whitespace();
        let value = |it: &mut std::str::SplitWhitespace<'_>| it.next()?.parse::<u64>().ok();
        match it.next() {
            Some("HugePages_Free:") => free = value(&mut it),
            Some("HugePages_Rsvd:") => reserved = value(&mut it).unwrap_or(0),
            Some("Hugepagesize:") => size_kb = value(&mut it),
            _ => {}
        }
    }
    // Only the default huge page size is counted; we map 2 MiB pages.
    match size_kb {
        Some(2048) => free.map(|f| f.saturating_sub(reserved)),
        _ => Some(0),
    }
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Tests that raise and put back vm.nr_hugepages take turns.
#[cfg(test)]
pub(crate) static HUGE_PAGE_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// vm.nr_hugepages: the size of the huge page pool (None when unknown).
pub fn nr_hugepages() -> Option<u64> {
    std::fs::read_to_string(NR_HUGEPAGES)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A raise of vm.nr_hugepages, put back when dropped (benchmarks and tests that need huge
/// pages on a machine that has too few reserved).
#[derive(Debug)]
pub struct HugePagePool {
    /// vm.nr_hugepages before and after the raise; None when nothing was raised.
    raised: Option<(u64, u64)>,
}

impl HugePagePool {
    /// Raises vm.nr_hugepages by what is missing for `needed` huge pages to be available
    /// ([`free_huge_pages`]); nothing when they already are. Fails only when the sysctl cannot
    /// be written: whether the kernel found the pages (memory may be short or fragmented) is
    /// for the caller to check with [`free_huge_pages`].
    pub fn raise_to(needed: u64) -> Result<HugePagePool, MemoryError> {
        let available = free_huge_pages().unwrap_or(0);
        if available >= needed {
            return Ok(HugePagePool { raised: None });
        }
        let old = nr_hugepages().unwrap_or(0);
        let want = old + (needed - available);
        std::fs::write(NR_HUGEPAGES, want.to_string())
            .map_err(|source| MemoryError::RaiseHugePages { want, source })?;
        Ok(HugePagePool {
            raised: Some((old, want)),
        })
    }

    /// (before, after) when vm.nr_hugepages was raised.
    pub fn raised(&self) -> Option<(u64, u64)> {
        self.raised
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        if let Some((old, _)) = self.raised {
            if let Err(e) = std::fs::write(NR_HUGEPAGES, old.to_string()) {
                tracing::warn!("putting vm.nr_hugepages back to {old} failed: {e}");
            }
        }
    }
}

/// Validates a memory configuration without allocating anything.
pub fn validate(cfg: &MemoryConfig) -> Result<(), MemoryError> {
    if cfg.size_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(cfg.size_mib));
    }
    if cfg.size_mib > 1 << 20 {
        return Err(MemoryError::TooLarge(cfg.size_mib));
    }
    if cfg.hugepages {
        if !(cfg.size_mib * MIB).is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MemoryError::NotHugeAligned(cfg.size_mib));
        }
        let needed = cfg.size_mib * MIB / HUGE_PAGE_SIZE;
        let free = free_huge_pages().unwrap_or(0);
        if free < needed {
            let total = nr_hugepages().unwrap_or(0);
            return Err(MemoryError::HugePagesShort {
                needed,
                free,
                suggest: total + (needed - free),
            });
        }
    }
    Ok(())
}

/// Maps guest RAM as configured. Pages are private to this VM and freed when the returned
/// memory (and every clone of it) is dropped.
pub fn create(cfg: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    validate(cfg)?;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if cfg.hugepages {
        // No MAP_NORESERVE: the pool is reserved at mmap time, so a short pool fails here
        // instead of killing us with SIGBUS on first touch.
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    } else {
        flags |= libc::MAP_NORESERVE;
    }
    if cfg.populate {
        flags |= libc::MAP_POPULATE;
    }
    map_ranges(cfg, |_, len| {
        Ok(MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(cfg.hugepages))
    })
}

/// Guest RAM of `cfg`'s size, each of its RAM ranges ([`ram_ranges`]) mapped as `build` says
/// from the range's offset in guest RAM (without the MMIO hole) and its length.
fn map_ranges(
    cfg: &MemoryConfig,
    mut build: impl FnMut(u64, u64) -> Result<MmapRegionBuilder, MemoryError>,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(cfg.size_mib * MIB) {
        let mapping = build(offset, len)?
            .build()
            .map_err(|e| mapping_failed(cfg, e))?;
        let region = GuestRegionMmap::new(mapping, base)
            .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} overflows", base.0)))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

/// Why guest RAM of `cfg` could not be mapped: on huge pages, ENOMEM is a short pool.
fn mapping_failed(cfg: &MemoryConfig, e: vm_memory::mmap::MmapRegionError) -> MemoryError {
    match e {
        vm_memory::mmap::MmapRegionError::Mmap(source) => {
            if cfg.hugepages && source.raw_os_error() == Some(libc::ENOMEM) {
                let needed = cfg.size_mib * MIB / HUGE_PAGE_SIZE;
                let free = free_huge_pages().unwrap_or(0);
                MemoryError::HugePagesShort {
                    needed,
                    free,
                    suggest: needed,
                }
            } else {
                MemoryError::Mmap {
                    size_mib: cfg.size_mib,
                    source,
                }
            }
        }
        other => MemoryError::Layout(other.to_string()),
    }
}

/// A memfd of 2 MiB huge pages (a file on the kernel's internal hugetlbfs): where a huge-page
/// snapshot's memory can go without a mount, named `/proc/self/fd/N` in this process.
pub fn hugetlb_memfd(name: &std::ffi::CStr) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name and valid flags.
    let fd = unsafe {
        libc::memfd_create(
            name.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just made, owned by nobody else.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Writes guest RAM to `path` (a snapshot's memory file): the RAM ranges one after the other,
/// without the MMIO hole, blocks of zeroes left as holes (a sparse file: a booted guest has
/// touched a small part of its memory).
///
/// A file on hugetlbfs (a huge-page VM's snapshot) is written through a shared mapping
/// instead, in 2 MiB pages: only those holding data are allocated (`fallocate`, so a short
/// pool is an error, never a SIGBUS), the rest stay holes.
pub fn save(mem: &GuestMemoryMmap, path: &std::path::Path) -> Result<Vec<(u64, u64)>, MemoryError> {
    use std::io::{Seek, SeekFrom, Write};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let err = |source| MemoryError::File {
        path: path.to_path_buf(),
        source,
    };
    use std::os::unix::fs::OpenOptionsExt;
    // The guest's memory: for its owner only (a hugetlbfs mount is often world-readable).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    if on_hugetlbfs(&f).map_err(err)? {
        return save_huge(mem, &f).map_err(err);
    }
    let mut total = 0u64;
    let mut data = Vec::new();
    const BLOCK: usize = 64 << 10;
    const PAGES_PER_BLOCK: usize = BLOCK / 4096;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region.as_ptr();
        // Pages that cannot hold anything but zeroes are not read: reading an untouched page
        // faults it in (the shared zero page), one fault per page: 3.5 s for 128 MiB in the
        // lab's emulated CPU.
        let may_hold = pages_with_data(host as usize, len);
        // SAFETY: the region maps `len` bytes at `host` for as long as `mem` lives; the VM is
        // stopped, so nothing writes them while they are read.
        let bytes = unsafe { std::slice::from_raw_parts(host, len) };
        for (i, block) in bytes.chunks(BLOCK).enumerate() {
            let untouched = may_hold.as_ref().is_some_and(|m| {
                m.iter()
                    .skip(i * PAGES_PER_BLOCK)
                    .take(PAGES_PER_BLOCK)
                    .all(|&d| !d)
            });
            if untouched || block.iter().all(|&b| b == 0) {
                f.seek(SeekFrom::Current(block.len() as i64)).map_err(err)?;
            } else {
                f.write_all(block).map_err(err)?;
                add_range(&mut data, total + (i * BLOCK) as u64, block.len() as u64);
            }
        }
        total += len as u64;
    }
    f.set_len(total).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(data)
}

/// `[at, at + len)` added to ordered ranges, joined to the last one when they touch.
fn add_range(ranges: &mut Vec<(u64, u64)>, at: u64, len: u64) {
    match ranges.last_mut() {
        Some((start, n)) if *start + *n == at => *n += len,
        _ => ranges.push((at, len)),
    }
}

const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;

/// Whether `f` is on hugetlbfs (its pages are 2 MiB huge pages).
fn on_hugetlbfs(f: &std::fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: statfs is plain data; fstatfs fills it from an open descriptor.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is open for the call; `st` is ours to write.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as libc::c_long == HUGETLBFS_MAGIC)
}

/// Whether the directory `dir` is on a hugetlbfs mount (where a huge-page VM's snapshot
/// memory can go).
pub fn is_hugetlbfs_dir(dir: &std::path::Path) -> io::Result<bool> {
    on_hugetlbfs(&std::fs::File::open(dir)?)
}

/// [`save`] into a file on hugetlbfs: each 2 MiB page of guest RAM that holds data is
/// allocated in the file (`fallocate`) and copied through a shared mapping.
fn save_huge(mem: &GuestMemoryMmap, f: &std::fs::File) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    const HUGE: usize = HUGE_PAGE_SIZE as usize;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(total)?;
    let mut offset = 0u64;
    let mut data = Vec::new();
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region.as_ptr();
        let may_hold = pages_with_data(host as usize, len);
        // SAFETY: a new shared mapping of `len` bytes of our file at `offset` (in range: the
        // file is `total` long); no reservation, so untouched pages take nothing from the pool
        // (the ones written are allocated by fallocate first).
        let dst = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                f.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if dst == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let copied = (|| -> io::Result<()> {
            for start in (0..len).step_by(HUGE) {
                let n = HUGE.min(len - start);
                let untouched = may_hold
                    .as_ref()
                    .is_some_and(|m| m[start / 4096..(start + n) / 4096].iter().all(|&d| !d));
                if untouched {
                    continue;
                }
                // SAFETY: `host` maps `len` bytes of guest RAM while `mem` lives; the VM is
                // stopped, so nothing writes them while they are read.
                let src = unsafe { std::slice::from_raw_parts(host.add(start), n) };
                if src.iter().all(|&b| b == 0) {
                    continue;
                }
                let at = (offset + start as u64) as libc::off_t;
                // SAFETY: fallocate on our open file; a short pool fails with an error.
                if unsafe { libc::fallocate(f.as_raw_fd(), 0, at, n as libc::off_t) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `dst` maps `len` bytes of the file (this page now allocated);
                // `src` is guest RAM, another mapping: they do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst.cast::<u8>().add(start), n)
                };
                add_range(&mut data, offset + start as u64, n as u64);
            }
            Ok(())
        })();
        // SAFETY: unmaps exactly the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(dst, len) };
        copied?;
        offset += len as u64;
    }
    Ok(data)
}

/// For each 4 KiB page of this process's `[start, start + len)`: whether it may hold
/// anything but zeroes: it is present or swapped out (`/proc/self/pagemap`), or it lies in a
/// file-backed mapping (`/proc/self/maps`: the kernel mapped copy-on-write from its file reads
/// the file's bytes even where nothing touched it). None when either cannot be read: then
/// every page is read.
fn pages_with_data(start: usize, len: usize) -> Option<Vec<bool>> {
    use std::io::{Read, Seek, SeekFrom};
    const PAGE: usize = 4096;
    let pages = len / PAGE;
    let mut pm = std::fs::File::open("/proc/self/pagemap").ok()?;
    pm.seek(SeekFrom::Start((start / PAGE * 8) as u64)).ok()?;
    let mut raw = vec![0u8; pages * 8];
    pm.read_exact(&mut raw).ok()?;
    // Bit 63: present; bit 62: swapped.
    let mut data: Vec<bool> = raw
        .chunks_exact(8)
        .map(|e| {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            v & (3 << 62) != 0
        })
        .collect();
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let end = start + len;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        // Anonymous memory, huge pages included (pagemap tells their pages).
        if inode == "0" || f.next().is_some_and(|p| p.starts_with("/anon_hugepage")) {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            continue;
        };
        let (lo, hi) = (lo.max(start), hi.min(end));
        if lo < hi {
            for d in &mut data[(lo - start) / PAGE..(hi - start).div_ceil(PAGE)] {
                *d = true;
            }
        }
    }
    Some(data)
}

/// Guest RAM of `cfg`'s size mapped `MAP_PRIVATE` from a memory file [`save`] wrote: pages come
/// from the file on first touch and are copied when written, so a write reaches neither the
/// file nor any other mapping of it (a clone per request). A huge-page guest's file is on
/// hugetlbfs: its pages are shared and copied 2 MiB at a time, and the mapping reserves the
/// pool pages its copies may need when it is made (a short pool fails here, as a boot's
/// would, never with a SIGBUS later).
pub fn map_private(
    cfg: &MemoryConfig,
    path: &std::path::Path,
) -> Result<GuestMemoryMmap, MemoryError> {
    use vm_memory::FileOffset;
    let (f, huge) = open_memory_file(cfg, path, true)?;
    let err = |source| MemoryError::File {
        path: path.to_path_buf(),
        source,
    };
    map_ranges(cfg, |offset, len| {
        let file = f.try_clone().map_err(err)?;
        Ok(MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(private_flags(huge))
            .with_hugetlbfs(huge))
    })
}

/// `mmap` flags of a clone's private mapping of a memory file: a huge-page one reserves its
/// copies' pool pages up front (no `MAP_NORESERVE`).
fn private_flags(huge: bool) -> i32 {
    if huge {
        libc::MAP_PRIVATE
    } else {
        libc::MAP_PRIVATE | libc::MAP_NORESERVE
    }
}

/// A memory file for guest RAM of `cfg` opened and checked: on hugetlbfs exactly when the
/// guest uses huge pages (then, with `pool_check`, the pool has room for its copies), and of
/// the guest's size. Returns it and whether it is on hugetlbfs.
fn open_memory_file(
    cfg: &MemoryConfig,
    path: &std::path::Path,
    pool_check: bool,
) -> Result<(std::fs::File, bool), MemoryError> {
    let err = |source| MemoryError::File {
        path: path.to_path_buf(),
        source,
    };
    let size = cfg.size_mib * MIB;
    let f = std::fs::File::open(path).map_err(err)?;
    let huge = on_hugetlbfs(&f).map_err(err)?;
    if huge != cfg.hugepages {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            if huge {
                "on hugetlbfs, but the guest does not use huge pages"
            } else {
                "not on hugetlbfs, but the guest uses huge pages"
            },
        )));
    }
    if huge && pool_check {
        validate(cfg)?;
    }
    let len = f.metadata().map_err(err)?.len();
    if len != size {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, the guest has {size}"),
        )));
    }
    Ok((f, huge))
}

/// Data ranges of a memory file closer than this are mapped as one (a mapping call costs more
/// than reading the hole between them as zeroes).
const MERGE_GAP: u64 = 2 * MIB;

/// Recorded (offset, length) data ranges of a memory file of `size` bytes as (start, end)
/// ranges, those less than [`MERGE_GAP`] apart merged; refused unless each is inside the file,
/// page-aligned and after the one before.
fn merged(ranges: &[(u64, u64)], size: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(at, len) in ranges {
        let end = at.checked_add(len).filter(|&e| e <= size);
        let after = out.last().is_none_or(|&(_, e)| at >= e);
        let (Some(end), true, true) = (end, after, at % 4096 == 0 && len % 4096 == 0) else {
            return Err(MemoryError::Layout(format!(
                "the snapshot's memory data range {at:#x}+{len:#x} does not fit a file of {size} bytes"
            )));
        };
        match out.last_mut() {
            Some(last) if at - last.1 < MERGE_GAP => last.1 = end,
            _ => out.push((at, end)),
        }
    }
    Ok(out)
}

/// The memory file at `path` mapped `MAP_PRIVATE` over `mem`, guest RAM of `cfg` that
/// [`create`] made (zero-fill pages; a huge-page one with its pool pages reserved), at the
/// same addresses, so that memory slots made over them show it from now on: the same mapping
/// as [`map_private`]'s (pages from the file on first touch, copied when written) where the
/// file holds data; its holes stay `mem`'s zero-fill pages, which read the same. Mapping over
/// a slot makes KVM drop what it mapped there (nothing yet, but its walk costs with the
/// range's size): mapping only the data keeps that small whatever the memory size. The data
/// is `recorded` (what [`save`] returned, kept in the snapshot); without it, the whole file is
/// mapped.
pub fn map_private_over(
    cfg: &MemoryConfig,
    path: &std::path::Path,
    mem: &GuestMemoryMmap,
    recorded: Option<&[(u64, u64)]>,
) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    // The pool pages are the reservation's already: the mapping takes over its share.
    let (f, huge) = open_memory_file(cfg, path, false)?;
    let size = cfg.size_mib * MIB;
    let ranges = ram_ranges(size);
    let regions: Vec<_> = mem.iter().collect();
    if regions.len() != ranges.len()
        || regions
            .iter()
            .zip(&ranges)
            .any(|(r, (base, len))| r.start_addr() != *base || r.len() != *len)
    {
        return Err(MemoryError::Layout(format!(
            "the reserved guest memory is not the layout of {} MiB",
            cfg.size_mib
        )));
    }
    let data = match recorded {
        Some(r) => merged(r, size)?,
        None => vec![(0, size)],
    };
    let mut file_at = 0u64;
    for (region, (_, len)) in regions.iter().zip(&ranges) {
        let (lo_region, hi_region) = (file_at, file_at + len);
        file_at = hi_region;
        for &(a, b) in &data {
            let (lo, hi) = (a.max(lo_region), b.min(hi_region));
            if lo >= hi {
                continue;
            }
            let off = libc::off_t::try_from(lo)
                .map_err(|_| MemoryError::Layout(format!("file offset {lo:#x}")))?;
            // SAFETY: [lo, hi) lies inside this region's part of the file, so the address
            // range is inside one region of `mem`, a mapping `mem` owns (made by `create`,
            // unmapped when `mem` is dropped); MAP_FIXED replaces that part in place, and the
            // drop unmaps it with the rest. Nothing else maps there.
            let at = unsafe {
                libc::mmap(
                    region.as_ptr().add((lo - lo_region) as usize).cast(),
                    (hi - lo) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    private_flags(huge) | libc::MAP_FIXED,
                    f.as_raw_fd(),
                    off,
                )
            };
            if at == libc::MAP_FAILED {
                return Err(mapping_failed(
                    cfg,
                    vm_memory::mmap::MmapRegionError::Mmap(io::Error::last_os_error()),
                ));
            }
        }
    }
    Ok(())
}

/// Host memory behind one VM, read from /proc/self/smaps and /proc/self/status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Guest RAM backed by 4 KiB pages that the guest touched (resident), in KiB.
    pub guest_resident_kib: u64,
    /// Of those, pages still shared with the page cache: kernel and initramfs pages the guest
    /// read but never wrote (mapped copy-on-write, not copied), in KiB.
    pub guest_shared_file_kib: u64,
    /// 2 MiB huge pages the guest touched.
    pub guest_huge_pages: u64,
    /// The process's peak resident set (VmHWM), in KiB. Huge pages are not part of it.
    pub process_peak_kib: u64,
    /// The process's resident set now (VmRSS), in KiB.
    pub process_now_kib: u64,
    /// Of that, anonymous memory (RssAnon: heap, stacks, the guest's written pages), in KiB.
    pub process_anon_kib: u64,
}

impl MemoryUse {
    /// What the host spends beyond the guest's own pages: the process's resident memory that
    /// is not guest RAM (VMM code, heap, stacks, device buffers), in KiB.
    pub fn overhead_kib(&self) -> u64 {
        self.process_peak_kib
            .saturating_sub(self.guest_resident_kib)
    }

    /// The part of the overhead that is this VMM's alone: anonymous memory that is not guest
    /// RAM (heap, stacks, device buffers), in KiB. The rest of the overhead is the xcgi
    /// executable's own pages, which every xcgi process on the host shares (page cache).
    pub fn private_overhead_kib(&self) -> u64 {
        let guest_anon = self
            .guest_resident_kib
            .saturating_sub(self.guest_shared_file_kib);
        self.process_anon_kib.saturating_sub(guest_anon)
    }
}

fn kib_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Pages of `[addr, addr + len)` present in this process's page tables (touched), and how many
/// of them are file pages (bit 61: never written, still the page cache's), from
/// /proc/self/pagemap (bit 63 of each 8-byte entry: present). Exact per range, unlike smaps,
/// whose entries are whole mappings (the kernel merges neighbouring ones).
fn present_pages(pagemap: &std::fs::File, addr: u64, len: u64) -> io::Result<(u64, u64)> {
    let (mut present, mut file) = (0, 0);
    each_present_page(pagemap, addr, len, |_, is_file| {
        present += 1;
        file += u64::from(is_file);
    })?;
    Ok((present, file))
}

/// Calls `f(page index from addr, file page?)` for each page of `[addr, addr + len)` present
/// in this process's page tables (/proc/self/pagemap: bit 63 present, bit 61 a file page).
fn each_present_page(
    pagemap: &std::fs::File,
    addr: u64,
    len: u64,
    mut f: impl FnMut(u64, bool),
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 4096; // entries per read (32 KiB: measuring must not add to the peak)
    let first = addr / 4096;
    let pages = len.div_ceil(4096);
    let mut buf = vec![0u8; (CHUNK * 8) as usize];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(CHUNK);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (first + done) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            if e[7] & 0x80 != 0 {
                f(done + i as u64, e[7] & 0x20 != 0);
            }
        }
        done += n;
    }
    Ok(())
}

/// The guest pages this process's mapping of `mem` holds now, as guest-physical addresses,
/// each marked [`crate::prefault::WRITE`] when it is private (written since it was mapped: a
/// copy, or a page that was a hole) rather than still the file's: a run's working set
/// ([`crate::prefault`]). `pagemap` is this process's /proc/self/pagemap, opened before a
/// jail took /proc away. With `huge` (memory on 2 MiB pages), one entry per huge page. At
/// most `max` entries (the lowest addresses).
pub fn touched_pages(
    mem: &GuestMemoryMmap,
    huge: bool,
    pagemap: &std::fs::File,
    max: usize,
) -> io::Result<Vec<u64>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let unit = if huge { 2 * MIB } else { 4096 };
    let mut out: Vec<u64> = Vec::new();
    for r in mem.iter() {
        let base = r.start_addr().0;
        each_present_page(pagemap, r.as_ptr() as u64, r.len(), |i, is_file| {
            let gpa = (base + i * 4096) & !(unit - 1);
            let written = if is_file { 0 } else { crate::prefault::WRITE };
            match out.last_mut() {
                Some(last) if *last & !crate::prefault::WRITE == gpa => *last |= written,
                _ => out.push(gpa | written),
            }
        })?;
        if out.len() >= max {
            out.truncate(max);
            break;
        }
    }
    Ok(out)
}

/// The pieces of host `[start, start + len)` by mapping, from /proc/self/smaps: (start, end,
/// huge pages?). Huge-page RAM can hold 4 KiB windows (the kernel's, the initramfs's).
fn pieces(smaps: &str, start: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut current: Option<(u64, u64)> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                let (lo, hi) = (lo.max(start), hi.min(start + len));
                current = (lo < hi).then_some((lo, hi));
                continue;
            }
        }
        if let (Some((lo, hi)), Some(size)) = (current, line.strip_prefix("KernelPageSize:")) {
            out.push((lo, hi, size.trim() != "4 kB"));
            current = None;
        }
    }
    out
}

/// Measures what `mem`'s guest has touched and the process's resident memory.
pub fn usage(mem: &GuestMemoryMmap) -> io::Result<MemoryUse> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut u = MemoryUse::default();
    for r in mem.iter() {
        for (lo, hi, huge) in pieces(&smaps, r.as_ptr() as u64, r.len()) {
            let (present, file) = present_pages(&pagemap, lo, hi - lo)?;
            if huge {
                u.guest_huge_pages += present.div_ceil(512);
            } else {
                u.guest_resident_kib += present * 4;
                u.guest_shared_file_kib += file * 4;
            }
        }
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    for line in status.lines() {
        if let Some(v) = kib_field(line, "VmHWM:") {
            u.process_peak_kib = v;
        } else if let Some(v) = kib_field(line, "VmRSS:") {
            u.process_now_kib = v;
        } else if let Some(v) = kib_field(line, "RssAnon:") {
            u.process_anon_kib = v;
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded data ranges are merged across gaps under 2 MiB and checked against the file.
    #[test]
    fn recorded_memory_data_is_merged_and_checked() {
        let size = 128 * MIB;
        let r = merged(&[(0, 65536), (1 << 20, 4096), (16 << 20, 8192)], size).expect("fits");
        assert_eq!(
            r,
            vec![(0, (1 << 20) + 4096), (16 << 20, (16 << 20) + 8192)]
        );
        for bad in [
            vec![(size - 4096, 8192)],
            vec![(1 << 20, 4096), (0, 4096)],
            vec![(100, 4096)],
            vec![(u64::MAX - 4095, 4096)],
        ] {
            let e = merged(&bad, size).expect_err("refused").to_string();
            assert!(e.contains("does not fit"), "{e}");
        }
    }
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
    }

    #[test]
    fn large_guest_is_split_around_mmio_hole() {
        let r = ram_ranges(4096 * MIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), 4096 * MIB - MMIO_GAP_START)
        );
        assert_eq!(r[0].1 + r[1].1, 4096 * MIB);
    }

    #[test]
    fn rejects_too_small() {
        let e = validate(&MemoryConfig {
            size_mib: 8,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("below the minimum"), "{e}");
    }

    #[test]
    fn rejects_odd_size_with_hugepages() {
        let cfg = MemoryConfig {
            size_mib: 33,
            hugepages: true,
            populate: false,
        };
        assert!(matches!(
            validate(&cfg),
            Err(MemoryError::NotHugeAligned(33))
        ));
    }

    #[test]
    fn anonymous_memory_is_zeroed_and_writable() {
        let mem = create(&MemoryConfig {
            size_mib: 64,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(mem.num_regions(), 1);
        let v: u64 = mem.read_obj(GuestAddress(0x234_0000)).unwrap();
        assert_eq!(v, 0);
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x234_0000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x234_0000)).unwrap(),
            0xdead_beef
        );
    }

    /// What the guest touches is what is counted: 4 MiB written into a fresh 64 MiB guest.
    #[test]
    fn usage_counts_touched_guest_pages() {
        let mem = create(&MemoryConfig {
            size_mib: 64,
            ..Default::default()
        })
        .unwrap();
        let before = usage(&mem).unwrap();
        for off in (0..4 * MIB).step_by(4096) {
            mem.write_obj(1u8, GuestAddress(0x100_0000 + off)).unwrap();
        }
        let after = usage(&mem).unwrap();
        assert_eq!(after.guest_resident_kib - before.guest_resident_kib, 4096);
        assert_eq!(after.guest_huge_pages, 0);
        assert!(after.process_peak_kib >= after.process_now_kib);
        assert!(after.process_now_kib >= after.guest_resident_kib);
        // The 4 MiB written are anonymous and guest RAM: not private overhead.
        assert!(after.process_anon_kib >= 4096);
        assert!(after.private_overhead_kib() < after.process_anon_kib);
    }

    #[test]
    fn smaps_pieces_are_clipped_to_the_range_with_their_page_size() {
        let smaps = "\
7f0000000000-7f0001000000 rw-p 00000000 00:00 0
Size:              16384 kB
KernelPageSize:     2048 kB
7f0001000000-7f0001200000 rw-p 00000000 00:00 0
KernelPageSize:        4 kB
7f0001200000-7f0004000000 rw-p 00000000 00:00 0
KernelPageSize:     2048 kB
";
        let p = pieces(smaps, 0x7f00_0080_0000, 0x100_0000);
        assert_eq!(
            p,
            vec![
                (0x7f00_0080_0000, 0x7f00_0100_0000, true),
                (0x7f00_0100_0000, 0x7f00_0120_0000, false),
                (0x7f00_0120_0000, 0x7f00_0180_0000, true),
            ]
        );
    }

    /// Pages mapped copy-on-write from a file count as shared until the guest writes them.
    #[test]
    fn usage_tells_pages_still_shared_with_the_file_from_written_ones() {
        use crate::arch::x86_64::loader::{load_initrd, tests::write_tmp, LoadMode};
        let mem = create(&MemoryConfig {
            size_mib: 64,
            ..Default::default()
        })
        .unwrap();
        let f = write_tmp(&vec![7u8; 64 * 4096]);
        let (addr, _) = load_initrd(&mem, f.path(), 0x100_0000, LoadMode::Map).unwrap();
        for p in 0..64 {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(addr + p * 4096)).unwrap(),
                7
            );
        }
        let read = usage(&mem).unwrap();
        assert_eq!(read.guest_shared_file_kib, 64 * 4);
        for p in 0..4 {
            mem.write_obj(1u8, GuestAddress(addr + p * 4096)).unwrap();
        }
        let written = usage(&mem).unwrap();
        assert_eq!(written.guest_shared_file_kib, 60 * 4);
        assert_eq!(written.guest_resident_kib, read.guest_resident_kib);
    }

    #[test]
    fn reserved_huge_pages_are_not_available() {
        let info = "HugePages_Total:     200\nHugePages_Free:      113\nHugePages_Rsvd:       64\nHugePages_Surp:        0\nHugepagesize:       2048 kB\n";
        assert_eq!(available_huge_pages(info), Some(49));
        let other = "HugePages_Free:      113\nHugepagesize:    1048576 kB\n";
        assert_eq!(available_huge_pages(other), Some(0));
    }

    #[test]
    fn huge_pages_short_pool_names_the_sysctl() {
        // Ask for far more than any CI machine has reserved.
        let cfg = MemoryConfig {
            size_mib: 512 * 1024,
            hugepages: true,
            populate: false,
        };
        let msg = validate(&cfg).unwrap_err().to_string();
        assert!(msg.contains("vm.nr_hugepages="), "{msg}");
    }

    /// A snapshot's memory file: what the guest wrote reads back in every private mapping; a
    /// write in one reaches neither the file nor another mapping; untouched blocks are holes.
    #[test]
    fn a_memory_file_maps_privately_into_each_clone() {
        use vm_memory::Bytes;
        let cfg = MemoryConfig {
            size_mib: 64,
            hugepages: false,
            populate: false,
        };
        let mem = create(&cfg).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x1234_5678_u32, GuestAddress(60 << 20))
            .unwrap();
        // Only the written pages can hold data: the untouched ones are not even read.
        {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            let r = mem.iter().next().unwrap();
            let d = pages_with_data(r.as_ptr() as usize, r.len() as usize).expect("pagemap");
            assert!(d[1] && !d[2] && !d[0x2000]);
            assert_eq!(
                d.iter().filter(|&&x| x).count(),
                2,
                "only the two pages written"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        save(&mem, &path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        {
            use std::os::unix::fs::MetadataExt;
            assert!(
                meta.blocks() * 512 < 1 << 20,
                "zero blocks were written, not skipped"
            );
        }
        let a = map_private(&cfg, &path).unwrap();
        let b = map_private(&cfg, &path).unwrap();
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(60 << 20)).unwrap(),
            0x1234_5678
        );
        a.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(a.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 7);
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef,
            "a write reached another clone"
        );
        let c = map_private(&cfg, &path).unwrap();
        assert_eq!(
            c.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef,
            "a write reached the file"
        );
        let wrong = MemoryConfig {
            size_mib: 128,
            ..cfg
        };
        let e = map_private(&wrong, &path).expect_err("another size");
        assert!(e.to_string().contains("the guest has"), "{e}");
    }
}
