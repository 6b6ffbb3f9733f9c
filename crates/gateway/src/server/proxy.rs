//! HTTP mode: the request forwarded to the guest's own server (hop-by-hop headers removed),
//! its response streamed back until the VM ends.

use super::*;

/// The request target sent to an HTTP-mode guest: the normalised path as the client encoded
/// it, or without the route's prefix (`strip_prefix`), and the query.
pub(super) fn forwarded_target(
    path: &crate::path::RequestPath,
    query: Option<&str>,
    route: &crate::config::Route,
) -> String {
    let path = if route.strip_prefix {
        let segments = route.prefix.split('/').filter(|s| !s.is_empty()).count();
        path.raw_without_segments(segments)
    } else {
        path.raw.clone()
    };
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

pub(super) fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// A proxied (HTTP mode) response body that keeps its VM's guard until it ends. Once the VM
/// is gone (killed at the deadline, crashed), nothing more can come: after a short grace
/// for what is already in the host's socket buffer, the body fails instead of waiting on a
/// peer that vanished without closing.
pub(super) struct GuardedBody {
    pub(super) inner: OutBody,
    /// Resolves when the VM is gone.
    pub(super) vm_end: oneshot::Receiver<Result<xcgi_vmm::Outcome, String>>,
    pub(super) grace: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(super) _guard: Guard,
    pub(super) _budget: Option<BudgetHold>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f);
        }
        if self.grace.is_none() {
            if Pin::new(&mut self.vm_end).poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.grace = Some(Box::pin(tokio::time::sleep(VM_END_GRACE)));
        }
        match self.grace.as_mut().map(|g| g.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(std::io::Error::other(
                "the VM ended before its response was complete",
            )))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Server {
    pub(super) async fn http(
        &self,
        executor: &VmHttpExecutor,
        job: Job<'_>,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        let Job {
            route,
            parts,
            path,
            body,
            slot,
            deadline,
            ..
        } = job;
        let GuestConnection {
            stream,
            killer,
            outcome,
            boot,
        } = match executor.start(slot, deadline).await {
            Ok(c) => c,
            Err(e) => {
                log.note = Some(e.to_string());
                let (status, public) = e.response();
                return error(status, public);
            }
        };
        let ready = boot;
        log.boot = Some(ready);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    killer.kill();
                    log.note = Some(format!("HTTP handshake with the guest failed: {e}"));
                    return error(StatusCode::BAD_GATEWAY, "the handler failed");
                }
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let target = forwarded_target(&path, parts.uri.query(), &route.route);
        let mut out = Request::builder().method(parts.method.clone()).uri(target);
        for (k, v) in parts.headers.iter() {
            if !is_hop_by_hop(k.as_str()) {
                out = out.header(k, v);
            }
        }
        let (req_body, budget): (OutBody, _) = match body {
            RequestBody::Stream(inc, _, body_deadline) => (
                TimedBody {
                    inner: inc,
                    deadline: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                        body_deadline,
                    ))),
                }
                .boxed(),
                None,
            ),
            RequestBody::Buffered(b, hold) => {
                (Full::new(b).map_err(|never| match never {}).boxed(), hold)
            }
        };
        let Ok(out) = out.body(req_body) else {
            killer.kill();
            return error(StatusCode::BAD_REQUEST, "cannot forward this request");
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let resp = match tokio::time::timeout(left, sender.send_request(out)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                killer.kill();
                log.note = Some(format!("the guest's HTTP server failed: {e}"));
                return error(StatusCode::BAD_GATEWAY, "the handler failed");
            }
            Err(_) => {
                killer.kill();
                log.note = Some(format!(
                    "timeout: no response within {} ms",
                    route.route.timeout_ms
                ));
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the handler did not answer in time",
                );
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        let hop: Vec<_> = rparts
            .headers
            .keys()
            .filter(|k| is_hop_by_hop(k.as_str()))
            .cloned()
            .collect();
        for k in hop {
            rparts.headers.remove(k);
        }
        let guard = Guard {
            killer: killer.clone(),
            timer: spawn_deadline(killer, deadline),
        };
        Response::from_parts(
            rparts,
            GuardedBody {
                inner: rbody.map_err(std::io::Error::other).boxed(),
                vm_end: outcome,
                grace: None,
                _guard: guard,
                _budget: budget,
            }
            .boxed(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_target_keeps_or_strips_the_prefix() {
        let mut r = crate::config::Route::quick("/bin/true".into(), Mode::Http);
        r.prefix = "/app".into();
        let p = |s: &str| crate::path::normalize(s).unwrap();
        assert_eq!(
            forwarded_target(&p("/app/x/y"), Some("q=1"), &r),
            "/app/x/y?q=1"
        );
        r.strip_prefix = true;
        assert_eq!(
            forwarded_target(&p("/app/x/y"), Some("q=1"), &r),
            "/x/y?q=1"
        );
        assert_eq!(forwarded_target(&p("/app"), None, &r), "/");
        assert_eq!(forwarded_target(&p("/app/./a%20b/../c"), None, &r), "/c");
        r.prefix = "/".into();
        assert_eq!(forwarded_target(&p("/z"), None, &r), "/z");
    }
}
