//! CGI in a fresh VM: the route's kernel and image (whose /init is `xcgi-init`), the request
//! sent over the channel, the handler's output relayed back.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use xcgi_channel as ch;
use xcgi_vmm::{Attachments, Cancel, ExitReason};

use super::vm::{log_dump, start_vm, VmSpec, VmThread};
use super::{
    push_tail, CgiExecutor, CgiStart, Exchange, ExecError, Finish, Invocation, Killer, STDOUT_DEPTH,
};
use crate::metrics::Metrics;

/// Runs each CGI request in a fresh VM of the route's shape.
#[derive(Debug)]
pub struct VmCgiExecutor {
    /// The route's VM.
    pub spec: VmSpec,
    /// The server's metrics (VMs started and running, prepared-VM misses).
    pub metrics: Arc<Metrics>,
}

impl CgiExecutor for VmCgiExecutor {
    fn start(&self, req: CgiStart<'_>) -> Result<Exchange, ExecError> {
        let metrics = Arc::clone(&self.metrics);
        spawn_vm_cgi(&self.spec, req.id, req.inv, req.body, metrics, req.slot)
    }
}

/// CGI in a fresh VM: boots the route's kernel and image (whose /init is `xcgi-init`), sends
/// the request over the channel and relays the handler's output.
pub fn spawn_vm_cgi<K: Send + 'static>(
    spec: &VmSpec,
    id: u64,
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
        seed: Vec::new(),
        now_ns: 0,
    };
    let (out_tx, out_rx) = mpsc::channel(STDOUT_DEPTH);
    let (ready_tx, ready) = oneshot::channel();
    let (fin_tx, finish) = oneshot::channel();
    let (kill_tx, killed) = tokio::sync::watch::channel(false);
    let complete = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    let chan = Relay {
        id,
        out_tx,
        ready_tx,
        complete: Arc::clone(&complete),
        killed,
    };
    // A clone's init said hello in its template: it waits for the request already.
    let said_hello = spec.snapshot.is_some();
    tokio::spawn(async move {
        let fin = drive_vm(host, start, body, chan, t0, vm, said_hello).await;
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
    /// The request's number, for its VM's debug dump.
    id: u64,
    out_tx: mpsc::Sender<Bytes>,
    ready_tx: oneshot::Sender<Duration>,
    complete: Arc<AtomicBool>,
    killed: tokio::sync::watch::Receiver<bool>,
}

/// What [`drive_vm`] keeps while frames come in.
struct Drive {
    id: u64,
    out_tx: Option<mpsc::Sender<Bytes>>,
    ready_tx: Option<oneshot::Sender<Duration>>,
    complete: Arc<AtomicBool>,
    killed: tokio::sync::watch::Receiver<bool>,
    /// The request (sent on the guest's hello) and the body that follows it.
    start: Option<(ch::Start, mpsc::Receiver<Bytes>)>,
    wr: Option<tokio::net::unix::OwnedWriteHalf>,
    writer: Option<tokio::task::JoinHandle<()>>,
    tail: Vec<u8>,
    exit: Option<i32>,
    failure: Option<String>,
    stdout_closed: bool,
    t0: Instant,
}

/// After a frame: go on, or the exchange is over.
enum Flow {
    More,
    Done,
}

impl Drive {
    /// One frame from the guest.
    async fn on_frame(&mut self, kind: u8, data: Vec<u8>) -> Flow {
        match kind {
            ch::HELLO => self.hello(),
            ch::STDOUT => return self.stdout(data).await,
            ch::STDERR => push_tail(&mut self.tail, &data),
            ch::STDOUT_CLOSED => {
                self.complete.store(true, Ordering::SeqCst);
                self.out_tx = None;
                self.stdout_closed = true;
            }
            ch::EXIT => {
                // Frames arrive in order: everything the handler wrote came before.
                self.complete.store(true, Ordering::SeqCst);
                let status = data
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                self.exit = Some(ExitReason::InitExited { status }.exit_code());
                return Flow::Done;
            }
            ch::FAILED => {
                // Guest text: escaped where it is logged (RequestLog), capped here.
                let text = String::from_utf8_lossy(&data);
                self.failure = Some(text.chars().take(512).collect());
                return Flow::Done;
            }
            other => {
                self.failure = Some(format!(
                    "unexpected frame {:?} from the guest",
                    other as char
                ));
                return Flow::Done;
            }
        }
        Flow::More
    }

    /// The guest's init is up: it gets the request, then the body as it comes.
    fn hello(&mut self) {
        if let Some(tx) = self.ready_tx.take() {
            let _ = tx.send(self.t0.elapsed());
        }
        let (Some((mut start, mut body)), Some(mut w)) = (self.start.take(), self.wr.take()) else {
            return;
        };
        // Fresh for this VM, taken now: its entropy and its clock (a clone of a snapshot would
        // otherwise share its template's random state and time with its siblings).
        start.seed = fresh_seed();
        start.now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.writer = Some(tokio::spawn(async move {
            if w.write_all(&ch::frame(ch::START, &start.encode()))
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

    /// Handler output, passed on; a client that does not read must not keep this task (and
    /// the VM's slot) past a kill.
    async fn stdout(&mut self, data: Vec<u8>) -> Flow {
        let Some(tx) = &self.out_tx else {
            return Flow::More;
        };
        let sent = tokio::select! {
            r = tx.send(Bytes::from(data)) => r.is_ok(),
            _ = self.killed.wait_for(|k| *k) => {
                self.failure = Some("killed".into());
                return Flow::Done;
            }
        };
        if !sent {
            // Nobody reads the response any more: the client went away.
            self.out_tx = None;
            self.failure = Some("the response was abandoned".into());
            return Flow::Done;
        }
        Flow::More
    }
}

/// 64 bytes from the host's CRNG (getrandom); empty if it fails (the guest keeps its own).
fn fresh_seed() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 64 {
        return Vec::new();
    }
    b
}

async fn drive_vm(
    host: tokio::net::UnixStream,
    start: ch::Start,
    body: mpsc::Receiver<Bytes>,
    relay: Relay,
    t0: Instant,
    vm: VmThread,
    said_hello: bool,
) -> Finish {
    let (mut rd, wr) = host.into_split();
    let mut d = Drive {
        id: relay.id,
        out_tx: Some(relay.out_tx),
        ready_tx: Some(relay.ready_tx),
        complete: relay.complete,
        killed: relay.killed,
        start: Some((start, body)),
        wr: Some(wr),
        writer: None,
        tail: Vec::new(),
        exit: None,
        failure: None,
        stdout_closed: false,
        t0,
    };
    if said_hello {
        d.hello();
    }
    let mut dec = ch::Decoder::new();
    let mut buf = vec![0u8; ch::CHUNK + ch::HEADER_LEN];
    'outer: loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = d.killed.wait_for(|k| *k) => {
                // After a complete response, the kill is the server's normal end of the VM.
                if !d.stdout_closed {
                    d.failure = Some("killed".into());
                }
                break;
            }
        };
        dec.feed(&buf[..n]);
        loop {
            match dec.next_frame() {
                Ok(Some((kind, data))) => {
                    if let Flow::Done = d.on_frame(kind, data).await {
                        break 'outer;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    d.failure = Some(format!("guest sent a bad frame: {e}"));
                    break 'outer;
                }
            }
        }
    }
    d.finish(vm).await
}

impl Drive {
    /// The exchange is over: how the handler ended.
    async fn finish(mut self, vm: VmThread) -> Finish {
        drop(self.out_tx.take());
        if let Some(w) = self.writer.take() {
            w.abort();
        }
        if self.failure.is_some() {
            // Killed before its response was complete (its deadline, a client gone) or
            // failed: with `debug_dump` its state says where it was (the dump of a VM that
            // gave no answer is the one that matters). Logged when it comes; the slot does not
            // wait for it.
            let id = self.id;
            tokio::spawn(async move {
                if let Ok(end) = vm.outcome.await {
                    log_dump(&end, Some(id));
                }
            });
        } else if self.exit.is_none() && !self.stdout_closed {
            // The channel closed without an exit status or a complete response: the VM
            // ended. Say how. (After a complete response the server stops the VM at once,
            // often before init has reported the exit status: that is no failure.)
            vm.cancel.cancel();
            self.failure = Some(match vm.outcome.await {
                Ok(end) => {
                    log_dump(&end, Some(self.id));
                    end.description
                }
                Err(_) => "VM thread lost".to_string(),
            });
        }
        Finish {
            exit: self.exit,
            failure: self.failure,
            stderr_tail: String::from_utf8_lossy(&self.tail).into_owned(),
        }
    }
}
