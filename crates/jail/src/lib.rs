//! Confinement for the processes xcgi starts: CGI handlers (`--isolation process`) and VM
//! processes (`xcgi run --jail`).
//!
//! - [`spawn`]: a child started by `clone3` (shared memory until `execve`, straight into its
//!   cgroup and namespaces, a pidfd to wait on), with rlimits and an unprivileged user set
//!   before `execve`.
//! - [`confine`]: what a process does to itself once it has opened everything it needs: an
//!   empty read-only root of its own (`pivot_root`), rlimits, no new privileges, not
//!   dumpable, an unprivileged uid and gid with no capability left.
//! - [`cgroup`]: cgroup v2 directories: a parent with controllers for its children, limits,
//!   kill, events, removal.
#![warn(missing_docs)]

pub mod cgroup;
pub mod confine;
pub mod spawn;

pub use confine::{close_from, confine, no_new_privs, switch_user, ConfineError, Confinement};
pub use spawn::{
    pipe, spawn, ChildSetup, Command, PidFd, Pipes, SeccompProgram, SpawnError, Spawned, Stdio,
};
