//! xcgi-vmm: a minimal microVM monitor on the rust-vmm crates.
//!
//! [`vm::run`] builds the machine a [`MachineShape`] describes (kernel, root, memory, vCPUs),
//! adds a run's [`Attachments`] (CGI channel, NIC), runs it as its [`RunOptions`] say and
//! returns a typed [`vm::Outcome`]. It is [`vm::prepare`] (everything that does not depend on
//! a request: memory, slots, kernel, vCPUs) followed by [`vm::launch`] (devices, command line,
//! run), so a server can prepare VMs ahead of their requests ([`pool`]).
//!
//! Layers: [`vm`] (the builder) → [`device_manager`] (buses, [`devices`]) and
//! [`arch`] (the x86-64 boot protocol) → [`hypervisor`] (KVM behind a trait).

#![warn(missing_docs)]

pub mod arch;
pub mod device_manager;
pub mod devices;
pub mod diagnostics;
pub mod hypervisor;
pub mod layout;
pub mod memory;
pub mod pool;
pub mod prefault;
pub mod resources;
pub mod seccomp;
pub mod snapshot;
pub mod vm;

pub use pool::{Pool, PoolHealth};
pub use resources::{Attachments, Cancel, Capture, MachineShape, NetAttachment, RunOptions};
pub use vm::{
    launch, prepare, prepare_in, prepare_shell, run, ExitReason, Outcome, PreparedVm, Shell,
    Timings, VmError,
};
