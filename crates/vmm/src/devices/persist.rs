//! A device's own state in a snapshot (issue 13): each device saves what the guest can see of
//! it as bytes of its own layout, and restores it into a device the restoring side built with
//! its own host resources (interrupt eventfds, output, files). The snapshot keeps the bytes
//! in a `dev.<name>` section ([`crate::snapshot::Snapshot::devices`]).

/// Why a device's saved state was refused.
#[derive(Debug, thiserror::Error)]
#[error("device {device}: saved state refused: {reason}")]
pub struct PersistError {
    /// The device's snapshot name.
    pub device: &'static str,
    /// What is wrong with the bytes.
    pub reason: String,
}

/// Save and restore of one device's guest-visible state.
pub trait Persist: Sized {
    /// The device's section name in a snapshot.
    const NAME: &'static str;
    /// What the device needs from the host to be rebuilt (its interrupt, its output).
    type Host;
    /// The device's state, as bytes.
    fn save(&self) -> Vec<u8>;
    /// The device rebuilt with `host` and `bytes`' state.
    fn restore(host: Self::Host, bytes: &[u8]) -> Result<Self, PersistError>;
}
