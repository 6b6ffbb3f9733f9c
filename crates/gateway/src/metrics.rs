//! Server metrics in the Prometheus text format (version 0.0.4), served at
//! `<admin_prefix>/metrics` or on the admin listener (see [`crate::admin`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bucket bounds in seconds, shared by the latency and boot-time histograms.
const BUCKETS: [f64; 16] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0,
];

/// A Prometheus histogram of durations over fixed buckets (1 ms to 120 s), without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The server's counters and gauges, shared by every request; see [`Metrics::render`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// Responses by status code.
    by_status: Mutex<BTreeMap<u16, u64>>,
    /// Request durations, from arrival to the end of the response
    /// (`xcgi_request_duration_seconds`).
    pub latency: Histogram,
    /// Per request, from starting its handler until the handler could take the request (a
    /// VM's boot, up to its port accepting in HTTP mode; a process's spawn)
    /// (`xcgi_vm_boot_seconds`).
    pub boot: Histogram,
    /// VMs alive now, teardown included.
    pub vms_running: AtomicI64,
    /// VMs prepared ahead and waiting for a request (kept by the pools).
    pub vms_prepared: Arc<AtomicI64>,
    /// Requests waiting for a concurrency slot now.
    pub queue_depth: AtomicI64,
    /// Requests being handled now, from arrival to their log line (admin requests aside).
    pub in_flight: AtomicI64,
    /// VMs started for requests, prepared ahead or not (a counter).
    pub vms_started: AtomicU64,
    /// Client connections open now.
    pub connections_open: AtomicI64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Bytes of chunked request bodies held now (against `body_budget`).
    pub body_bytes_buffered: AtomicI64,
    /// VM requests that found no prepared VM and built their own (the pool ran dry).
    pub prepared_misses: AtomicU64,
    /// `start = "snapshot"` templates taken (one per such route at start).
    pub snapshot_templates: AtomicU64,
    /// 1 while `/readyz` says ready.
    pub ready: AtomicI64,
    /// 1 from SIGTERM on.
    pub draining: AtomicI64,
    /// The guests' TAP pool (HTTP mode): its slots by state are gauges.
    pub net: std::sync::OnceLock<Arc<xcgi_net::GuestNet>>,
}

/// A gauge held up by one for as long as this lives (RAII): however the holder ends (a
/// future cancelled when its client hangs up included), the gauge comes back down.
#[derive(Debug)]
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    which: fn(&Metrics) -> &AtomicI64,
    by: i64,
}

impl GaugeGuard {
    /// Adds `by` to the gauge `which` picks, until the guard drops.
    pub fn add(metrics: &Arc<Metrics>, which: fn(&Metrics) -> &AtomicI64, by: i64) -> Self {
        which(metrics).fetch_add(by, Ordering::Relaxed);
        GaugeGuard {
            metrics: Arc::clone(metrics),
            which,
            by,
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.which)(&self.metrics).fetch_sub(self.by, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts one answered request: its status, and its duration in [`Metrics::latency`].
    pub fn record(&self, status: u16, total: Duration) {
        *self
            .by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(status)
            .or_default() += 1;
        self.latency.observe(total);
    }

    /// Every metric in the Prometheus text format: requests by status, the two histograms,
    /// the gauges, then the other counters.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP xcgi_requests_total Requests answered, by HTTP status.\n");
        out.push_str("# TYPE xcgi_requests_total counter\n");
        for (code, n) in self
            .by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "xcgi_requests_total{{status=\"{code}\"}} {n}");
        }
        self.latency.render(
            &mut out,
            "xcgi_request_duration_seconds",
            "Time from request to the end of the response.",
        );
        self.boot.render(
            &mut out,
            "xcgi_vm_boot_seconds",
            "Time from VM start to the guest being ready for the request.",
        );
        self.render_gauges(&mut out);
        self.render_counters(&mut out);
        out
    }

    /// The gauges: VMs, queue, requests, connections, buffered bodies, readiness, draining.
    fn render_gauges(&self, out: &mut String) {
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            out,
            "xcgi_vms_running",
            "VMs alive now (teardown included).",
            self.vms_running.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "xcgi_vms_prepared",
            "VMs built ahead (nothing run yet), waiting for a request.",
            self.vms_prepared.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "xcgi_queue_depth",
            "Requests waiting for a free slot.",
            self.queue_depth.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "xcgi_requests_in_flight",
            "Requests being handled.",
            self.in_flight.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "xcgi_connections_open",
            "Client connections open.",
            self.connections_open.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "xcgi_body_bytes_buffered",
            "Bytes of chunked request bodies held in memory.",
            self.body_bytes_buffered.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "xcgi_ready",
            "1 while the server is ready for traffic (what /readyz says), else 0.",
            self.ready.load(Ordering::Relaxed),
        );
        gauge(
            out,
            "xcgi_draining",
            "1 once SIGTERM came: finishing in-flight requests before exit.",
            self.draining.load(Ordering::Relaxed),
        );
        if let Some(net) = self.net.get() {
            let s = net.pool.stats();
            out.push_str(
                "# HELP xcgi_tap_slots Guest network slots (HTTP mode) by state: ready (TAP made \
                 ahead), free, leased (a VM has it), returning, stuck (its TAP outlived the VM).\n\
                 # TYPE xcgi_tap_slots gauge\n",
            );
            for (state, v) in [
                ("ready", s.ready),
                ("free", s.free),
                ("leased", s.leased),
                ("returning", s.returning),
                ("stuck", s.stuck),
            ] {
                let _ = writeln!(out, "xcgi_tap_slots{{state=\"{state}\"}} {v}");
            }
        }
    }

    /// The counters besides the requests'.
    fn render_counters(&self, out: &mut String) {
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            out,
            "xcgi_vms_started_total",
            "VMs started.",
            self.vms_started.load(Ordering::Relaxed),
        );
        counter(
            out,
            "xcgi_connections_refused_total",
            "Connections closed at once: max_connections were open.",
            self.connections_refused.load(Ordering::Relaxed),
        );
        counter(
            out,
            "xcgi_prepared_misses_total",
            "VM requests that found no VM prepared ahead and built their own (pool ran dry).",
            self.prepared_misses.load(Ordering::Relaxed),
        );
        counter(
            out,
            "xcgi_snapshot_templates_total",
            "Template VMs booted and captured for start = \"snapshot\" routes (never resumed).",
            self.snapshot_templates.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.record(200, Duration::from_millis(3));
        m.record(200, Duration::from_millis(30));
        m.record(504, Duration::from_secs(11));
        m.boot.observe(Duration::from_micros(900));
        m.vms_running.store(2, Ordering::Relaxed);
        let t = m.render();
        assert!(t.contains("xcgi_requests_total{status=\"200\"} 2"), "{t}");
        assert!(t.contains("xcgi_requests_total{status=\"504\"} 1"), "{t}");
        assert!(
            t.contains("xcgi_request_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("xcgi_request_duration_seconds_bucket{le=\"0.05\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("xcgi_request_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{t}"
        );
        assert!(t.contains("xcgi_request_duration_seconds_count 3"), "{t}");
        assert!(
            t.contains("xcgi_vm_boot_seconds_bucket{le=\"0.001\"} 1"),
            "{t}"
        );
        assert!(t.contains("xcgi_vms_running 2"), "{t}");
        assert!(t.contains("# TYPE xcgi_queue_depth gauge"), "{t}");
    }

    #[test]
    fn gauge_guards_come_back_down_however_their_holder_ends() {
        let m = Arc::new(Metrics::default());
        let g = GaugeGuard::add(&m, |m| &m.queue_depth, 1);
        let fut = async move {
            let _g = g;
            std::future::pending::<()>().await;
        };
        assert_eq!(m.queue_depth.load(Ordering::Relaxed), 1);
        drop(fut); // a cancelled future (a client that hung up while queued)
        assert_eq!(m.queue_depth.load(Ordering::Relaxed), 0);
    }
}
