//! virtio-net's receive side, run by the shared RX worker (`rx_worker`): one frame from the TAP
//! into each receive chain, `num_buffers` set to 1; a frame larger than the chain (it reaches
//! the spare byte after it) or without payload is dropped.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use tracing::{debug, warn};

use super::device::Counters;
use super::{NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::devices::virtio::chain::{ChainError, IoChain};
use crate::devices::virtio::rx_worker::{Batch, Filled, RxDevice};
use crate::devices::virtio::sys::MAX_IOVECS;

/// virtio-net's receive work: frames from the TAP into receive chains.
pub(super) struct NetRx {
    stats: Arc<Counters>,
    /// Spare byte after the chain: a frame that reaches it did not fit.
    overflow: [u8; 1],
    tap_error_logged: bool,
}

impl NetRx {
    pub(super) fn new(stats: Arc<Counters>) -> NetRx {
        NetRx {
            stats,
            overflow: [0],
            tap_error_logged: false,
        }
    }
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

    fn received(&mut self, filled: Filled<'_>) -> Option<u32> {
        let Filled {
            chain,
            mem,
            head,
            len: n,
        } = filled;
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
