//! Helpers shared by the integration tests: names, `ip`, raw frames on a TAP.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use xcgi_net::VNET_HDR_LEN;

/// A namespace name unique to this test process.
pub fn ns_name(tag: &str) -> String {
    format!("xcgi-t{}-{tag}", std::process::id())
}

/// Runs `ip` with `args`; returns (success, stdout + stderr).
pub fn ip(args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's `ip` must be installed to run these tests");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub fn mounted(path: &str) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp == path))
}

/// Inode of a namespace descriptor (`net:[inode]`).
pub fn ns_inode(fd: BorrowedFd<'_>) -> u64 {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("readlink");
    let s = link.to_string_lossy().into_owned();
    s.trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .unwrap_or_else(|_| panic!("not a netns link: {s}"))
}

/// Whether any descriptor of this process refers to namespace `inode`.
pub fn process_holds_ns(inode: u64) -> bool {
    let want = format!("net:[{inode}]");
    let fds = std::fs::read_dir("/proc/self/fd").expect("fd dir");
    fds.flatten().any(|e| {
        std::fs::read_link(e.path())
            .map(|l| l.to_string_lossy() == want)
            .unwrap_or(false)
    })
}

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A frame as the VMM would write it to the TAP: zero virtio-net header, Ethernet, IPv4,
/// ICMP echo request.
pub fn icmp_echo(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"xcgi-net-test-payload");
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    let total = (20 + icmp.len()) as u16;
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&id.to_be_bytes());
    iph.extend_from_slice(&[0x40, 0, 64, 1, 0, 0]); // DF, TTL 64, ICMP, csum
    iph.extend_from_slice(&src.octets());
    iph.extend_from_slice(&dst.octets());
    let c = csum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());

    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&iph);
    f.extend_from_slice(&icmp);
    f
}

pub fn write_frame(fd: BorrowedFd<'_>, frame: &[u8]) {
    // SAFETY: write from a valid buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    assert_eq!(
        n,
        frame.len() as isize,
        "write to TAP: {}",
        std::io::Error::last_os_error()
    );
}

/// Frames (without the virtio-net header) read from a TAP within `timeout`, stopping at the
/// first one `stop` accepts. Returns all frames read.
pub fn read_frames(
    fd: BorrowedFd<'_>,
    timeout: Duration,
    mut stop: impl FnMut(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return frames;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
        if r <= 0 {
            continue;
        }
        // SAFETY: read into our own buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        assert!(
            n >= VNET_HDR_LEN,
            "frame shorter than the virtio-net header"
        );
        let hdr = &buf[..VNET_HDR_LEN];
        // No offloads: never a GSO frame, never a partial checksum.
        assert_eq!(hdr[1], 0, "gso_type must be NONE, header {hdr:?}");
        assert_eq!(hdr[0] & 1, 0, "NEEDS_CSUM must not be set, header {hdr:?}");
        let frame = buf[VNET_HDR_LEN..n].to_vec();
        let done = stop(&frame);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

pub fn ethertype(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[12], f[13]])
}

/// For an IPv4 frame: (protocol, src, dst, L4 payload).
pub fn ipv4(f: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, &[u8])> {
    if f.len() < 34 || ethertype(f) != 0x0800 {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some((ip[9], src, dst, ip.get(ihl..)?))
}

/// Whether `f` is an ICMP echo reply from `from` to `to`.
pub fn is_echo_reply(f: &[u8], from: Ipv4Addr, to: Ipv4Addr) -> bool {
    matches!(ipv4(f), Some((1, s, d, l4)) if s == from && d == to && l4.first() == Some(&0))
}
