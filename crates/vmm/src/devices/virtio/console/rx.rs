//! virtio-console's receive side, run by the shared RX worker (`rx_worker`): whatever the
//! socket holds into each receive chain; at end-of-file (or a read error) the worker stops
//! watching the socket.

use std::io;
use std::sync::Arc;

use tracing::{debug, warn};

use super::device::Counters;
use crate::devices::virtio::rx_worker::{Batch, Filled, RxDevice};

/// virtio-console's receive side: whatever the socket holds into each receive chain (a
/// stream: a partial fill is fine).
pub(super) struct ConsoleRx {
    stats: Arc<Counters>,
}

impl ConsoleRx {
    pub(super) fn new(stats: Arc<Counters>) -> ConsoleRx {
        ConsoleRx { stats }
    }
}

impl RxDevice for ConsoleRx {
    const NAME: &'static str = "virtio-console";
    /// A readv into nothing returns 0, which would read as end-of-file.
    const MIN_CHAIN: u64 = 1;
    /// End of file: stop reading.
    const AT_EOF: Batch = Batch::Closed;

    fn received(&mut self, filled: Filled<'_>) -> Option<u32> {
        let n = filled.len;
        self.stats.rx_bytes.add(n);
        // n <= the chain's capacity, which 256 descriptors of u32 bound: fits.
        Some(u32::try_from(n).unwrap_or(0))
    }

    fn malformed(&mut self) {
        self.stats.rx_malformed.add(1);
    }

    fn read_failed(&mut self, e: io::Error) -> Batch {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) => {
                debug!(error = %e, "virtio-console: the peer reset the channel");
            }
            _ => warn!(error = %e, "virtio-console: reading the channel failed"),
        }
        Batch::Closed
    }

    fn closed(&mut self) {
        self.stats.rx_closed.set();
        debug!("virtio-console: the peer closed the channel; RX idle");
    }
}
