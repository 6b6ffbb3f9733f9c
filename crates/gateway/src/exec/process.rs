//! `--isolation process`: the handler as a classic CGI child (fork/exec, no VM), confined by
//! the jail (unprivileged user, rlimits, its own process group and cgroup).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use xcgi_channel as ch;

use super::{
    push_tail, CgiExecutor, Exchange, ExecError, Finish, Invocation, Killer, Slot, STDOUT_DEPTH,
};
use crate::jail::ProcessJail;

/// Runs each handler as a jailed child process.
#[derive(Debug)]
pub struct ProcessExecutor {
    pub jail: Arc<ProcessJail>,
}

impl CgiExecutor for ProcessExecutor {
    fn start(
        &self,
        inv: &Invocation,
        body: mpsc::Receiver<Bytes>,
        slot: Slot,
        id: u64,
    ) -> Result<Exchange, ExecError> {
        spawn_process(inv, body, &self.jail, id, slot)
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
