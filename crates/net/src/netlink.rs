//! A minimal rtnetlink (NETLINK_ROUTE) client on a raw socket: set a link up, add an IPv4
//! address, add a permanent neighbour entry, and dump links, addresses and neighbours.
//!
//! A netlink socket belongs to the network namespace of the thread that created it, for its
//! whole life: create it inside the namespace (see [`crate::NetNs::run`]) and use it from any
//! thread afterwards.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use thiserror::Error;

use crate::sys;

const NLMSG_HDRLEN: usize = 16;
const RECV_BUF: usize = 64 * 1024;

/// Errors of netlink requests.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// Opening or binding the netlink socket failed.
    #[error("cannot open a NETLINK_ROUTE socket: {source}")]
    Socket {
        /// The OS error from socket(2) or bind(2).
        #[source]
        source: io::Error,
    },
    /// Sending a request failed.
    #[error("netlink {op}: send failed: {source}")]
    Send {
        /// The operation, e.g. `add address`.
        op: &'static str,
        /// The OS error from send(2).
        #[source]
        source: io::Error,
    },
    /// Receiving a reply failed.
    #[error("netlink {op}: receive failed: {source}")]
    Recv {
        /// The operation, e.g. `dump links`.
        op: &'static str,
        /// The OS error from recv(2).
        #[source]
        source: io::Error,
    },
    /// The kernel answered EPERM: the process lacks CAP_NET_ADMIN in the namespace.
    #[error(
        "netlink {op}: operation not permitted: xcgi needs CAP_NET_ADMIN to configure its \
         network devices (run it as root or grant it the capability)"
    )]
    PermissionDenied {
        /// The refused operation.
        op: &'static str,
    },
    /// The kernel refused the request with an errno other than EPERM.
    #[error("netlink {op}: the kernel refused: {source}{}", ext_msg(.message))]
    Kernel {
        /// The refused operation.
        op: &'static str,
        /// The errno (positive), e.g. `libc::EEXIST`.
        errno: i32,
        /// The kernel's extended-ack text, when it sent one.
        message: Option<String>,
        /// `errno` as an I/O error.
        #[source]
        source: io::Error,
    },
    /// A reply did not parse.
    #[error("netlink {op}: malformed reply: {what}")]
    Malformed {
        /// The operation whose reply it was.
        op: &'static str,
        /// What was wrong with the reply.
        what: &'static str,
    },
}

fn ext_msg(message: &Option<String>) -> String {
    match message {
        Some(m) => format!(" ({m})"),
        None => String::new(),
    }
}

impl NetlinkError {
    /// The errno the kernel answered with, if this is a refusal by the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::PermissionDenied { .. } => Some(libc::EPERM),
            _ => None,
        }
    }
}

/// One link, as an RTM_GETLINK dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name (`IFLA_IFNAME`); empty if the kernel sent none.
    pub name: String,
    /// `IFF_*` flags (`IFF_UP` = 1, `IFF_LOWER_UP` = 0x10000, ...).
    pub flags: u32,
    /// The link-layer address, for Ethernet-like links.
    pub mac: Option<[u8; 6]>,
}

impl LinkInfo {
    /// Administratively up (`IFF_UP`).
    pub fn is_up(&self) -> bool {
        self.flags & sys::IFF_UP != 0
    }

    /// Carrier present (`IFF_LOWER_UP`); for a TAP: a descriptor is attached.
    pub fn has_carrier(&self) -> bool {
        self.flags & sys::IFF_LOWER_UP != 0
    }
}

/// One IPv4 address, as an RTM_GETADDR dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    /// Index of the interface the address is on.
    pub index: u32,
    /// Prefix length, e.g. 30.
    pub prefix_len: u8,
    /// The address (`IFA_LOCAL`, else `IFA_ADDRESS`).
    pub local: Ipv4Addr,
}

/// One IPv4 neighbour entry, as an RTM_GETNEIGH dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighInfo {
    /// Index of the interface the entry is on.
    pub index: u32,
    /// `NUD_*` state (`NUD_PERMANENT` = 0x80).
    pub state: u16,
    /// The neighbour's IPv4 address.
    pub dst: Ipv4Addr,
    /// The neighbour's MAC (`NDA_LLADDR`), when the entry has a 6-byte one.
    pub lladdr: Option<[u8; 6]>,
}

impl NeighInfo {
    /// A static entry (`NUD_PERMANENT`): never aged out or re-resolved by ARP.
    pub fn is_permanent(&self) -> bool {
        self.state & sys::NUD_PERMANENT != 0
    }
}

/// A NETLINK_ROUTE socket. Not `Sync`-shared: wrap it in a `Mutex` to share it.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

/// Builds one netlink request: header, fixed payload, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched in finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | sys::NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq, patched in finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
        Msg { buf }
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        self.buf.extend_from_slice(b);
        self.pad();
        self
    }

    fn attr(mut self, ty: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// `struct ifinfomsg` (16 bytes).
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = libc::AF_UNSPEC as u8;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// `struct ifaddrmsg` (8 bytes), IPv4, scope universe.
fn ifaddrmsg(index: u32, prefix_len: u8) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = libc::AF_INET as u8;
    b[1] = prefix_len;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b
}

/// `struct ndmsg` (12 bytes), IPv4.
fn ndmsg(index: u32, state: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = libc::AF_INET as u8;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..10].copy_from_slice(&state.to_ne_bytes());
    b
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterates `(type, payload)` over a run of rtattrs.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)?;
        if len < 4 || len > b.len() {
            return None;
        }
        let data = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        // NLA_F_NESTED / NLA_F_NET_BYTEORDER are the top bits of the type.
        Some((ty & 0x3fff, data))
    })
}

fn ipv4(data: &[u8]) -> Option<Ipv4Addr> {
    let a: [u8; 4] = data.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                sys::NETLINK_ROUTE,
            )
        };
        let raw = sys::cvt(raw).map_err(|source| NetlinkError::Socket { source })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Best effort: errors without the request echoed back, with the kernel's text.
        for opt in [sys::NETLINK_CAP_ACK, sys::NETLINK_EXT_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid pointer to an int and its size.
            let _ = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    sys::SOL_NETLINK,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        // SAFETY: zeroed sockaddr_nl is valid (family set below, pid 0 = kernel assigns).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind with a valid sockaddr_nl and its size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        sys::cvt(ret).map_err(|source| NetlinkError::Socket { source })?;
        Ok(Netlink {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sets a link administratively up.
    pub fn set_link_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let msg = Msg::new(sys::RTM_NEWLINK, sys::NLM_F_ACK).bytes(&ifinfomsg(
            index,
            sys::IFF_UP,
            sys::IFF_UP,
        ));
        self.request("set link up", msg)
    }

    /// Sets a link, found by name, administratively up.
    pub fn set_link_up_by_name(&mut self, name: &str) -> Result<(), NetlinkError> {
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        let msg = Msg::new(sys::RTM_NEWLINK, sys::NLM_F_ACK)
            .bytes(&ifinfomsg(0, sys::IFF_UP, sys::IFF_UP))
            .attr(sys::IFLA_IFNAME, &cname);
        self.request("set link up", msg)
    }

    /// Adds `addr/prefix_len` to a link (fails with EEXIST if it is already there).
    pub fn add_ipv4_addr(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let msg = Msg::new(
            sys::RTM_NEWADDR,
            sys::NLM_F_ACK | sys::NLM_F_CREATE | sys::NLM_F_EXCL,
        )
        .bytes(&ifaddrmsg(index, prefix_len))
        .attr(sys::IFA_LOCAL, &addr.octets())
        .attr(sys::IFA_ADDRESS, &addr.octets());
        self.request("add address", msg)
    }

    /// Adds (or replaces) a PERMANENT neighbour entry `dst -> lladdr` on a link.
    pub fn add_permanent_neigh(
        &mut self,
        index: u32,
        dst: Ipv4Addr,
        lladdr: [u8; 6],
    ) -> Result<(), NetlinkError> {
        let msg = Msg::new(
            sys::RTM_NEWNEIGH,
            sys::NLM_F_ACK | sys::NLM_F_CREATE | sys::NLM_F_REPLACE,
        )
        .bytes(&ndmsg(index, sys::NUD_PERMANENT))
        .attr(sys::NDA_DST, &dst.octets())
        .attr(sys::NDA_LLADDR, &lladdr);
        self.request("add neighbour", msg)
    }

    /// One link by index; `Ok(None)` when no such link exists (ENODEV).
    pub fn link(&mut self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        let msg = Msg::new(sys::RTM_GETLINK, 0).bytes(&ifinfomsg(index, 0, 0));
        match self.exchange("get link", msg, false) {
            Ok(replies) => Ok(replies
                .iter()
                .filter(|(ty, _)| *ty == sys::RTM_NEWLINK)
                .find_map(|(_, p)| parse_link(p))),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All links of the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let msg = Msg::new(sys::RTM_GETLINK, sys::NLM_F_DUMP).bytes(&ifinfomsg(0, 0, 0));
        let replies = self.exchange("dump links", msg, true)?;
        Ok(replies
            .iter()
            .filter(|(ty, _)| *ty == sys::RTM_NEWLINK)
            .filter_map(|(_, p)| parse_link(p))
            .collect())
    }

    /// All IPv4 addresses of the namespace.
    pub fn ipv4_addrs(&mut self) -> Result<Vec<AddrInfo>, NetlinkError> {
        let msg = Msg::new(sys::RTM_GETADDR, sys::NLM_F_DUMP).bytes(&ifaddrmsg(0, 0));
        let replies = self.exchange("dump addresses", msg, true)?;
        Ok(replies
            .iter()
            .filter(|(ty, _)| *ty == sys::RTM_NEWADDR)
            .filter_map(|(_, p)| parse_addr(p))
            .collect())
    }

    /// All IPv4 neighbour entries of the namespace.
    pub fn ipv4_neighs(&mut self) -> Result<Vec<NeighInfo>, NetlinkError> {
        let msg = Msg::new(sys::RTM_GETNEIGH, sys::NLM_F_DUMP).bytes(&ndmsg(0, 0));
        let replies = self.exchange("dump neighbours", msg, true)?;
        Ok(replies
            .iter()
            .filter(|(ty, _)| *ty == sys::RTM_NEWNEIGH)
            .filter_map(|(_, p)| parse_neigh(p))
            .collect())
    }

    fn request(&mut self, op: &'static str, msg: Msg) -> Result<(), NetlinkError> {
        self.exchange(op, msg, false).map(|_| ())
    }

    /// Sends one request and collects the replies up to its ACK (or NLMSG_DONE for a dump).
    fn exchange(
        &mut self,
        op: &'static str,
        msg: Msg,
        dump: bool,
    ) -> Result<Vec<(u16, Vec<u8>)>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let req = msg.finish(seq);
        loop {
            // SAFETY: send from a valid buffer of the given length.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    req.as_ptr().cast(),
                    req.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(NetlinkError::Send { op, source: err });
            }
        }
        let mut out = Vec::new();
        loop {
            // SAFETY: recv into our own buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Recv { op, source: err });
            }
            let n = n as usize;
            let mut at = 0;
            while at + NLMSG_HDRLEN <= n {
                let b = &self.buf[at..n];
                let len = u32_at(b, 0).ok_or(NetlinkError::Malformed {
                    op,
                    what: "short header",
                })? as usize;
                if len < NLMSG_HDRLEN || len > b.len() {
                    return Err(NetlinkError::Malformed {
                        op,
                        what: "bad message length",
                    });
                }
                let ty = u16_at(b, 4).unwrap_or(0);
                let flags = u16_at(b, 6).unwrap_or(0);
                let mseq = u32_at(b, 8).unwrap_or(0);
                let payload = &b[NLMSG_HDRLEN..len];
                at += align4(len);
                if mseq != seq {
                    // A reply to an earlier request that was abandoned on error.
                    continue;
                }
                match ty {
                    sys::NLMSG_ERROR => {
                        let errno = u32_at(payload, 0).ok_or(NetlinkError::Malformed {
                            op,
                            what: "short error message",
                        })? as i32;
                        if errno == 0 {
                            return Ok(out);
                        }
                        return Err(kernel_error(op, -errno, flags, payload));
                    }
                    sys::NLMSG_DONE => {
                        if flags & sys::NLM_F_DUMP_INTR != 0 {
                            tracing::debug!(op, "netlink dump was interrupted by a change");
                        }
                        return Ok(out);
                    }
                    _ => {
                        out.push((ty, payload.to_vec()));
                        if !dump && flags & sys::NLM_F_MULTI == 0 {
                            // A plain GET answers with one message and no ACK (we did
                            // not ask for one).
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }
}

fn kernel_error(op: &'static str, errno: i32, flags: u16, payload: &[u8]) -> NetlinkError {
    if errno == libc::EPERM {
        return NetlinkError::PermissionDenied { op };
    }
    let mut message = None;
    if flags & sys::NLM_F_ACK_TLVS != 0 {
        // struct nlmsgerr: error (4) + the request's header (16), plus its payload unless
        // capped; then the extended-ack attributes.
        let mut off = 4 + NLMSG_HDRLEN;
        if flags & sys::NLM_F_CAPPED == 0 {
            let req_len = u32_at(payload, 4).unwrap_or(0) as usize;
            off = 4 + align4(req_len);
        }
        if let Some(tlvs) = payload.get(off..) {
            message = attrs(tlvs)
                .find(|(ty, _)| *ty == sys::NLMSGERR_ATTR_MSG)
                .map(|(_, d)| {
                    String::from_utf8_lossy(d)
                        .trim_end_matches('\0')
                        .to_string()
                });
        }
    }
    NetlinkError::Kernel {
        op,
        errno,
        message,
        source: io::Error::from_raw_os_error(errno),
    }
}

fn parse_link(p: &[u8]) -> Option<LinkInfo> {
    let index = u32_at(p, 4)?;
    let flags = u32_at(p, 8)?;
    let mut name = String::new();
    let mut mac = None;
    for (ty, d) in attrs(p.get(16..)?) {
        match ty {
            sys::IFLA_IFNAME => {
                name = String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            }
            sys::IFLA_ADDRESS => mac = d.try_into().ok(),
            _ => {}
        }
    }
    Some(LinkInfo {
        index,
        name,
        flags,
        mac,
    })
}

fn parse_addr(p: &[u8]) -> Option<AddrInfo> {
    if *p.first()? != libc::AF_INET as u8 {
        return None;
    }
    let prefix_len = *p.get(1)?;
    let index = u32_at(p, 4)?;
    let mut local = None;
    let mut address = None;
    for (ty, d) in attrs(p.get(8..)?) {
        match ty {
            sys::IFA_LOCAL => local = ipv4(d),
            sys::IFA_ADDRESS => address = ipv4(d),
            _ => {}
        }
    }
    Some(AddrInfo {
        index,
        prefix_len,
        local: local.or(address)?,
    })
}

fn parse_neigh(p: &[u8]) -> Option<NeighInfo> {
    if *p.first()? != libc::AF_INET as u8 {
        return None;
    }
    let index = u32_at(p, 4)?;
    let state = u16_at(p, 8)?;
    let mut dst = None;
    let mut lladdr = None;
    for (ty, d) in attrs(p.get(12..)?) {
        match ty {
            sys::NDA_DST => dst = ipv4(d),
            sys::NDA_LLADDR => lladdr = d.try_into().ok(),
            _ => {}
        }
    }
    Some(NeighInfo {
        index,
        state,
        dst: dst?,
        lladdr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout_is_aligned_and_sized() {
        let m = Msg::new(sys::RTM_NEWNEIGH, sys::NLM_F_ACK)
            .bytes(&ndmsg(7, sys::NUD_PERMANENT))
            .attr(sys::NDA_DST, &[172, 16, 0, 2])
            .attr(sys::NDA_LLADDR, &[6, 0, 172, 16, 0, 2])
            .finish(42);
        // 16 header + 12 ndmsg + 8 dst + 12 (10 padded) lladdr
        assert_eq!(m.len(), 48);
        assert_eq!(u32_at(&m, 0), Some(48));
        assert_eq!(u16_at(&m, 4), Some(sys::RTM_NEWNEIGH));
        assert_eq!(u16_at(&m, 6), Some(sys::NLM_F_ACK | sys::NLM_F_REQUEST));
        assert_eq!(u32_at(&m, 8), Some(42));
        let parsed = parse_neigh(&m[16..]).expect("parses back");
        assert_eq!(parsed.index, 7);
        assert!(parsed.is_permanent());
        assert_eq!(parsed.dst, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(parsed.lladdr, Some([6, 0, 172, 16, 0, 2]));
    }

    #[test]
    fn attrs_stop_at_truncation() {
        // One good attribute, then a length that runs past the end.
        let b = [8, 0, 1, 0, 1, 2, 3, 4, 20, 0, 2, 0];
        let v: Vec<_> = attrs(&b).collect();
        assert_eq!(v, vec![(1u16, &[1u8, 2, 3, 4][..])]);
    }

    #[test]
    fn eperm_maps_to_capability_message() {
        let e = kernel_error("add address", libc::EPERM, 0, &[]);
        assert!(matches!(e, NetlinkError::PermissionDenied { .. }));
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    }
}
