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
//! The worker is told to stop on device reset and joined by the
//! [`MmioTransport`](super::MmioTransport) once it has released the lock; dropping the transport
//! (or a bare [`Net`]) stops and joins it too. No thread outlives the device.
//! The thread, its life (epoll, kick, stop, join) and the batch loop are `rx_worker`'s, and the
//! chain rules `chain::IoChain`'s, shared by virtio-net and virtio-console; this module says
//! what a frame is and how it is counted.
//!
//! Files: `device.rs` (the [`VirtioDevice`](super::VirtioDevice) implementation,
//! configuration space, features, counters), `tx.rs` (the transmit path, with the header
//! policy above), `rx.rs` (what the RX worker does with a frame), `backend.rs` (the TAP's
//! checks), `tests.rs`.
//!
//! Per-frame guest errors are logged at `debug` (a hostile guest could otherwise flood the log)
//! and counted in [`NetStats`]; nothing the guest writes can panic the device.

mod backend;
mod device;
mod rx;
mod tx;

#[cfg(test)]
mod tests;

use super::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_GSO, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_HDRLEN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_HASH_REPORT, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_RSC_EXT,
};

pub use super::rx_worker::RX_BATCH;
pub use device::{attach_net, Net, NetError, NetStats, NetStatsReader};

/// Bytes of `struct virtio_net_hdr_v1` in front of every frame, in both directions.
pub const VNET_HDR_LEN: usize = 12;
/// Size of each virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
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
