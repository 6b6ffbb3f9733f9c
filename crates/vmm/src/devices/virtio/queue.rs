//! Driver-facing queue helpers shared by every device: taking the chains the driver published
//! (without virtio-queue's log lines, which a guest could trigger at will), returning them, and
//! the loop a device runs on QueueNotify.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// How many chains the driver has published and the device has not taken; `None` if the
/// available index is unreadable or runs ahead of the queue size (a broken or hostile driver;
/// logged at debug level, so a guest cannot flood the host's log).
pub fn pending_chains(queue: &Queue, mem: &GuestMemoryMmap, device: &str) -> Option<u16> {
    let avail = match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx.0,
        Err(e) => {
            tracing::debug!(error = %e, "{device}: cannot read the available ring index");
            return None;
        }
    };
    let pending = avail.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        tracing::debug!(
            avail,
            next = queue.next_avail(),
            "{device}: available index runs ahead of the queue size; ignored"
        );
        return None;
    }
    Some(pending)
}

/// The next chain the driver published, if any: `Queue::pop_descriptor_chain` without its log
/// line. virtio-queue logs (through the `log` crate, at error level) every time it refuses to
/// iterate a queue, which a guest can arrange at will: an available ring at guest address 0
/// (which virtio-queue takes for a queue that was never set up), or an available index moved
/// out of range between [`pending_chains`] and this call. Here that is a `debug` line.
pub(crate) fn pop_chain<'m>(
    device: &str,
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    match queue.iter(mem) {
        Ok(mut chains) => chains.next(),
        Err(e) => {
            tracing::debug!(error = %e, "{device}: cannot read the available ring");
            None
        }
    }
}

/// Returns a chain to the driver; `used` becomes true when it went into the used ring.
/// `device` names the device in the (debug) log line of a guest-caused failure: the driver's
/// used ring is the driver's problem (and was checked at activation), not worth a warning it
/// could repeat at will.
pub(crate) fn add_used(
    device: &str,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    used: &mut bool,
) {
    match queue.add_used(mem, head, len) {
        Ok(()) => *used = true,
        Err(e) => tracing::debug!(head, error = %e, "{device}: cannot return a buffer"),
    }
}

/// Re-enables driver notifications; returns whether buffers were posted meanwhile.
pub(crate) fn enable_notification(device: &str, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.enable_notification(mem).unwrap_or_else(|e| {
        tracing::debug!(error = %e, "{device}: cannot enable notifications");
        false
    })
}

/// Serves the chains the driver has published so far (it notifies again for anything later):
/// `serve` handles one and says the length to return it with. Returns whether the driver must
/// be interrupted (a chain was used and the ring asks for it), as
/// [`VirtioDevice::process_queue`](super::VirtioDevice::process_queue) does.
pub(crate) fn serve_chains(
    device: &str,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> bool {
    let Some(pending) = pending_chains(queue, mem, device) else {
        return false;
    };
    let mut used = false;
    for _ in 0..pending {
        let Some(chain) = pop_chain(device, queue, mem) else {
            break;
        };
        let head = chain.head_index();
        let len = serve(chain);
        add_used(device, queue, mem, head, len, &mut used);
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, r, DriverQueue, BUF_BASE, QUEUE_BASE};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn pop_chain_takes_chains_and_refuses_broken_rings() {
        let mem = memory();
        let mut driver = DriverQueue::new(&mem, QUEUE_BASE, 8);
        let mut q = Queue::new(8).expect("queue");
        q.try_set_desc_table_address(driver.desc).expect("desc");
        q.try_set_avail_ring_address(driver.avail).expect("avail");
        q.try_set_used_ring_address(driver.used).expect("used");
        q.set_ready(true);
        let head = driver.add_chain(&[r(BUF_BASE, 16)]);
        let popped = pop_chain("test", &mut q, &mem).map(|c| c.head_index());
        assert_eq!(popped, Some(head));
        assert!(pop_chain("test", &mut q, &mem).is_none(), "nothing more");

        // An available index further ahead than the queue is long.
        driver.set_avail_idx(100);
        assert!(pop_chain("test", &mut q, &mem).is_none());
        assert_eq!(q.next_avail(), 1);

        // An available ring at guest address 0, with a chain in it: virtio-queue takes the
        // queue for one that was never set up (and would log so at each attempt).
        driver.set_avail_idx(1);
        mem.write_obj(2u16.to_le(), GuestAddress(2))
            .expect("avail idx");
        q.try_set_avail_ring_address(GuestAddress(0))
            .expect("avail at 0");
        assert!(pop_chain("test", &mut q, &mem).is_none());

        // A stopped queue.
        q.try_set_avail_ring_address(driver.avail).expect("avail");
        q.set_ready(false);
        assert!(pop_chain("test", &mut q, &mem).is_none());
    }
}
