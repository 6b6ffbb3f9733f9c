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
    push_tail, CgiExecutor, Exchange, ExecError, Finish, Invocation, Killer, Slot, STDOUT_DEPTH,
};
use crate::jail::ProcessJail;
use crate::spawn::SpawnError;

/// Runs each handler as a jailed child process.
#[derive(Debug)]
pub struct ProcessExecutor {
    /// The jail every handler of the server starts in.
    pub jail: Arc<ProcessJail>,
}

impl CgiExecutor for ProcessExecutor {
    fn start(
        &self,
        inv: &Invocation,
        body: mpsc::Receiver<Bytes>,
        slot: Slot,
        _id: u64,
    ) -> Result<Exchange, ExecError> {
        spawn_process(inv, body, &self.jail, slot)
    }
}

/// `--isolation process`: the handler as a classic CGI child (clone3 and execve, no VM), confined by
/// `jail` (unprivileged user, rlimits, its own process group and cgroup). `keep` (the
/// request's concurrency slot) is dropped once the handler and everything it started are
/// gone.
pub fn spawn_process<K: Send + 'static>(
    inv: &Invocation,
    mut body: mpsc::Receiver<Bytes>,
    jail: &crate::jail::ProcessJail,
    keep: K,
) -> Result<Exchange, ExecError> {
    let t0 = Instant::now();
    let (child, group) = jail.spawn(inv).map_err(|source| ExecError::Spawn {
        program: inv.program.clone(),
        source,
    })?;
    let mut pidfd = child.pidfd;
    let pipes = (|| -> std::io::Result<_> {
        Ok((
            pipe::Sender::from_owned_fd(child.stdin)?,
            pipe::Receiver::from_owned_fd(child.stdout)?,
            pipe::Receiver::from_owned_fd(child.stderr)?,
        ))
    })();
    let (stdin, stdout, stderr) = match pipes {
        Ok(p) => p,
        Err(e) => {
            group.kill();
            tokio::spawn(group.finish());
            return Err(ExecError::Spawn {
                program: inv.program.clone(),
                source: SpawnError::Prepare(e),
            });
        }
    };
    let (mut stdin, mut stdout, mut stderr) = (Some(stdin), Some(stdout), Some(stderr));
    let group = Arc::new(std::sync::Mutex::new(Some(group)));
    let (ready_tx, ready) = oneshot::channel();
    let _ = ready_tx.send(t0.elapsed());
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
        let exit = tokio::select! {
            // Biased: a handler that already exited is not "killed".
            biased;
            s = pidfd.wait() => s.ok(),
            _ = kill_rx => {
                failure = Some("killed".to_string());
                pidfd.signal(libc::SIGKILL);
                pidfd.wait().await.ok()
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
