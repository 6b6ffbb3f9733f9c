//! Kernel constants and small syscall helpers the `libc` crate does not (portably) provide.
//!
//! Values are from the Linux UAPI headers (`linux/if_tun.h`, `linux/netlink.h`,
//! `linux/rtnetlink.h`, `linux/if_addr.h`, `linux/neighbour.h`), x86-64 ioctl encoding.

use std::io;

// linux/if_tun.h
/// `_IOW('T', 202, int)`
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`
pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `_IOR('T', 215, int)`
pub const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
/// `_IOW('T', 216, int)`
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const IFF_TAP: libc::c_short = 0x0002;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Fail with EBUSY instead of attaching to an existing device of that name.
pub const IFF_TUN_EXCL: libc::c_short = 0x8000_u16 as libc::c_short;

// linux/netlink.h
pub const NETLINK_ROUTE: libc::c_int = 0;
pub const SOL_NETLINK: libc::c_int = 270;
pub const NETLINK_CAP_ACK: libc::c_int = 10;
pub const NETLINK_EXT_ACK: libc::c_int = 11;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// In an NLMSG_ERROR: the request was not echoed back (NETLINK_CAP_ACK).
pub const NLM_F_CAPPED: u16 = 0x100;
/// In an NLMSG_ERROR: extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
pub const NLMSGERR_ATTR_MSG: u16 = 1;

// linux/rtnetlink.h
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWNEIGH: u16 = 28;
pub const RTM_GETNEIGH: u16 = 30;

// linux/if_link.h, linux/if_addr.h, linux/neighbour.h
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const NDA_DST: u16 = 1;
pub const NDA_LLADDR: u16 = 2;
pub const NUD_PERMANENT: u16 = 0x80;

// linux/if.h
pub const IFF_UP: u32 = 0x1;
pub const IFF_LOWER_UP: u32 = 0x1_0000;

/// `Err(last_os_error)` when a libc call returned -1.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags (the rest of the union is
/// padding for this call).
#[repr(C)]
pub struct IfReqFlags {
    pub name: [libc::c_char; libc::IFNAMSIZ],
    pub flags: libc::c_short,
    pub _pad: [u8; 22],
}

impl IfReqFlags {
    pub fn new(name: &[u8], flags: libc::c_short) -> Self {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.iter()) {
            *dst = *src as libc::c_char;
        }
        req
    }

    pub fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
