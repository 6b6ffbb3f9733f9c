//! Guest networking for xcgi.
//!
//! Every VM gets a virtio-net NIC backed by a TAP device. All TAPs live in one network
//! namespace that xcgi creates ([`NetNs`]), never in the host's: a guest can reach only that
//! namespace's addresses, and guests cannot reach each other (IPv4 forwarding is off there).
//! Each VM gets a /30 from a configurable pool ([`PoolConfig`]), with the host side of the TAP
//! configured ahead of time (address, link up, permanent neighbour entry for the guest's MAC)
//! so the first packet to a new guest goes out without ARP. See docs/networking.md.
//!
//! ```no_run
//! # fn main() -> Result<(), xcgi_net::NetError> {
//! use std::sync::Arc;
//! let ns = Arc::new(xcgi_net::NetNs::create(Some("xcgi"))?);
//! let pool = xcgi_net::Pool::new(ns, xcgi_net::PoolConfig::default())?;
//! let lease = pool.lease()?;
//! // hand lease.tap_fd() to the VMM's virtio-net, lease.kernel_ip_param() to the command line
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod addr;
pub mod guests;
pub mod netlink;
pub mod netns;
pub mod pool;
mod sys;
pub mod tap;

use thiserror::Error;

pub use addr::{AddrError, AddrPlan, MacAddr, SlotAddrs};
pub use guests::{GuestNet, SocketReply};
pub use netlink::{Netlink, NetlinkError};
pub use netns::{NetNs, NetnsError};
pub use pool::{configure_tap, ifname, make_tap, Lease, Pool, PoolConfig, PoolStats, TapMaker};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

/// Errors of this crate's public operations.
#[derive(Debug, Error)]
pub enum NetError {
    /// Creating, entering or configuring the network namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Creating or querying a TAP device failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A netlink operation failed (e.g. opening the namespace's netlink socket).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The address plan is invalid, normally [`PoolConfig::base`] or [`PoolConfig::size`].
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// Configuring the host side of a new TAP (link up, address, neighbour entry) failed.
    #[error("cannot configure TAP {name:?}: {source}")]
    Configure {
        /// Name of the TAP being configured.
        name: String,
        /// What netlink reported.
        #[source]
        source: NetlinkError,
    },
    #[error(
        "network pool exhausted: all {size} slots are leased; raise the network pool size \
         (PoolConfig::size) to run more VMs with a network at once"
    )]
    /// No slot is free: all are leased (or stuck), and none came back within
    /// [`pool::RETURN_WAIT`].
    PoolExhausted {
        /// Number of slots in the pool.
        size: u32,
    },
    #[error("network pool prefill {prefill} is larger than the pool size {size}")]
    /// [`PoolConfig::prefill`] is larger than [`PoolConfig::size`].
    PrefillTooLarge {
        /// The requested prefill.
        prefill: u32,
        /// The requested pool size.
        size: u32,
    },
    /// A broken internal invariant (a bug in this crate); the text says which.
    #[error("internal error in xcgi-net: {0}")]
    Internal(&'static str),
    /// A [`TapMaker`] (another process) could not make the TAP: its words.
    #[error("the TAP maker failed: {0}")]
    Maker(String),
    /// The socket thread of a [`GuestNet`] could not be spawned.
    #[error("cannot start the guest network's socket thread: {0}")]
    Thread(std::io::Error),
}
