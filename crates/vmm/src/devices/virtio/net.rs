//! A virtio-net device backed by a TAP file descriptor.
//!
//! The TAP is opened by the host-networking code with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a
//! vnet header size of 12 (`struct virtio_net_hdr_v1`), no offloads, and `O_NONBLOCK` (which
//! [`Net::new`] enforces). Because the TAP speaks the same 12-byte header as a VERSION_1 driver,
//! frames move between guest memory and the TAP with one `readv`/`writev` each, header included,
//! without a bounce buffer.
//!
//! Features offered: VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC (configuration space: the MAC's 6
//! bytes; no STATUS, so the driver assumes the link is up). No checksum or segmentation offload
//! and no MRG_RXBUF: every receive chain must hold a whole frame plus its header, which Linux's
//! "small buffers" mode does (1518 + 12 bytes and more).
//!
//! # The transmit header
//!
//! The guest's own `virtio_net_hdr_v1` never reaches the TAP: every frame goes out behind an
//! all-zero header that lives in host memory (`ZERO_HDR`), whatever the guest wrote in front
//! of it. Why not check the guest's header field by field instead:
//!
//! - Without any offload feature negotiated (and none is offered: see [`OFFERED_FEATURES`]),
//!   the only header a conforming driver sends is all zeros: `flags` must be 0 without
//!   VIRTIO_NET_F_CSUM and `gso_type` NONE without HOST_TSO4/TSO6/UFO/USO (virtio 1.2, "Packet
//!   Transmission"), which leaves `hdr_len`, `gso_size`, `csum_start` and `csum_offset`
//!   nothing to describe, and `num_buffers` means nothing on transmit. Linux's driver zeroes
//!   the whole header (`xmit_skb`). Zeroing it changes nothing for a conforming guest.
//! - The host kernel would act on anything else: `tun_get_user` hands the header to
//!   `virtio_net_hdr_to_skb`, which honours NEEDS_CSUM and every GSO type whatever
//!   `TUNSETOFFLOAD` says (that ioctl only governs what the TAP gives *us*). Malformed
//!   offload metadata is a long-running source of kernel bugs (skb_segment, checksum
//!   offsets past the data); validation here would have to mirror the kernel's rules and
//!   still let well-formed-but-unusual combinations through, for a feature nobody uses.
//! - The kernel reads the header from host memory, so there is no window in which another
//!   vCPU could rewrite it between a check and the `writev` (a check of the guest's bytes in
//!   place would have that race and need a copy anyway).
//! - It costs nothing: still one `writev`, with one more iovec.
//!
//! Offering an offload feature later means replacing this with validation of a host copy of
//! the header against the negotiated features; a compile-time assertion on
//! [`OFFERED_FEATURES`] stops that from happening by accident. A frame whose guest header was
//! not zero is still sent (its payload is the guest's business: without NEEDS_CSUM honoured, a
//! partial checksum just makes the receiver drop it), and counted in
//! [`NetStats::tx_header_ignored`].
//!
//! Queues (256 entries each): 0 = receive, 1 = transmit.
//!
//! - **TX** runs on the vCPU thread, synchronously on QueueNotify for queue 1: each chain's
//!   device-readable descriptors are written to the TAP with one `writev`, the chain's first
//!   12 bytes (the guest's header) replaced by `ZERO_HDR`, and the chain is
//!   returned with a used length of 0. A full TAP (`EAGAIN`) drops the frame rather than block
//!   the vCPU. Malformed chains (a device-writable descriptor, less than a header, out of guest
//!   memory, too long) are returned without sending anything.
//! - **RX** runs on a worker thread started on activation (see the
//!   [module docs](super) for the threading model). It waits in `epoll` for the TAP
//!   (edge-triggered), a kick eventfd written when the driver notifies queue 0, and a stop
//!   eventfd. Under the transport lock, it pops a receive chain, `readv`s one frame straight into
//!   its writable descriptors, sets `num_buffers` to 1, adds the chain to the used ring and, once
//!   per batch, raises the interrupt. When no receive buffer is available it stops reading the
//!   TAP (frames wait there, and the kernel drops what overflows its queue), re-enables driver
//!   notifications and waits for a kick. A frame larger than the chain is dropped (logged at
//!   `debug`): the chain has one spare byte of host memory after it, and a frame that reaches it
//!   did not fit. At most [`RX_BATCH`] frames are moved per lock acquisition.
//!
//! The worker is told to stop on device reset and joined by [`MmioTransport`] once it has
//! released the lock; dropping the transport (or a bare [`Net`]) stops and joins it too. No
//! thread outlives the device.
//! The thread, its life (epoll, kick, stop, join) and the batch loop are `rx_worker`'s, and the
//! chain rules `chain::IoChain`'s, shared by virtio-net and virtio-console; this module says
//! what a frame is and how it is counted.
//!
//! Per-frame guest errors are logged at `debug` (a hostile guest could otherwise flood the log)
//! and counted in [`NetStats`]; nothing the guest writes can panic the device.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_GSO, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_HDRLEN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_HASH_REPORT, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_RSC_EXT,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{ChainError, IoChain};
use super::mmio::{MmioError, MmioTransport};
use super::queue::serve_chains;
use super::rx_worker::{Batch, RxDevice, RxWorkers, Source};
use super::stats::device_stats;
use super::sys::{set_nonblocking, SysError, MAX_IOVECS};
use super::{ActivateError, QueueAccess, VirtioDevice, VIRTIO_F_VERSION_1};

pub use super::rx_worker::RX_BATCH;

/// Bytes of `struct virtio_net_hdr_v1` in front of every frame, in both directions.
pub const VNET_HDR_LEN: usize = 12;
/// Size of each virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Configuration space: `mac[6]` only (no STATUS, MQ or MTU).
const CONFIG_LEN: usize = 6;
/// Largest frame accepted for transmission, header included: 64 KiB of Ethernet frame.
const MAX_TX_LEN: u64 = VNET_HDR_LEN as u64 + 65_536;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: u64 = 10;

/// Feature bits the device offers: no offloads (see the [module docs](self)).
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC);

/// Features that give the header's fields a meaning (or change its size): checksum and
/// segmentation offloads both ways, mergeable receive buffers, hash reports, RSC.
const HEADER_FEATURES: u64 = {
    let bits = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        VIRTIO_NET_F_GSO,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_GUEST_USO4,
        VIRTIO_NET_F_GUEST_USO6,
        VIRTIO_NET_F_HOST_USO,
        VIRTIO_NET_F_HASH_REPORT,
        VIRTIO_NET_F_GUEST_HDRLEN,
        VIRTIO_NET_F_RSC_EXT,
    ];
    let mut mask = 0u64;
    let mut i = 0;
    while i < bits.len() {
        mask |= 1 << bits[i];
        i += 1;
    }
    mask
};

// The transmit path replaces the guest's header with zeros, which is only right while no
// feature gives it a meaning. Offer one and this must become validation (module docs).
const _: () = assert!(OFFERED_FEATURES & HEADER_FEATURES == 0);

/// The header every frame goes to the TAP with (the guest's is dropped; see the
/// [module docs](self)).
static ZERO_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// Errors setting up a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid MAC address {}: it must be unicast and not all zeros", fmt_mac(.0))]
    InvalidMac([u8; 6]),
    #[error("cannot configure the TAP file descriptor ({what}): {source}")]
    Tap {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the TAP was not opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (flags {0:#06x})")]
    TapFlags(u16),
    #[error("the TAP's vnet header size is {0}, need {VNET_HDR_LEN}")]
    VnetHdrSize(i32),
    #[error("virtio-net transport: {0}")]
    Transport(#[from] MmioError),
}

impl From<SysError> for NetError {
    fn from(e: SysError) -> NetError {
        NetError::Tap {
            what: e.what,
            source: e.source,
        }
    }
}

/// Why a frame was not sent. Only logged and counted.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the TAP is full")]
    TapFull,
    #[error("TAP: {0}")]
    Tap(#[source] io::Error),
}

device_stats! {
    /// Counters of a virtio-net device. Bytes are Ethernet frame bytes (the vnet header
    /// excluded).
    pub struct NetStats {
        /// Frames written to the TAP.
        pub tx_frames: u64,
        pub tx_bytes: u64,
        /// Well-formed frames the TAP did not take (full, or an error).
        pub tx_dropped: u64,
        /// Transmit chains returned unsent because they were malformed.
        pub tx_malformed: u64,
        /// Frames sent whose guest header was not all zeros (offload metadata that was never
        /// negotiated); they went out with a zero header.
        pub tx_header_ignored: u64,
        /// Frames delivered to the guest.
        pub rx_frames: u64,
        pub rx_bytes: u64,
        /// Frames read from the TAP and dropped (larger than the receive chain, or shorter
        /// than a header).
        pub rx_dropped: u64,
        /// Receive chains returned unused (used length 0) because they were malformed.
        pub rx_malformed: u64,
    }
    counters: Counters,
    reader: NetStatsReader,
}

/// virtio-net device on a TAP.
pub struct Net {
    tap: Arc<OwnedFd>,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    stats: Arc<Counters>,
    /// The RX worker (joined on drop).
    rx: RxWorkers,
    /// Set when the driver first posts receive buffers (Linux: the interface was opened).
    rx_ready: Option<Arc<AtomicBool>>,
}

/// Build a virtio-net device on `tap` behind a virtio-mmio transport, ready for the MMIO
/// bus. `irq` is written on every interrupt and must be registered as a KVM irqfd for the
/// device's GSI.
pub fn attach_net(
    tap: OwnedFd,
    mac: [u8; 6],
    mem: GuestMemoryMmap,
    irq: EventFd,
    rx_ready: Option<Arc<AtomicBool>>,
) -> Result<MmioTransport<Net>, NetError> {
    let mut net = Net::new(tap, mac)?;
    net.rx_ready = rx_ready;
    Ok(MmioTransport::new(net, mem, irq)?)
}

impl Net {
    /// A device on `tap` with MAC address `mac`. Puts the descriptor in non-blocking mode. If
    /// `tap` is a TUN/TAP device, checks that it is a TAP with `IFF_NO_PI | IFF_VNET_HDR` and a
    /// 12-byte vnet header; any other descriptor (the tests use a datagram socket) is taken as
    /// is: one `read`/`write` per frame, header included.
    pub fn new(tap: OwnedFd, mac: [u8; 6]) -> Result<Net, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::InvalidMac(mac));
        }
        set_nonblocking(tap.as_raw_fd())?;
        check_tap(tap.as_raw_fd())?;
        debug!(mac = %fmt_mac(&mac), "virtio-net: created");
        let mut config = [0u8; CONFIG_LEN];
        config.copy_from_slice(&mac);
        Ok(Net {
            tap: Arc::new(tap),
            mac,
            config,
            stats: Arc::default(),
            rx: RxWorkers::new("virtio-net", RX_QUEUE),
            rx_ready: None,
        })
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats.snapshot()
    }

    /// A handle to read the counters later, e.g. after the transport went onto the MMIO bus.
    pub fn stats_reader(&self) -> NetStatsReader {
        NetStatsReader::new(self.stats.clone())
    }

    /// Whether an RX worker is running (the device is activated).
    pub fn has_worker(&self) -> bool {
        self.rx.is_running()
    }

    /// Kernel thread id of the running RX worker, once it has started (for diagnostics).
    pub fn worker_tid(&self) -> Option<i32> {
        self.rx.tid()
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut chain = IoChain::default();
        serve_chains("virtio-net", queue, mem, |desc_chain| {
            let head = desc_chain.head_index();
            match self.transmit(desc_chain, mem, &mut chain) {
                Ok(len) => {
                    self.stats.tx_frames.add(1);
                    self.stats.tx_bytes.add(len - VNET_HDR_LEN as u64);
                }
                Err(e @ (TxError::TapFull | TxError::Tap(_))) => {
                    debug!(head, error = %e, "virtio-net: TX frame dropped");
                    self.stats.tx_dropped.add(1);
                }
                Err(e) => {
                    debug!(head, error = %e, "virtio-net: malformed TX chain; returned unsent");
                    self.stats.tx_malformed.add(1);
                }
            }
            0
        })
    }

    /// Write one chain to the TAP, behind [`ZERO_HDR`] instead of the guest's header; returns
    /// its length (header included).
    fn transmit(
        &self,
        desc_chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        chain: &mut IoChain,
    ) -> Result<u64, TxError> {
        chain.load_readable(desc_chain, mem, VNET_HDR_LEN as u64, MAX_TX_LEN)?;
        // A copy of the guest's header, only to count and log what it asked for.
        let mut guest_hdr = [0u8; VNET_HDR_LEN];
        if let Err(e) = chain.read_at(mem, 0, &mut guest_hdr) {
            // In guest memory (the chain was checked): not reached.
            debug!(error = %e, "virtio-net: cannot read the guest's TX header");
        }
        // Our header instead of the guest's.
        chain.consume(VNET_HDR_LEN);
        chain.prepend(&ZERO_HDR);
        if chain.iovec_count() > MAX_IOVECS {
            return Err(ChainError::TooManyIovecs.into());
        }
        if guest_hdr[..NUM_BUFFERS_OFFSET as usize] != [0; NUM_BUFFERS_OFFSET as usize] {
            let field = |at: usize| u16::from_le_bytes([guest_hdr[at], guest_hdr[at + 1]]);
            debug!(
                flags = guest_hdr[0],
                gso_type = guest_hdr[1],
                hdr_len = field(2),
                gso_size = field(4),
                csum_start = field(6),
                csum_offset = field(8),
                "virtio-net: offload metadata in a TX header (none negotiated); sent without it"
            );
            self.stats.tx_header_ignored.add(1);
        }
        let total = chain.size();
        let written = loop {
            match chain.write_to(self.tap.as_raw_fd()) {
                Ok(n) => break n,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Err(TxError::TapFull),
                    _ => return Err(TxError::Tap(e)),
                },
            }
        };
        if written != total {
            // A TAP takes a frame whole or not at all; a stand-in might not.
            debug!(written, total, "virtio-net: short write to the TAP");
        }
        Ok(total)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            offset,
            len = data.len(),
            "virtio-net: write to read-only config space ignored"
        );
    }

    fn activate(
        &mut self,
        _acked_features: u64,
        queues: &[Queue],
        access: QueueAccess,
    ) -> Result<(), ActivateError> {
        for index in [RX_QUEUE, TX_QUEUE] {
            if !queues.get(index).is_some_and(|q| q.ready()) {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        let source = Source {
            fd: self.tap.clone(),
            events: EventSet::IN | EventSet::EDGE_TRIGGERED,
            watch: true,
        };
        let stats = self.stats.clone();
        let rx = move || NetRx {
            stats,
            overflow: [0],
            tap_error_logged: false,
        };
        self.rx
            .start(source, access, rx)
            .map_err(ActivateError::Worker)?;
        debug!(mac = %fmt_mac(&self.mac), "virtio-net: activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match index {
            RX_QUEUE => {
                // New receive buffers: wake the worker, which fills them under the lock later.
                if let Some(flag) = &self.rx_ready {
                    flag.store(true, Ordering::Release);
                }
                self.rx.kick();
                false
            }
            TX_QUEUE => self.process_tx(queue, mem),
            _ => {
                // The transport only notifies queues that exist (and rate-limits its warning
                // about the others).
                debug!(index, "virtio-net: notify for a queue that does not exist");
                false
            }
        }
    }

    fn reset(&mut self) {
        self.rx.stop();
    }

    fn stop_workers(&mut self) {
        self.rx.stop();
    }

    fn take_stopped_workers(&mut self) -> Vec<JoinHandle<()>> {
        self.rx.take_stopped()
    }
}

/// virtio-net's receive side: one frame from the TAP into each receive chain.
struct NetRx {
    stats: Arc<Counters>,
    /// Spare byte after the chain: a frame that reaches it did not fit.
    overflow: [u8; 1],
    tap_error_logged: bool,
}

impl RxDevice for NetRx {
    const NAME: &'static str = "virtio-net";
    const MIN_CHAIN: u64 = VNET_HDR_LEN as u64;
    /// A stand-in whose peer closed: nothing to read.
    const AT_EOF: Batch = Batch::Drained;

    fn check(&self, chain: &IoChain) -> Result<(), ChainError> {
        // Room for the overflow byte.
        if chain.iovec_count() >= MAX_IOVECS {
            return Err(ChainError::TooManyIovecs);
        }
        Ok(())
    }

    fn read(&mut self, chain: &mut IoChain, tap: RawFd) -> io::Result<u64> {
        chain.read_from(tap, &mut self.overflow)
    }

    fn received(
        &mut self,
        chain: &IoChain,
        mem: &GuestMemoryMmap,
        head: u16,
        n: u64,
    ) -> Option<u32> {
        if n > chain.size() {
            debug!(
                head,
                frame_len = n,
                capacity = chain.size(),
                "virtio-net: RX frame larger than the receive buffer; dropped"
            );
            self.stats.rx_dropped.add(1);
            return None;
        }
        if n <= VNET_HDR_LEN as u64 {
            debug!(
                head,
                len = n,
                "virtio-net: RX frame without payload; dropped"
            );
            self.stats.rx_dropped.add(1);
            return None;
        }
        // The TAP leaves num_buffers alone; without MRG_RXBUF every frame takes exactly one
        // buffer.
        if let Err(e) = chain.write_at(mem, NUM_BUFFERS_OFFSET, &1u16.to_le_bytes()) {
            debug!(head, error = %e, "virtio-net: cannot write num_buffers");
        }
        self.stats.rx_frames.add(1);
        self.stats.rx_bytes.add(n - VNET_HDR_LEN as u64);
        // n <= capacity <= 256 descriptors of u32: fits.
        Some(u32::try_from(n).unwrap_or(0))
    }

    fn malformed(&mut self) {
        self.stats.rx_malformed.add(1);
    }

    fn read_failed(&mut self, e: io::Error) -> Batch {
        if !std::mem::replace(&mut self.tap_error_logged, true) {
            warn!(error = %e, "virtio-net: reading the TAP failed");
        } else {
            debug!(error = %e, "virtio-net: reading the TAP failed");
        }
        Batch::Drained
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
        return Err(NetError::Tap {
            what: "TUNGETIFF",
            source,
        });
    }
    // SAFETY: TUNGETIFF fills the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags } as u16;
    let want = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    if flags & want != want || flags & libc::IFF_TUN as u16 != 0 {
        return Err(NetError::TapFlags(flags));
    }
    let mut size: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int to the pointer, which is valid for it.
    if unsafe { libc::ioctl(fd, libc::TUNGETVNETHDRSZ, &mut size) } < 0 {
        return Err(NetError::Tap {
            what: "TUNGETVNETHDRSZ",
            source: io::Error::last_os_error(),
        });
    }
    if size != VNET_HDR_LEN as libc::c_int {
        return Err(NetError::VnetHdrSize(size));
    }
    Ok(())
}

fn fmt_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd};
    use std::os::unix::net::UnixDatagram;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::{
        bring_up, count_warnings, eventfd, memory, r, read_reg, w, wait_for, warning_bound,
        write_reg, Desc, DriverQueue, BUF_BASE, MEM_SIZE, QUEUE_BASE,
    };
    use crate::devices::MmioDevice;

    const MAC: [u8; 6] = [0x02, 0x78, 0x63, 0x67, 0x69, 0x01];
    const DEVICE_ID: u64 = 0x008;
    const DEVICE_FEATURES: u64 = 0x010;
    const DEVICE_FEATURES_SEL: u64 = 0x014;
    const DRIVER_FEATURES: u64 = 0x020;
    const DRIVER_FEATURES_SEL: u64 = 0x024;
    const QUEUE_SEL: u64 = 0x030;
    const QUEUE_NUM_MAX: u64 = 0x034;
    const QUEUE_NUM: u64 = 0x038;
    const QUEUE_NOTIFY: u64 = 0x050;
    const INTERRUPT_STATUS: u64 = 0x060;
    const STATUS: u64 = 0x070;
    const CONFIG: u64 = 0x100;
    const TXQ_BASE: GuestAddress = GuestAddress(0x8000);
    /// Receive buffers go here, 0x1000 apart; transmit buffers above.
    const RX_BUF: u64 = BUF_BASE;
    const TX_BUF: u64 = BUF_BASE + 0x4_0000;
    const POISON: u8 = 0xee;
    /// The transmit header of a driver that negotiated no offloads.
    const NO_OFFLOAD: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

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

    fn task_alive(tid: i32) -> bool {
        Path::new(&format!("/proc/self/task/{tid}")).exists()
    }

    struct Fixture {
        mem: GuestMemoryMmap,
        t: MmioTransport<Net>,
        rxq: DriverQueue,
        txq: DriverQueue,
        /// The host side of the stand-in TAP.
        peer: UnixDatagram,
        /// Another descriptor for the device's end (same socket), to peek at or fill it.
        device_end: UnixDatagram,
    }

    impl Fixture {
        /// A device on a datagram socket pair, not brought up yet.
        fn unstarted() -> Fixture {
            let (dev, peer) = UnixDatagram::pair().expect("socketpair");
            let device_end = dev.try_clone().expect("clone");
            peer.set_nonblocking(true).expect("nonblocking");
            let mem = memory();
            let t = attach_net(OwnedFd::from(dev), MAC, mem.clone(), eventfd(), None).expect("net");
            mem.write_slice(&vec![POISON; 0x8_0000], GuestAddress(BUF_BASE))
                .expect("poison");
            Fixture {
                rxq: DriverQueue::new(&mem, QUEUE_BASE, 16),
                txq: DriverQueue::new(&mem, TXQ_BASE, 16),
                mem,
                t,
                peer,
                device_end,
            }
        }

        /// Brought up, with the RX worker running.
        fn new() -> Fixture {
            let mut f = Fixture::unstarted();
            f.start();
            f
        }

        fn start(&mut self) {
            bring_up(&mut self.t, &[&self.rxq, &self.txq]);
            assert!(self.t.lock().is_activated());
            wait_for("the RX worker to start", || self.tid().is_some());
        }

        fn tid(&self) -> Option<i32> {
            self.t.lock().device().worker_tid()
        }

        fn notify(&mut self, queue: u32) {
            write_reg(&mut self.t, QUEUE_NOTIFY, queue);
        }

        /// Post one receive chain and tell the device.
        fn post_rx(&mut self, chain: &[Desc]) -> u16 {
            let head = self.rxq.add_chain(chain);
            self.notify(RX_QUEUE as u32);
            head
        }

        fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem
                .read_slice(&mut buf, GuestAddress(at))
                .expect("read guest");
            buf
        }

        fn put(&self, at: u64, data: &[u8]) {
            self.mem
                .write_slice(data, GuestAddress(at))
                .expect("write guest");
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

        /// Length of the next datagram waiting for the device (without taking it).
        fn waiting_for_device(&self) -> Option<usize> {
            let mut buf = [0u8; 1];
            // SAFETY: recv into a valid 1-byte buffer; MSG_TRUNC reports the full length.
            let n = unsafe {
                libc::recv(
                    self.device_end.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            usize::try_from(n).ok()
        }

        fn irq_fired(&self) -> bool {
            self.t.lock().interrupt_evt().read().is_ok()
        }

        fn stats(&self) -> NetStats {
            self.t.lock().device().stats()
        }
    }

    #[test]
    fn identity_features_and_config() {
        let mut f = Fixture::unstarted();
        let t = &mut f.t;
        assert_eq!(read_reg(t, DEVICE_ID), 1);
        assert_eq!(read_reg(t, DEVICE_FEATURES), 1 << VIRTIO_NET_F_MAC);
        write_reg(t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(read_reg(t, DEVICE_FEATURES), 1); // VERSION_1 only
        for (sel, max) in [(0, 256), (1, 256), (2, 0)] {
            write_reg(t, QUEUE_SEL, sel);
            assert_eq!(read_reg(t, QUEUE_NUM_MAX), max, "queue {sel}");
        }
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
        assert!(!t.lock().device().has_worker());
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
    fn activation_needs_both_queues() {
        let mut f = Fixture::unstarted();
        bring_up(&mut f.t, &[&f.rxq]);
        assert!(!f.t.lock().is_activated());
        assert_ne!(read_reg(&mut f.t, STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!f.t.lock().device().has_worker());
        // A reset and a proper bring-up work.
        f.start();
        assert!(f.t.lock().device().has_worker());
    }

    #[test]
    fn tx_frames_reach_the_tap_intact() {
        let mut f = Fixture::new();
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
        f.notify(TX_QUEUE as u32);

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
        let mut f = Fixture::new();
        let chains: [&[Desc]; 7] = [
            // Device-writable.
            &[w(TX_BUF, 64)],
            // Shorter than the header.
            &[r(TX_BUF, 8)],
            // Readable then writable.
            &[r(TX_BUF, 12), w(TX_BUF + 0x100, 64)],
            // Runs out of guest memory; wraps around the address space.
            &[r(MEM_SIZE - 16, 64)],
            &[r(u64::MAX - 8, 64)],
            // Longer than any frame.
            &[r(TX_BUF, 12), r(TX_BUF + 0x100, 0x2_0000)],
            // Over 4 GiB: virtio-queue stops after the first descriptor, which says "next".
            &[r(TX_BUF, 12), r(TX_BUF + 0x100, u32::MAX)],
        ];
        let mut heads: Vec<u16> = chains.iter().map(|c| f.txq.add_chain(c)).collect();
        // A chain whose next index is outside the table.
        f.txq
            .write_desc(15, TX_BUF, 12, VRING_DESC_F_NEXT as u16, 99);
        f.txq.publish(15);
        heads.push(15);
        f.notify(TX_QUEUE as u32);
        assert_eq!(f.txq.used_idx(), heads.len() as u16);
        for (i, head) in heads.iter().enumerate() {
            assert_eq!(
                f.txq.used_elem(i as u16),
                (u32::from(*head), 0),
                "chain {i}"
            );
        }
        assert_eq!(f.sent(), None);
        let stats = f.stats();
        assert_eq!(stats.tx_malformed, heads.len() as u64);
        assert_eq!(stats.tx_frames, 0);
        assert!(f.irq_fired());

        // The queue still works.
        let good = packet(&NO_OFFLOAD, &payload(64, 9));
        f.put(TX_BUF, &good);
        f.txq.add_chain(&[r(TX_BUF, good.len() as u32)]);
        f.notify(TX_QUEUE as u32);
        assert_eq!(f.sent(), Some(good));
        assert_eq!(f.stats().tx_frames, 1);
    }

    #[test]
    fn guest_tx_header_never_reaches_the_tap() {
        let mut f = Fixture::new();
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
                f.notify(TX_QUEUE as u32);
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
        let mut f = Fixture::unstarted();
        let t = &mut f.t;
        assert_eq!(t.lock().device().device_features() & HEADER_FEATURES, 0);
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
        let mut f = Fixture::new();
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
                f.notify(TX_QUEUE as u32);
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
        f.notify(TX_QUEUE as u32);
        assert_eq!(f.sent(), Some(frame));
    }

    #[test]
    fn full_tap_drops_tx_frames_instead_of_blocking() {
        let mut f = Fixture::new();
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
        f.notify(TX_QUEUE as u32); // returns: the vCPU is not blocked
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
        f.notify(TX_QUEUE as u32);
        assert_eq!(f.sent(), Some(frame));
        assert_eq!(f.stats().tx_frames, 1);
        // The same numbers through a reader taken from the device.
        let reader = f.t.lock().device().stats_reader();
        assert_eq!(reader.get(), f.stats());
    }

    #[test]
    fn rx_frame_lands_in_a_posted_buffer() {
        let mut f = Fixture::new();
        // The header straddles two descriptors (num_buffers is in the second one).
        let head = f.post_rx(&[w(RX_BUF, 8), w(RX_BUF + 0x100, 2000)]);
        // As a TAP would write it: num_buffers (bytes 10-11) is the device's to fill.
        let mut hdr = header(0x20);
        hdr[10..].copy_from_slice(&[0xab, 0xcd]);
        let frame = payload(98, 5);
        f.peer.send(&packet(&hdr, &frame)).expect("send");

        wait_for("the frame to be used", || f.rxq.used_idx() == 1);
        assert_eq!(f.rxq.used_elem(0), (u32::from(head), 110));
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
        assert_eq!(f.waiting_for_device(), None);
    }

    #[test]
    fn rx_frames_wait_in_the_tap_until_buffers_are_posted() {
        let mut f = Fixture::new();
        let a = packet(&header(1), &payload(60, 1));
        let b = packet(&header(2), &payload(70, 2));
        f.peer.send(&a).expect("send a");
        f.peer.send(&b).expect("send b");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(f.rxq.used_idx(), 0);
        assert!(!f.irq_fired());
        // Still in the TAP, not read and lost.
        assert_eq!(f.waiting_for_device(), Some(a.len()));

        let head = f.post_rx(&[w(RX_BUF, 2048)]);
        wait_for("frame a", || f.rxq.used_idx() == 1);
        assert_eq!(f.rxq.used_elem(0), (u32::from(head), a.len() as u32));
        assert_eq!(f.bytes(RX_BUF + 12, 60), a[12..]);
        wait_for("the interrupt", || f.irq_fired());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(f.rxq.used_idx(), 1);
        assert_eq!(f.waiting_for_device(), Some(b.len()));

        let head = f.post_rx(&[w(RX_BUF + 0x1000, 2048)]);
        wait_for("frame b", || f.rxq.used_idx() == 2);
        assert_eq!(f.rxq.used_elem(1), (u32::from(head), b.len() as u32));
        assert_eq!(f.bytes(RX_BUF + 0x1000 + 12, 70), b[12..]);
        assert_eq!(f.waiting_for_device(), None);
        assert_eq!(f.stats().rx_frames, 2);
    }

    #[test]
    fn rx_frame_larger_than_the_buffer_is_dropped() {
        let mut f = Fixture::new();
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
        assert_eq!(f.waiting_for_device(), None);
    }

    #[test]
    fn malformed_rx_chains_are_returned_unused() {
        let mut f = Fixture::new();
        let bad = [
            f.post_rx(&[r(RX_BUF, 2048)]),                      // device-readable
            f.post_rx(&[w(RX_BUF, 8)]),                         // no room for the header
            f.post_rx(&[w(RX_BUF, 64), r(RX_BUF + 0x100, 64)]), // writable then readable
            f.post_rx(&[w(MEM_SIZE - 16, 2048)]),               // outside guest memory
            f.post_rx(&[w(RX_BUF, 64), w(RX_BUF + 0x100, u32::MAX)]), // over 4 GiB
        ];
        let good = f.post_rx(&[w(RX_BUF + 0x2000, 2048)]);
        let frame = packet(&header(3), &payload(60, 3));
        f.peer.send(&frame).expect("send");
        wait_for("all chains used", || f.rxq.used_idx() == 6);
        for (i, head) in bad.iter().enumerate() {
            assert_eq!(
                f.rxq.used_elem(i as u16),
                (u32::from(*head), 0),
                "chain {i}"
            );
        }
        assert_eq!(f.rxq.used_elem(5), (u32::from(good), frame.len() as u32));
        assert_eq!(f.bytes(RX_BUF + 0x2000 + 12, 60), frame[12..]);
        let stats = f.stats();
        assert_eq!((stats.rx_malformed, stats.rx_frames), (5, 1));
    }

    #[test]
    fn many_frames_cross_batches_in_order() {
        let mut f = Fixture::unstarted();
        // A bigger receive queue than one batch.
        f.rxq = DriverQueue::new(&f.mem, QUEUE_BASE, 128);
        f.start();
        let heads: Vec<u16> = (0..128u64)
            .map(|i| f.rxq.add_chain(&[w(RX_BUF + i * 0x100, 0x100)]))
            .collect();
        f.notify(RX_QUEUE as u32);
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

    #[test]
    fn reset_stops_the_worker_and_drop_joins_it() {
        let mut f = Fixture::new();
        let tid = f.tid().expect("worker tid");
        assert!(task_alive(tid));

        write_reg(&mut f.t, STATUS, 0);
        // The write returned after joining the worker.
        assert!(!f.t.lock().device().has_worker());
        wait_for("the worker's task to go", || !task_alive(tid));

        // A reset device receives nothing: frames wait in the TAP.
        let frame = packet(&header(7), &payload(60, 7));
        f.peer.send(&frame).expect("send");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(f.waiting_for_device(), Some(frame.len()));

        // Up again (fresh rings, as a driver would after a reset): a new worker delivers it.
        f.rxq = DriverQueue::new(&f.mem, QUEUE_BASE, 16);
        f.txq = DriverQueue::new(&f.mem, TXQ_BASE, 16);
        f.start();
        let tid2 = f.tid().expect("second worker tid");
        assert_ne!(tid2, tid);
        let head = f.post_rx(&[w(RX_BUF, 2048)]);
        wait_for("the waiting frame", || f.rxq.used_idx() == 1);
        assert_eq!(f.rxq.used_elem(0), (u32::from(head), frame.len() as u32));

        // Dropping the transport joins the worker and closes the TAP.
        let Fixture {
            t,
            peer,
            device_end,
            ..
        } = f;
        drop(t);
        wait_for("the second worker's task to go", || !task_alive(tid2));
        drop(device_end);
        assert!(peer.send(&frame).is_err(), "the device's end is still open");
    }

    #[test]
    fn dropping_an_idle_device_joins_its_worker() {
        let f = Fixture::new();
        let tid = f.tid().expect("worker tid");
        drop(f);
        wait_for("the worker's task to go", || !task_alive(tid));
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
        let mut t =
            attach_net(tap.fd, MAC, mem.clone(), eventfd(), None).expect("net on a real TAP");
        let mut rxq = DriverQueue::new(&mem, QUEUE_BASE, 16);
        let mut txq = DriverQueue::new(&mem, TXQ_BASE, 16);
        bring_up(&mut t, &[&rxq, &txq]);
        assert!(t.lock().is_activated());

        // TX: a broadcast frame of a local experimental ethertype.
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&MAC);
        frame.extend_from_slice(&ETH_P_TEST.to_be_bytes());
        frame.extend_from_slice(b"xcgi virtio-net tx");
        frame.resize(60, 0);
        let pkt = packet(&[0; VNET_HDR_LEN], &frame);
        mem.write_slice(&pkt, GuestAddress(TX_BUF)).expect("write");
        txq.add_chain(&[r(TX_BUF, 12), r(TX_BUF + 12, frame.len() as u32)]);
        write_reg(&mut t, QUEUE_NOTIFY, TX_QUEUE as u32);
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
            write_reg(&mut t, QUEUE_NOTIFY, TX_QUEUE as u32);
            let got = sock.recv_matching(|f| f[12..14] == ETH_P_TEST.to_be_bytes());
            assert_eq!(got, tagged, "header {i}");
        }
        let stats = t.lock().device().stats();
        assert_eq!(stats.tx_frames, 1 + bogus_headers().len() as u64);
        assert_eq!(stats.tx_dropped, 0);

        // RX: the host sends to the guest's MAC; the TAP hands it to the worker.
        for i in 0..8 {
            rxq.add_chain(&[w(RX_BUF + i * 0x1000, 2048)]);
        }
        write_reg(&mut t, QUEUE_NOTIFY, RX_QUEUE as u32);
        let mut reply = MAC.to_vec();
        reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        reply.extend_from_slice(&ETH_P_TEST.to_be_bytes());
        reply.extend_from_slice(b"xcgi virtio-net rx");
        reply.resize(60, 0);
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
        drop(t);
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
                let n = unsafe {
                    libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
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
}
