//! Admission: at most `concurrency` handlers at once, then a bounded queue with a timeout
//! (503), never past the request's own deadline (504). Both counts are held by guards, so a
//! client that hangs up while queued gives its place back.

use super::*;

/// Why a request got no slot.
pub(super) enum Refused {
    /// 503, with the reason.
    Busy(&'static str),
    /// 504: its deadline passed while it waited (no handler is started for it).
    Deadline,
}

impl Refused {
    /// The status and the reason (for the client and the log).
    pub(super) fn response(&self) -> (StatusCode, &'static str) {
        match self {
            Refused::Busy(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
            Refused::Deadline => (
                StatusCode::GATEWAY_TIMEOUT,
                "the request's deadline passed while it waited for a slot",
            ),
        }
    }
}

/// A place in the admission queue, given back on drop (RAII).
pub(super) struct QueueSpot<'a>(&'a AtomicUsize);

impl<'a> QueueSpot<'a> {
    pub(super) fn take(waiting: &'a AtomicUsize, limit: usize) -> Option<Self> {
        if waiting.fetch_add(1, Ordering::SeqCst) >= limit {
            waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(QueueSpot(waiting))
    }
}

impl Drop for QueueSpot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    /// A concurrency slot: at once, or after waiting in the bounded queue (no longer than
    /// `queue_timeout_ms`, nor past the request's deadline).
    pub(super) async fn admit(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(p);
        }
        // Both counts come back down however this ends: a queued client that hangs up
        // cancels this future mid-wait.
        let Some(_spot) = QueueSpot::take(&self.waiting, self.cfg.server.queue) else {
            return Err(Refused::Busy("server busy: the request queue is full"));
        };
        let _depth = GaugeGuard::add(&self.metrics, |m| &m.queue_depth, 1);
        let queue_end = Instant::now() + Duration::from_millis(self.cfg.server.queue_timeout_ms);
        let until = queue_end.min(deadline);
        let r = tokio::time::timeout_at(
            tokio::time::Instant::from_std(until),
            Arc::clone(&self.slots).acquire_owned(),
        )
        .await;
        match r {
            Ok(Ok(p)) if Instant::now() < deadline => Ok(p),
            Ok(Ok(_)) => Err(Refused::Deadline),
            Ok(Err(_)) => Err(Refused::Busy("server shutting down")),
            Err(_) if deadline <= queue_end => Err(Refused::Deadline),
            Err(_) => Err(Refused::Busy("server busy: waited too long in the queue")),
        }
    }
}
