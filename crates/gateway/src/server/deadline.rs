//! A handler's deadline: killed when it passes, or when the response is dropped.

use super::*;

/// Kills the handler at the route's deadline (a response still streaming is cut off).
pub(super) fn spawn_deadline(killer: Killer, deadline: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
        killer.kill();
    })
}

/// Held by a response body: the handler's life (the concurrency slot is the handler's own:
/// it goes when the handler is gone, whether or not the client reads).
pub(super) struct Guard {
    pub(super) killer: Killer,
    pub(super) timer: tokio::task::JoinHandle<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.timer.abort();
        // Response done or client gone: the handler goes now, whatever it is doing.
        self.killer.kill();
    }
}
