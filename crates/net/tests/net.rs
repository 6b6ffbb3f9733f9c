//! Real kernel objects: network namespaces, TAP devices, addresses, neighbour entries.
//! Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), /dev/net/tun and iproute2's `ip`.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use xcgi_net::{NetError, NetNs, NetnsError, Pool, PoolConfig, Tap, TapError, VNET_HDR_LEN};

fn pool(tag: &str, size: u32, prefill: u32) -> Pool {
    let ns = Arc::new(NetNs::create(Some(&ns_name(tag))).expect("create namespace"));
    Pool::new(
        ns,
        PoolConfig {
            size,
            prefill,
            ..PoolConfig::default()
        },
    )
    .expect("create pool")
}

#[test]
fn named_namespace_is_visible_has_lo_up_and_is_gone_after_drop() {
    let name = ns_name("life");
    let path = format!("/run/netns/{name}");
    let ns = NetNs::create(Some(&name)).expect("create namespace");
    assert_eq!(ns.name(), Some(name.as_str()));
    assert_eq!(ns.path().as_deref(), Some(Path::new(&path)));
    assert!(Path::new(&path).exists());
    assert!(mounted(&path), "{path} must be a bind mount");

    // Seen by iproute2 as a namespace, with lo up.
    let (ok, list) = ip(&["netns", "list"]);
    assert!(
        ok && list.lines().any(|l| l.split(' ').next() == Some(&name)),
        "{list}"
    );
    let (ok, lo) = ip(&["-n", &name, "-o", "link", "show", "dev", "lo"]);
    assert!(ok, "{lo}");
    assert!(
        lo.contains(",UP") || lo.contains("<UP"),
        "lo must be up: {lo}"
    );
    // Nothing but lo inside.
    let mut nl = ns.netlink().expect("netlink in ns");
    let links = nl.links().expect("dump links");
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].name, "lo");
    assert!(links[0].is_up());
    drop(nl);

    // A second namespace of the same name is refused; the first one is unharmed.
    let err = NetNs::create(Some(&name)).expect_err("duplicate name");
    assert!(
        matches!(&err, NetError::Netns(NetnsError::NameInUse { name: n, .. }) if *n == name),
        "{err}"
    );
    assert!(err.to_string().contains(&name), "{err}");
    assert!(mounted(&path));

    let inode = ns_inode(ns.as_fd());
    drop(ns);
    assert!(!Path::new(&path).exists(), "{path} must be removed");
    assert!(!mounted(&path), "{path} must be unmounted");
    assert!(
        !process_holds_ns(inode),
        "a descriptor into the namespace leaked"
    );
    let (_, list) = ip(&["netns", "list"]);
    assert!(!list.contains(&name), "{list}");
}

#[test]
fn unnamed_namespace_leaves_no_mount() {
    let ns = NetNs::create(None).expect("create namespace");
    assert_eq!(ns.path(), None);
    // Its own loopback, not the host's devices.
    let mut nl = ns.netlink().expect("netlink in ns");
    let names: Vec<_> = nl
        .links()
        .expect("links")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["lo"]);
}

#[test]
fn isolation_sysctls_inside_namespace() {
    let name = ns_name("sysctl");
    let ns = NetNs::create(Some(&name)).expect("create namespace");
    assert_eq!(ns.sysctl("net/ipv4/ip_forward").expect("ip_forward"), "0");
    assert_eq!(
        ns.sysctl("net/ipv4/conf/all/forwarding")
            .expect("all.forwarding"),
        "0"
    );
    assert_eq!(
        ns.sysctl("net/ipv4/conf/all/rp_filter").expect("rp_filter"),
        "1"
    );
    if Path::new("/proc/sys/net/ipv6").exists() {
        assert_eq!(
            ns.sysctl("net/ipv6/conf/default/disable_ipv6")
                .expect("disable_ipv6"),
            "1"
        );
    }
    // The same, read by a process that iproute2 puts inside the namespace.
    let (ok, out) = ip(&[
        "netns",
        "exec",
        &name,
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
    ]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "0");
}

#[test]
fn lease_tap_is_configured_inside_namespace_only() {
    let pool = pool("lease", 4, 1);
    let name = pool.netns().name().expect("named").to_string();
    let lease = pool.lease().expect("lease");
    assert_eq!(lease.ifname(), "xcgi0");
    assert_eq!(lease.host_ip(), Ipv4Addr::new(172, 16, 0, 1));
    assert_eq!(lease.guest_ip(), Ipv4Addr::new(172, 16, 0, 2));
    assert_eq!(lease.guest_mac().to_string(), "06:00:ac:10:00:02");
    assert_eq!(
        lease.kernel_ip_param(),
        "ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off"
    );

    // iproute2's view inside the namespace.
    let (ok, link) = ip(&["-n", &name, "-o", "link", "show", "dev", "xcgi0"]);
    assert!(ok, "{link}");
    assert!(link.contains("UP"), "{link}");
    let (ok, addr) = ip(&["-n", &name, "-4", "-o", "addr", "show", "dev", "xcgi0"]);
    assert!(ok, "{addr}");
    assert!(addr.contains("inet 172.16.0.1/30"), "{addr}");
    let (ok, neigh) = ip(&["-n", &name, "neigh", "show", "dev", "xcgi0"]);
    assert!(ok, "{neigh}");
    assert!(
        neigh.contains("172.16.0.2 lladdr 06:00:ac:10:00:02 PERMANENT"),
        "{neigh}"
    );
    let (ok, route) = ip(&["-n", &name, "-4", "route", "show", "dev", "xcgi0"]);
    assert!(ok && route.contains("172.16.0.0/30"), "{route}");

    // Our own netlink dump agrees.
    let mut nl = pool.netns().netlink().expect("netlink in ns");
    let links = nl.links().expect("links");
    let tap = links
        .iter()
        .find(|l| l.name == "xcgi0")
        .expect("xcgi0 in ns");
    assert_eq!(tap.index, lease.ifindex());
    assert!(tap.is_up() && tap.has_carrier(), "{tap:?}");
    let addrs = nl.ipv4_addrs().expect("addrs");
    assert!(addrs
        .iter()
        .any(|a| a.index == tap.index && a.local == lease.host_ip() && a.prefix_len == 30));
    let neighs = nl.ipv4_neighs().expect("neighs");
    assert!(neighs.iter().any(|n| n.index == tap.index
        && n.dst == lease.guest_ip()
        && n.is_permanent()
        && n.lladdr == Some(lease.guest_mac().0)));

    // Not in the host's namespace.
    let (ok, host) = ip(&["link", "show", "dev", "xcgi0"]);
    assert!(!ok, "xcgi0 must not exist in the host namespace: {host}");
    let mut host_nl = xcgi_net::Netlink::open().expect("host netlink");
    assert!(host_nl
        .links()
        .expect("host links")
        .iter()
        .all(|l| l.name != "xcgi0"));

    // What the VMM gets: non-blocking descriptor, TAP without packet info, 12-byte header.
    // SAFETY: F_GETFL on a valid descriptor.
    let fl = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&lease.tap_fd()),
            libc::F_GETFL,
        )
    };
    assert!(fl & libc::O_NONBLOCK != 0);
    let flags = lease.tap().tun_flags().expect("TUNGETIFF");
    assert_eq!(flags & 0x0002, 0x0002, "IFF_TAP");
    assert_eq!(flags & 0x1000, 0x1000, "IFF_NO_PI");
    assert_eq!(flags & 0x4000, 0x4000, "IFF_VNET_HDR");
    assert_eq!(flags & 0x0800, 0, "not persistent");
    assert_eq!(lease.tap().vnet_hdr_len().expect("hdr len"), VNET_HDR_LEN);
    assert_eq!(VNET_HDR_LEN, 12);
}

#[test]
fn host_sends_to_a_new_guest_without_arp_and_guest_reaches_its_host() {
    let pool = pool("frames", 4, 0);
    let lease = pool.lease().expect("lease");
    let guest = lease.guest_ip();
    let host = lease.host_ip();

    // First packet from the namespace to the guest: straight out, no ARP request first.
    let sock = pool
        .netns()
        .run(|| UdpSocket::bind((host, 0)))
        .expect("run")
        .expect("bind in namespace");
    sock.send_to(b"hello guest", (guest, 9999)).expect("send");
    let frames = read_frames(lease.tap_fd(), Duration::from_secs(2), |f| {
        ipv4(f).is_some_and(|(p, ..)| p == 17)
    });
    assert!(!frames.is_empty(), "nothing arrived on the TAP");
    assert!(
        frames.iter().all(|f| ethertype(f) != 0x0806),
        "the host sent ARP for a guest with a permanent neighbour entry"
    );
    let udp = frames.last().expect("a frame");
    assert_eq!(&udp[0..6], &lease.guest_mac().0, "to the guest MAC");
    let (proto, src, dst, l4) = ipv4(udp).expect("IPv4");
    assert_eq!((proto, src, dst), (17, host, guest));
    assert_eq!(&l4[8..], b"hello guest");

    // The guest pings its gateway (the host side) and gets the reply.
    let mut nl = pool.netns().netlink().expect("netlink");
    let tap_mac = nl
        .link(lease.ifindex())
        .expect("get link")
        .and_then(|l| l.mac)
        .expect("TAP MAC");
    let ping = icmp_echo(lease.guest_mac().0, tap_mac, guest, host, 0x1111);
    write_frame(lease.tap_fd(), &ping);
    let frames = read_frames(lease.tap_fd(), Duration::from_secs(2), |f| {
        is_echo_reply(f, host, guest)
    });
    assert!(
        frames.iter().any(|f| is_echo_reply(f, host, guest)),
        "no echo reply from the host side: {frames:?}"
    );
}

#[test]
fn guests_cannot_reach_each_other_or_spoof() {
    let pool = pool("iso", 4, 2);
    let a = pool.lease().expect("lease a");
    let b = pool.lease().expect("lease b");
    let mut nl = pool.netns().netlink().expect("netlink");
    let a_tap_mac = nl
        .link(a.ifindex())
        .expect("get link")
        .and_then(|l| l.mac)
        .expect("TAP MAC");

    // A -> B's guest address through A's gateway: not forwarded.
    write_frame(
        a.tap_fd(),
        &icmp_echo(
            a.guest_mac().0,
            a_tap_mac,
            a.guest_ip(),
            b.guest_ip(),
            0x2222,
        ),
    );
    let on_b = read_frames(b.tap_fd(), Duration::from_millis(400), |_| true);
    assert!(on_b.is_empty(), "A's packet reached B's TAP: {on_b:?}");

    // A spoofing B's guest address as source towards A's gateway: dropped (rp_filter).
    write_frame(
        a.tap_fd(),
        &icmp_echo(
            a.guest_mac().0,
            a_tap_mac,
            b.guest_ip(),
            a.host_ip(),
            0x3333,
        ),
    );
    let replies_a = read_frames(a.tap_fd(), Duration::from_millis(400), |_| true);
    let replies_b = read_frames(b.tap_fd(), Duration::from_millis(100), |_| true);
    assert!(
        replies_a.is_empty() && replies_b.is_empty(),
        "a spoofed packet was answered: {replies_a:?} {replies_b:?}"
    );

    // The namespace's loopback address is not reachable from a TAP (martian).
    write_frame(
        a.tap_fd(),
        &icmp_echo(
            a.guest_mac().0,
            a_tap_mac,
            a.guest_ip(),
            Ipv4Addr::LOCALHOST,
            0x7777,
        ),
    );
    let replies_a = read_frames(a.tap_fd(), Duration::from_millis(400), |_| true);
    assert!(replies_a.is_empty(), "127.0.0.1 answered: {replies_a:?}");

    // Weak host model (documented): A can reach B's *host-side* address, which is an
    // address of the namespace; the reply goes back out of A's TAP only.
    write_frame(
        a.tap_fd(),
        &icmp_echo(
            a.guest_mac().0,
            a_tap_mac,
            a.guest_ip(),
            b.host_ip(),
            0x4444,
        ),
    );
    let frames = read_frames(a.tap_fd(), Duration::from_secs(2), |f| {
        is_echo_reply(f, b.host_ip(), a.guest_ip())
    });
    assert!(frames
        .iter()
        .any(|f| is_echo_reply(f, b.host_ip(), a.guest_ip())));
    let on_b = read_frames(b.tap_fd(), Duration::from_millis(100), |_| true);
    assert!(on_b.is_empty(), "{on_b:?}");

    // Controls: the same frames do get through once the settings xcgi makes are undone, so
    // the checks above test those settings and not a malformed frame.
    let set = |key: &'static str, v: &'static str| {
        pool.netns()
            .run(move || std::fs::write(format!("/proc/sys/{key}"), v))
            .expect("run")
            .expect("write sysctl");
    };
    set("net/ipv4/ip_forward", "1");
    write_frame(
        a.tap_fd(),
        &icmp_echo(
            a.guest_mac().0,
            a_tap_mac,
            a.guest_ip(),
            b.guest_ip(),
            0x5555,
        ),
    );
    let on_b = read_frames(
        b.tap_fd(),
        Duration::from_secs(2),
        |f| matches!(ipv4(f), Some((1, s, d, _)) if s == a.guest_ip() && d == b.guest_ip()),
    );
    assert!(!on_b.is_empty(), "control: with forwarding on, A reaches B");
    set("net/ipv4/ip_forward", "0");
    set("net/ipv4/conf/all/rp_filter", "0");
    set(
        if a.ifname() == "xcgi0" {
            "net/ipv4/conf/xcgi0/rp_filter"
        } else {
            "net/ipv4/conf/xcgi1/rp_filter"
        },
        "0",
    );
    write_frame(
        a.tap_fd(),
        &icmp_echo(
            a.guest_mac().0,
            a_tap_mac,
            b.guest_ip(),
            a.host_ip(),
            0x6666,
        ),
    );
    let replies_b = read_frames(b.tap_fd(), Duration::from_secs(2), |f| {
        is_echo_reply(f, a.host_ip(), b.guest_ip())
    });
    assert!(
        replies_b
            .iter()
            .any(|f| is_echo_reply(f, a.host_ip(), b.guest_ip())),
        "control: without rp_filter the spoofed ping is answered (to B)"
    );
}

#[test]
fn leases_are_distinct_reusable_and_bounded() {
    let pool = pool("slots", 2, 0);
    let name = pool.netns().name().expect("named").to_string();
    let a = pool.lease().expect("lease a");
    let b = pool.lease().expect("lease b");
    assert_ne!(a.guest_ip(), b.guest_ip());
    assert_ne!(a.host_ip(), b.host_ip());
    assert_ne!(a.guest_mac(), b.guest_mac());
    assert_ne!(a.ifname(), b.ifname());
    assert_eq!(b.guest_ip(), Ipv4Addr::new(172, 16, 0, 6));
    assert_eq!(b.host_ip(), Ipv4Addr::new(172, 16, 0, 5));
    assert_eq!(b.guest_mac().to_string(), "06:00:ac:10:00:06");

    let err = pool.lease().expect_err("size-2 pool is exhausted");
    assert!(
        matches!(err, NetError::PoolExhausted { size: 2 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("PoolConfig::size"), "{err}");

    // Returning a slot destroys its TAP; the next lease gets a fresh device on that slot.
    let (a_slot, a_index) = (a.slot(), a.ifindex());
    drop(a);
    assert!(pool.wait_idle(Duration::from_secs(5)));
    let (ok, out) = ip(&["-n", &name, "link", "show", "dev", "xcgi0"]);
    assert!(!ok, "the returned TAP must be gone: {out}");
    let a2 = pool.lease().expect("re-lease");
    assert_eq!(a2.slot(), a_slot);
    assert_ne!(a2.ifindex(), a_index, "a new device, not the old one");
    let (ok, neigh) = ip(&["-n", &name, "neigh", "show", "dev", "xcgi0"]);
    assert!(ok && neigh.contains("PERMANENT"), "{neigh}");
    assert_eq!(pool.stats().leased, 2);

    let path = format!("/run/netns/{name}");
    drop(a2);
    drop(b);
    assert!(pool.wait_idle(Duration::from_secs(5)));
    assert_eq!(pool.stats().free, 2);
    drop(pool);
    assert!(!Path::new(&path).exists());
    assert!(!mounted(&path));
    let (ok, host_links) = ip(&["-o", "link", "show"]);
    assert!(ok);
    assert!(
        !host_links.lines().any(|l| l.contains(": xcgi")),
        "{host_links}"
    );
}

#[test]
fn prefilled_pool_refills_on_return() {
    let pool = pool("prefill", 4, 2);
    let name = pool.netns().name().expect("named").to_string();
    let s = pool.stats();
    assert_eq!((s.ready, s.free, s.leased), (2, 2, 0), "{s:?}");
    let (ok, links) = ip(&["-n", &name, "-o", "link", "show"]);
    assert!(
        ok && links.contains("xcgi0") && links.contains("xcgi1"),
        "{links}"
    );

    let a = pool.lease().expect("lease");
    assert_eq!(a.slot(), 0, "lowest ready slot first");
    assert_eq!(pool.stats().ready, 1);
    drop(a);
    assert!(pool.wait_idle(Duration::from_secs(5)));
    let s = pool.stats();
    assert_eq!((s.ready, s.leased), (2, 0), "{s:?}");

    // Leases beyond the ready set are created on demand.
    let leases: Vec<_> = (0..4).map(|_| pool.lease().expect("lease")).collect();
    let mut slots: Vec<_> = leases.iter().map(|l| l.slot()).collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1, 2, 3]);
    assert!(matches!(
        pool.lease(),
        Err(NetError::PoolExhausted { size: 4 })
    ));
}

#[test]
fn a_full_pool_waits_for_a_return_in_flight() {
    let pool = pool("inflight", 1, 1);
    let lease = pool.lease().expect("lease");
    let old_index = lease.ifindex();
    drop(lease);
    // The return (destroy + recreate) runs in the background; lease() waits for it rather
    // than reporting an exhausted pool.
    let again = pool.lease().expect("the returned slot");
    assert_eq!(again.slot(), 0);
    assert_ne!(again.ifindex(), old_index);
    assert_eq!(pool.stats().returning, 0);
}

#[test]
fn a_slot_whose_descriptor_is_still_open_is_not_reused() {
    let pool = pool("stuck", 1, 0);
    let name = pool.netns().name().expect("named").to_string();
    let lease = pool.lease().expect("lease");
    let dup = lease.try_clone_tap_fd().expect("dup");
    drop(lease);
    assert!(pool.wait_idle(Duration::from_secs(5)));
    // The device lives on through the duplicate, so the slot is held back.
    let (ok, out) = ip(&["-n", &name, "link", "show", "dev", "xcgi0"]);
    assert!(ok, "{out}");
    assert_eq!(pool.stats().stuck, 1);
    assert!(matches!(pool.lease(), Err(NetError::PoolExhausted { .. })));
    drop(dup);
    let again = pool
        .lease()
        .expect("slot reusable once the duplicate is closed");
    assert_eq!(again.slot(), 0);
    assert_eq!(pool.stats().stuck, 0);
}

#[test]
fn tap_name_in_use_is_reported_with_the_name() {
    let ns = NetNs::create(None).expect("create namespace");
    let (first, second) = ns
        .run(|| (Tap::create("xcgidup"), Tap::create("xcgidup")))
        .expect("run");
    let first = first.expect("first TAP");
    let err = second.expect_err("same name twice");
    assert!(
        matches!(&err, TapError::NameInUse { name } if name == "xcgidup"),
        "{err:?}"
    );
    assert!(err.to_string().contains("xcgidup"), "{err}");
    drop(first);
    // Free again once the first descriptor is closed (non-persistent).
    let again = ns.run(|| Tap::create("xcgidup")).expect("run");
    assert!(again.is_ok(), "{again:?}");
}

const CAP_NET_ADMIN: u32 = 12;

/// Removes `cap` from the calling thread's effective set (capabilities are per thread).
fn drop_effective_cap(cap: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut hdr = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a valid header and two data structs (version 3).
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()),
            0
        );
        data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()),
            0,
            "capset: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn without_cap_net_admin_the_error_says_so() {
    let ns = NetNs::create(None).expect("create namespace");
    let mut nl = ns.netlink().expect("netlink");
    let (tap, link_up) = ns
        .run(|| {
            drop_effective_cap(CAP_NET_ADMIN);
            let mut own = xcgi_net::Netlink::open().expect("netlink without cap");
            (Tap::create("xcgiperm"), own.set_link_up_by_name("lo"))
        })
        .expect("run");
    let err = tap.expect_err("TUNSETIFF without CAP_NET_ADMIN");
    assert!(matches!(err, TapError::PermissionDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
    let err = link_up.expect_err("RTM_NEWLINK without CAP_NET_ADMIN");
    assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
    // Nothing was created.
    assert!(nl.links().expect("links").iter().all(|l| l.name == "lo"));
}

#[test]
fn bad_configs_are_refused_before_touching_the_kernel() {
    let ns = Arc::new(NetNs::create(None).expect("create namespace"));
    let too_big = PoolConfig {
        size: 20_000,
        ..PoolConfig::default()
    };
    let err = Pool::new(Arc::clone(&ns), too_big).expect_err("does not fit a /16");
    assert!(matches!(err, NetError::Addr(_)), "{err:?}");
    let prefill = PoolConfig {
        size: 2,
        prefill: 3,
        ..PoolConfig::default()
    };
    assert!(matches!(
        Pool::new(ns, prefill),
        Err(NetError::PrefillTooLarge { .. })
    ));
}

#[test]
fn a_lease_outliving_its_pool_keeps_the_namespace_until_dropped() {
    let pool = pool("outlive", 2, 2);
    let name = pool.netns().name().expect("named").to_string();
    let path = format!("/run/netns/{name}");
    let lease = pool.lease().expect("lease");
    drop(pool);
    // The unused ready TAP is gone; the leased one and the namespace live on.
    assert!(mounted(&path));
    let (ok, links) = ip(&["-n", &name, "-o", "link", "show"]);
    assert!(ok, "{links}");
    assert!(links.contains(&format!(": {}:", lease.ifname())), "{links}");
    assert_eq!(links.matches(": xcgi").count(), 1, "{links}");
    drop(lease);
    assert!(!Path::new(&path).exists());
    assert!(!mounted(&path));
}

#[test]
fn concurrent_leases_and_returns_keep_the_books_straight() {
    let pool = pool("busy", 6, 2);
    let name = pool.netns().name().expect("named").to_string();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..15 {
                    let lease = pool.lease().expect("lease under contention");
                    assert!(lease.slot() < 6);
                    drop(lease);
                }
            });
        }
    });
    assert!(pool.wait_idle(Duration::from_secs(10)));
    let s = pool.stats();
    assert_eq!((s.leased, s.stuck, s.returning), (0, 0, 0), "{s:?}");
    assert_eq!(s.ready + s.free, 6, "{s:?}");
    assert!(s.ready >= 2, "{s:?}");
    // Exactly the ready TAPs exist in the namespace.
    let (ok, links) = ip(&["-n", &name, "-o", "link", "show"]);
    assert!(ok, "{links}");
    assert_eq!(links.matches(": xcgi").count() as u32, s.ready, "{links}");
    let (ok, neigh) = ip(&["-n", &name, "neigh", "show"]);
    assert!(ok);
    assert_eq!(
        neigh.matches("PERMANENT").count() as u32,
        s.ready,
        "{neigh}"
    );
}
