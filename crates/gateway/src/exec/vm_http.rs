//! HTTP mode: a VM with a TAP from the pool runs the route's own HTTP server; the executor
//! boots it and hands back a connection to the guest's port, once it accepts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::sync::oneshot;
use tracing::warn;
use xcgi_net::GuestNet;
use xcgi_vmm::{Attachments, Cancel, NetAttachment};

use super::vm::{log_dump, start_vm, VmSpec};
use super::{Killer, Slot};
use crate::metrics::Metrics;

/// Longest wait for an answer to one connection attempt.
const CONNECT_ATTEMPT: Duration = Duration::from_millis(1000);
/// Pause between connection attempts to a booting guest (the bound: 1 ms).
const CONNECT_RETRY: Duration = Duration::from_millis(1);
/// Connection attempts in flight at once while a guest boots.
const CONNECT_PARALLEL: usize = 8;
/// Longest pause before another attempt while earlier ones are still unanswered.
const CONNECT_PATIENCE_MAX: Duration = Duration::from_millis(16);

/// Boots HTTP-mode VMs of one route.
#[derive(Debug)]
pub struct VmHttpExecutor {
    /// The route's VM.
    pub spec: VmSpec,
    /// The guests' network: each VM leases a TAP and a /30 from its pool.
    pub net: Arc<GuestNet>,
    /// The server's metrics (VMs started and running, prepared-VM misses).
    pub metrics: Arc<Metrics>,
    /// The port the guest's server listens on.
    pub port: u16,
    /// The route's timeout (for the message when the guest never accepts).
    pub timeout_ms: u64,
}

/// A guest whose port accepted: the connection, what stops the VM, and its end.
pub struct GuestConnection {
    /// The TCP connection to the guest's port.
    pub stream: tokio::net::TcpStream,
    /// Stops the VM; the last clone dropped stops it too.
    pub killer: Killer,
    /// The VM's outcome, when it has been torn down.
    pub outcome: oneshot::Receiver<super::vm::VmEnd>,
    /// From start to the port accepting.
    pub boot: Duration,
}

/// Why no connection to the guest came.
#[derive(Debug, thiserror::Error)]
pub enum HttpStartError {
    /// No TAP could be leased from the pool (503).
    #[error("{0}")]
    NoNetworkSlot(xcgi_net::NetError),
    /// The leased TAP's descriptor could not be duplicated for the VM (500).
    #[error("guest network setup failed: {0}")]
    Setup(#[source] xcgi_net::NetError),
    /// The VM could not be started (500).
    #[error("cannot start the VM: {0}")]
    Vm(super::ExecError),
    /// The VM ended before its port accepted; holds how it ended (502).
    #[error("the VM ended before its port accepted: {0}")]
    Ended(String),
    /// The request's deadline passed before the guest's port accepted (504).
    #[error("timeout: guest {addr} did not accept within {ms} ms")]
    Timeout {
        /// The guest's address and port.
        addr: SocketAddr,
        /// The route's `timeout_ms`, for the message.
        ms: u64,
    },
}

impl HttpStartError {
    /// The status the client gets, and what it is told (the detail goes to the log only).
    pub fn response(&self) -> (StatusCode, &'static str) {
        match self {
            HttpStartError::NoNetworkSlot(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no free guest network slot",
            ),
            HttpStartError::Setup(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "guest network setup failed",
            ),
            HttpStartError::Vm(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot start the VM"),
            HttpStartError::Ended(_) => (StatusCode::BAD_GATEWAY, "the handler failed"),
            HttpStartError::Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "the handler did not answer in time",
            ),
        }
    }
}

impl VmHttpExecutor {
    /// Leases a TAP, boots the VM with it, and waits (until `deadline`) for the guest's port
    /// to accept. The slot and the TAP stay taken until the VM is gone.
    pub async fn start(
        &self,
        slot: Slot,
        deadline: Instant,
    ) -> Result<GuestConnection, HttpStartError> {
        let t0 = Instant::now();
        let lease = self
            .net
            .pool
            .lease()
            .map_err(HttpStartError::NoNetworkSlot)?;
        let tap = lease.try_clone_tap_fd().map_err(HttpStartError::Setup)?;
        let guest = SocketAddr::from((lease.guest_ip(), self.port));
        let cancel = Cancel::new();
        let rx_ready = Arc::new(AtomicBool::new(false));
        let attach = Attachments {
            net: Some(NetAttachment {
                tap: Arc::new(tap),
                mac: lease.guest_mac().0,
                ip_param: lease.kernel_ip_param(),
                rx_ready: Some(Arc::clone(&rx_ready)),
            }),
            ..Attachments::default()
        };
        let opts = self.spec.run_options(cancel.clone());
        let metrics = Arc::clone(&self.metrics);
        let vm = start_vm(&self.spec, attach, opts, metrics, (lease, slot))
            .map_err(HttpStartError::Vm)?;
        let killer = Killer::new(move || cancel.cancel());
        let mut outcome = vm.outcome;
        let stream = tokio::select! {
            s = connect_guest(&self.net, guest, &rx_ready, deadline) => s,
            r = &mut outcome => {
                if let Ok(r) = &r {
                    log_dump(r, None);
                }
                let why = r.map(|e| e.description).unwrap_or_else(|_| "VM thread lost".into());
                return Err(HttpStartError::Ended(why));
            }
        };
        let Some(stream) = stream else {
            killer.kill();
            // The dump (if asked for) once the VM is down: the guest never accepted.
            tokio::spawn(async move {
                if let Ok(r) = outcome.await {
                    log_dump(&r, None);
                }
            });
            return Err(HttpStartError::Timeout {
                addr: guest,
                ms: self.timeout_ms,
            });
        };
        Ok(GuestConnection {
            stream,
            killer,
            outcome,
            boot: t0.elapsed(),
        })
    }
}

/// A fresh socket in the guests' namespace.
async fn socket(net: &GuestNet) -> std::io::Result<tokio::net::TcpSocket> {
    let (tx, rx) = oneshot::channel();
    net.socket(Box::new(move |s| {
        let _ = tx.send(s);
    }));
    let std_sock = rx
        .await
        .map_err(|_| std::io::Error::other("the namespace socket thread is gone"))??;
    Ok(tokio::net::TcpSocket::from_std_stream(std_sock))
}

/// Connects to a booting guest's port. Nothing is sent until the guest's driver has posted
/// receive buffers (`rx_ready`); then one SYN at a time, more while the guest stays silent
/// (docs/serve.md, HTTP mode). None when `deadline` passes first.
async fn connect_guest(
    net: &GuestNet,
    addr: SocketAddr,
    rx_ready: &AtomicBool,
    deadline: Instant,
) -> Option<tokio::net::TcpStream> {
    let deadline = tokio::time::Instant::from_std(deadline);
    while !rx_ready.load(Ordering::Acquire) {
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(CONNECT_RETRY).await;
    }
    let mut attempts = tokio::task::JoinSet::new();
    let mut patience = CONNECT_RETRY;
    let mut next_try = tokio::time::Instant::now();
    loop {
        let can_try = attempts.len() < CONNECT_PARALLEL;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return None,
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                match done {
                    Ok(Ok(Ok(stream))) => return Some(stream),
                    // Refused (or reset): the guest answered; try again shortly.
                    Ok(Ok(Err(_))) => {
                        patience = CONNECT_RETRY;
                        next_try = tokio::time::Instant::now() + CONNECT_RETRY;
                    }
                    // No answer within CONNECT_ATTEMPT, or the task failed: others go on.
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(next_try), if can_try => {
                match socket(net).await {
                    Ok(sock) => {
                        attempts.spawn(tokio::time::timeout(CONNECT_ATTEMPT, sock.connect(addr)));
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot make a socket in the guests' namespace");
                        return None;
                    }
                }
                // If this one stays unanswered, the next goes out after `patience`.
                next_try = tokio::time::Instant::now() + patience;
                patience = (patience * 2).min(CONNECT_PATIENCE_MAX);
            }
        }
    }
}
