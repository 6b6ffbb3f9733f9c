//! xcgi's HTTP front end: every request is answered by a fresh handler, a microVM booted for
//! it (or, for `--isolation process`, a child process), destroyed when the response ends.
//!
//! - [`config`]: `xcgi.toml` (routes, limits, network pool), checked at start.
//! - [`images`]: once per route at start: kernel, `xcgi-init`, the route's guest image.
//! - [`cgi`]: CGI/1.1 meta-variables and response parsing (RFC 3875).
//! - [`exec`]: running one handler: VM (CGI over virtio-console) or process ([`jail`]:
//!   unprivileged user, rlimits, process group and cgroup killed whole).
//! - [`path`]: request paths decoded and normalised before routing.
//! - [`conn`]: per-connection deadlines (idle, header, write), the accept loop's guards.
//! - [`escape`]: untrusted text made safe for log lines.
//! - [`server`]: hyper server, routing, admission (concurrency, queue), HTTP-mode proxying,
//!   timeouts, logs; [`metrics`]: the Prometheus text.
//! - [`admin`]: healthz, readyz and metrics (reserved prefix, admin listener);
//!   [`systemd`]: readiness notification and socket activation.

#![warn(missing_docs)]

pub mod admin;
pub mod cgi;
pub mod config;
pub mod conn;
pub mod escape;
pub mod exec;
pub mod handler_seccomp;
pub mod images;
pub mod jail;
pub mod metrics;
pub mod path;
pub mod server;
pub mod systemd;

pub use config::Config;
pub use server::Server;
