//! virtio-net against a datagram socket pair standing in for the TAP (and a real TAP where
//! the host allows one).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::fmt_mac;
use super::*;
use crate::devices::virtio::mmio::regs::{
    CONFIG_SPACE_OFFSET as CONFIG, DRIVER_FEATURES, DRIVER_FEATURES_SEL, INTERRUPT_STATUS,
    QUEUE_NOTIFY, QUEUE_NUM, STATUS,
};
use crate::devices::virtio::testing::{
    assert_identity, bring_up, count_warnings, eventfd, memory, r, read_reg, socket_device_tests,
    w, wait_for, warning_bound, write_reg, Desc, DriverQueue, Fixture, SocketDevice, POISON,
    QUEUE_BASE, RX_BUF, TXQ_BASE, TX_BUF,
};
use crate::devices::virtio::{MmioTransport, VirtioDevice};
use crate::devices::MmioDevice;

const MAC: [u8; 6] = [0x02, 0x78, 0x63, 0x67, 0x69, 0x01];
/// The transmit header of a driver that negotiated no offloads.
const NO_OFFLOAD: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl SocketDevice for Net {
    type Socket = UnixDatagram;
    const SOCKET_TYPE: libc::c_int = libc::SOCK_DGRAM;

    fn attach(socket: OwnedFd, mem: GuestMemoryMmap) -> MmioTransport<Net> {
        attach_net(socket, MAC, mem, eventfd(), None).expect("net")
    }
}

/// A `virtio_net_hdr_v1` from its fields (little-endian).
fn vnet_hdr(
    flags: u8,
    gso_type: u8,
    [hdr_len, gso_size, csum_start, csum_offset, num_buffers]: [u16; 5],
) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    for (i, v) in [hdr_len, gso_size, csum_start, csum_offset, num_buffers]
        .into_iter()
        .enumerate()
    {
        h[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
    }
    h
}

/// Headers a hostile guest might send with no offload negotiated, each with whether it
/// carries offload metadata (`num_buffers` alone does not count).
fn bogus_headers() -> Vec<([u8; VNET_HDR_LEN], bool)> {
    const NEEDS_CSUM: u8 = 1;
    const DATA_VALID: u8 = 2;
    const GSO_TCPV4: u8 = 1;
    const GSO_UDP_L4: u8 = 5;
    const GSO_ECN: u8 = 0x80;
    vec![
        // TSO of a frame that is no TCP segment, 1-byte segments, header past the end.
        (
            vnet_hdr(NEEDS_CSUM, GSO_TCPV4, [0xffff, 1, 14, 16, 0]),
            true,
        ),
        // A checksum to put far past the frame.
        (vnet_hdr(NEEDS_CSUM, 0, [0, 0, 0xfff0, 0xffff, 0]), true),
        // Unknown GSO type and flags, ECN, USO with gso_size 0.
        (vnet_hdr(0xff, 0x7f, [14, 0, 0, 0, 0]), true),
        (
            vnet_hdr(DATA_VALID, GSO_UDP_L4 | GSO_ECN, [42, 0, 0, 0, 0]),
            true,
        ),
        // Only num_buffers, which means nothing on transmit: zeroed too.
        (vnet_hdr(0, 0, [0, 0, 0, 0, 0x1234]), false),
    ]
}

fn header(seed: u8) -> [u8; VNET_HDR_LEN] {
    std::array::from_fn(|i| seed.wrapping_add(i as u8))
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A header and a frame, as one datagram / one TAP read.
fn packet(hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Vec<u8> {
    [&hdr[..], frame].concat()
}

/// A device on a datagram socket pair.
type NetFixture = Fixture<Net>;

impl Fixture<Net> {
    fn stats(&self) -> NetStats {
        self.t.lock().device().stats()
    }

    /// Next datagram the device sent, if any.
    fn sent(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match self.peer.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

// The shared tests; frames wait in the TAP while the device is reset.
socket_device_tests!(Net, rx_data: packet(&header(7), &payload(60, 7)));

#[test]
fn identity_features_and_config() {
    let mut f = NetFixture::unstarted();
    let t = &mut f.t;
    // VERSION_1 and MAC only.
    let features = (1 << 32) | (1 << VIRTIO_NET_F_MAC);
    assert_identity(t, 1, features, &[256, 256]);
    // The MAC, with any access size; nothing after it.
    assert_eq!(
        read_reg(t, CONFIG),
        u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]])
    );
    let mut two = [0u8; 2];
    t.read(CONFIG + 4, &mut two);
    assert_eq!(two, [MAC[4], MAC[5]]);
    for (i, &b) in MAC.iter().enumerate() {
        let mut one = [0u8; 1];
        t.read(CONFIG + i as u64, &mut one);
        assert_eq!(one, [b]);
    }
    let mut eight = [0xffu8; 8];
    t.read(CONFIG, &mut eight);
    assert_eq!(
        eight,
        [MAC[0], MAC[1], MAC[2], MAC[3], MAC[4], MAC[5], 0, 0]
    );
    assert_eq!(read_reg(t, CONFIG + 6), 0);
    // Read-only.
    t.write(CONFIG, &[0xff; 6]);
    t.read(CONFIG, &mut eight);
    assert_eq!(&eight[..6], &MAC);
    assert_eq!(t.lock().device().mac(), MAC);
    assert!(!f.has_worker());
}

#[test]
fn new_checks_mac_and_makes_the_fd_nonblocking() {
    for bad in [[0x03, 0, 0, 0, 0, 1], [0; 6], [0xff; 6]] {
        let (dev, _peer) = UnixDatagram::pair().expect("socketpair");
        match Net::new(OwnedFd::from(dev), bad) {
            Err(e @ NetError::InvalidMac(_)) => {
                assert!(e.to_string().contains(&fmt_mac(&bad)), "{e}");
            }
            other => panic!("MAC {bad:?} accepted: {:?}", other.map(|n| n.mac())),
        }
    }
    let (dev, _peer) = UnixDatagram::pair().expect("socketpair");
    let probe = dev.try_clone().expect("clone");
    let flags = || {
        // SAFETY: F_GETFL on a descriptor we own.
        unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_GETFL) }
    };
    assert_eq!(flags() & libc::O_NONBLOCK, 0);
    let net = Net::new(OwnedFd::from(dev), MAC).expect("net");
    assert_ne!(flags() & libc::O_NONBLOCK, 0);
    assert_eq!(net.stats(), NetStats::default());
}

#[test]
fn tx_frames_reach_the_tap_intact() {
    let mut f = NetFixture::new();
    // Header and frame in separate descriptors, the frame itself split too. The headers
    // are what a driver without offloads sends: zeros.
    let hdr1 = NO_OFFLOAD;
    let frame1 = payload(60, 1);
    f.put(TX_BUF, &hdr1);
    f.put(TX_BUF + 0x100, &frame1[..20]);
    f.put(TX_BUF + 0x200, &frame1[20..]);
    let head1 = f
        .txq
        .add_chain(&[r(TX_BUF, 12), r(TX_BUF + 0x100, 20), r(TX_BUF + 0x200, 40)]);
    // Header and frame in one descriptor.
    let hdr2 = NO_OFFLOAD;
    let frame2 = payload(1514, 2);
    let both = packet(&hdr2, &frame2);
    f.put(TX_BUF + 0x1000, &both);
    let head2 = f.txq.add_chain(&[r(TX_BUF + 0x1000, both.len() as u32)]);
    f.notify(TX_QUEUE);

    assert_eq!(f.sent(), Some(packet(&hdr1, &frame1)));
    assert_eq!(f.sent(), Some(both));
    assert_eq!(f.sent(), None);
    assert_eq!(f.txq.used_idx(), 2);
    assert_eq!(f.txq.used_elem(0), (u32::from(head1), 0));
    assert_eq!(f.txq.used_elem(1), (u32::from(head2), 0));
    assert_eq!(read_reg(&mut f.t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert!(f.irq_fired());
    let stats = f.stats();
    assert_eq!((stats.tx_frames, stats.tx_bytes), (2, 60 + 1514));
    assert_eq!(
        stats.tx_malformed + stats.tx_dropped + stats.tx_header_ignored,
        0
    );
    // TX used nothing of the receive side.
    assert_eq!(f.rxq.used_idx(), 0);
}

#[test]
fn malformed_tx_chains_are_returned_unsent() {
    let mut f = NetFixture::new();
    let malformed = f.send_malformed_tx(&[
        // Shorter than the header.
        &[r(TX_BUF, 8)],
        // Longer than any frame.
        &[r(TX_BUF, 12), r(TX_BUF + 0x100, 0x2_0000)],
    ]);
    assert_eq!(f.sent(), None);
    let stats = f.stats();
    assert_eq!((stats.tx_malformed, stats.tx_frames), (malformed, 0));

    // The queue still works.
    let good = packet(&NO_OFFLOAD, &payload(64, 9));
    f.put(TX_BUF, &good);
    f.txq.add_chain(&[r(TX_BUF, good.len() as u32)]);
    f.notify(TX_QUEUE);
    assert_eq!(f.sent(), Some(good));
    assert_eq!(f.stats().tx_frames, 1);
}

#[test]
fn guest_tx_header_never_reaches_the_tap() {
    let mut f = NetFixture::new();
    let headers = bogus_headers();
    let frame = payload(60, 4);
    let mut expected_ignored = 0;
    for (i, (hdr, offload)) in headers.iter().enumerate() {
        expected_ignored += u64::from(*offload);
        let at = TX_BUF + i as u64 * 0x1000;
        f.put(at, &packet(hdr, &frame));
        // The same bytes in different layouts: the header alone, header and frame in one
        // descriptor, the header split over three (one of them empty).
        let layouts: [&[Desc]; 3] = [
            &[r(at, 12), r(at + 12, 60)],
            &[r(at, 72)],
            &[r(at, 5), r(at + 5, 0), r(at + 5, 30), r(at + 35, 37)],
        ];
        for chain in layouts {
            f.txq.add_chain(chain);
            f.notify(TX_QUEUE);
            assert_eq!(
                f.sent(),
                Some(packet(&[0; VNET_HDR_LEN], &frame)),
                "header {i} in {} descriptors",
                chain.len()
            );
        }
    }
    assert_eq!(f.sent(), None);
    let stats = f.stats();
    let sent = 3 * headers.len() as u64;
    assert_eq!((stats.tx_frames, stats.tx_bytes), (sent, sent * 60));
    assert_eq!(stats.tx_header_ignored, 3 * expected_ignored);
    assert_eq!(stats.tx_malformed + stats.tx_dropped, 0);
    // The guest's buffers are left as they were (they are device-readable only).
    assert_eq!(f.bytes(TX_BUF, 12), headers[0].0);
}

#[test]
fn no_offload_is_offered_or_can_be_negotiated() {
    let mut f = NetFixture::unstarted();
    let t = &mut f.t;
    assert_eq!(t.lock().device().info().features & HEADER_FEATURES, 0);
    // A driver that accepts an offload anyway does not get FEATURES_OK.
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_HOST_USO,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        let features = OFFERED_FEATURES | (1 << bit);
        write_reg(t, STATUS, 0);
        write_reg(t, STATUS, 1);
        write_reg(t, STATUS, 3);
        for sel in 0..2 {
            write_reg(t, DRIVER_FEATURES_SEL, sel);
            write_reg(t, DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        write_reg(t, STATUS, 11);
        assert_eq!(read_reg(t, STATUS), 3, "feature bit {bit} accepted");
    }
}

#[test]
fn a_misbehaving_guest_gets_a_bounded_number_of_warnings() {
    let mut f = NetFixture::new();
    let (bogus, _) = bogus_headers()[0];
    f.put(TX_BUF, &packet(&bogus, &payload(60, 5)));
    const ROUNDS: usize = 3_000;
    let start = Instant::now();
    let (lines, ()) = count_warnings(|| {
        for _ in 0..ROUNDS {
            f.notify(7); // no such queue
            write_reg(&mut f.t, QUEUE_NUM, 3); // queue set-up after DRIVER_OK
            f.txq.add_chain(&[w(TX_BUF, 64)]); // device-writable TX buffer
            f.txq.add_chain(&[r(TX_BUF, 8)]); // shorter than a header
            f.txq.add_chain(&[r(TX_BUF, 72)]); // offload metadata in the header
            f.notify(TX_QUEUE);
            assert!(f.sent().is_some());
        }
    });
    let elapsed = start.elapsed();
    assert!(
        lines <= warning_bound(elapsed),
        "{lines} lines in {elapsed:?} for {ROUNDS} rounds"
    );
    let stats = f.stats();
    assert_eq!(stats.tx_malformed, 2 * ROUNDS as u64);
    assert_eq!(stats.tx_header_ignored, ROUNDS as u64);
    assert_eq!(stats.tx_frames, ROUNDS as u64);
    // Still a working device.
    let frame = packet(&NO_OFFLOAD, &payload(60, 6));
    f.put(TX_BUF, &frame);
    f.txq.add_chain(&[r(TX_BUF, 72)]);
    f.notify(TX_QUEUE);
    assert_eq!(f.sent(), Some(frame));
}

#[test]
fn full_tap_drops_tx_frames_instead_of_blocking() {
    let mut f = NetFixture::new();
    // Fill the peer's receive queue through the device's own (non-blocking) socket.
    let filler = [0x55u8; 100];
    let mut queued = 0;
    loop {
        match f.device_end.send(&filler) {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("send: {e}"),
        }
        assert!(queued < 100_000, "socket never filled up");
    }
    let frame = packet(&NO_OFFLOAD, &payload(60, 3));
    f.put(TX_BUF, &frame);
    let head = f.txq.add_chain(&[r(TX_BUF, frame.len() as u32)]);
    f.notify(TX_QUEUE); // returns: the vCPU is not blocked
    assert_eq!(f.txq.used_idx(), 1);
    assert_eq!(f.txq.used_elem(0), (u32::from(head), 0));
    let stats = f.stats();
    assert_eq!((stats.tx_dropped, stats.tx_frames), (1, 0));
    // Only the filler was queued.
    for _ in 0..queued {
        assert_eq!(f.sent().as_deref(), Some(&filler[..]));
    }
    assert_eq!(f.sent(), None);
    // With room again, frames go through.
    f.txq.add_chain(&[r(TX_BUF, frame.len() as u32)]);
    f.notify(TX_QUEUE);
    assert_eq!(f.sent(), Some(frame));
    assert_eq!(f.stats().tx_frames, 1);
    // The same numbers through a reader taken from the device.
    let reader = f.t.lock().device().stats_reader();
    assert_eq!(reader.get(), f.stats());
}

#[test]
fn rx_frame_lands_in_a_posted_buffer() {
    let mut f = NetFixture::new();
    // The header straddles two descriptors (num_buffers is in the second one).
    let head = f.post_rx(&[w(RX_BUF, 8), w(RX_BUF + 0x100, 2000)]);
    // As a TAP would write it: num_buffers (bytes 10-11) is the device's to fill.
    let mut hdr = header(0x20);
    hdr[10..].copy_from_slice(&[0xab, 0xcd]);
    let frame = payload(98, 5);
    f.peer.send(&packet(&hdr, &frame)).expect("send");

    wait_for("the frame to be used", || f.rxq.used_idx() == 1);
    assert_eq!(f.rxq.used_elem(0), (u32::from(head), 110));
    // Taken from the TAP.
    assert_eq!(f.waiting_for_device(), 0);
    assert_eq!(f.bytes(RX_BUF, 8), hdr[..8]);
    assert_eq!(f.bytes(RX_BUF + 0x100, 4), [hdr[8], hdr[9], 1, 0]);
    assert_eq!(f.bytes(RX_BUF + 0x104, 98), frame);
    // Nothing written past the frame.
    assert_eq!(f.bytes(RX_BUF + 0x104 + 98, 16), [POISON; 16]);
    wait_for("the interrupt", || f.irq_fired());
    assert_ne!(
        read_reg(&mut f.t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        0
    );
    let stats = f.stats();
    assert_eq!((stats.rx_frames, stats.rx_bytes), (1, 98));
}

#[test]
fn rx_frames_wait_in_the_tap_until_buffers_are_posted() {
    let mut f = NetFixture::new();
    let a = packet(&header(1), &payload(60, 1));
    let b = packet(&header(2), &payload(70, 2));
    f.peer.send(&a).expect("send a");
    f.peer.send(&b).expect("send b");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.rxq.used_idx(), 0);
    assert!(!f.irq_fired());
    // Still in the TAP, not read and lost.
    assert_eq!(f.waiting_for_device(), a.len());

    let head = f.post_rx(&[w(RX_BUF, 2048)]);
    wait_for("frame a", || f.rxq.used_idx() == 1);
    assert_eq!(f.rxq.used_elem(0), (u32::from(head), a.len() as u32));
    assert_eq!(f.bytes(RX_BUF + 12, 60), a[12..]);
    wait_for("the interrupt", || f.irq_fired());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(f.rxq.used_idx(), 1);
    assert_eq!(f.waiting_for_device(), b.len());

    let head = f.post_rx(&[w(RX_BUF + 0x1000, 2048)]);
    wait_for("frame b", || f.rxq.used_idx() == 2);
    assert_eq!(f.rxq.used_elem(1), (u32::from(head), b.len() as u32));
    assert_eq!(f.bytes(RX_BUF + 0x1000 + 12, 70), b[12..]);
    assert_eq!(f.waiting_for_device(), 0);
    assert_eq!(f.stats().rx_frames, 2);
}

#[test]
fn rx_frame_larger_than_the_buffer_is_dropped() {
    let mut f = NetFixture::new();
    let head = f.post_rx(&[w(RX_BUF, 40), w(RX_BUF + 0x100, 60)]);
    let big = packet(&header(1), &payload(89, 1)); // 101 bytes: one too many
    let exact = packet(&header(2), &payload(88, 2)); // 100 bytes: fits exactly
    f.peer.send(&big).expect("send big");
    f.peer.send(&exact).expect("send exact");
    wait_for("the fitting frame", || f.rxq.used_idx() == 1);
    // The same chain, reused for the frame that fits.
    assert_eq!(f.rxq.used_elem(0), (u32::from(head), 100));
    assert_eq!(f.bytes(RX_BUF + 12, 28), exact[12..40]);
    assert_eq!(f.bytes(RX_BUF + 0x100, 60), exact[40..]);
    let stats = f.stats();
    assert_eq!((stats.rx_dropped, stats.rx_frames), (1, 1));
    assert_eq!(f.waiting_for_device(), 0);
}

#[test]
fn malformed_rx_chains_are_returned_unused() {
    let mut f = NetFixture::new();
    let frame = packet(&header(3), &payload(60, 3));
    // No room for the header.
    let malformed = f.post_malformed_rx(&[&[w(RX_BUF, 8)]], &frame);
    assert_eq!(f.bytes(RX_BUF + 0x2000 + 12, 60), frame[12..]);
    let stats = f.stats();
    assert_eq!((stats.rx_malformed, stats.rx_frames), (malformed, 1));
}

#[test]
fn many_frames_cross_batches_in_order() {
    let mut f = NetFixture::unstarted();
    // A bigger receive queue than one batch.
    f.rxq = DriverQueue::new(&f.mem, QUEUE_BASE, 128);
    f.start();
    let heads: Vec<u16> = (0..128u64)
        .map(|i| f.rxq.add_chain(&[w(RX_BUF + i * 0x100, 0x100)]))
        .collect();
    f.notify(RX_QUEUE);
    f.peer.set_nonblocking(false).expect("blocking");
    f.peer
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // More than one batch, fewer than the 128 buffers.
    let count = (RX_BATCH + 50) as u16;
    let packets: Vec<Vec<u8>> = (0..count)
        .map(|i| packet(&header(i as u8), &payload(50 + usize::from(i), i as u8)))
        .collect();
    for p in &packets {
        f.peer.send(p).expect("send");
    }
    wait_for("every frame", || f.rxq.used_idx() == count);
    for (i, p) in packets.iter().enumerate() {
        let (id, len) = f.rxq.used_elem(i as u16);
        assert_eq!(
            (id, len),
            (u32::from(heads[i]), p.len() as u32),
            "frame {i}"
        );
        let at = RX_BUF + i as u64 * 0x100;
        assert_eq!(f.bytes(at + 12, p.len() - 12), p[12..], "frame {i}");
    }
    assert_eq!(f.stats().rx_frames, u64::from(count));
}

/// A real TAP (needs root and /dev/net/tun; skipped otherwise): TX reaches the host
/// interface, RX from it reaches the guest.
#[test]
fn real_tap_round_trip() {
    let Some(tap) = RealTap::open() else {
        eprintln!("skipped: cannot create a TAP (needs CAP_NET_ADMIN and /dev/net/tun)");
        return;
    };
    // Until the header size is set the device refuses it (the default is 10).
    let dup = tap.fd.as_fd().try_clone_to_owned().expect("dup");
    assert!(matches!(Net::new(dup, MAC), Err(NetError::VnetHdrSize(10))));
    tap.configure();
    let Some(sock) = tap.packet_socket() else {
        eprintln!("skipped: cannot bring the TAP up or open a packet socket");
        return;
    };

    let mem = memory();
    let mut t = attach_net(tap.fd, MAC, mem.clone(), eventfd(), None).expect("net on a real TAP");
    let mut rxq = DriverQueue::new(&mem, QUEUE_BASE, 16);
    let mut txq = DriverQueue::new(&mem, TXQ_BASE, 16);
    bring_up(&mut t, &[&rxq, &txq]);
    assert!(t.lock().is_activated());
    real_tap_tx(&mut t, &mem, &mut txq, &sock);
    real_tap_rx(&mut t, &mem, &mut rxq, &sock);
}

/// A 60-byte Ethernet frame of the test ethertype, from `src` to `dst`, carrying `text`.
fn test_frame(dst: [u8; 6], src: [u8; 6], text: &[u8]) -> Vec<u8> {
    let mut frame = [dst, src].concat();
    frame.extend_from_slice(&ETH_P_TEST.to_be_bytes());
    frame.extend_from_slice(text);
    frame.resize(60, 0);
    frame
}

/// [`real_tap_round_trip`]'s transmit half: frames the guest sends reach the host's packet
/// socket, whatever header the guest put in front of them.
fn real_tap_tx(
    t: &mut MmioTransport<Net>,
    mem: &GuestMemoryMmap,
    txq: &mut DriverQueue,
    sock: &PacketSocket,
) {
    // A broadcast frame.
    let frame = test_frame([0xff; 6], MAC, b"xcgi virtio-net tx");
    let pkt = packet(&[0; VNET_HDR_LEN], &frame);
    mem.write_slice(&pkt, GuestAddress(TX_BUF)).expect("write");
    txq.add_chain(&[r(TX_BUF, 12), r(TX_BUF + 12, frame.len() as u32)]);
    write_reg(t, QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(txq.used_idx(), 1);
    assert_eq!(t.lock().device().stats().tx_frames, 1);
    let got = sock.recv_matching(|f| f[12..14] == ETH_P_TEST.to_be_bytes());
    assert_eq!(got, frame);

    // Offload metadata the guest was never offered does not reach the kernel: frames with
    // headers it would refuse (or act on) go out as plain frames.
    for (i, (hdr, _)) in bogus_headers().iter().enumerate() {
        let mut tagged = frame.clone();
        tagged[14] = i as u8;
        let pkt = packet(hdr, &tagged);
        let at = TX_BUF + 0x1000 * (1 + i as u64);
        mem.write_slice(&pkt, GuestAddress(at)).expect("write");
        txq.add_chain(&[r(at, pkt.len() as u32)]);
        write_reg(t, QUEUE_NOTIFY, TX_QUEUE as u32);
        let got = sock.recv_matching(|f| f[12..14] == ETH_P_TEST.to_be_bytes());
        assert_eq!(got, tagged, "header {i}");
    }
    let stats = t.lock().device().stats();
    assert_eq!(stats.tx_frames, 1 + bogus_headers().len() as u64);
    assert_eq!(stats.tx_dropped, 0);
}

/// [`real_tap_round_trip`]'s receive half: the host sends to the guest's MAC; the TAP hands
/// it to the worker, which puts it in a receive buffer with an all-zero header.
fn real_tap_rx(
    t: &mut MmioTransport<Net>,
    mem: &GuestMemoryMmap,
    rxq: &mut DriverQueue,
    sock: &PacketSocket,
) {
    for i in 0..8 {
        rxq.add_chain(&[w(RX_BUF + i * 0x1000, 2048)]);
    }
    write_reg(t, QUEUE_NOTIFY, RX_QUEUE as u32);
    let reply = test_frame(MAC, [0x02, 0, 0, 0, 0, 0x99], b"xcgi virtio-net rx");
    sock.send(&reply);
    // The host may send other frames (IPv6 chatter) too: look for ours.
    let find = || {
        (0..rxq.used_idx()).find_map(|i| {
            let (id, len) = rxq.used_elem(i);
            let at = RX_BUF + u64::from(id) * 0x1000;
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(at)).ok()?;
            (buf.get(VNET_HDR_LEN..) == Some(&reply[..])).then_some(buf)
        })
    };
    wait_for("the host's frame in the guest", || find().is_some());
    let buf = find().expect("found");
    // No offloads: an all-zero header, num_buffers 1.
    assert_eq!(buf[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
}

const ETH_P_TEST: u16 = 0x88b5;

struct RealTap {
    fd: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
}

impl RealTap {
    fn open() -> Option<RealTap> {
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain old data.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"xcgit%d") {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return None;
        }
        Some(RealTap {
            fd,
            name: ifr.ifr_name,
        })
    }

    /// Header size 12, no offloads, as the host-networking code does.
    fn configure(&self) {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        assert_eq!(rc, 0, "TUNSETVNETHDRSZ: {}", io::Error::last_os_error());
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, 0) };
        assert_eq!(rc, 0, "TUNSETOFFLOAD: {}", io::Error::last_os_error());
    }

    fn name(&self) -> String {
        self.name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect()
    }

    /// Bring the interface up (without IPv6, to keep it quiet) and open a packet socket on
    /// it for our ethertype.
    fn packet_socket(&self) -> Option<PacketSocket> {
        let name = self.name();
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // SAFETY: plain socket calls on descriptors we own, with valid ifreq pointers.
        unsafe {
            let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if ctl < 0 {
                return None;
            }
            let ctl = OwnedFd::from_raw_fd(ctl);
            let mut ifr: libc::ifreq = std::mem::zeroed();
            ifr.ifr_name = self.name;
            if libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
                return None;
            }
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
            if libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr) < 0 {
                return None;
            }
            let index = libc::if_nametoindex(self.name.as_ptr());
            let proto = ETH_P_TEST.to_be();
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            );
            if fd < 0 || index == 0 {
                return None;
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc < 0 {
                return None;
            }
            let timeout = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Some(PacketSocket { fd, addr })
        }
    }
}

struct PacketSocket {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
}

impl PacketSocket {
    fn recv_matching(&self, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        loop {
            let mut buf = vec![0u8; 2048];
            // SAFETY: recv into a valid buffer of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n >= 0, "packet recv: {}", io::Error::last_os_error());
            buf.truncate(n as usize);
            if buf.len() >= 14 && want(&buf) {
                return buf;
            }
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send a valid buffer to a valid sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(self.addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "packet send: {}",
            io::Error::last_os_error()
        );
    }
}
