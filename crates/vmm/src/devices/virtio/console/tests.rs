//! virtio-console against a stream socket pair, as the gateway connects it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::devices::virtio::mmio::regs::{
    CONFIG_SPACE_OFFSET as CONFIG_SPACE, INTERRUPT_STATUS, STATUS,
};
use crate::devices::virtio::testing::{
    assert_identity, eventfd, r, read_reg, socket_device_tests, task_alive, w, wait_for, write_reg,
    Desc, Fixture, SocketDevice, POISON, RX_BUF, TX_BUF,
};
use crate::devices::virtio::MmioTransport;
use crate::devices::MmioDevice;

impl SocketDevice for VirtioConsole {
    type Socket = UnixStream;
    const SOCKET_TYPE: libc::c_int = libc::SOCK_STREAM;

    fn attach(socket: OwnedFd, mem: GuestMemoryMmap) -> MmioTransport<VirtioConsole> {
        attach_console(socket, mem, eventfd()).expect("console")
    }
}

/// A device on a stream socket pair, as the gateway connects it.
type ConsoleFixture = Fixture<VirtioConsole>;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn is_nonblocking(fd: RawFd) -> bool {
    // SAFETY: F_GETFL on a descriptor the caller owns.
    unsafe { libc::fcntl(fd, libc::F_GETFL) & libc::O_NONBLOCK != 0 }
}

impl Fixture<VirtioConsole> {
    fn stats(&self) -> ConsoleStats {
        self.t.lock().device().stats()
    }

    /// The device's stop flag.
    fn stopper(&self) -> ConsoleStopper {
        self.t.lock().device().stopper()
    }

    /// Everything the device sent that the peer can read now.
    fn sent(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 0x1_0000];
        loop {
            match self.peer.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Fill the socket towards the peer until it takes no more; returns the bytes queued.
    fn fill_towards_peer(&mut self) -> usize {
        let filler = [0x55u8; 4096];
        let mut queued = 0;
        loop {
            match self.device_end.write(&filler) {
                Ok(n) => queued += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return queued,
                Err(e) => panic!("write: {e}"),
            }
            assert!(queued < 64 << 20, "socket never filled up");
        }
    }
}

// The shared tests; bytes wait in the socket while the device is reset.
socket_device_tests!(VirtioConsole, rx_data: *b"after reset");

#[test]
fn identity_features_and_config() {
    let mut f = ConsoleFixture::unstarted();
    let t = &mut f.t;
    // VERSION_1 only: no SIZE, MULTIPORT, EMERG_WRITE.
    assert_identity(t, 3, 1 << 32, &[256, 256]);
    // 12 bytes of zeros, read-only, and zeros beyond.
    let mut config = [0xffu8; 16];
    t.read(CONFIG_SPACE, &mut config);
    assert_eq!(config, [0; 16]);
    t.write(CONFIG_SPACE, &[0xff; 12]);
    t.write(CONFIG_SPACE + 4, &7u32.to_le_bytes());
    let mut config = [0xffu8; 12];
    t.read(CONFIG_SPACE, &mut config);
    assert_eq!(config, [0; 12]);
    assert_eq!(read_reg(t, CONFIG_SPACE + 8), 0);
    assert!(!f.has_worker());
    assert_eq!(f.stats(), ConsoleStats::default());
}

#[test]
fn new_refuses_non_stream_descriptors_and_makes_the_fd_nonblocking() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: descriptors we just created and own.
    let (read_end, _write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    match VirtioConsole::new(read_end) {
        Err(e @ ConsoleError::NotASocket) => assert!(e.to_string().contains("not a socket")),
        Err(e) => panic!("pipe refused for another reason: {e}"),
        Ok(_) => panic!("a pipe was accepted"),
    }

    let (dgram, _peer) = UnixDatagram::pair().expect("socketpair");
    match VirtioConsole::new(OwnedFd::from(dgram)) {
        Err(e @ ConsoleError::NotStream(libc::SOCK_DGRAM)) => {
            assert!(e.to_string().contains("SOCK_DGRAM"), "{e}");
        }
        Err(e) => panic!("datagram socket refused for another reason: {e}"),
        Ok(_) => panic!("a datagram socket was accepted"),
    }

    let (dev, _peer) = UnixStream::pair().expect("socketpair");
    let probe = dev.try_clone().expect("clone");
    assert!(!is_nonblocking(probe.as_raw_fd()));
    let console = VirtioConsole::new(OwnedFd::from(dev)).expect("console");
    assert!(is_nonblocking(probe.as_raw_fd()));
    assert_eq!(console.stats(), ConsoleStats::default());
    assert!(!console.stopper().is_stopped());
}

#[test]
fn tx_bytes_reach_the_peer_intact_and_in_order() {
    let mut f = ConsoleFixture::new();
    let data = pattern(3000, 1);
    // One chain in three descriptors (an empty one among them), then two single ones.
    f.put(TX_BUF, &data[..100]);
    f.put(TX_BUF + 0x1000, &data[100..1100]);
    f.put(TX_BUF + 0x2000, &data[1100..2000]);
    f.put(TX_BUF + 0x3000, &data[2000..2001]);
    f.put(TX_BUF + 0x4000, &data[2001..]);
    let heads = [
        f.txq.add_chain(&[
            r(TX_BUF, 100),
            r(TX_BUF + 0x1000, 1000),
            r(TX_BUF + 0x5000, 0),
            r(TX_BUF + 0x2000, 900),
        ]),
        f.txq.add_chain(&[r(TX_BUF + 0x3000, 1)]),
        f.txq.add_chain(&[r(TX_BUF + 0x4000, 999)]),
    ];
    f.notify(TX_QUEUE);
    assert_eq!(f.txq.used_idx(), 3);
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(f.txq.used_elem(i as u16), (u32::from(*head), 0));
    }
    assert_eq!(read_reg(&mut f.t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert!(f.irq_fired());
    assert_eq!(f.sent(), data);

    // A later notify continues the stream.
    let more = pattern(500, 9);
    f.put(TX_BUF + 0x6000, &more);
    f.txq.add_chain(&[r(TX_BUF + 0x6000, 500)]);
    f.notify(TX_QUEUE);
    assert_eq!(f.sent(), more);
    let stats = f.stats();
    assert_eq!(stats.tx_bytes, 3500);
    assert_eq!(stats.tx_discarded_bytes + stats.tx_malformed, 0);
    // TX used nothing of the receive side.
    assert_eq!(f.rxq.used_idx(), 0);
}

#[test]
fn tx_larger_than_the_socket_buffer_waits_for_the_reader() {
    let mut f = ConsoleFixture::new();
    // 384 KiB in twelve descriptors: more than a Unix socket buffers, so the sends are
    // partial and the vCPU waits for the reader in between.
    let data = pattern(12 * 0x8000, 3);
    f.put(TX_BUF, &data);
    let chain: Vec<Desc> = (0..12).map(|i| r(TX_BUF + i * 0x8000, 0x8000)).collect();
    let head = f.txq.add_chain(&chain);
    let mut reader = f.peer.try_clone().expect("clone");
    let total = data.len();
    let got = thread::scope(|s| {
        let handle = s.spawn(move || {
            let mut got = Vec::with_capacity(total);
            let mut buf = vec![0u8; 0x1000];
            while got.len() < total {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("read: {e}"),
                }
            }
            got
        });
        f.notify(TX_QUEUE);
        handle.join().expect("reader")
    });
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the stream arrived altered");
    assert_eq!(f.txq.used_elem(0), (u32::from(head), 0));
    assert_eq!(f.stats().tx_bytes, data.len() as u64);
}

#[test]
fn tx_blocked_on_a_full_socket_is_released_by_the_stopper() {
    let mut f = ConsoleFixture::new();
    let queued = f.fill_towards_peer();
    let data = pattern(100, 5);
    f.put(TX_BUF, &data);
    let head = f.txq.add_chain(&[r(TX_BUF, 60), r(TX_BUF + 60, 40)]);
    let stopper = f.stopper();
    let (started, stopped_at) = thread::scope(|s| {
        let handle = s.spawn(move || {
            thread::sleep(Duration::from_millis(150));
            let at = Instant::now();
            stopper.stop();
            at
        });
        let started = Instant::now();
        f.notify(TX_QUEUE); // blocks until the stop flag is set
        let returned = Instant::now();
        let stopped_at = handle.join().expect("stopper thread");
        assert!(
            returned.duration_since(stopped_at) < Duration::from_millis(500),
            "the vCPU was released {:?} after the stop",
            returned.duration_since(stopped_at)
        );
        (started, stopped_at)
    });
    assert!(stopped_at.duration_since(started) >= Duration::from_millis(100));
    assert_eq!(f.txq.used_idx(), 1);
    assert_eq!(f.txq.used_elem(0), (u32::from(head), 0));
    let stats = f.stats();
    assert_eq!(
        (stats.tx_abandoned, stats.tx_discarded_bytes, stats.tx_bytes),
        (1, 100, 0)
    );
    assert!(f.stopper().is_stopped());

    // Only the filler got through. With room again, stopped or not, bytes still go out.
    assert_eq!(f.sent().len(), queued);
    f.txq.add_chain(&[r(TX_BUF, 100)]);
    f.notify(TX_QUEUE);
    assert_eq!(f.sent(), data);
    // Full again: once stopped, nothing waits at all.
    f.fill_towards_peer();
    f.txq.add_chain(&[r(TX_BUF, 100)]);
    let t0 = Instant::now();
    f.notify(TX_QUEUE);
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_eq!(f.txq.used_idx(), 3);
    let stats = f.stats();
    assert_eq!((stats.tx_abandoned, stats.tx_discarded_bytes), (2, 200));
    assert_eq!(stats.tx_bytes, 100);
    // The same numbers through a reader taken from the device.
    let reader = f.t.lock().device().stats_reader();
    assert_eq!(reader.get(), f.stats());
}

/// SIGPIPE blocked in this thread, so that one raised by a send stays pending (even though
/// the test harness ignores SIGPIPE) and can be looked for.
struct SigpipeBlocked {
    old: libc::sigset_t,
}

impl SigpipeBlocked {
    fn new() -> SigpipeBlocked {
        // SAFETY: sigset_t manipulation on local values; pthread_sigmask changes only this
        // thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGPIPE);
            assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old), 0);
            SigpipeBlocked { old }
        }
    }

    /// Whether a SIGPIPE is pending; takes it if so.
    fn take_pending(&self) -> bool {
        // SAFETY: as above; sigtimedwait with a zero timeout only consumes a pending
        // SIGPIPE (it is blocked, so it can be waited for).
        unsafe {
            let mut pending: libc::sigset_t = std::mem::zeroed();
            assert_eq!(libc::sigpending(&mut pending), 0);
            if libc::sigismember(&pending, libc::SIGPIPE) != 1 {
                return false;
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGPIPE);
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::sigtimedwait(&set, std::ptr::null_mut(), &zero);
            true
        }
    }
}

impl Drop for SigpipeBlocked {
    fn drop(&mut self) {
        self.take_pending();
        // SAFETY: restores this thread's previous mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

#[test]
fn tx_after_the_peer_closed_discards_without_sigpipe() {
    let mut f = ConsoleFixture::new();
    let sigpipe = SigpipeBlocked::new();
    let (_, dead_peer) = UnixStream::pair().expect("socketpair");
    let peer = std::mem::replace(&mut f.peer, dead_peer);
    drop(peer);
    f.put(TX_BUF, &pattern(200, 7));
    let heads = [
        f.txq.add_chain(&[r(TX_BUF, 50)]),
        f.txq.add_chain(&[r(TX_BUF + 50, 70), r(TX_BUF + 120, 80)]),
    ];
    f.notify(TX_QUEUE);
    f.txq.add_chain(&[r(TX_BUF, 30)]);
    f.notify(TX_QUEUE);
    assert_eq!(f.txq.used_idx(), 3);
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(f.txq.used_elem(i as u16), (u32::from(*head), 0));
    }
    let stats = f.stats();
    assert_eq!((stats.tx_bytes, stats.tx_discarded_bytes), (0, 230));
    assert_eq!(stats.tx_abandoned + stats.tx_malformed, 0);
    assert!(!sigpipe.take_pending(), "the device raised SIGPIPE");

    // Control: a send without MSG_NOSIGNAL on the same socket does raise it.
    // SAFETY: send one byte from a valid buffer.
    let n = unsafe { libc::send(f.device_end.as_raw_fd(), b"x".as_ptr().cast(), 1, 0) };
    assert_eq!(n, -1);
    assert!(sigpipe.take_pending(), "the SIGPIPE check does not work");
}

#[test]
fn malformed_tx_chains_are_returned_unsent() {
    let mut f = ConsoleFixture::new();
    let malformed = f.send_malformed_tx(&[]);
    assert_eq!(f.sent(), b"");
    let stats = f.stats();
    assert_eq!(stats.tx_malformed, malformed);
    assert_eq!(stats.tx_bytes + stats.tx_discarded_bytes, 0);

    // The queue still works.
    f.put(TX_BUF, b"still here");
    f.txq.add_chain(&[r(TX_BUF, 10)]);
    f.notify(TX_QUEUE);
    assert_eq!(f.sent(), b"still here");
}

#[test]
fn rx_bytes_land_in_a_posted_buffer() {
    let mut f = ConsoleFixture::new();
    let head = f.post_rx(&[w(RX_BUF, 8), w(RX_BUF + 0x100, 2000)]);
    let data = pattern(50, 2);
    f.peer.write_all(&data).expect("write");
    wait_for("the bytes to be used", || f.rxq.used_idx() == 1);
    assert_eq!(f.rxq.used_elem(0), (u32::from(head), 50));
    assert_eq!(f.bytes(RX_BUF, 8), data[..8]);
    assert_eq!(f.bytes(RX_BUF + 0x100, 42), data[8..]);
    // Nothing written past them.
    assert_eq!(f.bytes(RX_BUF + 0x100 + 42, 16), [POISON; 16]);
    wait_for("the interrupt", || f.irq_fired());
    assert_ne!(
        read_reg(&mut f.t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        0
    );
    assert_eq!(f.stats().rx_bytes, 50);
    assert_eq!(f.waiting_for_device(), 0);
}

#[test]
fn rx_bytes_wait_in_the_socket_until_buffers_are_posted() {
    let mut f = ConsoleFixture::new();
    let data = pattern(100, 4);
    f.peer.write_all(&data).expect("write");
    thread::sleep(Duration::from_millis(100));
    assert_eq!(f.rxq.used_idx(), 0);
    assert!(!f.irq_fired());
    assert_eq!(f.waiting_for_device(), 100);

    // A buffer smaller than what waits: filled, the rest stays in the socket.
    let head = f.post_rx(&[w(RX_BUF, 64)]);
    wait_for("the first part", || f.rxq.used_idx() == 1);
    assert_eq!(f.rxq.used_elem(0), (u32::from(head), 64));
    assert_eq!(f.bytes(RX_BUF, 64), data[..64]);
    wait_for("the interrupt", || f.irq_fired());
    thread::sleep(Duration::from_millis(50));
    assert_eq!(f.rxq.used_idx(), 1);
    assert_eq!(f.waiting_for_device(), 36);

    let head = f.post_rx(&[w(RX_BUF + 0x1000, 64)]);
    wait_for("the rest", || f.rxq.used_idx() == 2);
    assert_eq!(f.rxq.used_elem(1), (u32::from(head), 36));
    assert_eq!(f.bytes(RX_BUF + 0x1000, 36), data[64..]);
    assert_eq!(f.waiting_for_device(), 0);
    assert_eq!(f.stats().rx_bytes, 100);
}

#[test]
fn rx_one_mib_through_4k_buffers_in_order_then_eof() {
    let mut f = ConsoleFixture::new();
    const SLOTS: u64 = 16;
    const BUF: u32 = 0x1000;
    for i in 0..SLOTS {
        f.rxq.add_chain(&[w(RX_BUF + i * 0x1000, BUF)]);
    }
    f.notify(RX_QUEUE);
    let data = pattern(1 << 20, 6);
    let mut writer = f.peer.try_clone().expect("clone");
    writer.set_nonblocking(false).expect("blocking");
    let mut got = Vec::with_capacity(data.len());
    thread::scope(|s| {
        let data = &data;
        s.spawn(move || {
            writer.write_all(data).expect("write");
            writer
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen: u16 = 0;
        while got.len() < data.len() {
            let used = f.rxq.used_idx();
            if used == seen {
                assert!(Instant::now() < deadline, "stuck at {} bytes", got.len());
                thread::sleep(Duration::from_micros(200));
                continue;
            }
            while seen != used {
                let (id, len) = f.rxq.used_elem(seen);
                // Buffers come back in the order they were posted.
                assert_eq!(u64::from(id), u64::from(seen) % SLOTS);
                assert!(len > 0 && len <= BUF, "used length {len}");
                let at = RX_BUF + u64::from(id) * 0x1000;
                got.extend_from_slice(&f.bytes(at, len as usize));
                seen = seen.wrapping_add(1);
                let head = f.rxq.add_chain(&[w(at, BUF)]);
                assert_eq!(u32::from(head), id);
            }
            f.notify(RX_QUEUE);
        }
    });
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the stream arrived altered");
    // End of file: the worker stops reading but runs on, and returns no more buffers.
    wait_for("end of file", || f.stats().rx_closed);
    let used = f.rxq.used_idx();
    thread::sleep(Duration::from_millis(50));
    assert_eq!(f.rxq.used_idx(), used);
    let stats = f.stats();
    assert_eq!((stats.rx_bytes, stats.rx_malformed), (1 << 20, 0));
    let tid = f.tid().expect("worker tid");
    assert!(task_alive(tid));
    // Kicks after end-of-file are harmless.
    f.notify(RX_QUEUE);
    thread::sleep(Duration::from_millis(20));
    assert_eq!(f.rxq.used_idx(), used);
}

#[test]
fn malformed_rx_chains_are_returned_unused() {
    let mut f = ConsoleFixture::new();
    // No room at all.
    let malformed = f.post_malformed_rx(&[&[w(RX_BUF, 0)]], b"hello");
    assert_eq!(f.bytes(RX_BUF + 0x2000, 5), b"hello");
    let stats = f.stats();
    assert_eq!((stats.rx_malformed, stats.rx_bytes), (malformed, 5));
    assert!(!stats.rx_closed);
}

/// The TX stop flag outlives a reset (a driver resets the device while probing it, before any
/// output) and is set once the transport goes away.
#[test]
fn reset_keeps_the_stop_flag_and_drop_sets_it() {
    let mut f = ConsoleFixture::new();
    let stopper = f.stopper();
    write_reg(&mut f.t, STATUS, 0);
    assert!(!stopper.is_stopped());
    f.start();
    assert!(!stopper.is_stopped());
    drop(f);
    assert!(stopper.is_stopped());
}
