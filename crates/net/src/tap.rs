//! TAP devices for virtio-net: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte virtio-net v1
//! header on every frame, non-blocking, non-persistent (the device disappears when its last
//! descriptor closes, so a crashed xcgi leaks no device), no offloads.
//!
//! A TAP is created in the network namespace of the thread that opens `/dev/net/tun`; create
//! it inside [`crate::NetNs::run`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use thiserror::Error;

use crate::sys;

/// Path of the TUN/TAP clone device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Size of the header in front of every frame read from or written to a TAP:
/// `struct virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// Errors creating or querying a TAP device.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is empty, over 15 bytes, `.` or `..`, or contains `/`, `:`, NUL or whitespace.
    #[error("invalid TAP device name {name:?}: 1 to 15 bytes, no '/', ':' or whitespace")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// Opening [`TUN_PATH`] failed with ENOENT, ENODEV or ENXIO: no TUN/TAP driver.
    #[error(
        "{path} does not exist or has no driver: the kernel's TUN/TAP support is missing; load \
         it with `modprobe tun` (CONFIG_TUN) ({source})"
    )]
    TunMissing {
        /// [`TUN_PATH`].
        path: &'static str,
        /// The OS error from open(2).
        #[source]
        source: io::Error,
    },
    /// EPERM or EACCES opening [`TUN_PATH`] or creating the TAP: no CAP_NET_ADMIN.
    #[error(
        "{op}: permission denied: xcgi needs CAP_NET_ADMIN to create TAP devices (run it as \
         root or grant it the capability) ({source})"
    )]
    PermissionDenied {
        /// The refused operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A device of that name already exists in the namespace (EBUSY or EEXIST from
    /// `TUNSETIFF`).
    #[error("TAP device name {name:?} is already in use in xcgi's network namespace")]
    NameInUse {
        /// The requested name.
        name: String,
    },
    /// Opening [`TUN_PATH`] failed for another reason.
    #[error("cannot open {path}: {source}")]
    Open {
        /// [`TUN_PATH`].
        path: &'static str,
        /// The OS error from open(2).
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` failed for another reason.
    #[error("cannot create TAP device {name:?} (TUNSETIFF): {source}")]
    SetIff {
        /// The requested name.
        name: String,
        /// The OS error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// Setting the virtio-net header size to [`VNET_HDR_LEN`] (`TUNSETVNETHDRSZ`) failed.
    #[error("cannot set the virtio-net header size of TAP {name:?} to {VNET_HDR_LEN}: {source}")]
    VnetHdr {
        /// The TAP's name.
        name: String,
        /// The OS error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// `if_nametoindex` found no index for the new TAP.
    #[error("cannot find the interface index of TAP {name:?}: {source}")]
    Index {
        /// The TAP's name.
        name: String,
        /// The OS error from if_nametoindex(3).
        #[source]
        source: io::Error,
    },
    /// `TUNGETIFF` or `TUNGETVNETHDRSZ` failed.
    #[error("cannot query TAP {name:?}: {source}")]
    Query {
        /// The TAP's name.
        name: String,
        /// The OS error from the ioctl.
        #[source]
        source: io::Error,
    },
    /// Duplicating the TAP's descriptor failed.
    #[error("cannot duplicate the descriptor of TAP {name:?}: {source}")]
    Dup {
        /// The TAP's name.
        name: String,
        /// The OS error from fcntl(2).
        #[source]
        source: io::Error,
    },
}

/// Maps an error from `open("/dev/net/tun")`.
pub(crate) fn map_open_error(source: io::Error) -> TapError {
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::TunMissing {
            path: TUN_PATH,
            source,
        },
        Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied {
            op: "open /dev/net/tun",
            source,
        },
        _ => TapError::Open {
            path: TUN_PATH,
            source,
        },
    }
}

/// Maps an error from `TUNSETIFF`.
pub(crate) fn map_setiff_error(name: &str, source: io::Error) -> TapError {
    match source.raw_os_error() {
        Some(libc::EBUSY | libc::EEXIST) => TapError::NameInUse {
            name: name.to_string(),
        },
        Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied {
            op: "create TAP device (TUNSETIFF)",
            source,
        },
        _ => TapError::SetIff {
            name: name.to_string(),
            source,
        },
    }
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// An open TAP device. Dropping it closes the descriptor, which destroys the device (and with
/// it its addresses, routes and neighbour entries) unless a duplicate is still open.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    index: u32,
}

impl Tap {
    /// Creates TAP `name` in the calling thread's network namespace. Fails with
    /// [`TapError::NameInUse`] if any device of that name exists there (`IFF_TUN_EXCL`).
    pub fn create(name: &str) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::InvalidName {
                name: name.to_string(),
            });
        }
        let path = c"/dev/net/tun";
        // SAFETY: open with a valid path; the descriptor is owned right away.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        let raw = sys::cvt(raw).map_err(map_open_error)?;
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let mut req = sys::IfReqFlags::new(
            name.as_bytes(),
            sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR | sys::IFF_TUN_EXCL,
        );
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as.
        let ret = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                sys::TUNSETIFF,
                &mut req as *mut sys::IfReqFlags,
            )
        };
        sys::cvt(ret).map_err(|e| map_setiff_error(name, e))?;
        let name = req.name();

        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        let ret = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                sys::TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        sys::cvt(ret).map_err(|source| TapError::VnetHdr {
            name: name.clone(),
            source,
        })?;

        let cname = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| TapError::InvalidName { name: name.clone() })?;
        // SAFETY: if_nametoindex with a valid NUL-terminated name; it looks the name up in the
        // calling thread's namespace, where the device was just created.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(TapError::Index {
                name,
                source: io::Error::last_os_error(),
            });
        }
        tracing::debug!(%name, index, "TAP created");
        Ok(Tap { fd, name, index })
    }

    /// A TAP made by another process: its descriptor, name and index (as that process's
    /// [`Tap`] had them).
    pub fn from_parts(fd: OwnedFd, name: String, index: u32) -> Tap {
        Tap { fd, name, index }
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface index (in the namespace the TAP lives in).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// A new descriptor for the same TAP queue (`F_DUPFD_CLOEXEC`). While any duplicate is
    /// open the device stays alive.
    pub fn try_clone_fd(&self) -> Result<OwnedFd, TapError> {
        self.fd.try_clone().map_err(|source| TapError::Dup {
            name: self.name.clone(),
            source,
        })
    }

    /// The `IFF_*` flags of the device as the driver reports them (`TUNGETIFF`).
    pub fn tun_flags(&self) -> Result<libc::c_short, TapError> {
        let mut req = sys::IfReqFlags::new(&[], 0);
        // SAFETY: TUNGETIFF writes a `struct ifreq`, which `req` is laid out as.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::TUNGETIFF,
                &mut req as *mut sys::IfReqFlags,
            )
        };
        sys::cvt(ret).map_err(|source| TapError::Query {
            name: self.name.clone(),
            source,
        })?;
        Ok(req.flags)
    }

    /// The virtio-net header size the device uses (`TUNGETVNETHDRSZ`).
    pub fn vnet_hdr_len(&self) -> Result<usize, TapError> {
        let mut len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes an int through the pointer.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::TUNGETVNETHDRSZ,
                &mut len as *mut libc::c_int,
            )
        };
        sys::cvt(ret).map_err(|source| TapError::Query {
            name: self.name.clone(),
            source,
        })?;
        Ok(usize::try_from(len).unwrap_or(0))
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        tracing::debug!(name = %self.name, index = self.index, "TAP closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setiff_errors_are_mapped() {
        let e = map_setiff_error("xcgi3", io::Error::from_raw_os_error(libc::EBUSY));
        assert!(matches!(&e, TapError::NameInUse { name } if name == "xcgi3"));
        assert!(e.to_string().contains("xcgi3"), "{e}");
        let e = map_setiff_error("xcgi3", io::Error::from_raw_os_error(libc::EPERM));
        assert!(matches!(e, TapError::PermissionDenied { .. }));
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        let e = map_setiff_error("xcgi3", io::Error::from_raw_os_error(libc::EINVAL));
        assert!(matches!(e, TapError::SetIff { .. }));
    }

    #[test]
    fn open_errors_are_mapped() {
        for errno in [libc::ENOENT, libc::ENODEV, libc::ENXIO] {
            let e = map_open_error(io::Error::from_raw_os_error(errno));
            assert!(matches!(e, TapError::TunMissing { .. }));
            assert!(e.to_string().contains("modprobe tun"), "{e}");
        }
        let e = map_open_error(io::Error::from_raw_os_error(libc::EACCES));
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    }

    #[test]
    fn ifnames() {
        assert!(valid_ifname("xcgi0"));
        assert!(valid_ifname("xcgi16383"));
        assert!(valid_ifname("abcdefghijklmno")); // 15 bytes
        for bad in ["", "abcdefghijklmnop", "a b", "a/b", "a:b", ".", ".."] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }
}
