//! [`super::Hypervisor`] on Linux KVM (`/dev/kvm`, opened once per process).

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Once, OnceLock};

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_run, kvm_userspace_memory_region, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{
    CpuId, Fpu, HypervisorError, LapicState, MsrEntry, Regs, Result, SpecialRegs, VcpuExit,
    VcpuState, VmState,
};

/// The process's KVM.
pub struct KvmHypervisor {
    kvm: Kvm,
    cpuid: OnceLock<CpuId>,
    msrs: OnceLock<Vec<u32>>,
}

static KVM: OnceLock<KvmHypervisor> = OnceLock::new();

fn err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::new(what, e.errno())
}

impl KvmHypervisor {
    /// `/dev/kvm`, opened on first use.
    pub fn get() -> Result<&'static KvmHypervisor> {
        if let Some(k) = KVM.get() {
            return Ok(k);
        }
        let kvm = Kvm::new().map_err(err("opening /dev/kvm"))?;
        Ok(KVM.get_or_init(|| KvmHypervisor {
            kvm,
            cpuid: OnceLock::new(),
            msrs: OnceLock::new(),
        }))
    }

    /// Every MSR KVM saves and restores (KVM_GET_MSR_INDEX_LIST), asked once.
    fn msr_indices(&self) -> Result<&[u32]> {
        if let Some(m) = self.msrs.get() {
            return Ok(m);
        }
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(err("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(self.msrs.get_or_init(|| list.as_slice().to_vec()))
    }
}

impl super::Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Box<dyn super::Vm>> {
        let fd = self.kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        let hv = KvmHypervisor::get()?;
        Ok(Box::new(KvmVm { fd, hv }))
    }

    fn supported_cpuid(&self) -> Result<CpuId> {
        if let Some(c) = self.cpuid.get() {
            return Ok(c.clone());
        }
        let c = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(self.cpuid.get_or_init(|| c).clone())
    }
}

/// A KVM VM.
pub struct KvmVm {
    fd: VmFd,
    hv: &'static KvmHypervisor,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl super::Vm for KvmVm {
    unsafe fn set_memory_region(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller promises the host range stays mapped for the VM's life.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn set_tss_address(&self, addr: u64) -> Result<()> {
        let addr = usize::try_from(addr)
            .map_err(|_| HypervisorError::new("KVM_SET_TSS_ADDR", libc::EINVAL))?;
        self.fd
            .set_tss_address(addr)
            .map_err(err("KVM_SET_TSS_ADDR"))
    }

    fn create_irqchip(&self) -> Result<()> {
        self.fd.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))
    }

    fn create_pit(&self) -> Result<()> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(err("KVM_CREATE_PIT2"))
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(evt, gsi).map_err(err("KVM_IRQFD"))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn super::Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;
        Ok(Box::new(KvmVcpu { fd, hv: self.hv }))
    }

    fn state(&self) -> Result<VmState> {
        Ok(VmState {
            pic_master: irqchip(&self.fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(&self.fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(&self.fd, KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    fn set_state(&self, s: &VmState) -> Result<()> {
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&s.pit).map_err(err("KVM_SET_PIT2"))?;
        // Only the clock value and REALTIME are settable; the other flags are KVM's report.
        let mut clock = s.clock;
        clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
        self.fd.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    hv: &'static KvmHypervisor,
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs ([`super::Vcpu::bind_kicks`]); the kick
    /// signal's handler sets its `immediate_exit`. Const-initialised, no destructor: reading
    /// it in a signal handler allocates nothing.
    static KICK_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KICK_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU's kvm_run mapping, set by bind_kicks and
        // cleared when that vCPU is dropped (on this thread: a signal handler cannot run
        // concurrently with it). A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

static KICK_HANDLER: Once = Once::new();

/// See [`super::kick`].
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill with a handler installed (bind_kicks ran on the thread before its
    // first run) only interrupts the thread; the caller holds the thread's handle, so the
    // pthread_t is alive.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

impl KvmVcpu {
    /// Reads every MSR KVM lists that this vCPU lets us read (a refused one is skipped).
    fn msrs(&self) -> Result<Vec<MsrEntry>> {
        let indices = self.hv.msr_indices()?;
        let mut out = Vec::with_capacity(indices.len());
        let mut i = 0;
        while i < indices.len() {
            let chunk = &indices[i..(i + KVM_MAX_MSR_ENTRIES).min(indices.len())];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| HypervisorError::new("building an MSR list", libc::E2BIG))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
            out.extend_from_slice(&msrs.as_slice()[..n]);
            i += n;
            if n < chunk.len() {
                i += 1; // KVM stops at the first MSR it refuses: skip that one
            }
        }
        Ok(out)
    }
}

/// Whether this host's /dev/kvm is PVM (the `kvm_pvm` module): it runs every setup and state
/// ioctl natively but cannot boot a standard Linux guest.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        super::Vcpu::unbind_kicks(self);
    }
}

impl super::Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        let run = self.fd.get_kvm_run() as *mut kvm_run;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Re-armed before the caller looks at why it was kicked: a kick that lands
                // after this is not lost (it sets the flag again).
                // SAFETY: `run` is this vCPU's kvm_run mapping, alive as long as `self.fd`.
                unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(err("KVM_RUN")(e)),
        };
        use kvm_ioctls::VcpuExit as K;
        Ok(match exit {
            K::IoIn(port, data) => VcpuExit::IoIn { port, data },
            K::IoOut(port, data) => VcpuExit::IoOut { port, data },
            K::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            K::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            K::Hlt => VcpuExit::Halt,
            K::Shutdown => VcpuExit::TripleFault,
            K::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VcpuExit::Reset,
            K::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => VcpuExit::PowerOff,
            K::SystemEvent(other, _) => VcpuExit::SystemEvent(other),
            K::FailEntry(reason, cpu) => VcpuExit::FailEntry { reason, cpu },
            K::InternalError => VcpuExit::InternalError,
            K::Intr => VcpuExit::Interrupted,
            other => VcpuExit::Other(format!("{other:?}")),
        })
    }

    fn bind_kicks(&mut self) {
        KICK_HANDLER.call_once(|| {
            if let Err(e) =
                vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            {
                tracing::error!("cannot install the vCPU kick handler: {e}");
            }
        });
        let run = self.fd.get_kvm_run() as *mut kvm_run;
        KICK_RUN.with(|c| c.set(run));
    }

    fn unbind_kicks(&mut self) {
        let mine = self.fd.get_kvm_run() as *mut kvm_run;
        KICK_RUN.with(|c| {
            if c.get() == mine {
                c.set(std::ptr::null_mut());
            }
        });
    }

    fn set_cpuid(&self, cpuid: &CpuId) -> Result<()> {
        self.fd.set_cpuid2(cpuid).map_err(err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<usize> {
        let list = Msrs::from_entries(msrs)
            .map_err(|_| HypervisorError::new("building an MSR list", libc::E2BIG))?;
        self.fd.set_msrs(&list).map_err(err("KVM_SET_MSRS"))
    }

    fn regs(&self) -> Result<Regs> {
        self.fd.get_regs().map_err(err("KVM_GET_REGS"))
    }

    fn set_regs(&self, regs: &Regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))
    }

    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(err("KVM_SET_SREGS"))
    }

    fn set_fpu(&self, fpu: &Fpu) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(err("KVM_SET_FPU"))
    }

    fn lapic(&self) -> Result<LapicState> {
        self.fd.get_lapic().map_err(err("KVM_GET_LAPIC"))
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(err("KVM_SET_LAPIC"))
    }

    fn set_mp_state(&self, state: super::MpState) -> Result<()> {
        self.fd.set_mp_state(state).map_err(err("KVM_SET_MP_STATE"))
    }

    fn state(&self) -> Result<VcpuState> {
        Ok(VcpuState {
            mp_state: self.fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            regs: self.regs()?,
            sregs: self.sregs()?,
            fpu: self.fd.get_fpu().map_err(err("KVM_GET_FPU"))?,
            xsave: self.fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            lapic: self.lapic()?,
            msrs: self.msrs()?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// In the order KVM needs: MP state and registers first, the LAPIC before the MSRs (the
    /// TSC deadline MSR is dropped without an enabled LAPIC), events last.
    fn set_state(&self, s: &VcpuState) -> Result<()> {
        self.set_mp_state(s.mp_state)?;
        self.set_regs(&s.regs)?;
        self.set_sregs(&s.sregs)?;
        // The FPU's state is in the XSAVE area, set next (KVM_SET_FPU would be overwritten).
        // SAFETY: `s.xsave` is a whole kvm_xsave as KVM_GET_XSAVE filled it; the kernel reads
        // no more than that struct.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(err("KVM_SET_XCRS"))?;
        self.set_lapic(&s.lapic)?;
        let n = self.set_msrs(&s.msrs)?;
        if n != s.msrs.len() {
            return Err(HypervisorError::new(
                "KVM_SET_MSRS (some refused)",
                libc::EINVAL,
            ));
        }
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))
    }

    /// KVM's documented way: enter once with `immediate_exit` set; the kernel completes the
    /// pending operation and returns EINTR before any guest instruction.
    fn complete_pending(&mut self) -> Result<()> {
        let run = self.fd.get_kvm_run() as *mut kvm_run;
        // SAFETY: `run` is this vCPU's kvm_run mapping, alive as long as `self.fd`.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        let r = self.fd.run().map(|_| ());
        // SAFETY: as above.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(0) };
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(err("KVM_RUN (completing the last exit)")(e)),
            Ok(()) => Err(HypervisorError::new(
                "KVM_RUN (completing the last exit) ran the guest",
                libc::EINVAL,
            )),
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::super::Hypervisor;
    use super::*;

    /// Every piece of vCPU and VM state read from one VM goes into another and reads back the
    /// same (runs on this host's /dev/kvm: no guest instruction is needed).
    #[test]
    fn state_round_trips_between_vms() {
        let hv = KvmHypervisor::get().unwrap();
        let build = || {
            let vm = hv.create_vm().unwrap();
            vm.set_tss_address(0xfffb_d000).unwrap();
            vm.create_irqchip().unwrap();
            vm.create_pit().unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
            (vm, vcpu)
        };
        let (vm_a, vcpu_a) = build();
        let mut regs = vcpu_a.regs().unwrap();
        regs.rip = 0x1234_5678;
        regs.rsi = 0x7000;
        regs.rflags = 2;
        vcpu_a.set_regs(&regs).unwrap();
        let state = vcpu_a.state().unwrap();
        assert!(state.msrs.len() > 10, "{state:?}");
        let vm_state = vm_a.state().unwrap();

        let (vm_b, vcpu_b) = build();
        vcpu_b.set_state(&state).unwrap();
        vm_b.set_state(&vm_state).unwrap();
        let back = vcpu_b.state().unwrap();
        assert_eq!(back.regs.rip, 0x1234_5678);
        assert_eq!(back.regs.rsi, 0x7000);
        assert_eq!(back.sregs.cr0, state.sregs.cr0);
        assert_eq!(back.lapic.regs[..], state.lapic.regs[..]);
        assert_eq!(back.msrs.len(), state.msrs.len());
        let b = vm_b.state().unwrap();
        assert_eq!(b.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
        // The clock moved on a little, never back.
        assert!(b.clock.clock >= vm_state.clock.clock);
    }
}
