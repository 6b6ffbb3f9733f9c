//! Guest physical memory layout (x86-64). One place for every fixed address.

/// GDT and IDT, as the 64-bit boot protocol wants them loaded on entry.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// The "zero page": struct boot_params handed to the kernel in %rsi.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack pointer on entry (the kernel sets up its own almost at once).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, one PD of 2 MiB pages (first 1 GiB).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
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
/// 32-bit MMIO hole [3 GiB, 4 GiB): guest RAM is split around it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices live here, one 4 KiB window each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (serial COM1 uses 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// KVM needs three pages for the TSS on Intel; harmless elsewhere.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Local APIC and IO-APIC default addresses (for the MP table).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Legacy COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller ports (only the reset command is implemented).
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
