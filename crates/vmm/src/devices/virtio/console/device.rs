//! The virtio-console device model: identity, features, counters, activation (which starts
//! the RX worker) and queue dispatch.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use tracing::debug;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{prepare_socket, rx_source, socket_type_name};
use super::rx::ConsoleRx;
use super::tx::{ConsoleStopper, ConsoleTx};
use super::{QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::mmio::{MmioError, MmioTransport};
use crate::devices::virtio::rx_worker::RxWorkers;
use crate::devices::virtio::stats::device_stats;
use crate::devices::virtio::{
    ActivateError, Activation, DeviceInfo, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Two queues (receive, transmit); VERSION_1 only (no SIZE, MULTIPORT or EMERG_WRITE). The
/// configuration space (`struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr) is
/// not offered: all zeros, read-only.
static INFO: DeviceInfo = DeviceInfo::new(VIRTIO_ID_CONSOLE, &[QUEUE_SIZE; 2], VIRTIO_F_VERSION_1);

/// Errors setting up a virtio-console device.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The descriptor is not a socket.
    #[error("the console channel is not a socket (need a connected SOCK_STREAM Unix socket)")]
    NotASocket,
    /// The socket is not SOCK_STREAM; holds its SO_TYPE.
    #[error(
        "the console channel is a socket of type {0} ({name}), need SOCK_STREAM",
        name = socket_type_name(*.0)
    )]
    NotStream(i32),
    /// A call on the socket failed (getsockopt SO_TYPE, fcntl for O_NONBLOCK).
    #[error("cannot configure the console channel ({what}): {source}")]
    Socket {
        /// The call that failed.
        what: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// The virtio-mmio transport refused the device.
    #[error("virtio-console transport: {0}")]
    Transport(#[from] MmioError),
}

device_stats! {
    /// Counters of a virtio-console device.
    pub struct ConsoleStats {
        /// Bytes the guest sent that reached the socket.
        pub tx_bytes: u64,
        /// Bytes the guest sent that were dropped: the peer was gone, or the device was stopped
        /// while waiting for room.
        pub tx_discarded_bytes: u64,
        /// Transmit chains given up on (partly or wholly unsent) because the stop flag was set
        /// while the socket was full.
        pub tx_abandoned: u64,
        /// Transmit chains returned unsent because they were malformed.
        pub tx_malformed: u64,
        /// Bytes delivered to the guest.
        pub rx_bytes: u64,
        /// Receive chains returned unused (used length 0) because they were malformed.
        pub rx_malformed: u64,
        /// The RX worker read end-of-file (or an error) from the socket and stopped watching it.
        pub rx_closed: bool,
    }
    counters: Counters,
    reader: ConsoleStatsReader,
}

/// virtio-console device (one port, `/dev/hvc0`) on a connected stream socket.
pub struct VirtioConsole {
    socket: Arc<OwnedFd>,
    stats: Arc<Counters>,
    /// The transmit path (on the vCPU thread), with the stop flag.
    tx: ConsoleTx,
    /// The RX worker (joined on drop).
    rx: RxWorkers,
}

/// Build a virtio-console device on `socket` behind a virtio-mmio transport, ready for the
/// MMIO bus. `irq` is written on every interrupt and must be registered as a KVM irqfd for the
/// device's GSI. Take the device's [`ConsoleStopper`] through `lock().device().stopper()`.
pub fn attach_console(
    socket: OwnedFd,
    mem: GuestMemoryMmap,
    irq: EventFd,
) -> Result<MmioTransport<VirtioConsole>, ConsoleError> {
    let console = VirtioConsole::new(socket)?;
    Ok(MmioTransport::new(console, mem, irq)?)
}

impl VirtioConsole {
    /// A device on `socket`, which must be a connected `SOCK_STREAM` socket. Puts the descriptor
    /// in non-blocking mode (on its open file description: every duplicate shares it).
    pub fn new(socket: OwnedFd) -> Result<VirtioConsole, ConsoleError> {
        prepare_socket(socket.as_raw_fd())?;
        debug!("virtio-console: created");
        let socket = Arc::new(socket);
        let stats = Arc::<Counters>::default();
        Ok(VirtioConsole {
            tx: ConsoleTx::new(socket.clone(), stats.clone()),
            socket,
            stats,
            rx: RxWorkers::new("virtio-console", RX_QUEUE),
        })
    }

    /// The device's counters so far.
    pub fn stats(&self) -> ConsoleStats {
        self.stats.snapshot()
    }

    /// A handle to read the counters later, e.g. after the transport went onto the MMIO bus.
    pub fn stats_reader(&self) -> ConsoleStatsReader {
        ConsoleStatsReader::new(self.stats.clone())
    }

    /// A handle that releases a vCPU waiting in TX for room in the socket, usable from any
    /// thread while the device sits on the MMIO bus (the VM sets it when it ends).
    pub fn stopper(&self) -> ConsoleStopper {
        self.tx.stopper()
    }
}

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        // Then `rx` stops and joins the worker.
        self.tx.stop();
    }
}

impl VirtioDevice for VirtioConsole {
    fn info(&self) -> &DeviceInfo {
        &INFO
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), ActivateError> {
        activation.require_ready(&[RX_QUEUE, TX_QUEUE])?;
        // After end-of-file there is nothing to watch (a worker of an earlier activation saw it).
        let source = rx_source(&self.socket, !self.stats.rx_closed.get());
        let stats = self.stats.clone();
        let rx = move || ConsoleRx::new(stats);
        self.rx.start(source, activation.access, rx)?;
        debug!("virtio-console: activated");
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        if index == RX_QUEUE {
            // New receive buffers: wake the worker, which fills them under the lock later.
            self.rx.kick();
            return false;
        }
        self.tx.process(queue, mem)
    }

    fn workers(&mut self) -> Option<&mut RxWorkers> {
        Some(&mut self.rx)
    }

    /// Also sets the TX stop flag: the transport is going away, nothing should wait for the
    /// socket any more. (A reset leaves the flag alone: TX runs under the same transport lock
    /// as a reset, so a reset never finds it waiting, and the flag is permanent while a driver
    /// resets the device when probing it, before any output.)
    fn stop_workers(&mut self) {
        self.tx.stop();
        self.rx.stop();
    }
}
