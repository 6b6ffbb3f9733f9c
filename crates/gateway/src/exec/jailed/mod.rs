//! VMs in jailed processes (`[server] jail = true`; docs/security.md, "The jail"). Each VM
//! runs in an `xcgi vmm-worker` process of its own: started by the server's jail helper
//! ([`Helper`]) in new PID, mount, IPC, UTS and network namespaces and a cgroup of its own,
//! it builds the route's VM up to the first KVM_RUN, confines itself ([`xcgi_jail::confine`]:
//! empty root, rlimits, no capabilities, a uid of its own from the helper's range), sets its
//! seccomp filters, says "ready" on its control socket and waits. A request hands it the CGI channel (or the TAP) over that socket
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
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use xcgi_vmm::{Attachments, RunOptions};

mod helper;
mod wire;
mod worker;

pub use helper::{helper_main, Exit, ExitSlot, Helper, HelperSettings, HelperTaps};

use wire::{recv, send, seqpacket_pair};
pub use worker::{confine_vm_process, worker_main, WorkerArgs};

use super::vm::{GuestRoot, VmEnd, VmSpec};
use super::vm_cgroup::VmLimits;

/// A VM process's namespaces (step 1 of the jail): its own PID 1, mounts, IPC, hostname and
/// network (empty in CGI mode; HTTP mode's TAP is handed to it).
pub const VM_NAMESPACES: u64 = (libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET) as u64;

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
    /// Its cgroup could not be made or opened.
    #[error("cannot make the jailed VM process's cgroup: {0}")]
    Cgroup(io::Error),
    /// The jail helper refused or failed (its words).
    #[error("{0}")]
    Helper(String),
}

/// One started worker: ready (or about to be) for one VM.
#[derive(Debug)]
struct Worker {
    pid: libc::pid_t,
    control: OwnedFd,
    /// Its end, said by the helper once it has reaped it.
    exit: Arc<ExitSlot>,
    helper: Arc<Helper>,
    /// Its cgroup's `cpu.weight` (lowest while it waits), when the cpu controller is on.
    weight: Option<std::fs::File>,
}

impl Worker {
    /// It has a request (or one waits for it): its CPU weight goes up to everyone's. A
    /// failure leaves it at the waiting weight, which costs time only while other cgroups
    /// compete for the CPU.
    fn running(&self) {
        use std::io::Write;
        if let Some(mut w) = self.weight.as_ref() {
            if let Err(e) = w.write_all(crate::exec::vm_cgroup::RUNNING_WEIGHT) {
                tracing::warn!(error = %e, "cannot raise a VM process's cpu.weight");
            }
        }
    }
}

impl Worker {
    /// Kills it (if still alive) and waits until the helper has reaped it, freed its uid and
    /// removed its cgroup. Its control socket is shut down first: one waiting for a request
    /// exits by itself even where the kill cannot reach it (no CAP_KILL), and one running a
    /// guest ends at its VM's deadline at the latest.
    fn end(&self) -> Exit {
        // SAFETY: shutdown(2) on our own socket; the descriptor stays ours.
        unsafe { libc::shutdown(self.control.as_raw_fd(), libc::SHUT_RDWR) };
        self.helper.kill(self.pid);
        self.exit.wait()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.end();
    }
}

/// A route's jailed VM processes: `target` kept ready, more started on demand.
#[derive(Debug)]
pub struct Workers {
    helper: Arc<Helper>,
    /// The helper's template for this route's VM processes.
    template: u32,
    /// The server's gauge of VMs prepared ahead: counts the ready ones.
    prepared_gauge: Arc<std::sync::atomic::AtomicI64>,
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

/// How long a VM process gets to say it is ready ([`await_ready`]).
#[derive(Debug, Clone, Copy)]
struct ReadyWait {
    /// A process prepared ahead runs at the lowest CPU weight; without a word by then it is
    /// taken as starved by VMs serving requests, and gets everyone's weight.
    starved_after: Duration,
    /// From then (at once, for a process a request waits for) to its word.
    limit: Duration,
}

const READY_WAIT: ReadyWait = ReadyWait {
    starved_after: Duration::from_secs(5),
    limit: Duration::from_secs(30),
};

/// Waits on a VM process's control socket for its word: ready, or why not. One prepared ahead
/// (`!wanted`) runs at the waiting weight, which only yields the CPU to VMs serving requests;
/// under load that lasts (in the lab, one CPU and a queue of requests) it got no CPU time at
/// all and was killed at the limit, again and again, while every request paid a start of its
/// own. So after [`ReadyWait::starved_after`] it is `raise`d to everyone's weight, and the
/// limit counts from there: a process that is stuck still ends within both.
fn await_ready(
    control: std::os::fd::BorrowedFd<'_>,
    wanted: bool,
    raise: impl FnOnce(),
    wait: ReadyWait,
) -> io::Result<Ready> {
    let mut buf = [0u8; 256];
    let mut word = None;
    if !wanted {
        word = recv(control, &mut buf, Some(wait.starved_after))?;
        if word.is_none() {
            tracing::debug!(
                after_ms = wait.starved_after.as_millis() as u64,
                "a VM process prepared ahead is not ready yet: it gets everyone's CPU weight"
            );
            raise();
        }
    }
    if word.is_none() {
        word = recv(control, &mut buf, Some(wait.limit))?;
    }
    Ok(match word {
        Some((1, _)) if buf[0] == b'R' => Ready::Yes,
        Some((n, _)) if n > 1 && buf[0] == b'E' => Ready::No(crate::escape::for_log(
            &String::from_utf8_lossy(&buf[1..n]),
            crate::escape::LOG_TEXT_MAX,
        )),
        Some((0, _)) => Ready::Exited,
        Some(_) => Ready::No("it said something else than ready".into()),
        None => Ready::No(format!(
            "no word from it within {} s (it is killed)",
            (if wanted {
                wait.limit
            } else {
                wait.starved_after + wait.limit
            })
            .as_secs()
        )),
    })
}

/// A VM process's word on its control socket ([`await_ready`]).
#[derive(Debug, PartialEq, Eq)]
enum Ready {
    Yes,
    /// It said why not, or said nothing in time.
    No(String),
    /// Its socket closed without a word: it ended.
    Exited,
}

/// Failed starts in a row after which the route is reported failing (as VM pools do).
const FAILING_AFTER: u32 = 3;

impl Workers {
    /// Workers for `spec`'s machine, started by `helper`, each in a cgroup with `limits`,
    /// `target` of them kept ready by a thread of their own.
    pub fn start(
        spec: &VmSpec,
        helper: &Arc<Helper>,
        limits: VmLimits,
        target: usize,
        prepared_gauge: Arc<std::sync::atomic::AtomicI64>,
    ) -> Result<Arc<Workers>, WorkerError> {
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
        if let Some(dir) = &spec.snapshot {
            args.extend(["--snapshot".into(), abs(dir)?]);
        }
        let template = helper.register(&args, &limits)?;
        let w = Arc::new(Workers {
            helper: Arc::clone(helper),
            template,
            prepared_gauge,
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
        self.prepared_gauge
            .fetch_sub(ready.len() as i64, std::sync::atomic::Ordering::Relaxed);
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
        if ready.is_some() {
            self.prepared_gauge
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.wake.notify_all();
        match ready {
            Some(w) => {
                w.running();
                Ok(w)
            }
            // A request waits for this one: it runs at the running weight from the start.
            None => self.start_one(true),
        }
    }

    /// Starts a worker and waits until it says it is ready; `wanted`: a request waits for it.
    fn start_one(&self, wanted: bool) -> Result<Worker, WorkerError> {
        let (ours, theirs) = seqpacket_pair()?;
        let started = self.helper.spawn(self.template, theirs.as_fd());
        drop(theirs);
        let started = started?;
        let worker = Worker {
            pid: started.pid,
            control: ours,
            exit: started.exit,
            helper: Arc::clone(&self.helper),
            weight: started.weight,
        };
        if wanted {
            worker.running();
        }
        match await_ready(
            worker.control.as_fd(),
            wanted,
            || worker.running(),
            READY_WAIT,
        )? {
            Ready::Yes => Ok(worker),
            Ready::No(why) => Err(WorkerError::NotReady(why)),
            // Its end says why (reaped by the helper first).
            Ready::Exited => Err(WorkerError::NotReady(describe_exit(&worker.end()))),
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
        self.start_one(true).map(ReadyWorker)
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

fn end(description: String) -> VmEnd {
    VmEnd {
        working_set: None,
        description,
        dump: None,
    }
}

/// The worker's environment: the log filter and the seccomp mode only.
pub(crate) fn worker_env() -> Vec<String> {
    ["XCGI_LOG", "XCGI_SECCOMP"]
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
            match p.start_one(false) {
                Ok(w) if p.stopping.load(std::sync::atomic::Ordering::SeqCst) => drop(w),
                Ok(w) => {
                    p.failures.store(0, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut r) = p.ready.lock() {
                        p.prepared_gauge
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        "L{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
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
        opts.debug_probe
            .as_ref()
            .map(|p| p.to_line())
            .unwrap_or_default(),
        u8::from(opts.record_working_set),
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
fn supervise(worker: Worker, opts: &RunOptions) -> VmEnd {
    let mut buf = vec![0u8; 256 << 10];
    let mut report = None;
    let mut working_set = None;
    // With `debug_dump`, a VM stopped by the server (its request's deadline, a client gone,
    // or its response complete) is first asked to stop and report, so that its state reaches
    // the log; then killed. So is one asked for its working set.
    let mut asked_until: Option<Instant> = None;
    loop {
        if opts.cancel.is_cancelled() {
            if !opts.debug_dump && !opts.record_working_set {
                break; // killed below
            }
            match asked_until {
                None => {
                    worker.helper.stop(worker.pid);
                    asked_until = Some(Instant::now() + DUMP_WAIT);
                }
                Some(t) if Instant::now() >= t => break,
                Some(_) => {}
            }
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
            // Said while it waited: it touched its whole working set ahead (a number).
            Ok(Some((n, _))) if n > 0 && buf[0] == b'T' => {
                let pages = std::str::from_utf8(&buf[1..n])
                    .ok()
                    .and_then(|t| t.parse::<u32>().ok());
                if let Some(pages) = pages {
                    tracing::debug!(
                        pid = worker.pid,
                        pages,
                        "clone touched its working set ahead"
                    );
                }
            }
            // The pages the guest touched, before the report (only when asked for): checked
            // here for form, against the route's memory when kept.
            Ok(Some((n, _))) if n > 0 && buf[0] == b'W' && opts.record_working_set => {
                match xcgi_vmm::prefault::WorkingSet::decode(&buf[1..n], u64::MAX) {
                    Ok(set) => working_set = Some(set),
                    Err(e) => tracing::warn!("a jailed VM process's working set: {e}"),
                }
            }
            Ok(None) => continue, // nothing yet
            // EOF (the worker is gone) or an error: its exit status says why.
            Ok(Some(_)) | Err(_) => break,
        }
    }
    // Done (or gone, or misbehaving): a VM process that reported does nothing more, and one
    // that sent anything else must not keep this thread waiting. Killing one that is
    // already dead changes nothing, its exit status included.
    let exit = worker.end();
    if let Some(r) = report {
        return VmEnd { working_set, ..r };
    }
    if opts.cancel.is_cancelled() {
        return end("cancelled (the server stopped it)".into());
    }
    end(describe_exit(&exit))
}

/// How long a VM process asked to stop gets to report (its dump) before it is killed.
const DUMP_WAIT: Duration = Duration::from_secs(3);

/// Why a VM process that did not report ended.
fn describe_exit(exit: &Exit) -> String {
    match (exit.code, exit.oom_max) {
        (_, Some(max)) => format!(
            "the jailed VM process was killed by the kernel's OOM killer: it reached its \
             cgroup's memory.max ({} MiB; raise the route's memory_max_mib)",
            max >> 20
        ),
        (c, None) if c == 128 + libc::SIGSYS => {
            "the jailed VM process was killed by its seccomp filter (SIGSYS): a system call \
             outside its allow-list"
                .into()
        }
        (c, None) if c == 128 + libc::SIGKILL => {
            "the jailed VM process was killed (SIGKILL)".into()
        }
        (-1, None) => "the jailed VM process's end is unknown: the jail helper is gone".into(),
        (c, None) => format!("the jailed VM process ended (status {c}) without reporting"),
    }
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
        working_set: None,
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

#[cfg(test)]
mod tests {
    use super::{await_ready, parse_report, send, seqpacket_pair, Ready, ReadyWait};
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const SHORT: ReadyWait = ReadyWait {
        starved_after: Duration::from_millis(200),
        limit: Duration::from_secs(3),
    };

    /// A VM process prepared ahead that gets no CPU time at the waiting weight (here: one that
    /// answers only once its weight went up) is raised and becomes ready, where it used to
    /// be killed at the limit (lab: three of the first four preparations under a queue of
    /// requests). One a request waits for is never "raised" again, and a stuck one still ends.
    #[test]
    fn a_starved_preparation_gets_the_cpu_and_a_stuck_one_still_ends() {
        let (server, process) = seqpacket_pair().unwrap();
        let raised = Arc::new(AtomicBool::new(false));
        let r2 = Arc::clone(&raised);
        let starved = std::thread::spawn(move || {
            while !r2.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            send(process.as_fd(), b"R", &[]).unwrap();
            process
        });
        let t0 = Instant::now();
        let raise = || raised.store(true, Ordering::SeqCst);
        assert_eq!(
            await_ready(server.as_fd(), false, raise, SHORT).unwrap(),
            Ready::Yes
        );
        assert!(t0.elapsed() >= SHORT.starved_after, "{:?}", t0.elapsed());
        let _process = starved.join().unwrap();

        // Wanted: at the running weight already; it answers at once, nothing is raised.
        let (server, process) = seqpacket_pair().unwrap();
        send(process.as_fd(), b"R", &[]).unwrap();
        let got = await_ready(server.as_fd(), true, || panic!("raised"), SHORT).unwrap();
        assert_eq!(got, Ready::Yes);

        // Stuck: no word in the starved time plus the limit.
        let t0 = Instant::now();
        let got = await_ready(server.as_fd(), false, || {}, SHORT).unwrap();
        assert_eq!(
            got,
            Ready::No("no word from it within 3 s (it is killed)".into())
        );
        assert!(t0.elapsed() >= SHORT.starved_after + SHORT.limit);

        // Its reason, escaped; an end without a word.
        send(process.as_fd(), b"Ecannot map\n\x1b[2J", &[]).unwrap();
        let got = await_ready(server.as_fd(), true, || {}, SHORT).unwrap();
        assert_eq!(got, Ready::No("cannot map\\n\\u{1b}[2J".into()));
        drop(process);
        let got = await_ready(server.as_fd(), false, || {}, SHORT).unwrap();
        assert_eq!(got, Ready::Exited);
    }

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
