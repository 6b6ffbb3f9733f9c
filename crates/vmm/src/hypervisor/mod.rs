//! The hypervisor seam: what the monitor needs from a hypervisor, and nothing of how KVM's
//! ioctls spell it. [`Hypervisor`] makes VMs; a [`Vm`] takes memory slots, interrupt
//! controllers, irqfds and vCPUs; a [`Vcpu`] runs until an exit ([`VcpuExit`], owned by this
//! crate) and gets and sets every piece of its state. [`VcpuState`] and [`VmState`] are the
//! whole of a VM's state outside its memory and devices: what a snapshot saves.
//!
//! [`kvm`] is the one implementation. Only that module names `kvm_ioctls`; the x86 register
//! layouts are KVM's (`kvm_bindings`), re-exported here under neutral names, as the Linux
//! boot protocol code in `arch::x86_64` fills them in.

pub mod kvm;

use std::os::fd::RawFd;

use vmm_sys_util::eventfd::EventFd;

pub use kvm_bindings::{
    kvm_clock_data as ClockData, kvm_cpuid_entry2 as CpuIdEntry, kvm_fpu as Fpu,
    kvm_irqchip as IrqChip, kvm_lapic_state as LapicState, kvm_mp_state as MpState,
    kvm_msr_entry as MsrEntry, kvm_pit_state2 as PitState, kvm_regs as Regs,
    kvm_segment as Segment, kvm_sregs as SpecialRegs, kvm_vcpu_events as VcpuEvents,
    kvm_xcrs as Xcrs, kvm_xsave as Xsave, CpuId,
};

/// A hypervisor call that failed: which, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct HypervisorError {
    /// The call (an ioctl's name, or what was being done).
    pub what: &'static str,
    /// The OS error it returned.
    #[source]
    pub source: std::io::Error,
}

impl HypervisorError {
    /// `what` failed with OS error number `errno`.
    pub fn new(what: &'static str, errno: i32) -> Self {
        HypervisorError {
            what,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// The OS error number.
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(0)
    }
}

/// The result of a hypervisor call.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Why [`Vcpu::run`] returned.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// Port I/O read: fill `data`.
    IoIn {
        /// The port.
        port: u16,
        /// Where the value goes (its length is the access size); KVM hands it to the guest
        /// on the next run.
        data: &'a mut [u8],
    },
    /// Port I/O write.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written (its length is the access size).
        data: &'a [u8],
    },
    /// MMIO read: fill `data`.
    MmioRead {
        /// The guest-physical address.
        addr: u64,
        /// Where the value goes (its length is the access size); KVM hands it to the guest
        /// on the next run.
        data: &'a mut [u8],
    },
    /// MMIO write.
    MmioWrite {
        /// The guest-physical address.
        addr: u64,
        /// The bytes written (its length is the access size).
        data: &'a [u8],
    },
    /// HLT with no interrupt controller in the kernel to wait on it.
    Halt,
    /// The vCPU shut down: a triple fault.
    TripleFault,
    /// The guest asked for a reset (PSCI/ACPI system event).
    Reset,
    /// The guest powered off (system event).
    PowerOff,
    /// Another system event (a guest crash report, ...): the VM cannot go on.
    SystemEvent(u32),
    /// Kicked ([`kick`]) or interrupted by a signal: nothing happened in the guest.
    Interrupted,
    /// VM entry failed.
    FailEntry {
        /// The hardware's entry failure reason (VMX/SVM specific).
        reason: u64,
        /// The host CPU the entry failed on.
        cpu: u32,
    },
    /// The hypervisor could not emulate something.
    InternalError,
    /// Anything else, described.
    Other(String),
}

/// Everything of one vCPU's state that is not in guest memory (x86-64).
pub struct VcpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: Regs,
    /// Segment, descriptor-table and control registers, EFER, the APIC base.
    pub sregs: SpecialRegs,
    /// x87 and SSE state (FXSAVE layout).
    pub fpu: Fpu,
    /// The XSAVE area (AVX and later extended state).
    pub xsave: Xsave,
    /// The extended control registers (XCR0).
    pub xcrs: Xcrs,
    /// The local APIC's register page.
    pub lapic: LapicState,
    /// Every MSR the hypervisor lets us read (kvmclock's included).
    pub msrs: Vec<MsrEntry>,
    /// Pending or injected exceptions, interrupts, NMIs and SMIs.
    pub events: VcpuEvents,
    /// Whether the vCPU runs, halts or waits for INIT/SIPI.
    pub mp_state: MpState,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish_non_exhaustive()
    }
}

/// Everything of a VM's own state outside its vCPUs, memory and devices: the in-kernel
/// interrupt controllers, the PIT and the clock.
#[derive(Clone)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: IrqChip,
    /// The slave 8259 PIC.
    pub pic_slave: IrqChip,
    /// The IO-APIC.
    pub ioapic: IrqChip,
    /// The 8254 PIT (its channels and flags).
    pub pit: PitState,
    /// The kvmclock value (ns) and its flags.
    pub clock: ClockData,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// Makes VMs.
pub trait Hypervisor: Send + Sync {
    /// A new VM with no memory, interrupt controller or vCPUs.
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
    /// The CPUID the hypervisor can give a guest.
    fn supported_cpuid(&self) -> Result<CpuId>;
}

/// One VM: memory slots, the in-kernel interrupt controllers and timer, irqfds, vCPUs, and
/// its own state.
pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into guest physical memory at
    /// `guest_addr` as slot `slot`.
    ///
    /// # Safety
    /// The host range must stay mapped, and be that large, for as long as this VM exists.
    unsafe fn set_memory_region(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// Where the three pages of the x86 TSS go (below 4 GiB, outside RAM).
    fn set_tss_address(&self, addr: u64) -> Result<()>;
    /// The in-kernel PIC, IOAPIC and local APICs.
    fn create_irqchip(&self) -> Result<()>;
    /// The in-kernel PIT (speaker port ignored).
    fn create_pit(&self) -> Result<()>;
    /// Writes to `evt` raise interrupt line `gsi`.
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()>;
    /// Adds vCPU `id` (also its local APIC id).
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
    /// Reads the interrupt controllers, PIT and clock.
    fn state(&self) -> Result<VmState>;
    /// Restores what [`Vm::state`] read.
    fn set_state(&self, state: &VmState) -> Result<()>;
}

/// One vCPU.
pub trait Vcpu: Send {
    /// Runs the guest until an exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// Call on the thread that will run this vCPU, before its first run: from then on
    /// [`kick`] on that thread makes [`Vcpu::run`] return [`VcpuExit::Interrupted`] at once,
    /// whether the signal lands inside the guest or just before it enters it.
    fn bind_kicks(&mut self);
    /// Undoes [`Vcpu::bind_kicks`] on this thread (when this vCPU is the one bound), before
    /// the vCPU leaves it for another: a kick that comes later finds nothing to stop.
    fn unbind_kicks(&mut self);
    /// Sets the CPUID the guest sees.
    fn set_cpuid(&self, cpuid: &CpuId) -> Result<()>;
    /// Sets `msrs`; returns how many were set (the first refused stops the list).
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<usize>;
    /// Reads the general registers.
    fn regs(&self) -> Result<Regs>;
    /// Sets the general registers.
    fn set_regs(&self, regs: &Regs) -> Result<()>;
    /// Reads the special registers.
    fn sregs(&self) -> Result<SpecialRegs>;
    /// Sets the special registers.
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()>;
    /// Sets the x87/SSE state.
    fn set_fpu(&self, fpu: &Fpu) -> Result<()>;
    /// Reads the local APIC's registers.
    fn lapic(&self) -> Result<LapicState>;
    /// Sets the local APIC's registers.
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
    /// Sets whether the vCPU runs, halts or waits for INIT/SIPI.
    fn set_mp_state(&self, state: MpState) -> Result<()>;
    /// Reads the whole [`VcpuState`].
    fn state(&self) -> Result<VcpuState>;
    /// Restores what [`Vcpu::state`] read; fails if any MSR is refused.
    fn set_state(&self, state: &VcpuState) -> Result<()>;
    /// Finishes the exit the vCPU last returned from (an MMIO or port read's value goes into
    /// its register only on the next entry) without running a guest instruction: after this,
    /// [`Vcpu::state`] is the whole state (a snapshot is taken after it).
    fn complete_pending(&mut self) -> Result<()>;
    /// The vCPU's file descriptor (for a seccomp filter or a jail to keep open).
    fn as_raw_fd(&self) -> RawFd;
}

/// Makes a vCPU thread's [`Vcpu::run`] return ([`VcpuExit::Interrupted`]): one signal is
/// enough, wherever the thread is (see [`Vcpu::bind_kicks`]).
pub fn kick(thread: libc::pthread_t) {
    kvm::kick(thread)
}
