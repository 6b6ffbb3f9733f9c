//! The receive side of an fd-backed virtio device (virtio-net on a TAP, virtio-console on a
//! socket): a thread per activation that waits in `epoll` on the source descriptor, a kick
//! eventfd (the driver posted receive buffers) and a stop eventfd, and moves data into the
//! guest's receive queue in batches, each under the transport lock.
//!
//! The device supplies the batch ([`RxFill`]); [`RxWorkers`] owns the thread's life: started on
//! activation, told to stop on reset, and joined by the transport once it is out of the device
//! lock ([`RxWorkers::take_stopped`]) or when the device is dropped.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use tracing::{debug, error};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::log_limit::{limited, LogLimiter};
use super::{enable_notification, pending_chains, pop_chain, QueueAccess, QueueAccessError};

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

/// A device's receive work, run on its worker thread (and made there: it may hold host
/// pointers into guest memory, which are not `Send`).
pub(crate) trait RxFill {
    /// Fills up to a batch of `queue`'s receive chains from `source`, under the transport lock;
    /// sets `used` when it completed a chain.
    fn fill(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        source: RawFd,
        used: &mut bool,
    ) -> Batch;

    /// The source closed ([`Batch::Closed`]): it is no longer watched.
    fn closed(&mut self) {}
}

/// The next receive chain the driver posted, for a [`RxFill`]. None when there is none (or
/// the ring is broken): driver notifications are then on again, after one more look for
/// buffers posted before the driver could see that.
pub(crate) fn next_chain<'m>(
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
    tid: Arc<AtomicI32>,
}

/// A device's RX worker: at most one running, and those told to stop until they are joined.
pub(crate) struct RxWorkers {
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
    /// [`RxFill`] on the new thread.
    pub(crate) fn start<F: RxFill>(
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
        let tid = Arc::new(AtomicI32::new(0));
        // The worker owns its own handles on the eventfds: an epoll registration dies with the
        // last descriptor of its file, and a stop written just before that would be lost.
        let (name, queue, watching) = (self.name, self.queue, source.watch);
        let (fd, worker_kick, worker_stop) = (source.fd, kick.try_clone()?, stop.try_clone()?);
        let worker_tid = tid.clone();
        let handle = thread::Builder::new()
            .name(format!("{name}-rx"))
            .spawn(move || {
                Worker {
                    name,
                    queue,
                    source: fd,
                    access,
                    epoll,
                    kick: worker_kick,
                    _stop: worker_stop,
                    tid: worker_tid,
                    watching,
                    fill: make(),
                }
                .run()
            })?;
        self.running = Some(Running {
            handle,
            stop,
            kick,
            tid,
        });
        Ok(())
    }

    /// New receive buffers: wakes the worker, which fills them under the lock later.
    pub(crate) fn kick(&mut self) {
        if let Some(w) = &self.running {
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
    pub(crate) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Kernel thread id of the running worker, once it has started (for diagnostics).
    pub(crate) fn tid(&self) -> Option<i32> {
        self.running
            .as_ref()
            .map(|w| w.tid.load(Ordering::Acquire))
            .filter(|&tid| tid != 0)
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
            // the transport, which SharedTransport's drop rules out).
            if handle.thread().id() == thread::current().id() {
                continue;
            }
            if handle.join().is_err() {
                error!("{}: RX worker panicked", self.name);
            }
        }
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
    tid: Arc<AtomicI32>,
    /// The source is registered in `epoll` (until it closes).
    watching: bool,
    fill: F,
}

impl<F: RxFill> Worker<F> {
    fn run(mut self) {
        let name = self.name;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tid.store(tid, Ordering::Release);
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
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(error = %e, "{name}: RX worker cannot wait; stopping");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_STOP => {
                        debug!(tid, "{name}: RX worker stopped");
                        return;
                    }
                    TOKEN_KICK => {
                        // Reset the counter; a failure (already 0) changes nothing.
                        let _ = self.kick.read();
                        have_buffers = true;
                    }
                    TOKEN_SOURCE => readable = true,
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
        self.fill.closed();
    }

    /// One batch under the transport lock.
    fn deliver(&mut self) -> Result<Batch, QueueAccessError> {
        let mut outcome = Batch::NoBuffers;
        let source = self.source.as_raw_fd();
        let (name, fill) = (self.name, &mut self.fill);
        self.access.with_queue(self.queue, |queue, mem| {
            // While we have buffers we need no kicks; re-enabled when we run out.
            if let Err(e) = queue.disable_notification(mem) {
                debug!(error = %e, "{name}: cannot disable RX notifications");
            }
            let mut used = false;
            outcome = fill.fill(queue, mem, source, &mut used);
            used && queue.needs_notification(mem).unwrap_or(true)
        })?;
        Ok(outcome)
    }
}
