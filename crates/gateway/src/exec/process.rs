//! `--isolation process`: the handler as a classic CGI child (clone3 and execve, no VM), confined by
//! the jail (unprivileged user, rlimits, its own process group and cgroup).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use xcgi_channel as ch;

use super::{
    push_tail, CgiExecutor, CgiStart, Exchange, ExecError, Finish, Invocation, Killer, STDOUT_DEPTH,
};
use crate::jail::{HandlerGroup, ProcessJail};
use xcgi_jail::SpawnError;

/// Runs each handler as a jailed child process.
#[derive(Debug)]
pub struct ProcessExecutor {
    /// The jail every handler of the server starts in.
    pub jail: Arc<ProcessJail>,
}

impl CgiExecutor for ProcessExecutor {
    fn start(&self, req: CgiStart<'_>) -> Result<Exchange, ExecError> {
        spawn_process(req.inv, req.body, &self.jail, req.slot)
    }
}

/// `--isolation process`: the handler as a classic CGI child (clone3 and execve, no VM), confined by
/// `jail` (unprivileged user, rlimits, its own process group and cgroup). `keep` (the
/// request's concurrency slot) is dropped once the handler and everything it started are
/// gone.
pub fn spawn_process<K: Send + 'static>(
    inv: &Invocation,
    body: mpsc::Receiver<Bytes>,
    jail: &crate::jail::ProcessJail,
    keep: K,
) -> Result<Exchange, ExecError> {
    let t0 = Instant::now();
    let spawn_err = |source| ExecError::Spawn {
        program: inv.program.clone(),
        source,
    };
    let (child, group) = jail.spawn(inv).map_err(spawn_err)?;
    let pipes = (|| -> std::io::Result<_> {
        let p = child
            .stdio
            .ok_or_else(|| std::io::Error::other("the handler's stdio is not piped"))?;
        Ok((
            pipe::Sender::from_owned_fd(p.stdin)?,
            pipe::Receiver::from_owned_fd(p.stdout)?,
            pipe::Receiver::from_owned_fd(p.stderr)?,
        ))
    })();
    let (stdin, stdout, stderr) = match pipes {
        Ok(p) => p,
        Err(e) => {
            group.kill();
            tokio::spawn(group.finish());
            return Err(spawn_err(SpawnError::Prepare(e)));
        }
    };
    let (ready_tx, ready) = oneshot::channel();
    let _ = ready_tx.send(t0.elapsed());
    tokio::spawn(feed_stdin(stdin, body));
    let killed = Arc::new(AtomicBool::new(false));
    let complete = Arc::new(AtomicBool::new(false));
    let (out_tx, out_rx) = mpsc::channel(STDOUT_DEPTH);
    let (k2, c2) = (Arc::clone(&killed), Arc::clone(&complete));
    tokio::spawn(read_stdout(stdout, out_tx, k2, c2));
    let err_task = tokio::spawn(stderr_tail(stderr));
    let group = Arc::new(std::sync::Mutex::new(Some(group)));
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let (fin_tx, finish) = oneshot::channel();
    let end = End {
        pidfd: child.pidfd,
        group: Arc::clone(&group),
        err_task,
    };
    tokio::spawn(async move {
        let _ = fin_tx.send(end.wait(kill_rx).await);
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

/// The request body into the handler's stdin, until either ends.
async fn feed_stdin(mut w: pipe::Sender, mut body: mpsc::Receiver<Bytes>) {
    while let Some(chunk) = body.recv().await {
        if w.write_all(&chunk).await.is_err() {
            break; // the handler stopped reading its stdin
        }
    }
}

/// The handler's stdout, chunk by chunk, into `out`; at its end `complete` says whether the
/// output ended by itself (not cut by a kill).
async fn read_stdout(
    mut r: pipe::Receiver,
    out: mpsc::Sender<Bytes>,
    killed: Arc<AtomicBool>,
    complete: Arc<AtomicBool>,
) {
    loop {
        let mut buf = BytesMut::with_capacity(ch::CHUNK);
        match r.read_buf(&mut buf).await {
            Ok(0) => {
                // Killed first: the end of output is a cut, not the end.
                complete.store(!killed.load(Ordering::SeqCst), Ordering::SeqCst);
                break;
            }
            Err(_) => break,
            Ok(_) => {
                if out.send(buf.freeze()).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The last [`super::STDERR_TAIL`] bytes the handler wrote to stderr.
async fn stderr_tail(mut r: pipe::Receiver) -> String {
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        push_tail(&mut tail, &buf[..n]);
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// What ends a handler: its process, its group and cgroup, its stderr.
struct End {
    pidfd: xcgi_jail::PidFd,
    group: Arc<std::sync::Mutex<Option<HandlerGroup>>>,
    err_task: tokio::task::JoinHandle<String>,
}

impl End {
    /// Waits for the handler to exit (or kills it when `kill` fires), then for everything it
    /// started to be gone.
    async fn wait(mut self, kill: oneshot::Receiver<()>) -> Finish {
        let mut failure = None;
        let exit = tokio::select! {
            // Biased: a handler that already exited is not "killed".
            biased;
            s = self.pidfd.wait() => s.ok(),
            _ = kill => {
                failure = Some("killed".to_string());
                self.pidfd.signal(libc::SIGKILL);
                self.pidfd.wait().await.ok()
            }
        };
        // The handler is gone: so is everything it started (a child it did not exec would
        // otherwise keep running and keep its pipes, and our fds, open).
        let group = self.group.lock().ok().and_then(|mut g| g.take());
        if let Some(g) = group {
            g.finish().await;
        }
        let stderr_tail = tokio::time::timeout(Duration::from_secs(2), self.err_task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Finish {
            exit,
            failure,
            stderr_tail,
        }
    }
}
