//! The virtio-net device model: identity, features, configuration space (the MAC), counters,
//! activation (which starts the RX worker) and queue dispatch.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::debug;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{prepare_tap, rx_source};
use super::rx::NetRx;
use super::tx::NetTx;
use super::{OFFERED_FEATURES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::devices::virtio::mmio::{MmioError, MmioTransport};
use crate::devices::virtio::rx_worker::RxWorkers;
use crate::devices::virtio::stats::device_stats;
use crate::devices::virtio::{ActivateError, Activation, DeviceInfo, VirtioDevice};

/// Errors setting up a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC is multicast (bit 0 of its first byte set) or all zeros.
    #[error("invalid MAC address {}: it must be unicast and not all zeros", fmt_mac(.0))]
    InvalidMac([u8; 6]),
    /// A call on the TAP descriptor failed (fcntl for O_NONBLOCK, TUNGETIFF, TUNGETVNETHDRSZ).
    #[error("cannot configure the TAP file descriptor ({what}): {source}")]
    Tap {
        /// The call that failed.
        what: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// The TUN/TAP device is not a TAP with IFF_NO_PI and IFF_VNET_HDR; holds its flags.
    #[error("the TAP was not opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (flags {0:#06x})")]
    TapFlags(u16),
    /// The TAP's vnet header size (TUNGETVNETHDRSZ) is not [`VNET_HDR_LEN`].
    #[error("the TAP's vnet header size is {0}, need {VNET_HDR_LEN}")]
    VnetHdrSize(i32),
    /// The virtio-mmio transport refused the device.
    #[error("virtio-net transport: {0}")]
    Transport(#[from] MmioError),
}

device_stats! {
    /// Counters of a virtio-net device. Bytes are Ethernet frame bytes (the vnet header
    /// excluded).
    pub struct NetStats {
        /// Frames written to the TAP.
        pub tx_frames: u64,
        /// Bytes of the frames written to the TAP.
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
        /// Bytes of the frames delivered to the guest.
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
    /// Two queues (receive, transmit), the features of the [module docs](super), and the
    /// configuration space: `mac[6]` only (no STATUS, MQ or MTU).
    info: DeviceInfo,
    tap: Arc<OwnedFd>,
    mac: [u8; 6],
    stats: Arc<Counters>,
    /// The transmit path (on the vCPU thread).
    tx: NetTx,
    /// The RX worker (joined on drop).
    rx: RxWorkers,
    /// Set when the driver first posts receive buffers (Linux: the interface was opened).
    rx_ready: Option<Arc<AtomicBool>>,
}

/// Build a virtio-net device on `tap` behind a virtio-mmio transport, ready for the MMIO bus.
/// `irq` is written on every interrupt and must be registered as a KVM irqfd for the device's
/// GSI.
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
        prepare_tap(tap.as_raw_fd())?;
        debug!(mac = %fmt_mac(&mac), "virtio-net: created");
        let tap = Arc::new(tap);
        let stats = Arc::<Counters>::default();
        Ok(Net {
            info: DeviceInfo::new(VIRTIO_ID_NET, &[QUEUE_SIZE; 2], OFFERED_FEATURES)
                .with_config(&mac),
            tx: NetTx::new(tap.clone(), stats.clone()),
            tap,
            mac,
            stats,
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
}

impl VirtioDevice for Net {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError> {
        activation.require_ready(&[RX_QUEUE, TX_QUEUE])?;
        let stats = self.stats.clone();
        let rx = move || NetRx::new(stats);
        self.rx.start(rx_source(&self.tap), activation.access, rx)?;
        debug!(mac = %fmt_mac(&self.mac), "virtio-net: activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if index == TX_QUEUE {
            return self.tx.process(queue, mem);
        }
        // New receive buffers: wake the worker, which fills them under the lock later.
        if let Some(flag) = &self.rx_ready {
            flag.store(true, Ordering::Release);
        }
        self.rx.kick();
        false
    }

    fn workers(&mut self) -> Option<&mut RxWorkers> {
        Some(&mut self.rx)
    }

    fn describe(&self) -> String {
        format!(
            "{:?}; tap readable now: {}; {}",
            self.stats(),
            crate::devices::virtio::sys::readable_now(self.tap.as_raw_fd()),
            self.rx.describe()
        )
    }
}

pub(super) fn fmt_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}
