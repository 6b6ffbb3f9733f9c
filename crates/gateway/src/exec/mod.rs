//! Executors: how one request's handler runs. Each route gets one at start ([`RouteExec`]):
//! - CGI routes a [`CgiExecutor`]: [`VmCgiExecutor`] (a fresh microVM whose `xcgi-init` speaks
//!   [`xcgi_channel`] over virtio-console) or [`ProcessExecutor`] (`--isolation process`: a
//!   jailed child process). Both give the server the same [`Exchange`]: the handler's stdout
//!   as a stream of chunks, its end ([`Finish`]) and a [`Killer`] that stops it (also on drop:
//!   nothing outlives a request).
//! - HTTP-mode routes a [`VmHttpExecutor`]: a VM with a TAP from the pool, running its own
//!   HTTP server; it hands back a connection to the guest's port ([`GuestConnection`]).

pub mod huge_dir;
pub mod jailed;
mod process;
pub mod template;
mod vm;
mod vm_cgi;
pub mod vm_cgroup;
mod vm_http;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

pub use process::ProcessExecutor;
pub use vm::{describe_outcome, start_vm, GuestRoot, VmEnd, VmSpec, VmThread};
pub use vm_cgi::VmCgiExecutor;
pub use vm_http::{GuestConnection, HttpStartError, VmHttpExecutor};

/// Bytes of a handler's stderr kept for the log line of a failed request.
pub const STDERR_TAIL: usize = 4096;
/// Chunks of handler output buffered between the handler and the client.
pub(crate) const STDOUT_DEPTH: usize = 16;

/// Why a handler could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Process isolation: preparing the handler's jail or spawning it failed.
    #[error("cannot start the handler {program}: {source}")]
    Spawn {
        /// The handler program.
        program: PathBuf,
        /// The error.
        #[source]
        source: xcgi_jail::SpawnError,
    },
    /// The socket pair carrying the CGI exchange to the guest could not be made.
    #[error("cannot create the host-guest channel: {0}")]
    Channel(std::io::Error),
    /// The thread that runs the VM could not be started.
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
    /// Stops the handler; the last clone dropped stops it too.
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
    /// A killer that runs `f` once: on the first [`Killer::kill`], or when the last clone
    /// drops.
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Killer(Arc::new(KillOnDrop(std::sync::Mutex::new(Some(Box::new(
            f,
        ))))))
    }

    /// Runs the kill now, unless it already ran (then nothing happens).
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
    /// The handler program: a guest path (VM) or a host path (process).
    pub program: PathBuf,
    /// Its whole environment, as `NAME=value` strings ([`crate::cgi::environment`]).
    pub env: Vec<String>,
    /// Its working directory, on the same side as `program`.
    pub cwd: PathBuf,
}

/// The request's concurrency slot: the handler holds it until it is gone.
pub type Slot = Arc<OwnedSemaphorePermit>;

/// One request's handler, to be started by a [`CgiExecutor`].
pub struct CgiStart<'a> {
    /// The request's number (`vm=N` in its log line), for what is logged about its handler.
    pub id: u64,
    /// What the handler runs.
    pub inv: &'a Invocation,
    /// The request body, fed to the handler's stdin.
    pub body: mpsc::Receiver<Bytes>,
    /// The request's concurrency slot, held until the handler (and everything it started)
    /// is gone.
    pub slot: Slot,
}

/// Runs CGI handlers: one per call, for one request.
pub trait CgiExecutor: Send + Sync {
    /// Starts the handler for one request.
    fn start(&self, req: CgiStart<'_>) -> Result<Exchange, ExecError>;
}

/// How a route's requests are run: chosen once per route at start.
#[derive(Clone)]
pub enum RouteExec {
    /// A CGI route: each request starts a handler and reads a CGI response.
    Cgi(Arc<dyn CgiExecutor>),
    /// An HTTP-mode route: each request boots a VM and is proxied to its port.
    Http(Arc<VmHttpExecutor>),
}

impl std::fmt::Debug for RouteExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteExec::Cgi(_) => "RouteExec::Cgi",
            RouteExec::Http(_) => "RouteExec::Http",
        })
    }
}

pub(crate) fn push_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(data);
    if tail.len() > STDERR_TAIL {
        let cut = tail.len() - STDERR_TAIL;
        tail.drain(..cut);
    }
}
