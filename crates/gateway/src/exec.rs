//! Running one CGI handler for one request: in a fresh microVM (the guest's `xcgi-init` speaks
//! [`xcgi_channel`] over virtio-console) or, for `--isolation process`, as a child process.
//! Both give the server the same [`Exchange`]: the handler's stdout as a stream of chunks, its
//! end ([`Finish`]) and a [`Killer`] that stops it (also on drop: nothing outlives a request).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use xcgi_channel as ch;
use xcgi_vmm::vm::Cancel;
use xcgi_vmm::{Attachments, ExitReason, MachineShape, Pool, RunOptions};

use crate::metrics::Metrics;

/// Bytes of a handler's stderr kept for the log line of a failed request.
pub const STDERR_TAIL: usize = 4096;
/// Chunks of handler output buffered between the handler and the client.
const STDOUT_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start the handler {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the host-guest channel: {0}")]
    Channel(std::io::Error),
    #[error("cannot start a VM thread: {0}")]
    Thread(std::io::Error),
}

/// How a handler ended.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    /// Exit code (128 + signal when killed), when the handler ran to its end.
    pub exit: Option<i32>,
    /// Why the handler did not end normally (VM crash, init failure, killed).
    pub failure: Option<String>,
    /// The end of what the handler wrote to stderr.
    pub stderr_tail: String,
}

/// A running handler.
pub struct Exchange {
    /// The handler's stdout, chunk by chunk; closed when the handler closes it (or dies).
    pub stdout: mpsc::Receiver<Bytes>,
    /// Set before `stdout` closes when the handler's output ended properly (it closed its
    /// stdout, or exited); unset when it was killed or its VM died mid-response: then the
    /// response is truncated and the client must be able to tell.
    pub complete: Arc<AtomicBool>,
    /// Sent once when the handler is done (or could not run).
    pub finish: oneshot::Receiver<Finish>,
    /// Time from start until the handler got the request (VM boot, or process spawn).
    pub ready: oneshot::Receiver<Duration>,
    pub killer: Killer,
}

type KillFn = Box<dyn FnOnce() + Send>;

/// Stops the handler: kills the process or the VM. Clones share one kill; dropping the last
/// clone kills too.
#[derive(Clone)]
pub struct Killer(Arc<KillOnDrop>);

struct KillOnDrop(std::sync::Mutex<Option<KillFn>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.get_mut().ok().and_then(Option::take) {
            f();
        }
    }
}

impl Killer {
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Killer(Arc::new(KillOnDrop(std::sync::Mutex::new(Some(Box::new(
            f,
        ))))))
    }

    pub fn kill(&self) {
        let f = self.0 .0.lock().ok().and_then(|mut g| g.take());
        if let Some(f) = f {
            f();
        }
    }
}

/// What the handler runs.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub program: PathBuf,
    pub env: Vec<String>,
    pub cwd: PathBuf,
}

fn push_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(data);
    if tail.len() > STDERR_TAIL {
        let cut = tail.len() - STDERR_TAIL;
        tail.drain(..cut);
    }
}

/// `--isolation process`: the handler as a classic CGI child (fork/exec, no VM), confined by
/// `jail` (unprivileged user, rlimits, its own process group and cgroup). `keep` (the
/// request's concurrency slot) is dropped once the handler and everything it started are
/// gone.
pub fn spawn_process<K: Send + 'static>(
    inv: &Invocation,
    mut body: mpsc::Receiver<Bytes>,
    jail: &crate::jail::ProcessJail,
    id: u64,
    keep: K,
) -> Result<Exchange, ExecError> {
    let t0 = Instant::now();
    let mut cmd = tokio::process::Command::new(&inv.program);
    cmd.env_clear()
        .envs(inv.env.iter().filter_map(|e| e.split_once('=')))
        .current_dir(&inv.cwd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let spawn_err = |source| ExecError::Spawn {
        program: inv.program.clone(),
        source,
    };
    let mut group = jail.prepare(&mut cmd, id).map_err(spawn_err)?;
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tokio::spawn(group.finish());
            return Err(spawn_err(e));
        }
    };
    group.started(child.id());
    let group = Arc::new(std::sync::Mutex::new(Some(group)));
    let (ready_tx, ready) = oneshot::channel();
    let _ = ready_tx.send(t0.elapsed());
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    tokio::spawn(async move {
        if let Some(mut w) = stdin.take() {
            while let Some(chunk) = body.recv().await {
                if w.write_all(&chunk).await.is_err() {
                    break; // the handler stopped reading its stdin
                }
            }
        }
    });
    let killed = Arc::new(AtomicBool::new(false));
    let complete = Arc::new(AtomicBool::new(false));
    let (out_tx, out_rx) = mpsc::channel(STDOUT_DEPTH);
    let (k2, c2) = (Arc::clone(&killed), Arc::clone(&complete));
    tokio::spawn(async move {
        if let Some(mut r) = stdout.take() {
            loop {
                let mut buf = BytesMut::with_capacity(ch::CHUNK);
                match r.read_buf(&mut buf).await {
                    Ok(0) => {
                        // Killed first: the end of output is a cut, not the end.
                        c2.store(!k2.load(Ordering::SeqCst), Ordering::SeqCst);
                        break;
                    }
                    Err(_) => break,
                    Ok(_) => {
                        if out_tx.send(buf.freeze()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    });
    let err_task = tokio::spawn(async move {
        let mut tail = Vec::new();
        if let Some(mut r) = stderr.take() {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                push_tail(&mut tail, &buf[..n]);
            }
        }
        String::from_utf8_lossy(&tail).into_owned()
    });
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let (fin_tx, finish) = oneshot::channel();
    let g2 = Arc::clone(&group);
    tokio::spawn(async move {
        let mut failure = None;
        let status = tokio::select! {
            // Biased: a handler that already exited is not "killed".
            biased;
            s = child.wait() => s.ok(),
            _ = kill_rx => {
                failure = Some("killed".to_string());
                child.wait().await.ok()
            }
        };
        // The handler is gone: so is everything it started (a child it did not exec would
        // otherwise keep running and keep its pipes, and our fds, open).
        let group = g2.lock().ok().and_then(|mut g| g.take());
        if let Some(g) = group {
            g.finish().await;
        }
        let stderr_tail = tokio::time::timeout(Duration::from_secs(2), err_task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let exit = status.and_then(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().or_else(|| s.signal().map(|sig| 128 + sig))
        });
        let _ = fin_tx.send(Finish {
            exit,
            failure,
            stderr_tail,
        });
        drop(keep);
    });
    Ok(Exchange {
        stdout: out_rx,
        complete,
        finish,
        ready,
        killer: Killer::new(move || {
            killed.store(true, Ordering::SeqCst);
            if let Some(g) = group.lock().ok().as_ref().and_then(|g| g.as_ref()) {
                g.kill();
            }
            let _ = kill_tx.send(());
        }),
    })
}

/// The guest's root: an initramfs or a read-only ext4 disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRoot {
    Initramfs(PathBuf),
    Disk(PathBuf),
}

impl GuestRoot {
    pub fn path(&self) -> &Path {
        match self {
            GuestRoot::Initramfs(p) | GuestRoot::Disk(p) => p,
        }
    }
}

/// How to boot a route's VM: prepared once per route at start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub root: GuestRoot,
    pub memory_mib: u64,
    pub hugepages: bool,
    pub vcpus: u8,
    pub timeout: Duration,
    /// VMs of this shape prepared ahead (None: every request builds its own).
    pub pool: Option<Arc<Pool>>,
}

impl VmSpec {
    /// The machine: what its prepared VMs are keyed by.
    pub fn shape(&self) -> MachineShape {
        let (initramfs, rootfs) = match &self.root {
            GuestRoot::Initramfs(p) => (Some(p.clone()), None),
            GuestRoot::Disk(p) => (None, Some(p.clone())),
        };
        MachineShape {
            kernel: self.kernel.clone(),
            initramfs,
            rootfs,
            memory: xcgi_vmm::memory::MemoryConfig {
                size_mib: self.memory_mib,
                hugepages: self.hugepages,
                populate: false,
            },
            vcpus: self.vcpus,
            ..MachineShape::default()
        }
    }

    /// One request's run: the route's deadline, stopped early by `cancel`.
    pub fn run_options(&self, cancel: Cancel) -> RunOptions {
        RunOptions {
            timeout: self.timeout,
            cancel,
            ..RunOptions::default()
        }
    }
}

/// A VM running on its own thread; the outcome arrives when it has been torn down.
pub struct VmThread {
    pub cancel: Cancel,
    pub outcome: oneshot::Receiver<Result<xcgi_vmm::Outcome, String>>,
}

/// Boots `spec`'s machine with `attach` on a new thread, from a VM prepared ahead when its
/// pool has one ready. `metrics.vms_running` counts it until its teardown is done. `keep` (a
/// TAP lease) is dropped after the VM is gone.
pub fn start_vm<K: Send + 'static>(
    spec: &VmSpec,
    attach: Attachments,
    opts: RunOptions,
    metrics: Arc<Metrics>,
    keep: K,
) -> Result<VmThread, ExecError> {
    let t0 = Instant::now();
    let prepared = spec.pool.as_ref().and_then(|s| s.take());
    if spec.pool.is_some() && prepared.is_none() {
        metrics.prepared_misses.fetch_add(1, Ordering::Relaxed);
    }
    let shape = prepared.is_none().then(|| spec.shape());
    let cancel = opts.cancel.clone();
    let (tx, outcome) = oneshot::channel();
    metrics.vms_running.fetch_add(1, Ordering::Relaxed);
    metrics.vms_started.fetch_add(1, Ordering::Relaxed);
    let m = Arc::clone(&metrics);
    let spawned = std::thread::Builder::new()
        .name("xcgi-vm".into())
        .spawn(move || {
            let r = match (prepared, shape) {
                (Some(p), _) => xcgi_vmm::launch(p, &attach, &opts, t0, None),
                (None, Some(shape)) => xcgi_vmm::run(&shape, &attach, &opts, t0, None),
                (None, None) => unreachable!("a shape is made when no VM was prepared"),
            }
            .map_err(|e| e.to_string());
            drop(keep);
            m.vms_running.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        metrics.vms_running.fetch_sub(1, Ordering::Relaxed);
        return Err(ExecError::Thread(e));
    }
    Ok(VmThread { cancel, outcome })
}

/// A short description of how a VM ended, for a log line.
pub fn describe_outcome(r: &Result<xcgi_vmm::Outcome, String>) -> String {
    match r {
        Ok(o) => {
            let mut s = o.reason.describe();
            if matches!(o.reason, ExitReason::Panic { .. } | ExitReason::TripleFault) {
                if let Some(last) = o.console.lines().rev().find(|l| !l.trim().is_empty()) {
                    s.push_str(&format!(" (console: {})", last.trim()));
                }
            }
            s
        }
        Err(e) => format!("VM failed to start: {e}"),
    }
}

/// CGI in a fresh VM: boots the route's kernel and image (whose /init is `xcgi-init`), sends
/// the request over the channel and relays the handler's output.
pub fn spawn_vm_cgi<K: Send + 'static>(
    spec: &VmSpec,
    inv: &Invocation,
    body: mpsc::Receiver<Bytes>,
    metrics: Arc<Metrics>,
    keep: K,
) -> Result<Exchange, ExecError> {
    let t0 = Instant::now();
    let (host, guest) = std::os::unix::net::UnixStream::pair().map_err(ExecError::Channel)?;
    host.set_nonblocking(true).map_err(ExecError::Channel)?;
    let host = tokio::net::UnixStream::from_std(host).map_err(ExecError::Channel)?;
    let cancel = Cancel::new();
    let attach = Attachments {
        channel: Some(Arc::new(OwnedFd::from(guest))),
        ..Attachments::default()
    };
    let vm = start_vm(spec, attach, spec.run_options(cancel.clone()), metrics, ())?;
    let start = ch::Start {
        program: path_bytes(&inv.program),
        args: vec![path_bytes(&inv.program)],
        env: inv.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        cwd: path_bytes(&inv.cwd),
    };
    let (out_tx, out_rx) = mpsc::channel(STDOUT_DEPTH);
    let (ready_tx, ready) = oneshot::channel();
    let (fin_tx, finish) = oneshot::channel();
    let (kill_tx, killed) = tokio::sync::watch::channel(false);
    let complete = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    let chan = Relay {
        out_tx,
        ready_tx,
        complete: Arc::clone(&complete),
        killed,
    };
    tokio::spawn(async move {
        let fin = drive_vm(host, start, body, chan, t0, vm).await;
        // The response is complete (or failed): stop the VM now rather than let init's exit
        // panic run; its teardown goes on in the background (counted in vms_running). The
        // handler is finished: its slot goes now, so the next VM boots while this one is
        // torn down (in the lab, teardown takes long enough to halve the throughput).
        c2.cancel();
        drop(keep);
        let _ = fin_tx.send(fin);
    });
    Ok(Exchange {
        stdout: out_rx,
        complete,
        finish,
        ready,
        killer: Killer::new(move || {
            cancel.cancel();
            let _ = kill_tx.send(true);
        }),
    })
}

fn path_bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

/// Where [`drive_vm`] relays the handler's output, and how it learns of a kill.
struct Relay {
    out_tx: mpsc::Sender<Bytes>,
    ready_tx: oneshot::Sender<Duration>,
    complete: Arc<AtomicBool>,
    killed: tokio::sync::watch::Receiver<bool>,
}

async fn drive_vm(
    host: tokio::net::UnixStream,
    start: ch::Start,
    mut body: mpsc::Receiver<Bytes>,
    relay: Relay,
    t0: Instant,
    vm: VmThread,
) -> Finish {
    let Relay {
        out_tx,
        ready_tx,
        complete,
        mut killed,
    } = relay;
    let (mut rd, wr) = host.into_split();
    let mut wr = Some(wr);
    let mut dec = ch::Decoder::new();
    let mut buf = vec![0u8; ch::CHUNK + ch::HEADER_LEN];
    let mut out_tx = Some(out_tx);
    let mut ready_tx = Some(ready_tx);
    let mut tail = Vec::new();
    let mut writer: Option<tokio::task::JoinHandle<()>> = None;
    let mut start = Some(start);
    let mut exit = None;
    let mut failure = None;
    let mut stdout_closed = false;
    'outer: loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = killed.wait_for(|k| *k) => {
                // After a complete response, the kill is the server's normal end of the VM.
                if !stdout_closed {
                    failure = Some("killed".into());
                }
                break;
            }
        };
        dec.feed(&buf[..n]);
        loop {
            let frame = match dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(format!("guest sent a bad frame: {e}"));
                    break 'outer;
                }
            };
            match frame {
                (ch::HELLO, _) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(t0.elapsed());
                    }
                    let (Some(s), Some(mut w)) = (start.take(), wr.take()) else {
                        continue;
                    };
                    let mut body = std::mem::replace(&mut body, mpsc::channel(1).1);
                    writer = Some(tokio::spawn(async move {
                        if w.write_all(&ch::frame(ch::START, &s.encode()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        while let Some(chunk) = body.recv().await {
                            for piece in chunk.chunks(ch::CHUNK) {
                                if w.write_all(&ch::frame(ch::DATA, piece)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let _ = w.write_all(&ch::frame(ch::DATA_END, b"")).await;
                    }));
                }
                (ch::STDOUT, data) => {
                    if let Some(tx) = &out_tx {
                        // A client that does not read must not keep this task (and the
                        // VM's slot) past a kill.
                        let sent = tokio::select! {
                            r = tx.send(Bytes::from(data)) => r.is_ok(),
                            _ = killed.wait_for(|k| *k) => {
                                failure = Some("killed".into());
                                break 'outer;
                            }
                        };
                        if !sent {
                            // Nobody reads the response any more: the client went away.
                            out_tx = None;
                            failure = Some("the response was abandoned".into());
                            break 'outer;
                        }
                    }
                }
                (ch::STDERR, data) => push_tail(&mut tail, &data),
                (ch::STDOUT_CLOSED, _) => {
                    complete.store(true, Ordering::SeqCst);
                    out_tx = None;
                    stdout_closed = true;
                }
                (ch::EXIT, data) => {
                    // Frames arrive in order: everything the handler wrote came before.
                    complete.store(true, Ordering::SeqCst);
                    let status = data
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    exit = Some(ExitReason::InitExited { status }.exit_code());
                    break 'outer;
                }
                (ch::FAILED, data) => {
                    // Guest text: escaped where it is logged (RequestLog), capped here.
                    let text = String::from_utf8_lossy(&data);
                    failure = Some(text.chars().take(512).collect());
                    break 'outer;
                }
                (other, _) => {
                    failure = Some(format!(
                        "unexpected frame {:?} from the guest",
                        other as char
                    ));
                    break 'outer;
                }
            }
        }
    }
    drop(out_tx);
    if let Some(w) = writer {
        w.abort();
    }
    if exit.is_none() && failure.is_none() && !stdout_closed {
        // The channel closed without an exit status or a complete response: the VM ended.
        // Say how. (After a complete response the server stops the VM at once, often before
        // init has reported the exit status: that is no failure.)
        vm.cancel.cancel();
        let outcome = vm
            .outcome
            .await
            .unwrap_or_else(|_| Err("VM thread lost".to_string()));
        failure = Some(describe_outcome(&outcome));
    }
    Finish {
        exit,
        failure,
        stderr_tail: String::from_utf8_lossy(&tail).into_owned(),
    }
}
