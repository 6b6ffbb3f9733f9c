//! xcgi-lab: real (nested, slow) KVM for end-to-end tests on machines whose /dev/kvm cannot
//! boot a standard Linux guest (see shared/ENVIRONMENT.md).
//!
//! The lab is full-system QEMU with TCG emulating AMD SVM, booting Debian's 6.1 kernel with
//! kvm-amd loaded, so /dev/kvm works inside. [`assets`] builds and caches the kernel and a
//! base initramfs (busybox, iproute2's `ip`, the KVM/tun/veth modules, an /init); [`run`]
//! boots it with a per-run payload (the command, files, binaries) appended as a second cpio
//! archive, streams the command's output and returns its exit code.
//!
//! ```no_run
//! use std::time::Duration;
//! use xcgi_lab::{host_has_hardware_kvm, LabCommand};
//!
//! if !host_has_hardware_kvm() {
//!     let cmd = LabCommand::new("ls -l /dev/kvm && xcgi --version")
//!         .binary("target/x86_64-unknown-linux-gnu/debug/xcgi", "/usr/bin/xcgi")
//!         .timeout(Duration::from_secs(120));
//!     let out = xcgi_lab::run(&cmd, |line| println!("lab: {line}")).unwrap();
//!     assert_eq!(out.exit_code, 0);
//! }
//! ```

#![warn(missing_docs)]

pub mod assets;
pub mod cpio;
mod run;

pub use assets::{prepare as prepare_assets, AssetError, LabAssets};
pub use run::{
    kernel_cmdline, run, Lab, LabCommand, LabError, LabOutput, DEFAULT_CPUS, EXIT_LAB_ERROR,
    EXIT_TIMEOUT, GUEST_WORKDIR, KERNEL_CMDLINE, ONESHOT_TIMER_ENV, PERIODIC_TICK,
};

use std::path::Path;

/// True only when this host can run standard guests on hardware virtualization directly:
/// /dev/kvm exists, the CPU advertises `svm` or `vmx`, and KVM is not PVM
/// (`/sys/module/kvm_pvm` absent). When false, end-to-end tests go through the lab.
pub fn host_has_hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    hardware_kvm(
        Path::new("/dev/kvm").exists(),
        &cpuinfo,
        Path::new("/sys/module/kvm_pvm").exists(),
    )
}

fn hardware_kvm(dev_kvm: bool, cpuinfo: &str, pvm: bool) -> bool {
    let virt_flag = cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| {
        l.split_once(':')
            .is_some_and(|(_, f)| f.split_whitespace().any(|f| f == "svm" || f == "vmx"))
    });
    dev_kvm && virt_flag && !pvm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_kvm_needs_all_three() {
        let svm = "processor\t: 0\nflags\t\t: fpu sse2 svm npt\n";
        let vmx = "flags\t\t: fpu vmx ept\n";
        let none = "flags\t\t: fpu sse2 hypervisor\nbugs\t\t: svm\n";
        assert!(hardware_kvm(true, svm, false));
        assert!(hardware_kvm(true, vmx, false));
        assert!(!hardware_kvm(false, svm, false));
        assert!(!hardware_kvm(true, svm, true));
        assert!(!hardware_kvm(true, none, false));
    }

    #[test]
    fn this_host() {
        // On the PVM development machines this must be false (see ENVIRONMENT.md).
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert!(!host_has_hardware_kvm());
        }
    }
}
