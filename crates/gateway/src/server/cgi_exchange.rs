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
        l.len() > 10
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

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
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

impl Server {
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
            path: rpath,
            body,
            slot,
            deadline,
            id,
        } = job;
        let mut method = parts.method.clone();
        let mut path = rpath.decoded;
        let mut query = parts.uri.query().unwrap_or("").to_string();
        let mut body = Some(body);
        for _ in 0..=MAX_LOCAL_REDIRECTS {
            let (body_rx, content_length, mut late) = match body.take() {
                Some(b) => b.into_channel(),
                None => (mpsc::channel(1).1, None, oneshot::channel().1),
            };
            let extra: Vec<(String, String)> = route
                .route
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let info = cgi::RequestInfo {
                method: &method,
                version: parts.version,
                path: &path,
                query: &query,
                headers: &parts.headers,
                remote,
                local,
                script_name: &route.route.prefix,
                document_root: &route.route.document_root,
                content_length,
                pass_authorization: route.route.pass_authorization,
            };
            let env = match cgi::environment(&info, &extra) {
                Ok(env) => env,
                Err(e) => {
                    log.note = Some(e.to_string());
                    return error(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request header fields too large for a CGI environment",
                    );
                }
            };
            let inv = Invocation {
                program: route.program.clone(),
                env,
                cwd: route.cwd.clone(),
            };
            // A local redirect may lead to another route: its own executor runs it.
            let started = match &route.exec {
                Some(RouteExec::Cgi(e)) => e.start(&inv, body_rx, Arc::clone(&slot), id),
                _ => {
                    log.note = Some(format!(
                        "local redirect to {path:?}, which is not a CGI route"
                    ));
                    return error(StatusCode::BAD_GATEWAY, "the handler failed");
                }
            };
            let mut ex = match started {
                Ok(ex) => ex,
                Err(e) => {
                    log.note = Some(e.to_string());
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "cannot start the handler",
                    );
                }
            };
            // Biased: a body that came too late must not pass for complete because the
            // handler answered the EOF it got when the feeding stopped.
            let head = tokio::select! {
                biased;
                Ok(()) = &mut late => Err(HeadError::BodyTimeout),
                h = read_head(&mut ex, deadline) => h,
            };
            let (head, rest) = match head {
                Ok(x) => x,
                Err(HeadError::Timeout) => {
                    ex.killer.kill();
                    log.note = Some(format!(
                        "timeout: no response header within {} ms",
                        route.route.timeout_ms
                    ));
                    log.finish = Some(ex.finish);
                    return error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the handler did not answer in time",
                    );
                }
                Err(HeadError::BodyTimeout) => {
                    ex.killer.kill();
                    log.note = Some(format!(
                        "the request body did not arrive within {} ms",
                        self.cfg.server.body_timeout_ms
                    ));
                    log.finish = Some(ex.finish);
                    return error(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body came too slowly",
                    );
                }
                Err(HeadError::Bad(why)) => {
                    ex.killer.kill();
                    let fin = tokio::time::timeout(Duration::from_secs(2), ex.finish)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    log.note = Some(format!("bad gateway: {why}; {}", describe_finish(&fin)));
                    return error(StatusCode::BAD_GATEWAY, "the handler failed");
                }
            };
            log.boot = ex.ready.try_recv().ok();
            match head {
                CgiHead::LocalRedirect { location } => {
                    ex.killer.kill();
                    let (p, q) = location.split_once('?').unwrap_or((&location, ""));
                    let target = crate::path::normalize(p).ok();
                    query = q.to_string();
                    method = Method::GET;
                    match target.as_ref().and_then(|t| self.cfg.route_for(&t.decoded)) {
                        Some((i, r)) if r.mode == Mode::Cgi => route = &self.routes[i],
                        _ => {
                            log.note = Some(format!("local redirect to {location}: no CGI route"));
                            return error(StatusCode::BAD_GATEWAY, "bad local redirect");
                        }
                    }
                    path = target.map(|t| t.decoded).unwrap_or_default();
                    continue;
                }
                CgiHead::Document { status, headers } => {
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
                    return resp;
                }
            }
        }
        log.note = Some(format!("more than {MAX_LOCAL_REDIRECTS} local redirects"));
        error(StatusCode::BAD_GATEWAY, "too many local redirects")
    }
}
