//! One log line and one metrics record per request, written when its response ends (or is
//! dropped: a client that hangs up at any await is still logged, as 499).

use super::*;

/// The per-request log line and metrics, written once, when the response body is finished
/// or dropped, or when the request is abandoned earlier (its future dropped because the
/// client went away: `Drop` writes it then, so no gauge is left counting it).
pub(super) struct RequestLog {
    pub(super) id: u64,
    pub(super) route: String,
    pub(super) method: Method,
    /// The path as the client sent it, escaped and cut for the log.
    pub(super) path: String,
    pub(super) t0: Instant,
    /// How long it waited in the admission queue for a slot (none: it did not get that far).
    pub(super) queued: Option<Duration>,
    pub(super) boot: Option<Duration>,
    pub(super) status: u16,
    pub(super) note: Option<String>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) finish: Option<oneshot::Receiver<Finish>>,
    /// The body reached its end (else the client went away first).
    pub(super) done: bool,
    /// The body ended in an error: the client got a truncated response.
    pub(super) cut: bool,
    pub(super) _in_flight: GaugeGuard,
    pub(super) _active: conn::ActiveRequest,
}

/// Rounds a duration to milliseconds with one decimal, for a log field.
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

impl RequestLog {
    pub(super) fn new(
        id: u64,
        method: Method,
        path: &str,
        t0: Instant,
        metrics: &Arc<Metrics>,
        active: conn::ActiveRequest,
    ) -> Self {
        RequestLog {
            id,
            route: String::new(),
            method,
            path: escape::for_log(path, 256),
            t0,
            queued: None,
            boot: None,
            // Until a response exists: "client closed the request" (nginx's 499).
            status: 499,
            note: None,
            metrics: Arc::clone(metrics),
            finish: None,
            done: false,
            cut: false,
            _in_flight: GaugeGuard::add(metrics, |m| &m.in_flight, 1),
            _active: active,
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let total = self.t0.elapsed();
        self.metrics.record(self.status, total);
        if let Some(b) = self.boot {
            self.metrics.boot.observe(b);
        }
        let finish = self.finish.take();
        let client_gone = !self.done;
        let (id, status, boot, cut) = (self.id, self.status, self.boot, self.cut);
        let queued = self.queued;
        let route = escape::for_log(&self.route, 256);
        let method = self.method.clone();
        let path = std::mem::take(&mut self.path);
        let note = self.note.take();
        // Exit status and stderr come a moment later; log once they are known (no runtime
        // left, at shutdown: log what is known now).
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            warn!(vm = id, route = %route, status, "request cut off at shutdown");
            return;
        };
        rt.spawn(async move {
            let fin = match finish {
                Some(f) => tokio::time::timeout(Duration::from_secs(2), f)
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            // The handler's own time: neither the wait for a slot nor its VM's boot.
            let queued_ms = queued.map(ms);
            let boot_ms = boot.map(ms);
            let handler_ms = boot.map(|b| ms(total.saturating_sub(b + queued.unwrap_or_default())));
            let total_ms = ms(total);
            let exit = fin.as_ref().and_then(|f| f.exit);
            let exec = fin
                .as_ref()
                .is_some_and(|f| exec_failed(f.exit, &f.stderr_tail));
            let note = compose_note(note, fin.as_ref(), client_gone, exec, status);
            // Handler, guest and client text is in here: escaped and cut.
            let note = escape::for_log(&note, escape::LOG_TEXT_MAX);
            // One line, at WARN for what went wrong, else INFO; the same fields either way.
            macro_rules! request_line {
                ($level:ident) => {
                    $level!(
                        vm = id,
                        route = %route,
                        method = %method,
                        path = %path,
                        status,
                        queued_ms,
                        boot_ms,
                        handler_ms,
                        total_ms,
                        exit,
                        "{note}"
                    )
                };
            }
            if status >= 500 || client_gone || cut || exec {
                request_line!(warn);
            } else {
                request_line!(info);
            }
        });
    }
}

/// The log line's note: what the server noted, why the handler ended, its stderr tail (for
/// a failure only).
fn compose_note(
    note: Option<String>,
    fin: Option<&Finish>,
    client_gone: bool,
    exec: bool,
    status: u16,
) -> String {
    let mut note = note.unwrap_or_default();
    if client_gone {
        note = "client went away: handler killed".into();
    }
    let mut add = |part: &str| {
        if !note.is_empty() {
            note.push_str("; ");
        }
        note.push_str(part);
    };
    if exec {
        add(
            "the handler, or a program it ran, could not be executed: is it in the image? \
             (docs/serve.md, \"Dynamic programs and helpers\")",
        );
    }
    if let Some(f) = fin {
        if f.exit.is_none() || status >= 500 || exec {
            if let Some(fl) = &f.failure {
                add(fl);
            }
            if !f.stderr_tail.trim().is_empty() {
                add(&format!("stderr: {}", f.stderr_tail.trim()));
            }
        }
    }
    note
}

/// Wraps a response body; writes the request's log line when the body ends or is dropped.
pub(super) struct LoggedBody {
    pub(super) inner: OutBody,
    pub(super) log: Option<RequestLog>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => {
                if let Some(mut log) = self.log.take() {
                    log.done = true;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut log) = self.log.take() {
                    log.done = true;
                    log.cut = true;
                    let cut = format!("response cut off: {e}");
                    log.note = Some(match log.note.take() {
                        Some(n) => format!("{n}; {cut}"),
                        None => cut,
                    });
                }
            }
            _ => {}
        }
        r
    }

    forward_body_hints!();
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.as_mut() {
            // Dropped before its end: only an error here if there was a body left to send. A
            // HEAD response has no body to send: hyper drops it unpolled once the head is out.
            log.done = self.inner.is_end_stream() || log.method == Method::HEAD;
        }
    }
}

/// Whether a handler's end says that it, or a program it ran, could not be executed: exit
/// 126 or 127 (what shells and `execvp` wrappers use), or a line of its stderr tail saying so
/// ("sh: gzip: not found", "cannot exec 'gzip': No such file or directory").
fn exec_failed(exit: Option<i32>, stderr: &str) -> bool {
    if matches!(exit, Some(126 | 127)) {
        return true;
    }
    stderr.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains(": not found")
            || l.contains("command not found")
            || (l.contains("exec")
                && (l.contains("no such file") || l.contains("permission denied")))
    })
}

#[cfg(test)]
mod exec_tests {
    use super::exec_failed;

    #[test]
    fn failed_execs_are_recognised_and_ordinary_output_is_not() {
        assert!(exec_failed(Some(127), ""));
        assert!(exec_failed(Some(126), ""));
        assert!(exec_failed(Some(0), "sh: 1: gzip: not found\n"));
        assert!(exec_failed(None, "bash: line 1: gzip: command not found"));
        assert!(exec_failed(
            Some(0),
            "fatal: cannot exec 'gzip': No such file or directory"
        ));
        assert!(exec_failed(
            Some(1),
            "xcgi-init: cannot execute the handler: Permission denied"
        ));
        assert!(!exec_failed(Some(0), ""));
        assert!(!exec_failed(Some(1), "page not found in the database\n"));
        assert!(!exec_failed(Some(2), "No such file or directory: /data/x"));
    }
}
