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
    pub(super) vm_end: oneshot::Receiver<crate::exec::VmEnd>,
    pub(super) grace: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(super) _guard: Guard,
    pub(super) _budget: Option<BudgetHold>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
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

    forward_body_hints!();
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
        let guest = match executor.start(slot, deadline).await {
            Ok(c) => c,
            Err(e) => {
                log.note = Some(e.to_string());
                let (status, public) = e.response();
                return error(status, public);
            }
        };
        log.boot = Some(guest.boot);
        let target = forwarded_target(&path, parts.uri.query(), &route.route);
        let (out, budget) = match forwarded_request(&parts, target, body) {
            Some(x) => x,
            None => {
                guest.killer.kill();
                return error(StatusCode::BAD_REQUEST, "cannot forward this request");
            }
        };
        let GuestConnection {
            stream,
            killer,
            outcome,
            ..
        } = guest;
        let resp = match exchange(stream, out, deadline).await {
            Ok(r) => r,
            Err(e) => {
                killer.kill();
                log.note = Some(match &e {
                    ProxyError::Timeout => {
                        format!("timeout: no response within {} ms", route.route.timeout_ms)
                    }
                    other => other.to_string(),
                });
                return match e {
                    ProxyError::Timeout => error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the handler did not answer in time",
                    ),
                    _ => error(StatusCode::BAD_GATEWAY, "the handler failed"),
                };
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
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

/// Why the guest gave no response.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("HTTP handshake with the guest failed: {0}")]
    Handshake(hyper::Error),
    #[error("the guest's HTTP server failed: {0}")]
    Failed(hyper::Error),
    #[error("timeout")]
    Timeout,
}

/// The request as the guest gets it: method, target, headers without hop-by-hop ones, and
/// the body (streamed under its deadline, or as taken in). The body budget hold, if any,
/// lives as long as the response.
fn forwarded_request(
    parts: &hyper::http::request::Parts,
    target: String,
    body: RequestBody,
) -> Option<(Request<OutBody>, Option<BudgetHold>)> {
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
    out.body(req_body).ok().map(|r| (r, budget))
}

/// One HTTP/1.1 exchange with the guest on `stream`, its response head before `deadline`.
async fn exchange(
    stream: tokio::net::TcpStream,
    out: Request<OutBody>,
    deadline: Instant,
) -> Result<Response<Incoming>, ProxyError> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ProxyError::Handshake)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, sender.send_request(out)).await {
        Ok(r) => r.map_err(ProxyError::Failed),
        Err(_) => Err(ProxyError::Timeout),
    }
}

/// Removes the hop-by-hop headers of a response (they were the guest's connection's).
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let hop: Vec<_> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k.as_str()))
        .cloned()
        .collect();
    for k in hop {
        headers.remove(k);
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
