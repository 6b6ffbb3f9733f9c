//! Rate limiting for log lines a guest can trigger at will.
//!
//! A guest that misuses its registers or rings takes the same error path as often as it can
//! exit, tens of thousands of times a second, each time on a vCPU thread that holds the device
//! lock. A `warn!` on such a path would let it flood the host's log (and slow every other
//! device user down with it). So every warning or error a guest can provoke either goes
//! through a [`LogLimiter`] (the [`limited!`] macro) or is logged at `debug` only (where it
//! tells an operator nothing a counter does not).
//!
//! A limiter lets [`BURST`] lines through per [`WINDOW`] and drops the rest. The first line
//! allowed in a later window, and dropping the limiter, first log one summary line with the
//! number of lines dropped, so nothing disappears without a trace. One limiter serves all the
//! guest-triggered lines of a device (its transport, or its worker), so a guest cannot
//! multiply its budget by varying its misbehaviour.
//!
//! What a guest controls reaches these lines only as numbers (register values, indices,
//! addresses, errors whose `Display` is made of numbers): never as raw guest text.

use std::time::{Duration, Instant};

/// Lines a limiter lets through per window.
pub(crate) const BURST: u32 = 10;
/// Length of a limiter's window.
pub(crate) const WINDOW: Duration = Duration::from_secs(5);

/// Log lines through a [`LogLimiter`]: `limited!(limiter, warn, field = x, "message")` is
/// `warn!(field = x, "message")` when the limiter allows a line now, and nothing otherwise.
macro_rules! limited {
    ($limiter:expr, $level:ident, $($arg:tt)+) => {
        if $limiter.allow() {
            tracing::$level!($($arg)+);
        }
    };
}
pub(crate) use limited;

/// How many lines a [`LogLimiter`] let through and dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogCounts {
    /// Lines allowed (not counting summaries).
    pub allowed: u64,
    /// Lines dropped.
    pub suppressed: u64,
    /// Summary lines logged ("K similar messages suppressed").
    pub summaries: u64,
}

/// At most `burst` lines per `window`, then a count of what was dropped. See the
/// [module docs](self).
#[derive(Debug)]
pub(crate) struct LogLimiter {
    /// Who logs (for the summary line), e.g. "virtio-net".
    name: &'static str,
    burst: u32,
    window: Duration,
    /// Start of the current window; `None` before the first line.
    window_start: Option<Instant>,
    /// Lines allowed in the current window.
    in_window: u32,
    /// Lines dropped since the last summary.
    pending: u64,
    counts: LogCounts,
}

impl LogLimiter {
    /// A limiter with the default limits ([`BURST`] lines per [`WINDOW`]).
    pub(crate) fn new(name: &'static str) -> LogLimiter {
        LogLimiter::with_limits(name, BURST, WINDOW)
    }

    /// A limiter that allows `burst` lines per `window`.
    pub(crate) fn with_limits(name: &'static str, burst: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            name,
            burst,
            window,
            window_start: None,
            in_window: 0,
            pending: 0,
            counts: LogCounts::default(),
        }
    }

    /// Whether a line may be logged now (and counts it either way).
    pub(crate) fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    /// [`allow`](Self::allow) at time `now`. When `now` opens a new window and lines were
    /// dropped in the last one, logs the summary first.
    pub(crate) fn allow_at(&mut self, now: Instant) -> bool {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.in_window = 0;
            self.summarize();
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            self.counts.allowed += 1;
            true
        } else {
            self.pending += 1;
            self.counts.suppressed += 1;
            false
        }
    }

    /// The counters so far.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> LogCounts {
        self.counts
    }

    /// Logs how many lines were dropped since the last summary, if any.
    fn summarize(&mut self) {
        let suppressed = std::mem::take(&mut self.pending);
        if suppressed > 0 {
            self.counts.summaries += 1;
            tracing::warn!(
                suppressed,
                "{}: {suppressed} similar messages suppressed (guest-triggered; at most {} per {:?})",
                self.name,
                self.burst,
                self.window
            );
        }
    }
}

impl Drop for LogLimiter {
    fn drop(&mut self) {
        self.summarize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::count_warnings;

    #[test]
    fn lets_a_burst_through_then_suppresses_and_reports_the_count() {
        let mut l = LogLimiter::with_limits("test", 3, Duration::from_secs(1));
        let t0 = Instant::now();
        let (lines, allowed) = count_warnings(|| {
            let allowed: Vec<bool> = (0..10)
                .map(|i| l.allow_at(t0 + Duration::from_millis(i * 10)))
                .collect();
            allowed
        });
        assert_eq!(
            allowed,
            [true, true, true, false, false, false, false, false, false, false]
        );
        // The limiter itself logs nothing until the window is over.
        assert_eq!(lines, 0);
        assert_eq!(
            l.counts(),
            LogCounts {
                allowed: 3,
                suppressed: 7,
                summaries: 0
            }
        );

        // Still the same window just before it ends.
        assert!(!l.allow_at(t0 + Duration::from_millis(999)));
        // A new window: one summary of the 8 dropped, then a new burst.
        let (lines, allowed) = count_warnings(|| {
            (0..5)
                .map(|i| l.allow_at(t0 + Duration::from_millis(1000 + i)))
                .collect::<Vec<_>>()
        });
        assert_eq!(allowed, [true, true, true, false, false]);
        assert_eq!(lines, 1, "one summary line");
        assert_eq!(
            l.counts(),
            LogCounts {
                allowed: 6,
                suppressed: 10,
                summaries: 1
            }
        );

        // Dropping the limiter reports what is still pending.
        let (lines, ()) = count_warnings(|| drop(l));
        assert_eq!(lines, 1);
    }

    #[test]
    fn no_summary_when_nothing_was_suppressed() {
        let mut l = LogLimiter::with_limits("test", 2, Duration::from_secs(1));
        let t0 = Instant::now();
        let (lines, ()) = count_warnings(|| {
            assert!(l.allow_at(t0));
            assert!(l.allow_at(t0 + Duration::from_secs(5)));
            assert!(l.allow_at(t0 + Duration::from_secs(10)));
        });
        assert_eq!(lines, 0);
        assert_eq!(l.counts().summaries, 0);
        let (lines, ()) = count_warnings(|| drop(l));
        assert_eq!(lines, 0);
    }

    #[test]
    fn time_going_backwards_does_not_reopen_the_window() {
        let mut l = LogLimiter::with_limits("test", 1, Duration::from_secs(1));
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(l.allow_at(t0));
        assert!(!l.allow_at(t0 - Duration::from_secs(5)));
        assert!(l.allow_at(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn the_macro_logs_only_what_the_limiter_allows() {
        let mut l = LogLimiter::with_limits("test", 4, Duration::from_secs(3600));
        let (lines, ()) = count_warnings(|| {
            for i in 0..1000u32 {
                limited!(l, warn, i, "test: guest did something odd");
            }
        });
        assert_eq!(lines, 4);
        assert_eq!(l.counts().suppressed, 996);
    }
}
