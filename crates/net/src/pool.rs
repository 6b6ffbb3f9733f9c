//! A pool of configured TAP devices, one per /30 slot.
//!
//! A slot's TAP is `xcgi<slot>` inside xcgi's namespace, with the host address
//! `host/30`, link up, and a PERMANENT neighbour entry `guest -> guest MAC`, so the host never
//! waits on ARP for a new guest. [`Pool::lease`] hands out a ready TAP (prefilled) or creates
//! one on demand; dropping the [`Lease`] destroys that TAP (closing its descriptor) on a
//! background thread and, to keep `prefill` TAPs ready, creates a fresh one for the slot. A
//! returned slot therefore never carries state from the previous guest: no queued frames, no
//! offload, filter or carrier settings a VMM may have made on the descriptor, and no way for a
//! leaked duplicate of the old descriptor to see the next guest's traffic (such a slot is held
//! back until the duplicate is closed).

use std::collections::BTreeSet;
use std::mem::ManuallyDrop;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::addr::{AddrPlan, MacAddr, SlotAddrs, DEFAULT_BASE, DEFAULT_SIZE, SLOT_PREFIX_LEN};
use crate::netlink::Netlink;
use crate::netns::NetNs;
use crate::tap::Tap;
use crate::NetError;

/// Prefix of the TAP names; slot `i` is `xcgi<i>`.
pub const IFNAME_PREFIX: &str = "xcgi";
/// Default number of TAPs kept configured and ready.
pub const DEFAULT_PREFILL: u32 = 4;
/// How long [`Pool::lease`] waits for a returned lease's slot when every other slot is in use
/// (destroying a TAP takes ~20 ms of kernel RCU waiting).
pub const RETURN_WAIT: Duration = Duration::from_secs(2);

/// Configuration of a [`Pool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// First address of the pool; must start a /30. Default 172.16.0.0.
    pub base: Ipv4Addr,
    /// Number of /30 slots = the most VMs with a NIC at once. At most what fits in the /16 of
    /// `base` (16384 from x.y.0.0). Default 64.
    pub size: u32,
    /// Number of TAPs kept created and configured ahead of demand (at most `size`).
    /// Default 4.
    pub prefill: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            base: DEFAULT_BASE,
            size: DEFAULT_SIZE,
            prefill: DEFAULT_PREFILL,
        }
    }
}

/// Counts, for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Total number of slots.
    pub size: u32,
    /// Configured TAPs waiting for a lease.
    pub ready: u32,
    /// Slots without a device.
    pub free: u32,
    /// Slots whose returned TAP is still alive because a duplicate of its descriptor is open;
    /// they are reused once that descriptor is closed.
    pub stuck: u32,
    /// Returned leases still being processed in the background.
    pub returning: u32,
    /// Slots held by a [`Lease`] (or getting a TAP for one): `size` minus all the others.
    pub leased: u32,
}

struct Ready {
    addrs: SlotAddrs,
    tap: Tap,
}

struct Stuck {
    slot: u32,
    index: u32,
    name: String,
}

struct State {
    ready: Vec<Ready>,
    free: BTreeSet<u32>,
    stuck: Vec<Stuck>,
    /// Returned leases whose TAP is being destroyed (and maybe recreated) in the background.
    returning: u32,
}

/// Counts the background return threads, so that dropping the pool can wait until none of
/// them holds the pool (and through it the namespace) any more.
#[derive(Default)]
struct Threads {
    count: Mutex<u32>,
    done: Condvar,
}

impl Threads {
    fn enter(&self) {
        *lock(&self.count) += 1;
    }

    fn exit(&self) {
        let mut n = lock(&self.count);
        *n = n.saturating_sub(1);
        drop(n);
        self.done.notify_all();
    }

    fn wait_none(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = lock(&self.count);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self
                .done
                .wait_timeout(n, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// Closes TAPs (destroying them) on a few threads at once: each close waits ~20 ms for an
/// RCU barrier, and concurrent closes share that wait.
fn destroy_all(taps: Vec<Tap>) {
    const THREADS: usize = 16;
    if taps.len() <= 1 {
        drop(taps);
        return;
    }
    let per = taps.len().div_ceil(THREADS);
    let mut groups: Vec<Vec<Tap>> = Vec::new();
    let mut it = taps.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    std::thread::scope(|s| {
        for group in groups {
            // The group sits in a cell so that it survives a failed spawn.
            let cell = Arc::new(Mutex::new(Some(group)));
            let in_thread = Arc::clone(&cell);
            let spawned = std::thread::Builder::new()
                .name("xcgi-net-close".into())
                .spawn_scoped(s, move || drop(lock(&in_thread).take()));
            if spawned.is_err() {
                drop(lock(&cell).take());
            }
        }
    });
}

struct Inner {
    state: Mutex<State>,
    threads: Arc<Threads>,
    /// Signalled whenever a background return completes.
    returned: Condvar,
    nl: Mutex<Netlink>,
    plan: AddrPlan,
    prefill: u32,
    closed: AtomicBool,
    ns: Arc<NetNs>,
    maker: Mutex<Option<Arc<dyn TapMaker>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The TAP name of a pool slot.
pub fn ifname(slot: u32) -> String {
    format!("{IFNAME_PREFIX}{slot}")
}

/// Host-side configuration of a new TAP: link up, host address /30, permanent neighbour.
pub fn configure_tap(nl: &mut Netlink, tap: &Tap, addrs: &SlotAddrs) -> Result<(), NetError> {
    let index = tap.index();
    let wrap = |source| NetError::Configure {
        name: tap.name().to_string(),
        source,
    };
    nl.set_link_up(index).map_err(wrap)?;
    nl.add_ipv4_addr(index, addrs.host, SLOT_PREFIX_LEN)
        .map_err(wrap)?;
    nl.add_permanent_neigh(index, addrs.guest, addrs.mac.0)
        .map_err(wrap)?;
    Ok(())
}

/// Creates and configures the TAP of `addrs`'s slot in `ns` (what a pool does for a slot).
pub fn make_tap(ns: &NetNs, nl: &mut Netlink, addrs: &SlotAddrs) -> Result<Tap, NetError> {
    let tap = ns.run(|| Tap::create(&ifname(addrs.slot)))??;
    configure_tap(nl, &tap, addrs)?;
    Ok(tap)
}

/// Where a pool's TAPs come from once it runs, when not from the pool itself (which needs
/// CAP_SYS_ADMIN and CAP_NET_ADMIN at run time): a privileged process that makes them in the
/// same namespace with [`make_tap`] and hands over their descriptors.
pub trait TapMaker: Send + Sync {
    /// The TAP of `addrs`'s slot, made and configured.
    fn make(&self, addrs: &SlotAddrs) -> Result<Tap, NetError>;
}

impl Inner {
    fn configure(&self, tap: &Tap, addrs: &SlotAddrs) -> Result<(), NetError> {
        configure_tap(&mut lock(&self.nl), tap, addrs)
    }

    /// Creates and configures the TAPs of `slots`, all on one thread in the namespace (or
    /// through the pool's [`TapMaker`]).
    fn make(&self, slots: &[u32]) -> Result<Vec<Ready>, NetError> {
        let addrs = slots
            .iter()
            .map(|&s| self.plan.slot(s))
            .collect::<Result<Vec<_>, _>>()?;
        let maker = self.maker.lock().ok().and_then(|m| m.clone());
        if let Some(m) = maker {
            return addrs
                .into_iter()
                .map(|addrs| {
                    Ok(Ready {
                        tap: m.make(&addrs)?,
                        addrs,
                    })
                })
                .collect();
        }
        let taps = self.ns.run(|| {
            slots
                .iter()
                .map(|&s| Tap::create(&ifname(s)))
                .collect::<Result<Vec<_>, _>>()
        })??;
        // On error the TAPs made so far are dropped, which destroys them.
        let mut out = Vec::with_capacity(taps.len());
        for (tap, addrs) in taps.into_iter().zip(addrs) {
            self.configure(&tap, &addrs)?;
            out.push(Ready { addrs, tap });
        }
        Ok(out)
    }

    fn make_one(&self, slot: u32) -> Result<Ready, NetError> {
        let mut v = self.make(&[slot])?;
        v.pop()
            .ok_or(NetError::Internal("no TAP made for the slot"))
    }

    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while st.returning > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .returned
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Moves stuck slots whose old device has gone to the free set.
    fn reclaim_stuck(&self, st: &mut State) {
        if st.stuck.is_empty() {
            return;
        }
        let mut nl = lock(&self.nl);
        let mut still = Vec::new();
        for s in st.stuck.drain(..) {
            match nl.link(s.index) {
                Ok(Some(link)) if link.name == s.name => still.push(s),
                Ok(_) => {
                    tracing::info!(slot = s.slot, name = %s.name, "stuck TAP is gone; slot reusable");
                    st.free.insert(s.slot);
                }
                Err(error) => {
                    tracing::warn!(slot = s.slot, %error, "cannot check a stuck TAP");
                    still.push(s);
                }
            }
        }
        st.stuck = still;
    }

    /// Destroys a returned TAP and takes its slot back: runs on a background thread, since
    /// closing a TAP's last descriptor blocks for an RCU barrier (~20 ms, little CPU).
    fn give_back(&self, tap: Tap, addrs: SlotAddrs) {
        let index = tap.index();
        let name = tap.name().to_string();
        // Closing the last descriptor destroys the device with its address, route and
        // neighbour entry; the device is unregistered when close() returns.
        drop(tap);
        self.take_back(addrs, index, name);
        let mut st = lock(&self.state);
        st.returning = st.returning.saturating_sub(1);
        drop(st);
        self.returned.notify_all();
    }

    fn take_back(&self, addrs: SlotAddrs, index: u32, name: String) {
        let gone = match lock(&self.nl).link(index) {
            Ok(None) => true,
            Ok(Some(link)) => link.name != name,
            Err(error) => {
                tracing::warn!(%name, %error, "cannot check that a returned TAP is gone");
                false
            }
        };
        if !gone {
            tracing::error!(
                %name,
                slot = addrs.slot,
                "returned TAP still exists: a duplicate of its descriptor is open; the slot \
                 stays out of use until it is closed"
            );
            lock(&self.state).stuck.push(Stuck {
                slot: addrs.slot,
                index,
                name,
            });
            return;
        }
        let refill = !self.closed.load(Ordering::Acquire)
            && (lock(&self.state).ready.len() as u32) < self.prefill;
        if refill {
            match self.make_one(addrs.slot) {
                Ok(ready) => {
                    lock(&self.state).ready.push(ready);
                    return;
                }
                Err(error) => {
                    tracing::warn!(slot = addrs.slot, %error, "cannot refill the TAP pool")
                }
            }
        }
        lock(&self.state).free.insert(addrs.slot);
    }
}

/// The TAP pool of one namespace. Only one pool may use a namespace (TAP names are per slot).
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("plan", &self.inner.plan)
            .field("prefill", &self.inner.prefill)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Pool {
    /// Validates `config`, opens a netlink socket in `ns` and creates `prefill` ready TAPs.
    pub fn new(ns: Arc<NetNs>, config: PoolConfig) -> Result<Pool, NetError> {
        let plan = AddrPlan::new(config.base, config.size)?;
        if config.prefill > config.size {
            return Err(NetError::PrefillTooLarge {
                prefill: config.prefill,
                size: config.size,
            });
        }
        let nl = ns.netlink()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                ready: Vec::new(),
                free: (config.prefill..config.size).collect(),
                stuck: Vec::new(),
                returning: 0,
            }),
            threads: Arc::new(Threads::default()),
            returned: Condvar::new(),
            nl: Mutex::new(nl),
            plan,
            prefill: config.prefill,
            closed: AtomicBool::new(false),
            ns,
            maker: Mutex::new(None),
        });
        let t = Instant::now();
        let slots: Vec<u32> = (0..config.prefill).collect();
        let mut ready = inner.make(&slots)?;
        // Lease the lowest slot first.
        ready.reverse();
        lock(&inner.state).ready = ready;
        tracing::info!(
            base = %config.base,
            size = config.size,
            prefill = config.prefill,
            elapsed_us = t.elapsed().as_micros() as u64,
            "TAP pool ready"
        );
        Ok(Pool { inner })
    }

    /// A configured TAP for one VM: a ready one if any, else one created now.
    ///
    /// When every slot is leased but some leases are being returned, waits up to
    /// [`RETURN_WAIT`] for one of them; [`NetError::PoolExhausted`] otherwise.
    pub fn lease(&self) -> Result<Lease, NetError> {
        let deadline = Instant::now() + RETURN_WAIT;
        let mut st = lock(&self.inner.state);
        let slot = loop {
            if let Some(Ready { addrs, tap }) = st.ready.pop() {
                drop(st);
                tracing::debug!(slot = addrs.slot, name = tap.name(), "TAP leased (ready)");
                return Ok(self.wrap(addrs, tap));
            }
            if st.free.is_empty() {
                self.inner.reclaim_stuck(&mut st);
            }
            if let Some(slot) = st.free.pop_first() {
                break slot;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if st.returning == 0 || left.is_zero() {
                return Err(NetError::PoolExhausted {
                    size: self.inner.plan.size(),
                });
            }
            st = self
                .inner
                .returned
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        drop(st);
        match self.inner.make_one(slot) {
            Ok(Ready { addrs, tap }) => {
                tracing::debug!(slot, name = tap.name(), "TAP leased (created on demand)");
                Ok(self.wrap(addrs, tap))
            }
            Err(e) => {
                lock(&self.inner.state).free.insert(slot);
                Err(e)
            }
        }
    }

    fn wrap(&self, addrs: SlotAddrs, tap: Tap) -> Lease {
        Lease {
            inner: Arc::clone(&self.inner),
            addrs,
            tap: ManuallyDrop::new(tap),
        }
    }

    /// From now on, TAPs come from `maker` (see [`TapMaker`]).
    pub fn set_maker(&self, maker: Arc<dyn TapMaker>) {
        if let Ok(mut m) = self.inner.maker.lock() {
            *m = Some(maker);
        }
    }

    /// The namespace the TAPs live in.
    pub fn netns(&self) -> &Arc<NetNs> {
        &self.inner.ns
    }

    /// The configuration the pool was created with.
    pub fn config(&self) -> PoolConfig {
        PoolConfig {
            base: self.inner.plan.base(),
            size: self.inner.plan.size(),
            prefill: self.inner.prefill,
        }
    }

    /// Waits until no returned lease is still being processed in the background (its TAP
    /// destroyed, its slot free or ready again). Returns false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.inner.wait_idle(timeout)
    }

    /// A snapshot of the slot counts.
    pub fn stats(&self) -> PoolStats {
        let st = lock(&self.inner.state);
        let size = self.inner.plan.size();
        let ready = st.ready.len() as u32;
        let free = st.free.len() as u32;
        let stuck = st.stuck.len() as u32;
        PoolStats {
            size,
            ready,
            free,
            stuck,
            returning: st.returning,
            leased: size.saturating_sub(ready + free + stuck + st.returning),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        // Let returns in flight finish, so that their TAPs (and the namespace, if this held the
        // last reference) are gone when this returns.
        if !self.inner.threads.wait_none(RETURN_WAIT) {
            tracing::warn!("TAP pool closed while returned leases are still being processed");
        }
        // Destroy the ready TAPs now; leases still out destroy theirs when dropped.
        let ready = std::mem::take(&mut lock(&self.inner.state).ready);
        destroy_all(ready.into_iter().map(|r| r.tap).collect());
        tracing::debug!("TAP pool closed");
    }
}

/// One VM's network: a configured TAP and its addresses. Dropping it destroys the TAP and
/// returns the slot. Any duplicate of the TAP descriptor must be closed before that, or the
/// slot stays out of use (and the old device alive) until it is.
pub struct Lease {
    inner: Arc<Inner>,
    addrs: SlotAddrs,
    tap: ManuallyDrop<Tap>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("addrs", &self.addrs)
            .field("tap", &*self.tap)
            .finish()
    }
}

impl Lease {
    /// The TAP descriptor (non-blocking, close-on-exec, 12-byte virtio-net header).
    pub fn tap_fd(&self) -> BorrowedFd<'_> {
        self.tap.as_fd()
    }

    /// A duplicate of the TAP descriptor; close it before dropping the lease.
    pub fn try_clone_tap_fd(&self) -> Result<OwnedFd, NetError> {
        Ok(self.tap.try_clone_fd()?)
    }

    /// The TAP itself (name, index, flags).
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The index of the leased slot in the pool.
    pub fn slot(&self) -> u32 {
        self.addrs.slot
    }

    /// The address the guest must configure on its NIC.
    pub fn guest_ip(&self) -> Ipv4Addr {
        self.addrs.guest
    }

    /// The host side of the TAP: the guest's gateway and the only host address meant for it.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.addrs.host
    }

    /// The slot's netmask, 255.255.255.252 (/30).
    pub fn netmask(&self) -> Ipv4Addr {
        self.addrs.netmask()
    }

    /// The MAC the guest's NIC must use (the host's permanent neighbour entry points at it).
    pub fn guest_mac(&self) -> MacAddr {
        self.addrs.mac
    }

    /// `ip=<guest>::<host>:255.255.255.252::eth0:off` for the guest kernel command line.
    pub fn kernel_ip_param(&self) -> String {
        self.addrs.kernel_ip_param()
    }

    /// The TAP's name inside xcgi's namespace.
    pub fn ifname(&self) -> &str {
        self.tap.name()
    }

    /// The TAP's interface index inside xcgi's namespace.
    pub fn ifindex(&self) -> u32 {
        self.tap.index()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // SAFETY: `tap` is taken exactly once, here, and not used afterwards.
        let tap = unsafe { ManuallyDrop::take(&mut self.tap) };
        lock(&self.inner.state).returning += 1;
        let threads = Arc::clone(&self.inner.threads);
        // Counted before `closed` is read: a pool closing now waits for this return (its
        // wait could otherwise see no return running between the check and the count).
        threads.enter();
        if self.inner.closed.load(Ordering::Acquire) {
            // The pool is gone: nothing waits for this slot, and whoever drops the last lease
            // expects the namespace's cleanup to be done when this returns.
            self.inner.give_back(tap, self.addrs);
            threads.exit();
            return;
        }
        let inner = Arc::clone(&self.inner);
        let addrs = self.addrs;
        // Destroying a TAP blocks ~20 ms (an RCU barrier in the kernel, little CPU), so it
        // happens on a short-lived thread; concurrent returns share that wait. The TAP sits in
        // a cell so that it survives a failed spawn (which drops the closure) and is then
        // returned inline.
        let cell = Arc::new(Mutex::new(Some(tap)));
        let in_thread = Arc::clone(&cell);
        let spawned = std::thread::Builder::new()
            .name("xcgi-net-return".into())
            .spawn({
                let threads = Arc::clone(&threads);
                move || {
                    if let Some(tap) = lock(&in_thread).take() {
                        inner.give_back(tap, addrs);
                    }
                    // Release the pool before saying so.
                    drop(inner);
                    threads.exit();
                }
            });
        if let Err(error) = spawned {
            threads.exit();
            tracing::warn!(%error, "cannot start a thread to return a TAP; returning it inline");
            if let Some(tap) = lock(&cell).take() {
                self.inner.give_back(tap, self.addrs);
            }
        }
    }
}
