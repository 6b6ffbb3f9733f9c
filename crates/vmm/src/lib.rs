//! xcgi-vmm: a minimal microVM monitor on the rust-vmm crates.

pub mod devices;
