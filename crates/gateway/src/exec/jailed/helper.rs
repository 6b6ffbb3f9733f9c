//! The jail's helper: the one process of a server that keeps the privileges jailing a VM
//! process takes (new namespaces, a change of user, cgroups), so that the server itself can
//! run as an unprivileged user (`[server] user`; docs/security.md, "Privileges").
//!
//! `xcgi jail-helper` is started by the server while it is still root, with a
//! `SOCK_SEQPACKET` socket as its fd 3, and does only this, on the server's word:
//! - at start, before the server seals it: takes the uid range and the cgroup parent (`I`), and
//!   one template per route (`T`: the `xcgi vmm-worker` arguments and the cgroup limits);
//!   after the seal (`Z`) no template, range or parent can be added or changed, so a server
//!   taken over by a client can only ask for the VM processes it was configured with;
//! - starts a VM process from a template (`S`): a uid of the range, a cgroup with the
//!   template's limits, new namespaces, the server's control socket as the VM process's fd 3;
//!   answers with its pid (`s`), or why not (`e`);
//! - kills one of its VM processes (`K`);
//! - makes the TAP of a slot of the guests' pool (`N`; the namespace and the pool's addresses
//!   given before the seal, `W`): an unprivileged server cannot (setns, CAP_NET_ADMIN);
//! - reaps each that ends, removes its cgroup, frees its uid and says how it ended (`x`);
//! - when the server goes (its end of the socket closes), kills and reaps every VM process
//!   left, removes the cgroups and the guests' namespace mount, and exits.
//!
//! Messages (text, fields separated by spaces; a template's arguments by NUL):
//! - server → helper: `I<uid base> <uid count>\n<cgroup parent or empty>`;
//!   `T<memory.max bytes> <pids.max> <cpu percent, 0: none>\nvmm-worker\0<arg>\0...`; `Z`;
//!   `W<pool base> <pool size>\n<namespace mount or empty>` + the namespace;
//!   `S<request> <template>` + the control socket; `K<pid>`; `N<request> <slot>`;
//! - helper → server: `t<template>`; `s<request> <pid>`; `n<request> <index> <name>` + the
//!   TAP; `e<request> <why>`;
//!   `x<pid> <exit code> <memory.max hit by the OOM killer, bytes; 0: none> <memory.peak>`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use xcgi_jail::{ChildSetup, Command, PidFd, Stdio};

use super::wire::{recv, send, seqpacket_pair};
use super::WorkerError;
use crate::exec::vm_cgroup::{VmCgroup, VmCgroups, VmLimits};

/// How a VM process the helper started ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code, or 128 + the signal that killed it; -1: unknown (the helper is gone).
    pub code: i32,
    /// The cgroup's `memory.max` when the kernel's OOM killer killed it.
    pub oom_max: Option<u64>,
    /// The cgroup's `memory.peak`, bytes (0: unknown).
    pub memory_peak: u64,
}

/// Where one VM process's end arrives.
#[derive(Debug, Default)]
pub struct ExitSlot {
    exit: Mutex<Option<Exit>>,
    ended: Condvar,
}

impl ExitSlot {
    fn set(&self, e: Exit) {
        if let Ok(mut x) = self.exit.lock() {
            *x = Some(e);
        }
        self.ended.notify_all();
    }

    /// Blocks until the VM process has ended and been reaped by the helper.
    pub fn wait(&self) -> Exit {
        let Ok(mut x) = self.exit.lock() else {
            return GONE;
        };
        loop {
            if let Some(e) = *x {
                return e;
            }
            x = match self.ended.wait(x) {
                Ok(x) => x,
                Err(_) => return GONE,
            };
        }
    }
}

/// What a VM process's end says when the helper is gone.
const GONE: Exit = Exit {
    code: -1,
    oom_max: None,
    memory_peak: 0,
};

/// A VM process the helper started.
#[derive(Debug)]
pub struct Started {
    /// Its pid (in the server's PID namespace).
    pub pid: libc::pid_t,
    /// Its end.
    pub exit: Arc<ExitSlot>,
    /// Its cgroup's `cpu.weight`, low while it waits ([`super::super::vm_cgroup`]): raised
    /// through this when it gets its request.
    pub weight: Option<std::fs::File>,
}

/// What the helper answers a request with.
#[derive(Debug)]
enum Reply {
    Template(u32),
    Started(Started),
    Tap(xcgi_net::Tap),
}

/// Requests waiting for the helper's answer, by id (0: a template).
type Pending = Mutex<HashMap<u64, mpsc::Sender<Result<Reply, String>>>>;

/// The server's side of the helper.
#[derive(Debug)]
pub struct Helper {
    sock: OwnedFd,
    /// Serialises the server's messages.
    send_lock: Mutex<()>,
    pending: Arc<Pending>,
    next: AtomicU64,
    /// The helper process: killed and reaped on drop (its end of the socket closing first
    /// lets it clean up).
    process: Mutex<Option<PidFd>>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the helper is told at start.
#[derive(Debug, Clone)]
pub struct HelperSettings {
    /// The xcgi binary (its `jail-helper` and `vmm-worker` subcommands).
    pub program: PathBuf,
    /// The first uid (and gid) of the VM processes' range.
    pub uid_base: u32,
    /// How many uids: at most that many VM processes at once.
    pub uid_count: u32,
    /// Where the VM processes' cgroups go (None: the server's own cgroup).
    pub cgroup_parent: Option<PathBuf>,
}

impl Helper {
    /// Starts the helper (as root) and tells it the uid range and the cgroup parent.
    pub fn start(settings: &HelperSettings) -> io::Result<Arc<Helper>> {
        let (ours, theirs) = seqpacket_pair()?;
        let args: Vec<OsString> = vec!["jail-helper".into()];
        let env = super::worker_env();
        let setup = ChildSetup::default();
        let passed = [theirs.as_fd()];
        let cmd = Command {
            args: &args,
            stdio: Stdio::Inherit,
            pass_fds: &passed,
            ..Command::new(&settings.program, &env, Path::new("/"), &setup)
        };
        let child = xcgi_jail::spawn(&cmd).map_err(io::Error::other)?;
        drop(theirs);
        let init = format!(
            "I{} {}\n{}",
            settings.uid_base,
            settings.uid_count,
            settings
                .cgroup_parent
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        send(ours.as_fd(), init.as_bytes(), &[])?;
        let reader_sock = ours.try_clone()?;
        let pending: Arc<Pending> = Arc::default();
        let p2 = Arc::clone(&pending);
        let reader = std::thread::Builder::new()
            .name("xcgi-jail-helper".into())
            .spawn(move || read_replies(&reader_sock, &p2))?;
        Ok(Arc::new(Helper {
            sock: ours,
            send_lock: Mutex::new(()),
            pending,
            next: AtomicU64::new(1),
            process: Mutex::new(Some(child.pidfd)),
            reader: Mutex::new(Some(reader)),
        }))
    }

    fn send(&self, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let _g = self.send_lock.lock();
        send(self.sock.as_fd(), msg, fds)
    }

    /// Registers a template: `args` for `xcgi vmm-worker`, `limits` for its cgroup.
    /// Answered through the reply channel of request 0.
    pub fn register(&self, args: &[OsString], limits: &VmLimits) -> Result<u32, WorkerError> {
        let mut msg = format!(
            "T{} {} {}\n",
            limits.memory_max,
            limits.pids_max,
            limits.cpu_percent.unwrap_or(0)
        )
        .into_bytes();
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                msg.push(0);
            }
            msg.extend_from_slice(a.as_bytes());
        }
        match self.ask(0, &msg, &[]) {
            Ok(Reply::Template(t)) => Ok(t),
            Ok(_) => Err(WorkerError::Helper("a wrong answer to a template".into())),
            Err(e) => Err(WorkerError::Helper(e)),
        }
    }

    /// No more templates: from now on the helper starts only what it was given.
    pub fn seal(&self) -> io::Result<()> {
        self.send(b"Z", &[])
    }

    /// Sends request `id` and waits (30 s at most) for its answer.
    fn ask(&self, id: u64, msg: &[u8], fds: &[RawFd]) -> Result<Reply, String> {
        let (tx, rx) = mpsc::channel();
        self.pending_insert(id, tx);
        if let Err(e) = self.send(msg, fds) {
            self.pending_remove(id);
            return Err(format!("cannot reach the jail helper: {e}"));
        }
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(r) => r,
            Err(_) => {
                self.pending_remove(id);
                Err("no answer within 30 s (is the jail helper alive?)".into())
            }
        }
    }

    fn pending_remove(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    /// Hands the helper the guests' network namespace (and its bind mount, which the helper
    /// then removes when it exits: the server, once unprivileged, could not) and the pool's
    /// addresses: from then on it makes the pool's TAPs ([`HelperTaps`]).
    pub fn give_network(
        &self,
        ns: &xcgi_net::NetNs,
        base: std::net::Ipv4Addr,
        size: u32,
    ) -> io::Result<()> {
        let msg = format!(
            "W{base} {size}\n{}",
            ns.path()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        self.send(msg.as_bytes(), &[ns.as_fd().as_raw_fd()])?;
        ns.release_mount();
        Ok(())
    }

    /// The TAP of `slot`, made by the helper in the guests' namespace.
    fn make_tap(&self, slot: u32) -> Result<xcgi_net::Tap, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        match self.ask(id, format!("N{id} {slot}").as_bytes(), &[])? {
            Reply::Tap(t) => Ok(t),
            _ => Err("a wrong answer to a TAP".into()),
        }
    }

    fn pending_insert(&self, id: u64, tx: mpsc::Sender<Result<Reply, String>>) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
    }

    /// Starts a VM process from `template` with `control` as its fd 3.
    pub fn spawn(&self, template: u32, control: BorrowedFd<'_>) -> Result<Started, WorkerError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let msg = format!("S{id} {template}");
        match self.ask(id, msg.as_bytes(), &[control.as_raw_fd()]) {
            Ok(Reply::Started(s)) => Ok(s),
            Ok(_) => Err(WorkerError::Helper("a wrong answer to a start".into())),
            Err(e) => Err(WorkerError::Helper(e)),
        }
    }

    /// Kills a VM process it started (nothing if it has ended).
    pub fn kill(&self, pid: libc::pid_t) {
        let _ = self.send(format!("K{pid}").as_bytes(), &[]);
    }

    /// Asks a VM process it started to stop its VM and report (SIGTERM: the VM process
    /// cancels its run, which then ends with its debug dump when it has one); nothing if it
    /// has ended. The server still kills it after.
    pub fn stop(&self, pid: libc::pid_t) {
        let _ = self.send(format!("Q{pid}").as_bytes(), &[]);
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.close();
    }
}

impl Helper {
    /// Ends the helper: its end of the socket sees EOF, it kills and reaps the VM processes
    /// left, removes their cgroups and the guests' namespace mount, and exits; waited for
    /// (10 s at most, then killed). Nothing it did is left when this returns.
    pub fn close(&self) {
        // SAFETY: shutdown(2) on our socket; the descriptor stays ours.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(mut p) = self.process.lock().ok().and_then(|mut p| p.take()) {
            let t = std::time::Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if !matches!(p.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            // Dropped: killed and reaped if it has not exited.
        }
        if let Some(r) = self.reader.lock().ok().and_then(|mut r| r.take()) {
            let _ = r.join();
        }
    }
}

/// The guests' TAPs, made by the helper ([`Helper::give_network`]).
#[derive(Debug)]
pub struct HelperTaps(pub Arc<Helper>);

impl xcgi_net::TapMaker for HelperTaps {
    fn make(&self, addrs: &xcgi_net::SlotAddrs) -> Result<xcgi_net::Tap, xcgi_net::NetError> {
        self.0
            .make_tap(addrs.slot)
            .map_err(xcgi_net::NetError::Maker)
    }
}

/// The server's reader: answers to their requests, ends to their VM processes.
fn read_replies(sock: &OwnedFd, pending: &Pending) {
    let mut exits: HashMap<libc::pid_t, Arc<ExitSlot>> = HashMap::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, mut fds) = match recv(sock.as_fd(), &mut buf, None) {
            Ok(Some((n, fds))) if n > 0 => (n, fds),
            _ => break, // the helper is gone
        };
        let text = String::from_utf8_lossy(&buf[1..n]).into_owned();
        let mut f = text.split(' ');
        let mut num = || f.next().and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
        // Whether someone still waited for the answer (an `ask` gives up after 30 s).
        let reply_to = |id: i64, r: Result<Reply, String>| -> bool {
            let tx = pending
                .lock()
                .ok()
                .and_then(|mut p| p.remove(&u64::try_from(id).unwrap_or(u64::MAX)));
            tx.is_some_and(|tx| tx.send(r).is_ok())
        };
        match buf[0] {
            b't' => {
                let t = num();
                reply_to(0, Ok(Reply::Template(t as u32)));
            }
            b'n' => {
                let (id, index) = (num(), num());
                let name = f.next().unwrap_or("").to_string();
                let r = match fds.pop() {
                    Some(fd) => Ok(Reply::Tap(xcgi_net::Tap::from_parts(
                        fd,
                        name,
                        index as u32,
                    ))),
                    None => Err("a TAP without its descriptor".into()),
                };
                reply_to(id, r);
            }
            b's' => {
                let (id, pid) = (num(), num() as libc::pid_t);
                let slot: Arc<ExitSlot> = Arc::default();
                exits.insert(pid, Arc::clone(&slot));
                let weight = fds.pop().map(std::fs::File::from);
                let taken = reply_to(
                    id,
                    Ok(Reply::Started(Started {
                        pid,
                        exit: slot,
                        weight,
                    })),
                );
                if !taken {
                    // Started after the server gave up on it: nobody owns it, it goes.
                    let _ = send(sock.as_fd(), format!("K{pid}").as_bytes(), &[]);
                }
            }
            b'e' => {
                let (id, why) = text.split_once(' ').unwrap_or((&text, ""));
                reply_to(id.parse().unwrap_or(-1), Err(why.to_string()));
            }
            b'x' => {
                let (pid, code, oom, peak) = (num() as libc::pid_t, num(), num(), num());
                if let Some(slot) = exits.remove(&pid) {
                    slot.set(Exit {
                        code: code as i32,
                        oom_max: (oom > 0).then_some(oom as u64),
                        memory_peak: peak.max(0) as u64,
                    });
                }
            }
            _ => {}
        }
    }
    // Gone: nothing more will be answered or reaped.
    for (_, slot) in exits.drain() {
        slot.set(GONE);
    }
    if let Ok(mut p) = pending.lock() {
        for (_, tx) in p.drain() {
            let _ = tx.send(Err("the jail helper is gone".into()));
        }
    }
}

/// One VM process of the helper.
struct Child {
    pidfd: PidFd,
    uid: u32,
    /// Removed (dropped) after the process is reaped.
    cgroup: Option<VmCgroup>,
}

/// The helper's state.
struct State {
    sock: OwnedFd,
    templates: Vec<(Vec<OsString>, VmLimits)>,
    sealed: bool,
    free_uids: Vec<u32>,
    uid_count: u32,
    cgroups: Option<Arc<VmCgroups>>,
    children: HashMap<libc::pid_t, Child>,
    /// The guests' network (`W`): its namespace (its bind mount removed when this goes), a
    /// netlink socket in it, the pool's addresses.
    net: Option<(xcgi_net::NetNs, xcgi_net::Netlink, xcgi_net::AddrPlan)>,
}

/// `xcgi jail-helper`: serves the server on fd 3 until it goes. Returns the exit code.
pub fn helper_main() -> i32 {
    // SAFETY: the socket the server passed as fd 3, ours alone.
    let sock = unsafe { OwnedFd::from_raw_fd(3) };
    xcgi_jail::close_from(4);
    // Not killed with the server's process group by a terminal's ^C: it ends when the
    // server's end of the socket closes, after cleaning up.
    // SAFETY: setsid(2) has no preconditions.
    unsafe { libc::setsid() };
    let mut st = State::new(sock);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut polled: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: st.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let pids: Vec<libc::pid_t> = st.children.keys().copied().collect();
        for pid in &pids {
            let fd = st.children[pid].pidfd.as_fd().map_or(-1, |f| f.as_raw_fd());
            polled.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: polls descriptors held in `st` for the duration of the call.
        let r = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        for (i, pid) in pids.iter().enumerate() {
            if polled[i + 1].revents != 0 {
                st.reap(*pid);
            }
        }
        if polled[0].revents != 0 {
            match recv(st.sock.as_fd(), &mut buf, None) {
                Ok(Some((n, fds))) if n > 0 => st.handle(&buf[..n], fds),
                _ => break, // the server is gone
            }
        }
    }
    // The server is gone: so is every VM process it had.
    let pids: Vec<libc::pid_t> = st.children.keys().copied().collect();
    for pid in pids {
        if let Some(c) = st.children.get(&pid) {
            c.pidfd.signal(libc::SIGKILL);
        }
        if let Some(mut c) = st.children.remove(&pid) {
            let _ = c.pidfd.wait_blocking();
        }
    }
    drop(st);
    0
}

impl State {
    /// Nothing yet: no range, template, network or VM process; not sealed.
    fn new(sock: OwnedFd) -> State {
        State {
            sock,
            templates: Vec::new(),
            sealed: false,
            free_uids: Vec::new(),
            uid_count: 0,
            cgroups: None,
            children: HashMap::new(),
            net: None,
        }
    }

    fn reply(&self, msg: &str, fds: &[RawFd]) {
        let _ = send(self.sock.as_fd(), msg.as_bytes(), fds);
    }

    fn handle(&mut self, msg: &[u8], fds: Vec<OwnedFd>) {
        let text = String::from_utf8_lossy(&msg[1..]).into_owned();
        match msg[0] {
            b'I' if !self.sealed => self.init(&text),
            b'T' if !self.sealed => match parse_template(&msg[1..]) {
                Some(t) => {
                    self.templates.push(t);
                    self.reply(&format!("t{}", self.templates.len() - 1), &[]);
                }
                None => self.reply("e0 a template the helper cannot read", &[]),
            },
            b'Z' => self.sealed = true,
            b'W' if !self.sealed => self.take_network(&text, fds),
            b'N' => {
                let mut f = text.split(' ');
                let id = f.next().unwrap_or("0").to_string();
                let slot = f.next().and_then(|v| v.parse::<u32>().ok());
                match self.make_tap(slot) {
                    Ok(tap) => self.reply(
                        &format!("n{id} {} {}", tap.index(), tap.name()),
                        &[tap.as_fd().as_raw_fd()],
                    ),
                    // Dropped once sent: the server's descriptor is then the only one.
                    Err(e) => self.reply(&format!("e{id} {e}"), &[]),
                }
            }
            b'S' => {
                let mut f = text.split(' ');
                let id = f.next().unwrap_or("0").to_string();
                let template = f.next().and_then(|t| t.parse::<usize>().ok());
                let r = match (template, fds.into_iter().next()) {
                    (Some(t), Some(control)) if t < self.templates.len() => self.start(t, control),
                    _ => Err("a start request the helper cannot read".into()),
                };
                match r {
                    Ok(pid) => {
                        // Its cpu.weight, for the server to raise when it has a request.
                        let weight = self
                            .children
                            .get(&pid)
                            .and_then(|c| c.cgroup.as_ref()?.weight_handle());
                        let fds: Vec<RawFd> = weight.iter().map(AsRawFd::as_raw_fd).collect();
                        self.reply(&format!("s{id} {pid}"), &fds);
                    }
                    Err(e) => self.reply(&format!("e{id} {e}"), &[]),
                }
            }
            b'K' | b'Q' => {
                let pid = text.parse::<libc::pid_t>().unwrap_or(0);
                let sig = if msg[0] == b'K' {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                // Only its own children: a pid it did not start is not signalled.
                if let Some(c) = self.children.get(&pid) {
                    c.pidfd.signal(sig);
                }
            }
            _ => tracing::warn!("jail helper: a message it does not take"),
        }
    }

    fn take_network(&mut self, text: &str, fds: Vec<OwnedFd>) {
        let (plan, mount) = text.split_once('\n').unwrap_or((text, ""));
        let mut f = plan.split(' ');
        let base = f.next().and_then(|b| b.parse().ok());
        let size = f.next().and_then(|s| s.parse().ok());
        let (Some(base), Some(size), Some(fd)) = (base, size, fds.into_iter().next()) else {
            tracing::warn!("jail helper: a network message it cannot read");
            return;
        };
        let mount = (!mount.is_empty()).then(|| PathBuf::from(mount));
        let ns = xcgi_net::NetNs::from_fd(fd, mount);
        let made = xcgi_net::AddrPlan::new(base, size)
            .map_err(|e| e.to_string())
            .and_then(|plan| Ok((ns.netlink().map_err(|e| e.to_string())?, plan)));
        match made {
            Ok((nl, plan)) => self.net = Some((ns, nl, plan)),
            Err(e) => tracing::warn!(error = %e, "jail helper: cannot use the guests' network"),
        }
    }

    /// The TAP of a slot of the pool (and only of the pool: a slot past its size is refused).
    fn make_tap(&mut self, slot: Option<u32>) -> Result<xcgi_net::Tap, String> {
        let (ns, nl, plan) = self.net.as_mut().ok_or("the helper has no guest network")?;
        let slot = slot.ok_or("a TAP request it cannot read")?;
        let addrs = plan.slot(slot).map_err(|e| e.to_string())?;
        xcgi_net::make_tap(ns, nl, &addrs).map_err(|e| e.to_string())
    }

    fn init(&mut self, text: &str) {
        let (range, parent) = text.split_once('\n').unwrap_or((text, ""));
        let mut f = range.split(' ').map(|v| v.parse::<u32>().unwrap_or(0));
        let (base, count) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        self.uid_count = count;
        self.free_uids = (0..count)
            .rev()
            .filter_map(|i| base.checked_add(i))
            .filter(|&u| u != 0)
            .collect();
        let parent = (!parent.is_empty()).then(|| PathBuf::from(parent));
        self.cgroups = VmCgroups::new(parent.as_deref());
    }

    /// Starts a VM process from template `t`; its pid.
    fn start(&mut self, t: usize, control: OwnedFd) -> Result<libc::pid_t, String> {
        let uid = self
            .free_uids
            .pop()
            .ok_or_else(|| WorkerError::NoUid(self.uid_count).to_string())?;
        let r = self.spawn_in(t, uid, &control);
        if r.is_err() {
            self.free_uids.push(uid);
        }
        let (pid, child) = r?;
        self.children.insert(pid, child);
        Ok(pid)
    }

    fn spawn_in(
        &self,
        t: usize,
        uid: u32,
        control: &OwnedFd,
    ) -> Result<(libc::pid_t, Child), String> {
        let (args, limits) = &self.templates[t];
        let mut args = args.clone();
        // Always this binary: a template names only the worker's arguments.
        let program =
            std::env::current_exe().map_err(|e| format!("finding the xcgi binary: {e}"))?;
        args.extend(["--uid".into(), uid.to_string().into()]);
        let cgroup = match &self.cgroups {
            Some(c) => Some(
                c.make(limits)
                    .map_err(|e| WorkerError::Cgroup(e).to_string())?,
            ),
            None => None,
        };
        let dir = match &cgroup {
            Some(c) => Some(
                std::fs::File::open(c.path()).map_err(|e| WorkerError::Cgroup(e).to_string())?,
            ),
            None => None,
        };
        let setup = ChildSetup {
            namespaces: super::VM_NAMESPACES,
            ..ChildSetup::default()
        };
        let env = super::worker_env();
        let passed = [control.as_fd()];
        let cmd = Command {
            args: &args,
            stdio: Stdio::Inherit,
            pass_fds: &passed,
            cgroup: dir.as_ref().map(|d| d.as_fd()),
            ..Command::new(&program, &env, Path::new("/"), &setup)
        };
        let child = xcgi_jail::spawn(&cmd).map_err(|e| WorkerError::Spawn(e).to_string())?;
        Ok((
            child.pid,
            Child {
                pidfd: child.pidfd,
                uid,
                cgroup,
            },
        ))
    }

    /// Reaps a VM process that ended, removes its cgroup, frees its uid, tells the server.
    fn reap(&mut self, pid: libc::pid_t) {
        let code = match self.children.get_mut(&pid).map(|c| c.pidfd.try_wait()) {
            Some(Ok(Some(code))) => code,
            Some(Ok(None)) => return, // not yet
            Some(Err(_)) => -1,
            None => return,
        };
        let Some(c) = self.children.remove(&pid) else {
            return;
        };
        let oom = c
            .cgroup
            .as_ref()
            .and_then(VmCgroup::oom_killed)
            .unwrap_or(0);
        let peak = c
            .cgroup
            .as_ref()
            .and_then(VmCgroup::memory_peak)
            .unwrap_or(0);
        if let Some(cg) = &c.cgroup {
            tracing::debug!(
                pid,
                memory_peak = peak,
                memory_max = cg.memory_max().unwrap_or(0),
                "VM process reaped"
            );
        }
        self.free_uids.push(c.uid);
        drop(c);
        self.reply(&format!("x{pid} {code} {oom} {peak}"), &[]);
    }
}

fn parse_template(b: &[u8]) -> Option<(Vec<OsString>, VmLimits)> {
    let nl = b.iter().position(|&c| c == b'\n')?;
    let head = std::str::from_utf8(&b[..nl]).ok()?;
    let mut f = head.split(' ');
    let memory_max = f.next()?.parse().ok()?;
    let pids_max = f.next()?.parse().ok()?;
    let cpu: u32 = f.next()?.parse().ok()?;
    let args: Vec<OsString> = b[nl + 1..]
        .split(|&c| c == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    if args.first().is_none_or(|a| a != "vmm-worker") || args.iter().any(|a| a.is_empty()) {
        return None;
    }
    Some((
        args,
        VmLimits {
            memory_max,
            pids_max,
            cpu_percent: (cpu > 0).then_some(cpu),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (State, OwnedFd) {
        let (ours, theirs) = seqpacket_pair().expect("socketpair");
        (State::new(theirs), ours)
    }

    fn answer(sock: &OwnedFd) -> String {
        let mut buf = [0u8; 512];
        match recv(sock.as_fd(), &mut buf, Some(Duration::from_secs(1))) {
            Ok(Some((n, _))) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            _ => String::new(),
        }
    }

    /// A VM process whose start was answered after the server stopped waiting (`ask` gives
    /// up after 30 s) is killed, not left running unowned.
    #[test]
    fn a_start_answered_too_late_is_killed() {
        let (server, helper) = seqpacket_pair().expect("socketpair");
        let pending: Arc<Pending> = Arc::default();
        let (tx, rx) = mpsc::channel();
        pending.lock().unwrap().insert(5, tx);
        let p2 = Arc::clone(&pending);
        let reader = std::thread::spawn(move || read_replies(&server, &p2));
        // Request 5 is still awaited: it is handed over, nothing is killed.
        send(helper.as_fd(), b"s5 4242", &[]).unwrap();
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(Ok(Reply::Started(Started { pid: 4242, .. })))
        ));
        // Request 6 was given up on: the helper is told to kill its process.
        send(helper.as_fd(), b"s6 4343", &[]).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = recv(helper.as_fd(), &mut buf, Some(Duration::from_secs(5)))
            .unwrap()
            .expect("an answer");
        assert_eq!(&buf[..n], b"K4343");
        drop(helper);
        reader.join().unwrap();
    }

    /// What a server taken over by a client could ask of the helper after the seal: no new
    /// template, no start of a template it does not have, no TAP outside the pool, no other
    /// program than `vmm-worker`.
    #[test]
    fn a_sealed_helper_starts_only_what_it_was_given() {
        let (mut st, sock) = state();
        st.handle(b"T100 9 0\nvmm-worker\x00--mem\x00128", Vec::new());
        assert_eq!(answer(&sock), "t0");
        st.handle(b"T100 9 0\n/bin/sh\0-c\0id", Vec::new());
        assert!(answer(&sock).starts_with("e0 "), "another program");
        assert_eq!(st.templates.len(), 1);
        st.handle(b"Z", Vec::new());
        st.handle(b"T100 9 0\nvmm-worker\x00--mem\x0065536", Vec::new());
        assert_eq!(answer(&sock), "", "a template after the seal was answered");
        assert_eq!(st.templates.len(), 1, "a template after the seal was taken");
        st.handle(b"I1000 10\n", Vec::new());
        assert!(
            st.free_uids.is_empty(),
            "a uid range after the seal was taken"
        );
        let (a, _b) = seqpacket_pair().expect("socketpair");
        st.handle(b"S7 1", vec![a]);
        assert!(answer(&sock).starts_with("e7 "), "a start of template 1");
        st.handle(b"N8 0", Vec::new());
        assert!(answer(&sock).starts_with("e8 "), "a TAP without a network");
        st.handle(b"K1", Vec::new());
        assert!(st.children.is_empty());
    }
}
