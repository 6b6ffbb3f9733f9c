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

use super::vm::{describe_outcome, start_vm, VmSpec, VmThread};
use super::{
    push_tail, CgiExecutor, Exchange, ExecError, Finish, Invocation, Killer, Slot, STDOUT_DEPTH,
};
use crate::metrics::Metrics;

/// Runs each CGI request in a fresh VM of the route's shape.
#[derive(Debug)]
pub struct VmCgiExecutor {
    pub spec: VmSpec,
    pub metrics: Arc<Metrics>,
}

impl CgiExecutor for VmCgiExecutor {
    fn start(
        &self,
        inv: &Invocation,
        body: mpsc::Receiver<Bytes>,
        slot: Slot,
        _id: u64,
    ) -> Result<Exchange, ExecError> {
        spawn_vm_cgi(&self.spec, inv, body, Arc::clone(&self.metrics), slot)
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
