//! virtio-net's transmit path, on the vCPU thread: each chain the driver published on the
//! transmit queue goes to the TAP with one `writev`, behind [`ZERO_HDR`] instead of the guest's
//! header (see the [module docs](super) for why), and is returned with a used length of 0.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use tracing::debug;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;

use super::device::Counters;
use super::{NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::devices::virtio::chain::{ChainError, IoChain};
use crate::devices::virtio::queue::serve_chains;
use crate::devices::virtio::sys::MAX_IOVECS;

/// Largest frame accepted for transmission, header included: 64 KiB of Ethernet frame.
const MAX_TX_LEN: u64 = VNET_HDR_LEN as u64 + 65_536;

/// The header every frame goes to the TAP with (the guest's is dropped; see the
/// [module docs](super)).
static ZERO_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

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

/// The transmit side of a virtio-net device.
pub(super) struct NetTx {
    tap: Arc<OwnedFd>,
    stats: Arc<Counters>,
}

impl NetTx {
    pub(super) fn new(tap: Arc<OwnedFd>, stats: Arc<Counters>) -> NetTx {
        NetTx { tap, stats }
    }

    /// Sends every frame the driver published; returns whether to interrupt it.
    pub(super) fn process(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
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
        self.check_header(&guest_hdr);
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

    /// Counts (and logs at `debug`) a guest header with offload metadata, which is never sent.
    fn check_header(&self, guest_hdr: &[u8; VNET_HDR_LEN]) {
        // 10: fits any usize.
        #[allow(clippy::cast_possible_truncation)]
        const META: usize = NUM_BUFFERS_OFFSET as usize;
        if guest_hdr[..META] == [0; META] {
            return;
        }
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
}
