//! CGI mode: the request's environment and body to the handler, its CGI header block read
//! and turned into a response (local redirects followed), its output streamed back.

use super::*;

pub(super) enum HeadError {
    Timeout,
    BodyTimeout,
    Bad(String),
}

/// Reads the handler's stdout up to the end of its CGI header block. Returns the parsed head
/// and the body bytes that came with it. Each byte is looked at once ([`cgi::HeadScanner`]),
/// however small the pieces it arrives in.
pub(super) async fn read_head(
    ex: &mut Exchange,
    deadline: Instant,
) -> Result<(CgiHead, Bytes), HeadError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut scanner = cgi::HeadScanner::default();
    let deadline = tokio::time::Instant::from_std(deadline);
    loop {
        let chunk = tokio::select! {
            c = ex.stdout.recv() => c,
            _ = tokio::time::sleep_until(deadline) => return Err(HeadError::Timeout),
        };
        let Some(chunk) = chunk else {
            let why = if buf.is_empty() {
                "the handler wrote nothing".to_string()
            } else {
                cgi::CgiResponseError::Truncated.to_string()
            };
            return Err(HeadError::Bad(why));
        };
        buf.extend_from_slice(&chunk);
        if let Some(end) = scanner.scan(&buf) {
            if end > MAX_HEADER_BLOCK {
                return Err(HeadError::Bad(
                    cgi::CgiResponseError::HeadersTooLong.to_string(),
                ));
            }
            let rest = Bytes::copy_from_slice(&buf[end..]);
            // A local redirect must have no body: look for one only if none arrived yet.
            let mut body_follows = !rest.is_empty();
            if !body_follows && is_local_redirect_candidate(&buf[..end]) {
                let peek = tokio::select! {
                    c = ex.stdout.recv() => c,
                    _ = tokio::time::sleep_until(deadline) => return Err(HeadError::Timeout),
                };
                if let Some(c) = peek {
                    body_follows = true;
                    let head = cgi::parse_head(&buf[..end], body_follows)
                        .map_err(|e| HeadError::Bad(e.to_string()))?;
                    let mut all = rest.to_vec();
                    all.extend_from_slice(&c);
                    return Ok((head, Bytes::from(all)));
                }
            }
            let head = cgi::parse_head(&buf[..end], body_follows)
                .map_err(|e| HeadError::Bad(e.to_string()))?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEADER_BLOCK {
            return Err(HeadError::Bad(
                cgi::CgiResponseError::HeadersTooLong.to_string(),
            ));
        }
    }
}

pub(super) fn is_local_redirect_candidate(block: &[u8]) -> bool {
    block.split(|&b| b == b'\n').any(|l| {
        l.len() > 9
            && l[..9].eq_ignore_ascii_case(b"location:")
            && l[9..].trim_ascii_start().starts_with(b"/")
    })
}

/// A CGI response body: the bytes that came with the headers, then the handler's stdout.
/// Output cut short (the handler killed at its deadline, its VM died) ends in an error, so
/// the client sees a truncated response, not a complete one: hyper then closes the
/// connection without the final chunk.
pub(super) struct ChanBody {
    pub(super) first: Option<Bytes>,
    pub(super) rx: Option<mpsc::Receiver<Bytes>>,
    pub(super) complete: Arc<std::sync::atomic::AtomicBool>,
    pub(super) guard: Option<Guard>,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => {
                self.rx = None;
                self.guard = None;
                if self.complete.load(Ordering::SeqCst) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(std::io::Error::other(
                        "the handler was stopped before its response was complete",
                    ))))
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rx.is_none()
    }
}

/// What a CGI request asks for; a local redirect replaces it with a GET of another path.
struct Target {
    method: Method,
    /// Decoded and normalised.
    path: String,
    query: String,
}

/// Where the handler's stdout comes from, and where the request's own data is.
struct Caller<'a> {
    parts: &'a hyper::http::request::Parts,
    remote: SocketAddr,
    local: SocketAddr,
}

impl Server {
    /// CGI mode: runs the route's handler and answers with its response, following local
    /// redirects (at most [`MAX_LOCAL_REDIRECTS`]).
    pub(super) async fn cgi(
        &self,
        job: Job<'_>,
        remote: SocketAddr,
        local: SocketAddr,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        let Job {
            mut route,
            parts,
            path,
            body,
            slot,
            deadline,
        } = job;
        let caller = Caller {
            parts: &parts,
            remote,
            local,
        };
        let mut target = Target {
            method: parts.method.clone(),
            path: path.decoded,
            query: parts.uri.query().unwrap_or("").to_string(),
        };
        let mut body = Some(body);
        for _ in 0..=MAX_LOCAL_REDIRECTS {
            let (body_rx, content_length, late) = match body.take() {
                Some(b) => b.into_channel(),
                None => (mpsc::channel(1).1, None, oneshot::channel().1),
            };
            let inv = match invocation(route, &caller, &target, content_length) {
                Ok(inv) => inv,
                Err(e) => {
                    log.note = Some(e.to_string());
                    return error(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request header fields too large for a CGI environment",
                    );
                }
            };
            let run = Run {
                route,
                slot: &slot,
                deadline,
            };
            let (ex, head, rest) = match self
                .start_and_read_head(run, &inv, body_rx, late, log)
                .await
            {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            match head {
                CgiHead::LocalRedirect { location } => {
                    ex.killer.kill();
                    match self.redirect(&location) {
                        Some((r, t)) => (route, target) = (r, t),
                        None => {
                            log.note = Some(format!("local redirect to {location}: no CGI route"));
                            return error(StatusCode::BAD_GATEWAY, "bad local redirect");
                        }
                    }
                }
                CgiHead::Document { status, headers } => {
                    return document(ex, status, headers, rest, deadline, log);
                }
            }
        }
        log.note = Some(format!("more than {MAX_LOCAL_REDIRECTS} local redirects"));
        error(StatusCode::BAD_GATEWAY, "too many local redirects")
    }

    /// A local redirect's target: a GET of `location`'s path (with its query) on the CGI
    /// route that serves it.
    fn redirect(&self, location: &str) -> Option<(&ServedRoute, Target)> {
        let (p, q) = location.split_once('?').unwrap_or((location, ""));
        let path = crate::path::normalize(p).ok()?;
        let (i, r) = self.cfg.route_for(&path.decoded)?;
        (r.mode == Mode::Cgi).then(|| {
            let target = Target {
                method: Method::GET,
                path: path.decoded,
                query: q.to_string(),
            };
            (&self.routes[i], target)
        })
    }

    /// Starts the route's handler and reads its CGI header block: the exchange, the head and
    /// the body bytes that came with it; or the error response (timeout, slow body, a bad
    /// head), the handler killed.
    async fn start_and_read_head(
        &self,
        run: Run<'_>,
        inv: &Invocation,
        body_rx: mpsc::Receiver<Bytes>,
        mut late: oneshot::Receiver<()>,
        log: &mut RequestLog,
    ) -> Result<(Exchange, CgiHead, Bytes), Response<OutBody>> {
        // A local redirect may lead to another route: its own executor runs it.
        let started = match &run.route.exec {
            Some(RouteExec::Cgi(e)) => e.start(CgiStart {
                id: log.id,
                inv,
                body: body_rx,
                slot: Arc::clone(run.slot),
            }),
            _ => {
                log.note = Some("the route is not a CGI route".into());
                return Err(error(StatusCode::BAD_GATEWAY, "the handler failed"));
            }
        };
        let mut ex = started.map_err(|e| {
            log.note = Some(e.to_string());
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot start the handler",
            )
        })?;
        // Biased: a body that came too late must not pass for complete because the
        // handler answered the EOF it got when the feeding stopped.
        let head = tokio::select! {
            biased;
            Ok(()) = &mut late => Err(HeadError::BodyTimeout),
            h = read_head(&mut ex, run.deadline) => h,
        };
        match head {
            Ok((head, rest)) => {
                log.boot = ex.ready.try_recv().ok();
                Ok((ex, head, rest))
            }
            Err(e) => {
                ex.killer.kill();
                Err(self.head_failed(e, ex.finish, run.route, log).await)
            }
        }
    }

    /// The response when no usable CGI head came (the handler is already killed).
    async fn head_failed(
        &self,
        e: HeadError,
        finish: oneshot::Receiver<Finish>,
        route: &ServedRoute,
        log: &mut RequestLog,
    ) -> Response<OutBody> {
        match e {
            HeadError::Timeout => {
                log.note = Some(format!(
                    "timeout: no response header within {} ms",
                    route.route.timeout_ms
                ));
                log.finish = Some(finish);
                error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the handler did not answer in time",
                )
            }
            HeadError::BodyTimeout => {
                log.note = Some(format!(
                    "the request body did not arrive within {} ms",
                    self.cfg.server.body_timeout_ms
                ));
                log.finish = Some(finish);
                error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body came too slowly",
                )
            }
            HeadError::Bad(why) => {
                let fin = tokio::time::timeout(Duration::from_secs(2), finish)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                log.note = Some(format!("bad gateway: {why}; {}", describe_finish(&fin)));
                error(StatusCode::BAD_GATEWAY, "the handler failed")
            }
        }
    }
}

/// One start of a handler: which route, the request's slot and deadline.
struct Run<'a> {
    route: &'a ServedRoute,
    slot: &'a crate::exec::Slot,
    deadline: Instant,
}

/// What the handler runs with: the CGI environment built from the request and the route.
fn invocation(
    route: &ServedRoute,
    caller: &Caller<'_>,
    target: &Target,
    content_length: Option<u64>,
) -> Result<Invocation, cgi::EnvError> {
    let extra: Vec<(String, String)> = route
        .route
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let info = cgi::RequestInfo {
        method: &target.method,
        version: caller.parts.version,
        path: &target.path,
        query: &target.query,
        headers: &caller.parts.headers,
        remote: caller.remote,
        local: caller.local,
        script_name: &route.route.prefix,
        document_root: &route.route.document_root,
        content_length,
        pass_authorization: route.route.pass_authorization,
    };
    Ok(Invocation {
        program: route.program.clone(),
        env: cgi::environment(&info, &extra)?,
        cwd: route.cwd.clone(),
    })
}

/// The handler's document: its status and headers, then its output as it comes, cut off
/// (and the handler killed) at the deadline.
fn document(
    ex: Exchange,
    status: StatusCode,
    headers: hyper::HeaderMap,
    rest: Bytes,
    deadline: Instant,
    log: &mut RequestLog,
) -> Response<OutBody> {
    let mut resp = Response::new(
        ChanBody {
            first: (!rest.is_empty()).then_some(rest),
            rx: Some(ex.stdout),
            complete: ex.complete,
            guard: Some(Guard {
                killer: ex.killer.clone(),
                timer: spawn_deadline(ex.killer.clone(), deadline),
            }),
        }
        .boxed(),
    );
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    log.finish = Some(ex.finish);
    resp
}

#[cfg(test)]
mod tests {
    use super::is_local_redirect_candidate;

    #[test]
    fn a_local_location_is_seen_however_short_and_with_or_without_cr() {
        for block in [
            &b"Location:/\n\n"[..],
            b"Location:/\r\n\r\n",
            b"location: /env\n\n",
            b"Status: 200\nLOCATION:\t/x\n\n",
        ] {
            assert!(
                is_local_redirect_candidate(block),
                "{:?}",
                String::from_utf8_lossy(block)
            );
        }
        for block in [
            &b"Location: http://example.com/\n\n"[..],
            b"Location:\n\n",
            b"Content-Type: text/plain\n\n",
            b"X-Location: /x\n\n",
        ] {
            assert!(
                !is_local_redirect_candidate(block),
                "{:?}",
                String::from_utf8_lossy(block)
            );
        }
    }
}
