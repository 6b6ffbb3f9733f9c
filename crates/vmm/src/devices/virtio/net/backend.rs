//! The TAP side of virtio-net: what [`Net::new`](super::Net::new) checks of the descriptor it is
//! given (opened by the host-networking code).

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;

use tracing::debug;
use vmm_sys_util::epoll::EventSet;

use super::{NetError, VNET_HDR_LEN};
use crate::devices::virtio::rx_worker::Source;
use crate::devices::virtio::sys::{set_nonblocking, SyscallError};

/// Puts `fd` in non-blocking mode and, if it is a TUN/TAP device, checks its mode and header
/// size.
pub(super) fn prepare_tap(fd: RawFd) -> Result<(), NetError> {
    set_nonblocking::<NetError>(fd)?;
    check_tap(fd)
}

impl SyscallError for NetError {
    fn syscall(what: &'static str, source: io::Error) -> NetError {
        NetError::Tap { what, source }
    }
}

/// What the RX worker watches: the TAP, readable (edge-triggered).
pub(super) fn rx_source(tap: &Arc<OwnedFd>) -> Source {
    Source {
        fd: tap.clone(),
        events: EventSet::IN | EventSet::EDGE_TRIGGERED,
        watch: true,
    }
}

/// If `fd` is a TUN/TAP device, check its mode and header size.
fn check_tap(fd: RawFd) -> Result<(), NetError> {
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one struct ifreq to the pointer, which is valid for it.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) } < 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENOTTY) {
            debug!("virtio-net: not a TUN/TAP descriptor; using it as is");
            return Ok(());
        }
        return Err(NetError::syscall("TUNGETIFF", source));
    }
    // SAFETY: TUNGETIFF fills the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags }.cast_unsigned();
    // The IFF_* flags all fit the 16-bit ifr_flags (they are defined for it).
    let flag = |f: libc::c_int| u16::try_from(f).unwrap_or(0);
    let want = flag(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    if flags & want != want || flags & flag(libc::IFF_TUN) != 0 {
        return Err(NetError::TapFlags(flags));
    }
    let mut size: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int to the pointer, which is valid for it.
    if unsafe { libc::ioctl(fd, libc::TUNGETVNETHDRSZ, &mut size) } < 0 {
        return Err(NetError::last_os_error("TUNGETVNETHDRSZ"));
    }
    if usize::try_from(size).ok() != Some(VNET_HDR_LEN) {
        return Err(NetError::VnetHdrSize(size));
    }
    Ok(())
}
