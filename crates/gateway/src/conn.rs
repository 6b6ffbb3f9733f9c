//! Client connections: the deadlines every connection lives under, and the accept loop's
//! guards (a connection cap, back-off when out of file descriptors).
//!
//! [`TimedIo`] wraps a connection's socket and enforces, without any per-connection task:
//! - **idle**: a connection waiting for its next request (no byte of it yet) is closed after
//!   `idle`;
//! - **header**: once a request's first byte arrived, its whole head must follow within
//!   `header` (slowloris);
//! - **write**: a write the client does not make room for within `write` fails, so a client
//!   that never reads its response cannot hold the connection (and the handler) forever.
//!
//! Reads while a request is being handled have no deadline here: the request body has its
//! own (`body_timeout_ms`) and the handler its route's deadline.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A connection's deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Longest wait for the first byte of the next request (`idle_timeout_ms`).
    pub idle: Duration,
    /// Longest time for a request's head, from its first byte (`header_timeout_ms`).
    pub header: Duration,
    /// Longest time a write may make no progress (`write_timeout_ms`).
    pub write: Duration,
}

/// What a connection's requests tell its [`TimedIo`]: whether one is being handled.
#[derive(Debug, Default)]
pub struct Activity {
    active: AtomicUsize,
    started: AtomicU64,
}

/// Held while a request of the connection is being handled (RAII).
#[derive(Debug)]
pub struct ActiveRequest(Arc<Activity>);

impl Activity {
    /// Marks a request as being handled until the returned guard drops; meanwhile reads
    /// have no deadline.
    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveRequest(Arc::clone(self))
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadPhase {
    /// Handling a request (or not yet reading): no read deadline.
    Busy,
    /// Waiting for a request's first byte since the deadline was set.
    Idle,
    /// A request head has begun arriving.
    Head,
}

/// A socket with the connection's deadlines (see the module docs).
pub struct TimedIo<T> {
    inner: T,
    t: Timeouts,
    activity: Arc<Activity>,
    phase: ReadPhase,
    /// `activity.started` when the phase began: a request started since resets it.
    phase_gen: u64,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<T> TimedIo<T> {
    /// Wraps `inner`; `activity` is shared with the connection's request handlers. The idle
    /// deadline starts at the first read.
    pub fn new(inner: T, t: Timeouts, activity: Arc<Activity>) -> Self {
        TimedIo {
            inner,
            t,
            activity,
            phase: ReadPhase::Busy,
            phase_gen: 0,
            read_timer: Box::pin(tokio::time::sleep(t.idle)),
            write_timer: None,
        }
    }

    fn timed_out(what: &str) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, what.to_string())
    }

    /// Polls the write deadline after a write made no progress.
    fn write_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let write = self.t.write;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(write)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Self::timed_out(
                "the client did not read its response in time",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let active = this.activity.active.load(Ordering::SeqCst) > 0;
        let generation = this.activity.started.load(Ordering::SeqCst);
        if active {
            this.phase = ReadPhase::Busy;
        } else if this.phase == ReadPhase::Busy || generation != this.phase_gen {
            // The connection just became idle: wait for the next request.
            this.phase = ReadPhase::Idle;
            this.phase_gen = generation;
            let at = Instant::now() + this.t.idle;
            this.read_timer.as_mut().reset(at);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == ReadPhase::Idle && buf.filled().len() > before {
                    this.phase = ReadPhase::Head;
                    let at = Instant::now() + this.t.header;
                    this.read_timer.as_mut().reset(at);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.phase != ReadPhase::Busy && this.read_timer.as_mut().poll(cx).is_ready() {
                    let what = if this.phase == ReadPhase::Idle {
                        "idle connection closed"
                    } else {
                        "the request head did not arrive in time"
                    };
                    return Poll::Ready(Err(Self::timed_out(what)));
                }
                Poll::Pending
            }
        }
    }
}

impl<T> TimedIo<T> {
    /// A write-side poll's result, with the write deadline applied: progress disarms it,
    /// no progress arms it (and fails once it passes).
    fn deadline<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => match self.write_stalled(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            done => {
                self.write_timer = None;
                done
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.deadline(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.deadline(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.deadline(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Back-off for the accept loop when accepting fails for lack of resources (EMFILE,
/// ENFILE, ENOBUFS, ENOMEM): the listener stays readable, so retrying at once would spin
/// and log in a loop. The pause doubles from 10 ms to 1 s; a log line is due at most once
/// per [`AcceptBackoff::LOG_EVERY`], with the count of failures since the last one.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    /// Failures in a row (sets the pause).
    run: u32,
    /// Failures not yet reported in a log line.
    unreported: u64,
    last_log: Option<std::time::Instant>,
}

impl AcceptBackoff {
    /// Least time between two log lines about failed accepts.
    pub const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Whether `e` is a lack of resources (else it concerns one connection: go on at once).
    pub fn is_resource_error(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }

    /// Records a failure at `now`; returns the pause before the next accept and, when a log
    /// line is due, the number of failures it reports.
    pub fn failed(&mut self, now: std::time::Instant) -> (Duration, Option<u64>) {
        let exp = self.run.min(7);
        self.run = self.run.saturating_add(1);
        self.unreported += 1;
        let pause = Duration::from_millis(10 * 2u64.pow(exp)).min(Duration::from_secs(1));
        let due = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::LOG_EVERY);
        if due {
            self.last_log = Some(now);
            (pause, Some(std::mem::take(&mut self.unreported)))
        } else {
            (pause, None)
        }
    }

    /// An accept succeeded: the pause starts again from its shortest.
    pub fn succeeded(&mut self) {
        self.run = 0;
    }
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (each connection, handler and
/// VM costs descriptors; the default soft limit of 1024 is hit by ~1,000 idle clients).
/// Returns the (old, new) soft limit.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid rlimit; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn timeouts(ms: u64) -> Timeouts {
        Timeouts {
            idle: Duration::from_millis(ms),
            header: Duration::from_millis(ms * 2),
            write: Duration::from_millis(ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_times_out_but_not_while_a_request_runs() {
        let (a, mut b) = tokio::io::duplex(64);
        let act = Arc::new(Activity::default());
        let mut io = TimedIo::new(a, timeouts(100), Arc::clone(&act));
        let mut buf = [0u8; 8];
        let req = act.begin();
        // Busy: no deadline, however long.
        let r = tokio::time::timeout(Duration::from_secs(60), io.read(&mut buf)).await;
        assert!(r.is_err(), "a read during a request must not time out");
        drop(req);
        let t = Instant::now();
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() >= Duration::from_millis(100) && t.elapsed() < Duration::from_millis(150)
        );
        // A head that starts must finish within `header`.
        let mut io = TimedIo::new(io.inner, timeouts(100), Arc::clone(&act));
        b.write_all(b"GET").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 3);
        let t = Instant::now();
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_never_reads_times_out() {
        let (a, _b) = tokio::io::duplex(16);
        let act = Arc::new(Activity::default());
        let mut io = TimedIo::new(a, timeouts(100), act);
        let t = Instant::now();
        let e = io.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn accept_backoff_grows_and_logs_rarely() {
        let mut b = AcceptBackoff::default();
        let t0 = std::time::Instant::now();
        assert_eq!(b.failed(t0), (Duration::from_millis(10), Some(1)));
        assert_eq!(b.failed(t0), (Duration::from_millis(20), None));
        // Many failures, with recoveries in between, within one log period: no more lines.
        for i in 0..1000 {
            if i % 10 == 0 {
                b.succeeded();
            }
            let (p, log) = b.failed(t0 + Duration::from_millis(i));
            assert!(p <= Duration::from_secs(1));
            assert_eq!(log, None);
        }
        // The next period's first failure reports everything since the last line.
        let (p, log) = b.failed(t0 + AcceptBackoff::LOG_EVERY);
        assert_eq!(log, Some(1002));
        assert!(p > Duration::from_millis(10));
        b.succeeded();
        assert_eq!(
            b.failed(t0 + AcceptBackoff::LOG_EVERY).0,
            Duration::from_millis(10)
        );
    }
}
