//! The receive side of an fd-backed virtio device (virtio-net on a TAP, virtio-console on a
//! socket): a thread per activation that waits in `epoll` on the source descriptor, a kick
//! eventfd (the driver posted receive buffers) and a stop eventfd, and moves data into the
//! guest's receive queue in batches, each under the transport lock.
//!
//! Everything but what the data means is here, once for both devices:
//!
//! - [`RxWorkers`] owns the thread's life: started on activation, told to stop on reset, and
//!   joined by the transport once it is out of the device lock ([`RxWorkers::take_stopped`]) or
//!   when the device is dropped.
//! - The batch loop ([`fill_batch`]): take a receive chain the driver posted, load it (an
//!   [`IoChain`]: the common rules for a writable chain), `readv` into it and return it, at most
//!   [`RX_BATCH`] chains per lock acquisition; a malformed chain goes back unused, the data waits
//!   in the source while there is no buffer, and driver notifications are on again once the
//!   buffers run out.
//! - The device ([`RxDevice`]) says what a chain must hold beyond that, what a read means (a
//!   frame that did not fit, a stream's bytes), what end-of-file and read errors mean, and
//!   counts.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use tracing::{debug, error};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{ChainError, IoChain};
use super::log_limit::{limited, LogLimiter};
use super::queue::{add_used, enable_notification, pending_chains, pop_chain};
use super::sys::gettid;
use super::{ActivateError, QueueAccess, QueueAccessError};

/// Most receive chains the RX worker fills per acquisition of the transport lock.
pub const RX_BATCH: usize = 64;

const TOKEN_STOP: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_SOURCE: u64 = 2;

/// What one batch ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Batch {
    /// The batch limit: release the lock and go on.
    More,
    /// Nothing more to read from the source now: wait for it.
    Drained,
    /// End of file or a hard error: stop watching the source.
    Closed,
    /// No receive buffer: wait for a kick.
    NoBuffers,
}

/// A device's receive side, as [`fill_batch`] drives it on the worker thread (where it is made:
/// what it holds may point into guest memory, which is not `Send`).
pub(crate) trait RxDevice {
    /// The device, in log lines and the thread's name.
    const NAME: &'static str;
    /// Fewest bytes a receive chain must hold.
    const MIN_CHAIN: u64;
    /// What end-of-file on the source means (the chain it found is kept for later).
    const AT_EOF: Batch;

    /// Checks a loaded chain beyond the common rules.
    fn check(&self, chain: &IoChain) -> Result<(), ChainError> {
        let _ = chain;
        Ok(())
    }

    /// Reads from `source` into `chain`.
    fn read(&mut self, chain: &mut IoChain, source: RawFd) -> io::Result<u64> {
        chain.read_from(source, &mut [])
    }

    /// A read filled a chain: the used length to return it with, or `None` to keep the chain
    /// for the next read (what was read is dropped).
    fn received(&mut self, filled: Filled<'_>) -> Option<u32>;

    /// A malformed chain was returned unused.
    fn malformed(&mut self);

    /// Reading failed (not `WouldBlock` or `Interrupted`): log it and say what now.
    fn read_failed(&mut self, error: io::Error) -> Batch;

    /// The source closed ([`Batch::Closed`]): it is no longer watched.
    fn closed(&mut self) {}
}

/// What one read put into a receive chain, for [`RxDevice::received`].
pub(crate) struct Filled<'a> {
    pub chain: &'a IoChain,
    pub mem: &'a GuestMemoryMmap,
    /// The chain's head index (for log lines).
    pub head: u16,
    /// Bytes read: at least 1.
    pub len: u64,
}

/// The next receive chain the driver posted. None when there is none (or the ring is broken):
/// driver notifications are then on again, after one more look for buffers posted before the
/// driver could see that.
fn next_chain<'m>(
    device: &str,
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    for _ in 0..2 {
        let Some(pending) = pending_chains(queue, mem, device) else {
            enable_notification(device, queue, mem);
            return None;
        };
        if pending == 0 {
            if enable_notification(device, queue, mem) {
                continue;
            }
            return None;
        }
        let chain = pop_chain(device, queue, mem);
        if chain.is_none() {
            enable_notification(device, queue, mem);
        }
        return chain;
    }
    None
}

/// Fills up to [`RX_BATCH`] of `queue`'s receive chains from `source`, under the transport lock;
/// sets `used` when it returned a chain to the driver.
pub(crate) fn fill_batch<D: RxDevice>(
    device: &mut D,
    chain: &mut IoChain,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    source: RawFd,
    used: &mut bool,
) -> Batch {
    let name = D::NAME;
    for _ in 0..RX_BATCH {
        // Out of buffers: wait for a kick (notifications are on again).
        let Some(desc_chain) = next_chain(name, queue, mem) else {
            return Batch::NoBuffers;
        };
        let head = desc_chain.head_index();
        let loaded = chain
            .load_writable(desc_chain, mem, D::MIN_CHAIN)
            .and_then(|()| device.check(chain));
        if let Err(e) = loaded {
            debug!(head, error = %e, "{name}: malformed RX chain; returned unused");
            device.malformed();
            add_used(name, queue, mem, head, 0, used);
            continue;
        }
        match device.read(chain, source) {
            Ok(0) => {
                // End of file: nothing to read; the chain waits for later.
                queue.go_to_previous_position();
                return D::AT_EOF;
            }
            Ok(len) => {
                let chain = &*chain;
                let filled = Filled {
                    chain,
                    mem,
                    head,
                    len,
                };
                match device.received(filled) {
                    Some(used_len) => add_used(name, queue, mem, head, used_len, used),
                    None => queue.go_to_previous_position(),
                }
            }
            Err(e) => {
                queue.go_to_previous_position();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Batch::Drained,
                    io::ErrorKind::Interrupted => {}
                    _ => return device.read_failed(e),
                }
            }
        }
    }
    Batch::More
}

/// The descriptor a worker reads from, and how to watch it.
pub(crate) struct Source {
    pub fd: Arc<OwnedFd>,
    /// Edge-triggered events to wait for (readable, and hang-up where it matters).
    pub events: EventSet,
    /// Whether to watch it at all (not after an earlier worker saw it close).
    pub watch: bool,
}

/// The running worker, as the device sees it.
struct Running {
    handle: JoinHandle<()>,
    stop: EventFd,
    kick: EventFd,
    probe: Arc<Probe>,
}

/// What a worker tells the outside about itself (for diagnostics: a debug dump reads it while
/// the worker runs). Relaxed counters; a few per batch, none per frame.
#[derive(Debug, Default)]
struct Probe {
    tid: AtomicI32,
    /// Kicks the device sent (each receive-queue notify).
    kicks_sent: AtomicU64,
    /// Kick events the worker took.
    kicks_seen: AtomicU64,
    /// Readable events of the source.
    source_events: AtomicU64,
    /// Batches delivered (each under the transport lock).
    batches: AtomicU64,
    /// [`WAITING`] with what it waits for ([`READABLE`], [`HAVE_BUFFERS`], [`WATCHING`]), or
    /// [`DONE`]; 0 while working.
    state: AtomicU8,
}

const READABLE: u8 = 1;
const HAVE_BUFFERS: u8 = 2;
const WATCHING: u8 = 4;
const WAITING: u8 = 8;
const DONE: u8 = 16;

impl Probe {
    fn describe(&self) -> String {
        let state = self.state.load(Ordering::Relaxed);
        let what = if state & DONE != 0 {
            "ended".to_owned()
        } else if state & WAITING != 0 {
            format!(
                "waiting (source readable={} buffers={} watching={})",
                state & READABLE != 0,
                state & HAVE_BUFFERS != 0,
                state & WATCHING != 0
            )
        } else {
            "working".to_owned()
        };
        format!(
            "rx worker tid={} {what}; kicks sent={} seen={} source events={} batches={}",
            self.tid.load(Ordering::Relaxed),
            self.kicks_sent.load(Ordering::Relaxed),
            self.kicks_seen.load(Ordering::Relaxed),
            self.source_events.load(Ordering::Relaxed),
            self.batches.load(Ordering::Relaxed)
        )
    }
}

/// A device's RX worker: at most one running, and those told to stop until they are joined.
/// What [`VirtioDevice::workers`](super::VirtioDevice::workers) hands the transport.
pub struct RxWorkers {
    /// The device, for logs and the thread name (`<name>-rx`).
    name: &'static str,
    queue: usize,
    running: Option<Running>,
    stopping: Vec<JoinHandle<()>>,
    /// For what the driver's kicks can make us say (each notify of the receive queue kicks).
    log: LogLimiter,
}

impl RxWorkers {
    pub(crate) fn new(name: &'static str, queue: usize) -> RxWorkers {
        RxWorkers {
            name,
            queue,
            running: None,
            stopping: Vec::new(),
            log: LogLimiter::new(name),
        }
    }

    /// Starts a worker on `source` (stopping the one running, if any); `make` builds its
    /// [`RxDevice`] on the new thread.
    pub(crate) fn start<F: RxDevice>(
        &mut self,
        source: Source,
        access: QueueAccess,
        make: impl FnOnce() -> F + Send + 'static,
    ) -> Result<(), ActivateError> {
        self.spawn(source, access, make)
            .map_err(ActivateError::Worker)
    }

    fn spawn<F: RxDevice>(
        &mut self,
        source: Source,
        access: QueueAccess,
        make: impl FnOnce() -> F + Send + 'static,
    ) -> io::Result<()> {
        self.stop();
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KICK),
        )?;
        if source.watch {
            epoll.ctl(
                ControlOperation::Add,
                source.fd.as_raw_fd(),
                EpollEvent::new(source.events, TOKEN_SOURCE),
            )?;
        }
        let probe = Arc::new(Probe::default());
        // The worker owns its own handles on the eventfds: an epoll registration dies with the
        // last descriptor of its file, and a stop written just before that would be lost.
        let (name, queue, watching) = (self.name, self.queue, source.watch);
        let (fd, worker_kick, worker_stop) = (source.fd, kick.try_clone()?, stop.try_clone()?);
        let worker_probe = probe.clone();
        let handle = thread::Builder::new()
            .name(format!("{name}-rx"))
            .spawn(move || {
                // A jailed process: this thread's seccomp filter, before any guest data.
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Device) {
                    tracing::error!("{name} RX thread not started: {e}");
                    return;
                }
                Worker {
                    name,
                    queue,
                    source: fd,
                    access,
                    epoll,
                    kick: worker_kick,
                    _stop: worker_stop,
                    probe: worker_probe,
                    watching,
                    device: make(),
                    chain: IoChain::default(),
                }
                .run()
            })?;
        self.running = Some(Running {
            handle,
            stop,
            kick,
            probe,
        });
        Ok(())
    }

    /// New receive buffers: wakes the worker, which fills them under the lock later.
    pub(crate) fn kick(&mut self) {
        if let Some(w) = &self.running {
            w.probe.kicks_sent.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = w.kick.write(1) {
                limited!(
                    self.log,
                    warn,
                    error = %e,
                    "{}: cannot kick the RX worker",
                    self.name
                );
            }
        }
    }

    /// Tells the running worker to stop; it is joined later ([`Self::take_stopped`], or drop).
    pub(crate) fn stop(&mut self) {
        if let Some(w) = self.running.take() {
            if let Err(e) = w.stop.write(1) {
                // It still exits on its next queue access, which the transport now refuses.
                error!(error = %e, "{}: cannot signal the RX worker to stop", self.name);
            }
            self.stopping.push(w.handle);
        }
    }

    /// Whether a worker is running (the device is activated).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Kernel thread id of the running worker, once it has started (for diagnostics).
    pub fn tid(&self) -> Option<i32> {
        self.running
            .as_ref()
            .map(|w| w.probe.tid.load(Ordering::Acquire))
            .filter(|&tid| tid != 0)
    }

    /// The running worker's state and counters, one line (for a debug dump).
    pub fn describe(&self) -> String {
        match &self.running {
            Some(w) => w.probe.describe(),
            None => "rx worker not running".to_owned(),
        }
    }

    /// Workers told to stop and not joined yet.
    pub(crate) fn take_stopped(&mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.stopping)
    }
}

impl Drop for RxWorkers {
    fn drop(&mut self) {
        self.stop();
        for handle in self.stopping.drain(..) {
            // Never join ourselves (only possible if the worker dropped the last reference to
            // the transport, which MmioTransport's drop rules out).
            if handle.thread().id() == thread::current().id() {
                continue;
            }
            if handle.join().is_err() {
                error!("{}: RX worker panicked", self.name);
            }
        }
    }
}

/// Marks the probe [`DONE`] however the worker's loop ends.
struct Done<'a>(&'a Probe);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.state.store(DONE, Ordering::Relaxed);
    }
}

/// The worker thread's state.
struct Worker<F> {
    name: &'static str,
    queue: usize,
    source: Arc<OwnedFd>,
    access: QueueAccess,
    epoll: Epoll,
    kick: EventFd,
    /// Keeps the stop eventfd (registered in `epoll`) open as long as the worker runs.
    _stop: EventFd,
    probe: Arc<Probe>,
    /// The source is registered in `epoll` (until it closes).
    watching: bool,
    device: F,
    /// Scratch: the receive chain being filled.
    chain: IoChain,
}

impl<F: RxDevice> Worker<F> {
    fn run(mut self) {
        let name = self.name;
        let tid = gettid();
        self.probe.tid.store(tid, Ordering::Release);
        let probe = Arc::clone(&self.probe);
        let _done = Done(&probe);
        debug!(tid, "{name}: RX worker started");
        // Look at both right away: data may already wait, the driver may have posted buffers.
        let mut readable = true;
        let mut have_buffers = true;
        let mut events = [EpollEvent::default(); 4];
        loop {
            while self.watching && readable && have_buffers {
                match self.deliver() {
                    Ok(Batch::More) => {}
                    Ok(Batch::Drained) => readable = false,
                    Ok(Batch::Closed) => self.unwatch(),
                    Ok(Batch::NoBuffers) => have_buffers = false,
                    // The driver stopped the queue: nothing to do until the device is reset.
                    Err(QueueAccessError::NotReady(_)) => have_buffers = false,
                    Err(QueueAccessError::Stale) => {
                        debug!(tid, "{name}: RX worker done (device reset or gone)");
                        return;
                    }
                }
            }
            let waiting = WAITING
                | if readable { READABLE } else { 0 }
                | if have_buffers { HAVE_BUFFERS } else { 0 }
                | if self.watching { WATCHING } else { 0 };
            probe.state.store(waiting, Ordering::Relaxed);
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(error = %e, "{name}: RX worker cannot wait; stopping");
                    return;
                }
            };
            probe.state.store(0, Ordering::Relaxed);
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => {
                        debug!(tid, "{name}: RX worker stopped");
                        return;
                    }
                    TOKEN_KICK => {
                        // Reset the counter; a failure (already 0) changes nothing.
                        let _ = self.kick.read();
                        probe.kicks_seen.fetch_add(1, Ordering::Relaxed);
                        have_buffers = true;
                    }
                    TOKEN_SOURCE => {
                        probe.source_events.fetch_add(1, Ordering::Relaxed);
                        readable = true;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Stops watching the source: after end-of-file it would report readable forever.
    fn unwatch(&mut self) {
        self.watching = false;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Delete,
            self.source.as_raw_fd(),
            EpollEvent::default(),
        ) {
            debug!(error = %e, "{}: cannot remove the source from epoll", self.name);
        }
        self.device.closed();
    }

    /// One batch under the transport lock.
    fn deliver(&mut self) -> Result<Batch, QueueAccessError> {
        self.probe.batches.fetch_add(1, Ordering::Relaxed);
        let mut outcome = Batch::NoBuffers;
        let source = self.source.as_raw_fd();
        let (name, device, chain) = (self.name, &mut self.device, &mut self.chain);
        self.access.with_queue(self.queue, |queue, mem| {
            // While we have buffers we need no kicks; re-enabled when we run out.
            if let Err(e) = queue.disable_notification(mem) {
                debug!(error = %e, "{name}: cannot disable RX notifications");
            }
            let mut used = false;
            outcome = fill_batch(device, chain, queue, mem, source, &mut used);
            used && queue.needs_notification(mem).unwrap_or(true)
        })?;
        Ok(outcome)
    }
}
