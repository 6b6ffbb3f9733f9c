//! Request bodies: streamed to the handler under `body_timeout_ms`, or (chunked, for CGI
//! which needs CONTENT_LENGTH) taken in whole within the route's `max_body` and the
//! server's `body_budget`.

use super::*;

/// Why a chunked request body was not taken in.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("chunked body over the route's max_body")]
    TooLarge,
    #[error("the server's body budget (body_budget) is used up")]
    Budget,
    #[error("the request body did not arrive in time (body_timeout_ms)")]
    Timeout,
    #[error("cannot read the request body")]
    Read,
}

impl BodyError {
    pub(super) fn response(&self) -> Response<OutBody> {
        match self {
            BodyError::TooLarge => error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            BodyError::Budget => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server busy: too many request bodies in memory",
            ),
            BodyError::Timeout => error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body came too slowly",
            ),
            BodyError::Read => error(StatusCode::BAD_REQUEST, "cannot read the request body"),
        }
    }
}

/// Bytes of the body budget a buffered body holds, and the gauge that shows them.
pub(super) struct BudgetHold {
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) _gauge: GaugeGuard,
    pub(super) metrics: Arc<Metrics>,
    pub(super) extra: i64,
}

impl BudgetHold {
    pub(super) fn new(permit: OwnedSemaphorePermit, len: u64, metrics: &Arc<Metrics>) -> Self {
        BudgetHold {
            permit,
            _gauge: GaugeGuard::add(metrics, |m| &m.body_bytes_buffered, len as i64),
            metrics: Arc::clone(metrics),
            extra: 0,
        }
    }

    pub(super) fn add(&mut self, permit: OwnedSemaphorePermit, len: u64) {
        self.permit.merge(permit);
        self.extra += len as i64;
        self.metrics
            .body_bytes_buffered
            .fetch_add(len as i64, Ordering::Relaxed);
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.metrics
            .body_bytes_buffered
            .fetch_sub(self.extra, Ordering::Relaxed);
    }
}

pub(super) enum RequestBody {
    /// The client's body as it arrives, with its declared length (0: none) and the time by
    /// which it must have arrived.
    Stream(Incoming, u64, Instant),
    /// A chunked body, taken in whole, and the share of the body budget it holds.
    Buffered(Bytes, Option<BudgetHold>),
}

impl RequestBody {
    /// A channel the handler's stdin is fed from, CONTENT_LENGTH, and a signal that fires
    /// if the body did not arrive by its deadline (the feeding stops then).
    pub(super) fn into_channel(
        self,
    ) -> (mpsc::Receiver<Bytes>, Option<u64>, oneshot::Receiver<()>) {
        let (late_tx, late) = oneshot::channel();
        match self {
            RequestBody::Buffered(b, hold) => {
                // Capacity 1: once the handler side has taken the body, there is room again,
                // and the budget goes back. The sender is dropped then, so the handler's
                // stdin gets its EOF.
                let (tx, rx) = mpsc::channel(1);
                let len = b.len() as u64;
                if !b.is_empty() {
                    tokio::spawn(async move {
                        if tx.send(b).await.is_ok() {
                            let _ = tx.reserve().await;
                        }
                        drop(hold);
                        drop(late_tx);
                    });
                }
                (rx, (len > 0).then_some(len), late)
            }
            RequestBody::Stream(mut inc, len, by) => {
                let (tx, rx) = mpsc::channel(8);
                tokio::spawn(async move {
                    let by = tokio::time::Instant::from_std(by);
                    loop {
                        let frame = tokio::select! {
                            f = inc.frame() => f,
                            _ = tokio::time::sleep_until(by) => {
                                let _ = late_tx.send(());
                                return;
                            }
                        };
                        let Some(Ok(frame)) = frame else { break };
                        if let Ok(data) = frame.into_data() {
                            if tx.send(data).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                (rx, (len > 0).then_some(len), late)
            }
        }
    }
}

/// A request body for an HTTP-mode guest that fails once its deadline passes (a client
/// trickling its body must not hold a VM until the route's deadline).
pub(super) struct TimedBody {
    pub(super) inner: Incoming,
    pub(super) deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(std::io::Error::other)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body did not arrive in time",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    forward_body_hints!();
}

impl Server {
    /// Takes in a chunked body whole: at most `max` bytes, within the server's body budget,
    /// before `deadline`.
    pub(super) async fn buffer_body(
        &self,
        mut incoming: Incoming,
        max: u64,
        deadline: Instant,
    ) -> Result<(Bytes, Option<BudgetHold>), BodyError> {
        let mut buf = bytes::BytesMut::new();
        let mut hold: Option<BudgetHold> = None;
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            let frame = match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Err(_) => return Err(BodyError::Timeout),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(BodyError::Read),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            let len = data.len() as u64;
            if buf.len() as u64 + len > max {
                return Err(BodyError::TooLarge);
            }
            let more = u32::try_from(len).map_err(|_| BodyError::TooLarge)?;
            let permit = Arc::clone(&self.body_budget)
                .try_acquire_many_owned(more)
                .map_err(|_| BodyError::Budget)?;
            match &mut hold {
                Some(h) => h.add(permit, len),
                None => hold = Some(BudgetHold::new(permit, len, &self.metrics)),
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), hold))
    }

    /// The request's body as its handler gets it: streamed (a declared length, or none),
    /// or, when chunked, taken in first (CGI needs CONTENT_LENGTH) up to the route's
    /// `max_body`, within the body budget, before the body deadline.
    pub(super) async fn request_body(
        &self,
        incoming: Incoming,
        declared: Option<u64>,
        route: &ServedRoute,
        deadline: Instant,
    ) -> Result<RequestBody, BodyError> {
        let body_deadline = Instant::now() + Duration::from_millis(self.cfg.server.body_timeout_ms);
        if declared.is_some() || incoming.is_end_stream() {
            return Ok(RequestBody::Stream(
                incoming,
                declared.unwrap_or(0),
                body_deadline,
            ));
        }
        let (bytes, budget) = self
            .buffer_body(incoming, route.route.max_body, body_deadline.min(deadline))
            .await?;
        Ok(RequestBody::Buffered(bytes, budget))
    }
}
