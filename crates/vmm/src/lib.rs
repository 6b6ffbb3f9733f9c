//! xcgi-vmm: a minimal microVM monitor on the rust-vmm crates.
//!
//! [`vm::run`] builds a VM from a [`vm::VmConfig`] (memory, kernel, root, devices, vCPUs),
//! runs it to its end and returns a typed [`vm::Outcome`]. It is [`vm::prepare`] (everything
//! that does not depend on a request: memory, slots, kernel, vCPUs) followed by [`vm::launch`]
//! (devices, command line, run), so a server can prepare VMs ahead of their requests.

pub mod arch;
pub mod device_manager;
pub mod devices;
pub mod hypervisor;
pub mod layout;
pub mod memory;
pub mod vm;

pub use vm::{launch, prepare, run, ExitReason, Outcome, PreparedVm, Timings, VmConfig, VmError};
