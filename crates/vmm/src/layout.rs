//! Guest physical memory layout (x86-64). One place for every fixed address.

/// The boot GDT ([`crate::arch::x86_64::gdt::table`]), loaded on entry as the 64-bit boot
/// protocol wants.
pub const GDT_ADDR: u64 = 0x500;
/// The boot IDT: one zero 8-byte entry (limit 7), after the GDT's 5 entries (0x500-0x527).
pub const IDT_ADDR: u64 = 0x540;
/// The "zero page": struct boot_params handed to the kernel in %rsi.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack pointer on entry (the kernel sets up its own almost at once).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// PML4 of the boot identity page tables (the boot CR3); with one PDPT and one PD of 2 MiB
/// pages they map the first 1 GiB.
pub const PML4_ADDR: u64 = 0x9000;
/// The one page-directory-pointer table (entry 0 of the PML4).
pub const PDPT_ADDR: u64 = 0xa000;
/// The one page directory: 512 2 MiB pages (entry 0 of the PDPT).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line the x86 kernel accepts (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table goes here and RAM below it ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte after the legacy hole (640 KiB - 1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Where a bzImage's protected-mode code is put.
pub const BZIMAGE_LOAD_ADDR: u64 = 0x10_0000;
/// Highest address an initrd may end at (the boot protocol's conservative default).
pub const INITRD_ADDR_MAX: u64 = 0x3800_0000;
/// Start of the 32-bit MMIO hole [3 GiB, 4 GiB); guest RAM is split around it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole (exclusive): where RAM above 3 GiB resumes.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices live here, one 4 KiB window each, in the order they are added.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size in bytes of each virtio-mmio device's window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (serial COM1 uses 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// KVM needs three pages for the TSS on Intel; harmless elsewhere.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Local APIC default address (for the MP table).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IO-APIC default address (for the MP table).
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Legacy COM1: its first I/O port.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1's interrupt (GSI).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller data port (only the reset command is implemented).
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port; the device covers every port from the data port to this one.
pub const I8042_COMMAND_PORT: u16 = 0x64;
