//! xcgi-vmm: a minimal microVM monitor on the rust-vmm crates.
//!
//! [`vm::run`] builds a VM from a [`vm::VmConfig`] (memory, kernel, root, devices, vCPUs),
//! runs it to its end and returns a typed [`vm::Outcome`].

pub mod boot;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod vm;

pub use vm::{run, ExitReason, Outcome, Timings, VmConfig, VmError};
