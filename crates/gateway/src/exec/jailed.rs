//! VMs in jailed processes (`[server] jail = true`; docs/security.md, "The jail"). Each VM
//! runs in an `xcgi vmm-worker` process of its own: started with [`xcgi_jail::spawn`] in new
//! PID, mount, IPC, UTS and network namespaces, it builds the route's VM up to the first
//! KVM_RUN, confines itself ([`xcgi_jail::confine`]: empty root, rlimits, no capabilities, a
//! uid of its own from the server's range), sets its seccomp filters, says "ready" on its
//! control socket and waits. A request hands it the CGI channel (or the TAP) over that socket
//! (SCM_RIGHTS) and the worker launches the guest, reports how it ended and exits. One worker
//! serves one VM. Workers are started ahead, `prepared` per route, as prepared VMs are.
//!
//! The control socket is a `SOCK_SEQPACKET` pair: the worker's end is its fd 3.
//! - worker → server: `R` once ready; `E` + the end's description, a NUL, the debug dump;
//! - server → worker: `L` + the launch as lines (deadline ms, debug dump 0/1, channel 0/1,
//!   NIC 0/1, MAC, `ip=` parameter, extra kernel parameters, setup only 0/1: for
//!   `xcgi bench jail`), the channel and TAP descriptors attached.
//!
//! A worker that dies without reporting (a seccomp kill, an OOM kill, a crash) is described
//! from its exit status; the server keeps serving.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use xcgi_jail::{ChildSetup, Command, PidFd, Stdio};
use xcgi_vmm::{Attachments, NetAttachment, RunOptions};

use super::vm::{GuestRoot, VmEnd, VmSpec};

/// Where jailed VM processes come from.
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// The xcgi binary (its `vmm-worker` subcommand).
    pub program: PathBuf,
}

/// Why a jailed VM process could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Every uid of the range belongs to a live worker.
    #[error("no free uid in the jail's range ({0} workers alive): raise [server] jail_uids")]
    NoUid(u32),
    /// The process could not be started.
    #[error("cannot start a jailed VM process: {0}")]
    Spawn(#[from] xcgi_jail::SpawnError),
    /// Its control socket failed.
    #[error("jailed VM process control socket: {0}")]
    Io(#[from] io::Error),
    /// It ended before it was ready.
    #[error("the jailed VM process ended before it was ready: {0}")]
    NotReady(String),
}

/// The uids of the range not in use.
#[derive(Debug)]
struct Uids {
    free: Mutex<Vec<u32>>,
    count: u32,
}

impl Uids {
    fn take(&self) -> Result<u32, WorkerError> {
        self.free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .ok_or(WorkerError::NoUid(self.count))
    }

    fn give_back(&self, uid: u32) {
        if let Ok(mut f) = self.free.lock() {
            f.push(uid);
        }
    }
}

/// One started worker: ready (or about to be) for one VM.
#[derive(Debug)]
struct Worker {
    pid: libc::pid_t,
    pidfd: PidFd,
    control: OwnedFd,
    uid: u32,
    uids: Arc<Uids>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Killed (if still alive) and reaped before its uid can serve another worker.
        self.pidfd.signal(libc::SIGKILL);
        let _ = self.pidfd.wait_blocking();
        self.uids.give_back(self.uid);
    }
}

/// A route's jailed VM processes: `target` kept ready, more started on demand.
#[derive(Debug)]
pub struct Workers {
    settings: JailSettings,
    args: Vec<OsString>,
    uids: Arc<Uids>,
    ready: Mutex<VecDeque<Worker>>,
    wake: Condvar,
    target: usize,
    stopping: std::sync::atomic::AtomicBool,
    /// The thread keeping `target` ready, joined by [`Workers::stop`].
    refill: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Starts that failed in a row (0 after a success).
    failures: std::sync::atomic::AtomicU32,
    /// Whether `target` were ready at least once.
    filled_once: std::sync::atomic::AtomicBool,
}

/// Failed starts in a row after which the route is reported failing (as VM pools do).
const FAILING_AFTER: u32 = 3;

impl Workers {
    /// Workers for `spec`'s machine, `target` of them kept ready by a thread of their own.
    pub fn start(
        spec: &VmSpec,
        settings: JailSettings,
        uids: &Arc<UidRange>,
        target: usize,
    ) -> io::Result<Arc<Workers>> {
        // The VM process starts in "/": every path absolute.
        let abs = |p: &Path| std::path::absolute(p).map(OsString::from);
        let mut args: Vec<OsString> = vec!["vmm-worker".into(), "--kernel".into()];
        args.push(abs(&spec.kernel)?);
        match &spec.root {
            GuestRoot::Initramfs(p) => args.extend(["--initramfs".into(), abs(p)?]),
            GuestRoot::Disk(p) => args.extend(["--rootfs".into(), abs(p)?]),
        }
        args.extend([
            "--mem".into(),
            spec.memory_mib.to_string().into(),
            "--vcpus".into(),
            spec.vcpus.to_string().into(),
        ]);
        if spec.hugepages {
            args.push("--hugepages".into());
        }
        let w = Arc::new(Workers {
            settings,
            args,
            uids: Arc::clone(&uids.0),
            ready: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            target,
            stopping: false.into(),
            refill: Mutex::new(None),
            failures: 0.into(),
            filled_once: (target == 0).into(),
        });
        if target > 0 {
            let weak = Arc::downgrade(&w);
            let h = std::thread::Builder::new()
                .name("xcgi-workers".into())
                .spawn(move || refill(&weak))?;
            if let Ok(mut r) = w.refill.lock() {
                *r = Some(h);
            }
        }
        Ok(w)
    }

    /// Stops keeping workers ready: the refill thread ends (one it was starting is killed)
    /// and the ready ones are killed and reaped before this returns.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_all();
        let refill = self.refill.lock().ok().and_then(|mut r| r.take());
        if let Some(h) = refill {
            let _ = h.join();
        }
        let ready: Vec<Worker> = self
            .ready
            .lock()
            .map(|mut r| r.drain(..).collect())
            .unwrap_or_default();
        drop(ready);
    }

    /// Ready workers now.
    fn ready_count(&self) -> usize {
        self.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// For readiness: filled once, still warming, or failing to start VM processes.
    pub fn health(&self) -> xcgi_vmm::PoolHealth {
        use std::sync::atomic::Ordering::Relaxed;
        let failures = self.failures.load(Relaxed);
        if failures >= FAILING_AFTER {
            return xcgi_vmm::PoolHealth::Failing { failures };
        }
        if self.filled_once.load(Relaxed) {
            return xcgi_vmm::PoolHealth::Filled;
        }
        xcgi_vmm::PoolHealth::Warming {
            ready: self.ready_count(),
            target: self.target,
        }
    }

    /// A ready worker, or a new one (started and waited for here).
    fn take(&self) -> Result<Worker, WorkerError> {
        let ready = self.ready.lock().ok().and_then(|mut r| r.pop_front());
        self.wake.notify_all();
        match ready {
            Some(w) => Ok(w),
            None => self.start_one(),
        }
    }

    /// Starts a worker and waits until it says it is ready.
    fn start_one(&self) -> Result<Worker, WorkerError> {
        let uid = self.uids.take()?;
        let (ours, theirs) = seqpacket_pair()?;
        let mut args = self.args.clone();
        args.extend(["--uid".into(), uid.to_string().into()]);
        let setup = ChildSetup {
            namespaces: (libc::CLONE_NEWPID
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | libc::CLONE_NEWNET) as u64,
            ..ChildSetup::default()
        };
        let env = worker_env();
        let passed = [theirs.as_fd()];
        let cmd = Command {
            args: &args,
            stdio: Stdio::Inherit,
            pass_fds: &passed,
            ..Command::new(&self.settings.program, &env, Path::new("/"), &setup)
        };
        let spawned = xcgi_jail::spawn(&cmd);
        drop(theirs);
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                self.uids.give_back(uid);
                return Err(e.into());
            }
        };
        let worker = Worker {
            pid: child.pid,
            pidfd: child.pidfd,
            control: ours,
            uid,
            uids: Arc::clone(&self.uids),
        };
        let mut buf = [0u8; 256];
        match recv(
            worker.control.as_fd(),
            &mut buf,
            Some(Duration::from_secs(30)),
        )? {
            Some((1, _)) if buf[0] == b'R' => Ok(worker),
            Some((n, _)) if n > 1 && buf[0] == b'E' => {
                Err(WorkerError::NotReady(crate::escape::for_log(
                    &String::from_utf8_lossy(&buf[1..n]),
                    crate::escape::LOG_TEXT_MAX,
                )))
            }
            _ => Err(WorkerError::NotReady(
                "no word from it within 30 s, or it exited (its log line says why)".into(),
            )),
        }
    }

    /// Runs one VM in a worker: hands it `attach`, waits for its end (or kills it when
    /// `opts.cancel` is cancelled). Blocking: called on the VM's supervising thread.
    pub fn run(&self, attach: &Attachments, opts: &RunOptions) -> VmEnd {
        let worker = match self.take() {
            Ok(w) => w,
            Err(e) => return end(format!("VM failed to start: {e}")),
        };
        if let Err(e) = launch(&worker, attach, opts) {
            return end(format!(
                "VM failed to start: cannot hand the VM its request: {e}"
            ));
        }
        // The guest driver's "receive buffers posted" flag lives in the VM process: the
        // server cannot see it, and connects at once instead (HTTP mode; its retries cover a
        // guest still booting).
        if let Some(ready) = attach.net.as_ref().and_then(|n| n.rx_ready.as_ref()) {
            ready.store(true, std::sync::atomic::Ordering::Release);
        }
        supervise(worker, opts)
    }
}

/// A started, jailed and ready VM process, for `xcgi bench jail`.
#[derive(Debug)]
pub struct ReadyWorker(Worker);

impl ReadyWorker {
    /// Its pid.
    pub fn pid(&self) -> libc::pid_t {
        self.0.pid
    }
}

impl Workers {
    /// `xcgi bench jail`: starts one VM process and waits until it is ready (spawned, VM
    /// built, confined, filters set).
    pub fn bench_start(&self) -> Result<ReadyWorker, WorkerError> {
        self.start_one().map(ReadyWorker)
    }

    /// `xcgi bench jail`: hands `w` a request (`attach`, setup only) and returns the times
    /// from just before the hand-off to the VM process having the message, and to its VM
    /// being ready for its first KVM_RUN (CLOCK_MONOTONIC in both processes).
    pub fn bench_handoff(
        w: ReadyWorker,
        attach: &Attachments,
    ) -> Result<(Duration, Duration), String> {
        let opts = RunOptions {
            setup_only: true,
            ..RunOptions::default()
        };
        let t0 = xcgi_vmm::vm::monotonic_ns();
        launch(&w.0, attach, &opts).map_err(|e| e.to_string())?;
        let end = supervise(w.0, &opts);
        let stamp = |key: &str| -> Option<u128> {
            end.description
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|n| n.parse().ok())
        };
        let (Some(got), Some(ready)) = (stamp("got_ns="), stamp("ready_ns=")) else {
            return Err(end.description);
        };
        let since = |ns: u128| {
            Duration::from_nanos(u64::try_from(ns.saturating_sub(t0)).unwrap_or(u64::MAX))
        };
        Ok((since(got), since(ready)))
    }
}

/// The server's uid range for jailed VM processes, shared by every route.
#[derive(Debug)]
pub struct UidRange(Arc<Uids>);

impl UidRange {
    /// `count` uids from `base`.
    pub fn new(base: u32, count: u32) -> Arc<UidRange> {
        let free = (0..count)
            .rev()
            .filter_map(|i| base.checked_add(i))
            .collect();
        Arc::new(UidRange(Arc::new(Uids {
            free: Mutex::new(free),
            count,
        })))
    }
}

fn end(description: String) -> VmEnd {
    VmEnd {
        description,
        dump: None,
    }
}

/// The worker's environment: the log filter and the seccomp mode only.
fn worker_env() -> Vec<String> {
    ["RUST_LOG", "XCGI_SECCOMP"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .collect()
}

/// Keeps `target` workers ready until the pool is gone or stopped.
fn refill(pool: &std::sync::Weak<Workers>) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        if p.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let short = p.ready.lock().map(|r| r.len() < p.target).unwrap_or(false);
        if short {
            match p.start_one() {
                Ok(w) if p.stopping.load(std::sync::atomic::Ordering::SeqCst) => drop(w),
                Ok(w) => {
                    p.failures.store(0, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut r) = p.ready.lock() {
                        r.push_back(w);
                        if r.len() >= p.target {
                            p.filled_once
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    p.failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot prepare a jailed VM process");
                    drop(p);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            continue;
        }
        let guard = p.ready.lock();
        if let Ok(g) = guard {
            let _ = p.wake.wait_timeout(g, Duration::from_millis(500));
        }
    }
}

/// Sends the launch message with the channel and TAP descriptors.
fn launch(w: &Worker, attach: &Attachments, opts: &RunOptions) -> io::Result<()> {
    let net = attach.net.as_ref();
    let text = format!(
        "L{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
        opts.timeout.as_millis(),
        u8::from(opts.debug_dump),
        u8::from(attach.channel.is_some()),
        u8::from(net.is_some()),
        net.map(|n| hex_mac(&n.mac)).unwrap_or_default(),
        net.map(|n| n.ip_param.clone()).unwrap_or_default(),
        attach
            .cmdline_extra
            .clone()
            .unwrap_or_default()
            .replace('\n', " "),
        u8::from(opts.setup_only),
    );
    let mut fds: Vec<RawFd> = Vec::new();
    if let Some(c) = &attach.channel {
        fds.push(c.as_raw_fd());
    }
    if let Some(n) = net {
        fds.push(n.tap.as_raw_fd());
    }
    send(w.control.as_fd(), text.as_bytes(), &fds)
}

fn hex_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits for the worker's report (or its death, or the cancel), then reaps it.
fn supervise(mut worker: Worker, opts: &RunOptions) -> VmEnd {
    let mut buf = vec![0u8; 256 << 10];
    let mut report = None;
    loop {
        if opts.cancel.is_cancelled() {
            break; // killed below
        }
        match recv(
            worker.control.as_fd(),
            &mut buf,
            Some(Duration::from_millis(20)),
        ) {
            Ok(Some((n, _))) if n > 0 && buf[0] == b'E' => {
                report = Some(parse_report(&buf[1..n]));
                break;
            }
            Ok(None) => continue, // nothing yet
            // EOF (the worker is gone) or an error: its exit status says why.
            Ok(Some(_)) | Err(_) => break,
        }
    }
    // Done (or gone, or misbehaving): a VM process that reported does nothing more, and one
    // that sent anything else must not keep this thread waiting. Killing one that is
    // already dead changes nothing, its exit status included.
    worker.pidfd.signal(libc::SIGKILL);
    let code = worker.pidfd.wait_blocking();
    if let Some(r) = report {
        return r;
    }
    if opts.cancel.is_cancelled() {
        return end("cancelled (the server stopped it)".into());
    }
    end(match code {
        Ok(c) if c == 128 + libc::SIGSYS => {
            "the jailed VM process was killed by its seccomp filter (SIGSYS): a system call \
             outside its allow-list"
                .into()
        }
        Ok(c) if c == 128 + libc::SIGKILL => {
            "the jailed VM process was killed (SIGKILL: out of memory in its cgroup?)".into()
        }
        Ok(c) => format!("the jailed VM process ended (status {c}) without reporting"),
        Err(e) => format!("the jailed VM process could not be waited for: {e}"),
    })
}

/// The worker's report. It comes from a process that ran the guest, so it is as untrusted
/// as the guest: the description is escaped and cut like any guest text, the dump line by
/// line (at most [`DUMP_LINES`] lines), before either can reach a log line.
fn parse_report(b: &[u8]) -> VmEnd {
    let (desc, dump) = match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    VmEnd {
        description: crate::escape::for_log(&text(desc), crate::escape::LOG_TEXT_MAX),
        dump: dump.filter(|d| !d.is_empty()).map(|d| {
            text(d)
                .lines()
                .take(DUMP_LINES)
                .map(|l| crate::escape::for_log(l, crate::escape::LOG_TEXT_MAX))
                .collect::<Vec<_>>()
                .join("\n")
        }),
    }
}

/// Lines of a jailed VM process's debug dump that reach the log.
const DUMP_LINES: usize = 400;

/// The worker's side: `xcgi vmm-worker --kernel K (--initramfs P | --rootfs P) --mem M
/// --vcpus N [--hugepages] --uid U`, started by [`Workers`] with its control socket as fd 3.
/// Returns the process's exit code.
pub fn worker_main(args: &WorkerArgs) -> i32 {
    // SAFETY: a descriptor the server passed as fd 3, ours alone.
    let control = unsafe { OwnedFd::from_raw_fd(3) };
    // Nothing else the server had open comes along.
    xcgi_jail::close_from(4);
    match worker_steps(args, control.as_fd()) {
        Ok(()) => 0,
        Err(e) => {
            let _ = send(control.as_fd(), format!("E{e}").as_bytes(), &[]);
            tracing::error!("jailed VM process: {e}");
            1
        }
    }
}

/// What the server tells `xcgi vmm-worker` on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The machine.
    pub spec: VmSpec,
    /// The uid and gid to drop to.
    pub uid: u32,
}

fn worker_steps(args: &WorkerArgs, control: BorrowedFd<'_>) -> Result<(), String> {
    let t0 = Instant::now();
    let shape = args.spec.shape();
    let prepared = xcgi_vmm::prepare(&shape, t0).map_err(|e| format!("building the VM: {e}"))?;
    confine_vm_process(shape.vcpus, args.uid)?;
    silence_stdio().map_err(|e| format!("detaching stdio: {e}"))?;
    send(control, b"R", &[]).map_err(|e| format!("saying ready: {e}"))?;
    let mut buf = vec![0u8; 8192];
    let (n, fds) = recv(control, &mut buf, None)
        .map_err(|e| format!("waiting for a request: {e}"))?
        .ok_or("the server went away")?;
    let got_ns = xcgi_vmm::vm::monotonic_ns();
    if n == 0 || buf[0] != b'L' {
        return Err("the server closed the control socket".into());
    }
    let (attach, opts) = parse_launch(&buf[1..n], fds)?;
    let (launched, launched_ns) = (Instant::now(), xcgi_vmm::vm::monotonic_ns());
    let r = xcgi_vmm::launch(prepared, &attach, &opts, launched, None);
    let mut end = VmEnd::from_run(&r);
    if let (true, Ok(out)) = (opts.setup_only, &r) {
        // `xcgi bench jail`: when the VM was ready for its first KVM_RUN (CLOCK_MONOTONIC,
        // ns; the launch's own measure, before the setup-only VM was torn down).
        let ready_ns = launched_ns + out.timings.setup.as_nanos();
        end.description = format!("setup-only got_ns={got_ns} ready_ns={ready_ns}");
    }
    let mut msg = format!("E{}", end.description.replace('\0', " ")).into_bytes();
    if let Some(d) = &end.dump {
        msg.push(0);
        msg.extend_from_slice(d.as_bytes());
    }
    msg.truncate(200 << 10);
    send(control, &msg, &[]).map_err(|e| format!("reporting the end: {e}"))
}

/// From here on the guest may run: the VM process's stdin, stdout and stderr (the server's
/// own log, inherited) become pipes nobody reads or writes, so nothing it writes, compromised
/// or not, reaches the server's log except through the escaped report.
fn silence_stdio() -> io::Result<()> {
    // A read end with no writer (reads see EOF), a write end with no reader (writes fail:
    // EPIPE, SIGPIPE is ignored).
    let (r, _) = xcgi_jail::pipe()?;
    let (_, w) = xcgi_jail::pipe()?;
    // SAFETY: dup2 onto this process's own 0, 1 and 2.
    unsafe {
        if libc::dup2(r.as_raw_fd(), 0) < 0
            || libc::dup2(w.as_raw_fd(), 1) < 0
            || libc::dup2(w.as_raw_fd(), 2) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Confines a VM process whose VM is built (steps 3-5 of the jail, docs/security.md) and
/// sets the seccomp filters its threads install (step 6; `XCGI_SECCOMP=log` logs instead of
/// killing). Shared by the server's VM processes and `xcgi run --jail`.
pub fn confine_vm_process(vcpus: u8, uid: u32) -> Result<(), String> {
    xcgi_jail::confine(&xcgi_jail::Confinement {
        mount_point: std::env::temp_dir(),
        uid,
        gid: uid,
        limits: vec![
            (libc::RLIMIT_NOFILE, 128),
            // Threads count: main, vCPUs, device RX threads.
            (libc::RLIMIT_NPROC, 8 + u64::from(vcpus)),
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_FSIZE, 0),
        ],
    })
    .map_err(|e| e.to_string())?;
    let mismatch = match std::env::var("XCGI_SECCOMP").as_deref() {
        Ok("log") => xcgi_vmm::seccomp::Mismatch::Log,
        _ => xcgi_vmm::seccomp::Mismatch::Kill,
    };
    let filters = xcgi_vmm::seccomp::Filters::new(mismatch).map_err(|e| e.to_string())?;
    xcgi_vmm::seccomp::set_process_filters(filters);
    Ok(())
}

fn parse_launch(b: &[u8], fds: Vec<OwnedFd>) -> Result<(Attachments, RunOptions), String> {
    let text = String::from_utf8_lossy(b);
    let l: Vec<&str> = text.split('\n').collect();
    if l.len() < 8 {
        return Err(format!("a launch message of {} lines", l.len()));
    }
    let timeout_ms: u64 = l[0].parse().map_err(|_| "a bad deadline")?;
    let mut fds = fds.into_iter();
    let channel = (l[2] == "1").then(|| fds.next().map(Arc::new)).flatten();
    let net = if l[3] == "1" {
        let tap = fds.next().ok_or("a NIC without its TAP")?;
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = l[4]
                .get(i * 2..i * 2 + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad MAC address")?;
        }
        Some(NetAttachment {
            tap: Arc::new(tap),
            mac,
            ip_param: l[5].to_string(),
            rx_ready: None,
        })
    } else {
        None
    };
    let attach = Attachments {
        channel,
        net,
        cmdline_extra: (!l[6].is_empty()).then(|| l[6].to_string()),
    };
    let opts = RunOptions {
        timeout: Duration::from_millis(timeout_ms),
        debug_dump: l[1] == "1",
        setup_only: l[7] == "1",
        ..RunOptions::default()
    };
    Ok((attach, opts))
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two new descriptors into fds.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new, ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

const MAX_FDS: usize = 4;

/// One message with up to [`MAX_FDS`] descriptors (SCM_RIGHTS).
fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    // SAFETY: a zeroed msghdr/cmsg buffer filled below with pointers to live locals.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut cbuf = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let len = std::mem::size_of_val(fds) as u32;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(len) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One message and its descriptors; None when `timeout` passed first. Some((0, _)): the
/// peer closed.
fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    timeout: Option<Duration>,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    if let Some(t) = timeout {
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: polls one descriptor we hold.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 {
            return Ok(None);
        }
    }
    // SAFETY: recvmsg into buf and a cmsg buffer sized for MAX_FDS descriptors; the
    // descriptors received are new and become ours.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE((MAX_FDS * 4) as u32) as usize;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok(Some((n as usize, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_report;

    #[test]
    fn a_report_from_a_vm_process_is_escaped_before_it_reaches_a_log() {
        let mut msg = b"deadline\n2026-01-01T00:00:00Z  INFO forged status=200".to_vec();
        msg.push(0);
        msg.extend_from_slice(b"vcpu0: rip=0x1\n\x1b[2Jcleared\n");
        msg.extend(std::iter::repeat_n(b"x\n".as_slice(), 1000).flatten());
        let end = parse_report(&msg);
        assert!(!end.description.contains('\n'), "{:?}", end.description);
        let dump = end.dump.expect("a dump");
        assert!(!dump.contains('\x1b'), "{dump:?}");
        assert!(dump.starts_with("vcpu0: rip=0x1\n"), "{dump:?}");
        assert_eq!(dump.lines().count(), super::DUMP_LINES);
    }
}
