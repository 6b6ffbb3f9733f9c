//! The zero page (struct boot_params), its e820 map, and the kernel command line.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, HIGH_MEMORY_START, ZERO_PAGE_ADDR,
};
use crate::memory::ram_ranges;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Why the command line or zero page could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// The command line leaves no room for its NUL in [`CMDLINE_MAX_SIZE`] bytes.
    #[error(
        "kernel command line is {len} bytes; the kernel accepts at most {max}: shorten --cmdline"
    )]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The most bytes allowed (without the NUL).
        max: usize,
    },
    /// The command line holds a NUL or a non-ASCII byte.
    #[error("kernel command line contains a NUL or non-ASCII byte: {0:?}")]
    CmdlineInvalid(String),
    /// Writing into guest memory failed.
    #[error("writing boot parameters into guest memory failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Plain-old-data wrapper so boot_params can be written with vm-memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a C struct of integers and arrays of integers; every bit pattern is valid.
unsafe impl ByteValued for ZeroPage {}

/// The e820 map for a guest of `mem_size` bytes: low RAM below the EBDA, the EBDA and BIOS
/// area reserved, RAM from 1 MiB up, and RAM above 4 GiB for large guests.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (base, len) in ram_ranges(mem_size) {
        let (start, end) = (base.0.max(HIGH_MEMORY_START), base.0 + len);
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// What goes into the zero page besides the memory map.
#[derive(Debug, Clone, Default)]
pub struct ZeroPageConfig {
    /// Guest RAM size in bytes, for the e820 map ([`e820_map`]).
    pub mem_size: u64,
    /// Command line length in bytes, without the NUL (what [`write_cmdline`] returns).
    pub cmdline_len: usize,
    /// The initramfs as (guest-physical address, size in bytes), if any.
    pub initrd: Option<(u64, u64)>,
    /// A bzImage's setup header to start from (None for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
}

/// Builds the zero page: `cfg`'s setup header (or an empty one) with our loader type, the
/// command line at [`CMDLINE_ADDR`], the initramfs, and the e820 map.
pub fn zero_page(cfg: &ZeroPageConfig) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = cfg.setup_header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cfg.cmdline_len as u32;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = cfg.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(cfg.mem_size);
    for (slot, e) in p.e820_table.iter_mut().zip(map.iter()) {
        *slot = *e;
    }
    p.e820_entries = map.len() as u8;
    p
}

/// Writes [`zero_page`] at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &ZeroPageConfig,
) -> Result<(), ParamsError> {
    mem.write_obj(ZeroPage(zero_page(cfg)), GuestAddress(ZERO_PAGE_ADDR))?;
    Ok(())
}

/// Checks and writes the NUL-terminated command line; returns its length without the NUL.
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<usize, ParamsError> {
    validate_cmdline(cmdline)?;
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_ADDR))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmdline.len() as u64))?;
    Ok(cmdline.len())
}

/// Checks a command line fits in [`CMDLINE_MAX_SIZE`] with its NUL and is ASCII without NULs.
pub fn validate_cmdline(cmdline: &str) -> Result<(), ParamsError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(ParamsError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.bytes().any(|b| b == 0 || !b.is_ascii()) {
        return Err(ParamsError::CmdlineInvalid(cmdline.into()));
    }
    Ok(())
}

/// Where the root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// virtio-blk disk /dev/vda, read-only ext4, init at /init.
    Disk,
    /// initramfs: the kernel runs /init from it.
    Initramfs,
}

/// Assembles the kernel command line: our defaults, the devices, the root, then the user's
/// extra parameters (which can override earlier ones: the kernel takes the last value).
pub fn build_cmdline(root: &RootSource, devices: &[String], extra: Option<&str>) -> String {
    let mut parts: Vec<&str> = vec![
        "console=ttyS0",
        // The guest ends by rebooting: on panic at once (init exiting panics), through the
        // keyboard controller, which the VMM turns into the end of the VM.
        "reboot=k",
        "panic=-1",
        "8250.nr_uarts=1",
        "no_timer_check",
        "quiet",
    ];
    match root {
        RootSource::Disk => parts.extend(["root=/dev/vda", "rootfstype=ext4", "ro", "init=/init"]),
        RootSource::Initramfs => parts.push("rdinit=/init"),
    }
    parts.extend(devices.iter().map(String::as_str));
    let mut s = parts.join(" ");
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn e820_small_guest() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].addr, m[0].size, m[0].r#type),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!({ m[1].r#type }, E820_RESERVED);
        assert_eq!(
            (m[2].addr, m[2].size),
            (HIGH_MEMORY_START, (128 << 20) - HIGH_MEMORY_START)
        );
    }

    #[test]
    fn e820_large_guest_skips_mmio_hole() {
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2].addr + m[2].size, 0xc000_0000);
        assert_eq!({ m[3].addr }, 0x1_0000_0000);
        let ram: u64 = m
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIGH_MEMORY_START - EBDA_START));
        // No RAM entry overlaps the hole.
        for e in &m {
            assert!(e.addr + e.size <= 0xc000_0000 || e.addr >= 0x1_0000_0000);
        }
    }

    #[test]
    fn zero_page_fields() {
        let p = zero_page(&ZeroPageConfig {
            mem_size: 128 << 20,
            cmdline_len: 42,
            initrd: Some((0x700_0000, 0x1234)),
            setup_header: None,
        });
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn zero_page_lands_at_its_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_zero_page(
            &mem,
            &ZeroPageConfig {
                mem_size: 64 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        // boot_flag is at offset 0x1fe of the zero page, the "HdrS" magic at 0x202.
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(ZERO_PAGE_ADDR + 0x1fe))
                .unwrap(),
            0xaa55
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(ZERO_PAGE_ADDR + 0x202))
                .unwrap(),
            KERNEL_HDR_MAGIC
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(ZERO_PAGE_ADDR + 0x1e8))
                .unwrap(),
            3
        );
    }

    #[test]
    fn cmdline_for_disk_root_and_devices() {
        let s = build_cmdline(
            &RootSource::Disk,
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            Some(" foo=1 "),
        );
        assert!(s.starts_with("console=ttyS0 "));
        assert!(s.contains(" root=/dev/vda "));
        assert!(s.contains(" ro "));
        assert!(s.contains("virtio_mmio.device=4K@0xd0000000:5"));
        assert!(s.ends_with(" foo=1"));
    }

    #[test]
    fn cmdline_for_initramfs() {
        let s = build_cmdline(&RootSource::Initramfs, &[], None);
        assert!(s.contains("rdinit=/init"));
        assert!(!s.contains("root=/dev/vda"));
        assert!(!s.ends_with(' '));
    }

    #[test]
    fn cmdline_written_nul_terminated_and_length_checked() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = write_cmdline(&mem, "console=ttyS0").unwrap();
        assert_eq!(n, 13);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(CMDLINE_ADDR + 13)).unwrap(),
            0
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&mem, &long),
            Err(ParamsError::CmdlineTooLong { .. })
        ));
        assert!(write_cmdline(&mem, "a\0b").is_err());
    }
}
