//! `xcgi.toml`: the server, its network pool and its routes. Checked completely at start; an
//! error names the file, the key and the reason.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//! isolation = "vm"          # or "process": classic CGI children, no VM (baseline, development)
//! concurrency = 8           # requests handled at once (VMs running)
//! queue = 64                # requests waiting for a slot; beyond that: 503
//! queue_timeout_ms = 10000  # longest wait for a slot: then 503
//! header_timeout_ms = 10000 # a request head must arrive within this, else the connection closes
//! idle_timeout_ms = 5000    # a keep-alive connection with no request is closed after this
//! write_timeout_ms = 30000  # a response the client does not read for this long is aborted
//! body_timeout_ms = 30000   # a request body must arrive within this (after its head): 408
//! max_connections = 4096    # open client connections; more are accepted and closed at once
//! body_budget = 268435456   # bytes of chunked request bodies held at once, all requests: 503
//! kernel = "vmlinux"        # default guest kernel (else the one `xcgi kernel build` cached)
//! debug_dump = false        # log a debug dump of each VM that ends badly (docs/networking.md)
//! jail = true               # each VM in a jailed process of its own (docs/security.md)
//! cgroup_parent = "/sys/fs/cgroup/xcgi" # where VM processes' cgroups go (default: own cgroup)
//! user = "xcgi"             # after start-up, run as this user with no capability (jail = true)
//!
//! [process]                 # isolation = "process" only: how each handler process runs
//! user = "nobody"           # an unprivileged user (when the server runs as root)
//! cpu_seconds = 60          # RLIMIT_CPU
//! memory_mib = 1024         # RLIMIT_AS
//! processes = 256           # RLIMIT_NPROC (counted per user: all handlers together)
//! cgroup = true             # a cgroup v2 per handler where writable (kills every descendant)
//! seccomp = true            # seccomp filters: no ptrace, namespaces, mounts, bpf... (EPERM)
//!
//! [network]                 # HTTP-mode routes only: a /30 per VM from this pool
//! base = "172.16.0.0"
//! size = 64
//!
//! [[route]]
//! prefix = "/hello"
//! mode = "cgi"              # or "http"
//! handler = "hello-cgi"     # the program (relative paths: from this file's directory)
//! tree = "rootfs/"          # optional: more files for the guest's root (busybox, data)
//! memory_mib = 128
//! memory_max_mib = 176      # jailed VM process's cgroup memory.max (default memory_mib + 48)
//! pids_max = 9              # its pids.max (default 8 + vcpus)
//! cpu_percent = 100         # its cpu.max, percent of one CPU (default: no limit)
//! prepared = 2              # VMs built ahead for this route (off the request path); 0: none
//! working_set = true        # snapshot clones touch the pages a served clone touched, ahead
//! timeout_ms = 10000
//! max_body = 1048576
//! env = { GREETING = "hi" }
//! pass_authorization = false # pass the Authorization header as HTTP_AUTHORIZATION
//! ```

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read it: {source}")]
    Read {
        /// The configuration file.
        file: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or a key or type the configuration does not have.
    #[error("{file}: {message}")]
    Parse {
        /// The configuration file.
        file: PathBuf,
        /// The TOML parser's message (it names the line).
        message: String,
    },
    /// A value that fails the checks.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The configuration file, or `(command line)`.
        file: PathBuf,
        /// The key, e.g. `server.concurrency` or `route[0] (prefix "/a").memory_mib`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// How handlers are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A fresh microVM per request (the product).
    #[default]
    Vm,
    /// A child process per request (fork/exec, no VM): development and the baseline.
    Process,
}

/// What the handler is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A CGI/1.1 program: request in its environment and stdin, response on its stdout.
    #[default]
    Cgi,
    /// An HTTP server listening on `port`; the gateway forwards the request to it.
    Http,
}

/// How a route's VMs start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// Every request's VM boots the kernel.
    Boot,
    /// Every request's VM is a copy-on-write clone of a template VM that booted once, at
    /// start, up to xcgi-init's hello (docs/serve.md, "Snapshots"). CGI mode only.
    Snapshot,
}

/// `[server]`: listeners, admission, connection limits and timeouts, guest defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address of the serving port. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How handlers are isolated. Default `vm`.
    #[serde(default)]
    pub isolation: Isolation,
    /// Handlers running at once; a request's slot is held until its handler is gone. At
    /// least 1; default 8.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Requests that may wait for a slot; beyond that, 503 at once (0: none wait).
    /// Default 64.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Longest wait in the queue, ms, then 503 (504 if the route's deadline comes first).
    /// At least 1; default 10000.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout_ms: u64,
    /// In-flight requests get this long to finish on SIGTERM, ms. Default 30000.
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: u64,
    /// A request's head (request line and headers) must arrive within this, counted from its
    /// first byte; else the connection is closed. ms, at least 1; default 10000.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// A connection waiting for its next request is closed after this. ms, at least 1;
    /// default 5000.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// A response that cannot be written for this long (the client does not read) is
    /// aborted: the connection closes and the handler is killed. ms, at least 1; default
    /// 30000.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_ms: u64,
    /// A request body must arrive completely within this after the request's head: else 408
    /// (and the handler is killed). ms, at least 1; default 30000.
    #[serde(default = "default_body_timeout")]
    pub body_timeout_ms: u64,
    /// Client connections open at once; a connection over the cap is accepted and closed.
    /// At least 1; default 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Bytes of chunked request bodies held in memory at once, across all requests (a
    /// chunked body is taken in whole before the handler starts: CGI needs its length). A
    /// request that would go over gets 503. At least 1; default 268435456 (256 MiB).
    #[serde(default = "default_body_budget")]
    pub body_budget: u64,
    /// Guest kernel for routes without their own `kernel`. Unset: the one `xcgi kernel
    /// build` cached (looked up only when some route needs it).
    pub kernel: Option<PathBuf>,
    /// `xcgi-init`, the guest side of CGI mode (default: next to the xcgi binary).
    pub init: Option<PathBuf>,
    /// Reserved path prefix on the serving port for `healthz`, `readyz` and (without
    /// `admin_listen`) `metrics`. No route may be configured under it. Default `/_xcgi`.
    #[serde(default = "default_admin_prefix")]
    pub admin_prefix: String,
    /// A second listener for `/healthz`, `/readyz` and `/metrics` (then metrics are no
    /// longer on the serving port). Keep it private.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// SO_REUSEPORT on the listeners: a new instance can bind beside the old one during a
    /// restart (docs/deploy.md). Off by default: a second server started by mistake on the
    /// same port is refused instead of silently sharing its traffic.
    #[serde(default)]
    pub reuse_port: bool,
    /// On SIGTERM readiness goes false at once; new connections are still accepted for this
    /// long (so a balancer's health check sees the server leave) before the drain starts.
    /// ms; default 0.
    #[serde(default)]
    pub drain_delay_ms: u64,
    /// Log a debug dump (WARN) of the VM of every failed request: a triple fault or panic, a
    /// guest that never accepted (HTTP mode), a VM that ended before answering
    /// (docs/networking.md). For chasing guest failures; off by default.
    #[serde(default)]
    pub debug_dump: bool,
    /// With `debug_dump`: guest kernel memory to add to each dump, read through the guest's
    /// page tables (`xcgi_vmm::diagnostics::Probe`: `LABEL ADDRESS [* | +HEX | -HEX]...
    /// LENGTH` per line). For hunting a guest-side hang; none by default.
    #[serde(default)]
    pub debug_probe: Option<String>,
    /// Run every VM in a jailed process of its own (docs/security.md, "The jail"): new
    /// namespaces, an empty root, a cgroup with limits, rlimits, no capabilities, a uid from
    /// `jail_uid_base`, seccomp filters per thread. Needs root. Default true; false runs
    /// each VM as threads of the server (as trusted as the server: for development only).
    #[serde(default = "default_true")]
    pub jail: bool,
    /// The first uid (and gid) jailed VM processes run as; one per live process.
    #[serde(default = "default_jail_uid_base")]
    pub jail_uid_base: u32,
    /// How many uids from `jail_uid_base`: at most that many jailed VM processes at once.
    #[serde(default = "default_jail_uids")]
    pub jail_uids: u32,
    /// The cgroup v2 directory under which the server makes its jailed VM processes'
    /// cgroups (`xcgi-vms-PID/vmN`). Default: the server's own cgroup (a systemd unit with
    /// `Delegate=yes`); the server then moves itself into a leaf `xcgi-server-PID` so that
    /// the controllers can be enabled below it.
    pub cgroup_parent: Option<PathBuf>,
    /// After its start-up (routes prepared, sockets bound, the jail helper started), the
    /// server switches to this user (a name, or `UID[:GID]`) and keeps no capability: its HTTP
    /// side then runs unprivileged, and only the jail helper (root) starts VM processes
    /// (docs/security.md, "Privileges"). Needs `jail = true`.
    /// Default: none (the server keeps the user it was started as).
    pub user: Option<String>,
    /// A hugetlbfs mount: the memory of `hugepages = true` routes' templates goes there
    /// (`start = "snapshot"`), one file per template, removed with it. Default
    /// `/dev/hugepages`.
    #[serde(default = "default_hugetlbfs")]
    pub hugetlbfs: PathBuf,
}

fn default_hugetlbfs() -> PathBuf {
    "/dev/hugepages".into()
}

fn default_jail_uid_base() -> u32 {
    3_000_000_000
}
fn default_jail_uids() -> u32 {
    4096
}

impl ServerSection {
    /// `debug_probe`, parsed (None when absent or invalid: [`Config::parse`] refuses an
    /// invalid one).
    pub fn probe(&self) -> Option<xcgi_vmm::diagnostics::Probe> {
        let text = self.debug_probe.as_deref()?;
        xcgi_vmm::diagnostics::Probe::parse(text).ok()
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: default_listen(),
            isolation: Isolation::default(),
            concurrency: default_concurrency(),
            queue: default_queue(),
            queue_timeout_ms: default_queue_timeout(),
            drain_timeout_ms: default_drain(),
            header_timeout_ms: default_header_timeout(),
            idle_timeout_ms: default_idle_timeout(),
            write_timeout_ms: default_write_timeout(),
            body_timeout_ms: default_body_timeout(),
            max_connections: default_max_connections(),
            body_budget: default_body_budget(),
            kernel: None,
            init: None,
            admin_prefix: default_admin_prefix(),
            admin_listen: None,
            reuse_port: false,
            drain_delay_ms: 0,
            debug_dump: false,
            debug_probe: None,
            jail: true,
            jail_uid_base: default_jail_uid_base(),
            jail_uids: default_jail_uids(),
            cgroup_parent: None,
            user: None,
            hugetlbfs: default_hugetlbfs(),
        }
    }
}

/// How a handler process runs (`isolation = "process"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSection {
    /// The user handlers run as, when the server runs as root (never root itself).
    /// Default `nobody`.
    #[serde(default = "default_process_user")]
    pub user: String,
    /// RLIMIT_CPU: seconds of CPU time per handler process. At least 1; default 60.
    #[serde(default = "default_process_cpu")]
    pub cpu_seconds: u64,
    /// RLIMIT_AS: address space per handler process, MiB. At least 1; default 1024.
    #[serde(default = "default_process_memory")]
    pub memory_mib: u64,
    /// RLIMIT_NPROC: processes of the handlers' user (all handlers together). At least 1;
    /// default 256.
    #[serde(default = "default_process_processes")]
    pub processes: u64,
    /// A cgroup v2 per handler where the server can make one: every descendant is killed
    /// with it, even one that left the handler's process group. Default true.
    #[serde(default = "default_true")]
    pub cgroup: bool,
    /// Seccomp filters on every handler: EPERM for debugging other processes, new
    /// namespaces, mounts, and kernel interfaces a handler does not need (docs/security.md).
    /// Default true.
    #[serde(default = "default_true")]
    pub seccomp: bool,
}

impl Default for ProcessSection {
    fn default() -> Self {
        ProcessSection {
            user: default_process_user(),
            cpu_seconds: default_process_cpu(),
            memory_mib: default_process_memory(),
            processes: default_process_processes(),
            cgroup: true,
            seccomp: true,
        }
    }
}

/// `[network]`: the address pool HTTP-mode guests get a TAP and a /30 from (VM isolation).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// First address of the pool; must start a /30. Default `172.16.0.0`.
    #[serde(default = "default_net_base")]
    pub base: Ipv4Addr,
    /// Number of /30 slots: the most HTTP-mode VMs at once. At least 1; default 64.
    #[serde(default = "default_net_size")]
    pub size: u32,
    /// TAPs created ahead of demand (at most `size`). Default 4.
    #[serde(default = "default_net_prefill")]
    pub prefill: u32,
    /// Name of the network namespace the TAPs live in (default: xcgi-serve-PID).
    pub netns: Option<String>,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            base: default_net_base(),
            size: default_net_size(),
            prefill: default_net_prefill(),
            netns: None,
        }
    }
}

/// A `[[route]]`: the requests under a path prefix and the handler that answers them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Path prefix, matched on whole segments (`/a` matches `/a` and `/a/b`, not `/ab`).
    pub prefix: String,
    /// How its VMs start: `snapshot` (clones of a template booted once at start) or `boot`.
    /// Default: `snapshot` where it applies (a CGI route, VM isolation, 4 KiB pages), else
    /// `boot` ([`Route::start_mode`]).
    pub start: Option<Start>,
    /// What the handler is. Default `cgi`.
    #[serde(default)]
    pub mode: Mode,
    /// The handler program, or a prebuilt guest image (`.cpio` initramfs or `.ext4`) holding
    /// it (CGI: with xcgi-init as /init; see `program`).
    pub handler: PathBuf,
    /// CGI with an image handler: the program's path inside the image
    /// (default `/cgi-bin/handler`).
    pub program: Option<String>,
    /// A directory copied into the guest's root before the handler (a busybox for shell
    /// scripts, data files). Handler programs only, not images.
    pub tree: Option<PathBuf>,
    /// This route's guest kernel, instead of `server.kernel`.
    pub kernel: Option<PathBuf>,
    /// Guest memory, MiB: 32 to 65536. Default 128.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Guest vCPUs: 1 to 32. Default 1.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Back guest memory with 2 MiB huge pages (they must be reserved). Default false.
    #[serde(default)]
    pub hugepages: bool,
    /// Jailed VM processes: their cgroup's `memory.max`, MiB: what the whole VM process may
    /// use, guest memory included. Default `memory_mib` + 48 (the VM process's own needs,
    /// docs/security.md); set lower to overcommit guests that touch little of their memory.
    pub memory_max_mib: Option<u64>,
    /// Jailed VM processes: their cgroup's `pids.max` (threads). Default 8 + `vcpus`.
    pub pids_max: Option<u32>,
    /// Jailed VM processes: their cgroup's `cpu.max`, in percent of one CPU (100: a whole
    /// CPU's time; 50: half). Default: no limit beyond the VM's vCPUs.
    pub cpu_percent: Option<u32>,
    /// VMs kept prepared ahead for this route (memory, kernel, vCPUs built; nothing run),
    /// each used by one request. 0 builds every VM on its request. At most 64; default 2.
    #[serde(default = "default_prepared")]
    pub prepared: usize,
    /// `start = "snapshot"`: record the pages a served clone touched and have every clone
    /// prepared after that touch them before its request (docs/serve.md, "Snapshots").
    /// Default true.
    #[serde(default = "default_true")]
    pub working_set: bool,
    /// A request's deadline, ms from its arrival: queue wait, body and response included.
    /// Then the handler is killed: 504 before the response head, else the response is cut
    /// off. At least 1; default 10000.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Largest request body, bytes: a larger Content-Length gets 413 before anything
    /// starts, a chunked body 413 once it grows past it. Default 1048576 (1 MiB).
    #[serde(default = "default_max_body")]
    pub max_body: u64,
    /// HTTP mode: the port the handler listens on in the guest. Default 80.
    #[serde(default = "default_port")]
    pub port: u16,
    /// HTTP mode: forward the path without the route's prefix (`/app/x` → `/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// PATH_TRANSLATED = document_root + PATH_INFO. Default `/`.
    #[serde(default = "default_document_root")]
    pub document_root: String,
    /// CGI mode: more environment variables for the handler. PATH may be set, the CGI
    /// variables the server sets may not.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Pass the client's `Authorization` header to the handler as HTTP_AUTHORIZATION (the
    /// server itself authenticates nobody, so REMOTE_USER and AUTH_TYPE are never set).
    #[serde(default)]
    pub pass_authorization: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    process: ProcessSection,
    network: Option<NetworkSection>,
    #[serde(default, rename = "route")]
    routes: Vec<Route>,
}

/// A checked configuration; relative paths already resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (`(command line)` without one); errors name it.
    pub file: PathBuf,
    /// `[server]` (its defaults when absent).
    pub server: ServerSection,
    /// `[process]` (its defaults when absent): used with `isolation = "process"` only.
    pub process: ProcessSection,
    /// `[network]` (its defaults when absent): used by HTTP-mode routes only.
    pub network: NetworkSection,
    /// The `[[route]]` tables, in file order; at least one.
    pub routes: Vec<Route>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_prefix() -> String {
    "/_xcgi".into()
}
fn default_concurrency() -> usize {
    8
}
fn default_queue() -> usize {
    64
}
fn default_queue_timeout() -> u64 {
    10_000
}
fn default_drain() -> u64 {
    30_000
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_idle_timeout() -> u64 {
    5_000
}
fn default_write_timeout() -> u64 {
    30_000
}
fn default_body_timeout() -> u64 {
    30_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_body_budget() -> u64 {
    256 << 20
}
fn default_process_user() -> String {
    "nobody".into()
}
fn default_process_cpu() -> u64 {
    60
}
fn default_process_memory() -> u64 {
    1024
}
fn default_process_processes() -> u64 {
    256
}
fn default_true() -> bool {
    true
}
fn default_net_base() -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 0, 0)
}
fn default_net_size() -> u32 {
    64
}
fn default_net_prefill() -> u32 {
    4
}
fn default_prepared() -> usize {
    2
}
fn default_memory() -> u64 {
    128
}
fn default_vcpus() -> u8 {
    1
}
fn default_timeout() -> u64 {
    10_000
}
fn default_max_body() -> u64 {
    1 << 20
}
fn default_port() -> u16 {
    80
}
fn default_document_root() -> String {
    "/".into()
}

impl Route {
    /// [`Route::timeout_ms`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// How its VMs start: `start` as set, else `snapshot` where it applies (a CGI route of
    /// VM isolation on 4 KiB pages: huge-page clones need a hugetlbfs mount and keep their
    /// template's pages, so they are asked for) and `boot` elsewhere.
    pub fn start_mode(&self, isolation: Isolation) -> Start {
        self.start.unwrap_or(
            if isolation == Isolation::Vm && self.mode == Mode::Cgi && !self.hugepages {
                Start::Snapshot
            } else {
                Start::Boot
            },
        )
    }

    /// A route for `xcgi serve --handler` (quick start).
    pub fn quick(handler: PathBuf, mode: Mode) -> Route {
        Route {
            prefix: "/".into(),
            start: None,
            mode,
            handler,
            program: None,
            tree: None,
            kernel: None,
            memory_mib: default_memory(),
            vcpus: default_vcpus(),
            hugepages: false,
            memory_max_mib: None,
            pids_max: None,
            cpu_percent: None,
            prepared: default_prepared(),
            working_set: true,
            timeout_ms: default_timeout(),
            max_body: default_max_body(),
            port: default_port(),
            strip_prefix: false,
            document_root: default_document_root(),
            env: BTreeMap::new(),
            pass_authorization: false,
        }
    }

    /// Whether `path` is under this route's prefix (whole segments).
    pub fn matches(&self, path: &str) -> bool {
        let p = self.prefix.trim_end_matches('/');
        if p.is_empty() {
            return true;
        }
        match path.strip_prefix(p) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

impl Config {
    /// Reads, parses and checks `file`.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Config::parse(file, &text)
    }

    /// Parses and checks `text`, read from `file`: relative paths in it are made absolute
    /// against the file's directory.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        // Relative paths in the file are relative to its directory, made absolute now: a
        // process handler runs in its own directory, where a relative path means nothing.
        let dir = file.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let base = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let base = base.as_path();
        let cfg = Config {
            file: file.to_path_buf(),
            server: raw.server,
            process: raw.process,
            network: raw.network.unwrap_or_default(),
            routes: raw.routes,
        };
        cfg.resolve(base).validate()
    }

    /// A configuration made from command-line flags (no file).
    pub fn from_parts(
        server: ServerSection,
        network: NetworkSection,
        routes: Vec<Route>,
    ) -> Result<Config, ConfigError> {
        Config {
            file: PathBuf::from("(command line)"),
            server,
            process: ProcessSection::default(),
            network,
            routes,
        }
        .validate()
    }

    fn resolve(mut self, base: &Path) -> Config {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(k) = self.server.kernel.as_mut() {
            abs(k);
        }
        if let Some(i) = self.server.init.as_mut() {
            abs(i);
        }
        for r in &mut self.routes {
            abs(&mut r.handler);
            if let Some(t) = r.tree.as_mut() {
                abs(t);
            }
            if let Some(k) = r.kernel.as_mut() {
                abs(k);
            }
        }
        self
    }

    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Checks the configuration again (after command-line overrides).
    pub fn checked(self) -> Result<Config, ConfigError> {
        self.validate()
    }

    /// Checks every section, in the order its errors are reported: the server's limits, the
    /// admin prefix, the process limits, the server's files, the network, then each route.
    fn validate(self) -> Result<Config, ConfigError> {
        self.validate_server()?;
        self.validate_admin()?;
        self.validate_process()?;
        self.validate_server_files()?;
        self.validate_network()?;
        if self.routes.is_empty() {
            return Err(self.invalid("route", "no routes: add at least one [[route]] table"));
        }
        for i in 0..self.routes.len() {
            self.validate_route(i)?;
        }
        Ok(self)
    }

    /// `[server]`: the concurrency, timeouts and caps are at least 1; a debug probe parses
    /// and comes with `debug_dump`.
    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if let Some(text) = &s.debug_probe {
            if let Err(e) = xcgi_vmm::diagnostics::Probe::parse(text) {
                return Err(self.invalid("server.debug_probe", e.to_string()));
            }
            if !s.debug_dump {
                return Err(self.invalid(
                    "server.debug_probe",
                    "is read into debug dumps only: set debug_dump = true too",
                ));
            }
        }
        if s.concurrency == 0 {
            return Err(self.invalid("server.concurrency", "must be at least 1"));
        }
        for (key, v) in [
            ("server.queue_timeout_ms", s.queue_timeout_ms),
            ("server.header_timeout_ms", s.header_timeout_ms),
            ("server.idle_timeout_ms", s.idle_timeout_ms),
            ("server.write_timeout_ms", s.write_timeout_ms),
            ("server.body_timeout_ms", s.body_timeout_ms),
        ] {
            if v == 0 {
                return Err(self.invalid(key, "must be at least 1"));
            }
        }
        if s.max_connections == 0 {
            return Err(self.invalid("server.max_connections", "must be at least 1"));
        }
        if s.body_budget == 0 {
            return Err(self.invalid("server.body_budget", "must be at least 1"));
        }
        if let Some(u) = &s.user {
            self.validate_user(u)?;
        }
        Ok(())
    }

    /// `server.user`: not root, and only where nothing after start-up needs privileges the
    /// jail helper does not hold.
    fn validate_user(&self, u: &str) -> Result<(), ConfigError> {
        let key = "server.user";
        if u.is_empty() || u == "root" || u == "0" || u.starts_with("0:") {
            return Err(self.invalid(
                key,
                "must name an unprivileged user (e.g. \"xcgi\"), not root",
            ));
        }
        if self.server.isolation != Isolation::Vm || !self.server.jail {
            return Err(self.invalid(
                key,
                "needs isolation = \"vm\" and jail = true: process isolation starts each handler \
                 as [process] user and in-process VMs run as the server, both of which need root; \
                 remove server.user for those",
            ));
        }
        Ok(())
    }

    /// The admin prefix, the admin listener, and routes kept out of the reserved prefix.
    fn validate_admin(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let p = &s.admin_prefix;
        let well_formed = p.len() > 1
            && p.starts_with('/')
            && !p.ends_with('/')
            && crate::path::normalize(p).is_ok_and(|n| n.decoded == *p && n.raw == *p)
            && p.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'%' && b != b'?' && b != b'#');
        if !well_formed {
            return Err(self.invalid(
                "server.admin_prefix",
                format!("{p:?} must be a plain absolute path like \"/_xcgi\" (not \"/\", no trailing '/', no '.', '..', '%', '?' or '#')"),
            ));
        }
        if s.admin_listen == Some(s.listen) {
            return Err(self.invalid(
                "server.admin_listen",
                "is the serving address: give the admin listener its own port",
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let under = r.prefix.trim_end_matches('/');
            if under == p || under.starts_with(&format!("{p}/")) {
                return Err(self.invalid(
                    format!("route[{i}] (prefix {:?}).prefix", r.prefix),
                    format!("is under the reserved admin prefix {p:?} (healthz, readyz, metrics): choose another prefix or set server.admin_prefix"),
                ));
            }
        }
        Ok(())
    }

    /// `[process]`: an unprivileged user, and limits of at least 1.
    fn validate_process(&self) -> Result<(), ConfigError> {
        let p = &self.process;
        if p.user.is_empty() || p.user == "root" || p.user == "0" {
            return Err(self.invalid(
                "process.user",
                "handlers must not run as root: name an unprivileged user (default \"nobody\")",
            ));
        }
        for (key, v) in [
            ("process.cpu_seconds", p.cpu_seconds),
            ("process.memory_mib", p.memory_mib),
            ("process.processes", p.processes),
        ] {
            if v == 0 {
                return Err(self.invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// `server.kernel` and `server.init`, where given, are files.
    fn validate_server_files(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("server.kernel", &self.server.kernel),
            ("server.init", &self.server.init),
        ] {
            if let Some(reason) = not_a_file(path.as_deref()) {
                return Err(self.invalid(key, reason));
            }
        }
        Ok(())
    }

    /// `[network]`: at least one address, and no more prefilled than there are.
    fn validate_network(&self) -> Result<(), ConfigError> {
        if self.network.size == 0 {
            return Err(self.invalid("network.size", "must be at least 1"));
        }
        if self.network.prefill > self.network.size {
            return Err(self.invalid(
                "network.prefill",
                format!(
                    "{} is larger than network.size {}",
                    self.network.prefill, self.network.size
                ),
            ));
        }
        Ok(())
    }

    /// Route `i`: its prefix and files, its sizes, its strings and environment, then whether
    /// its handler, mode and program go together.
    fn validate_route(&self, i: usize) -> Result<(), ConfigError> {
        let check = RouteCheck {
            cfg: self,
            i,
            r: &self.routes[i],
        };
        check.paths()?;
        check.sizes()?;
        check.strings()?;
        check.handler()
    }

    /// The route for `path`: the longest matching prefix.
    pub fn route_for(&self, path: &str) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches(path))
            .max_by_key(|(_, r)| r.prefix.trim_end_matches('/').len())
    }

    /// Whether the guests' network must be set up: VM isolation with an HTTP-mode route.
    pub fn needs_network(&self) -> bool {
        self.server.isolation == Isolation::Vm && self.routes.iter().any(|r| r.mode == Mode::Http)
    }
}

/// Why `path`, where given, is not a usable file.
fn not_a_file(path: Option<&Path>) -> Option<String> {
    path.filter(|p| !p.is_file())
        .map(|p| format!("{} is not a file", p.display()))
}

/// Why `path`, where given, is not a usable directory.
fn not_a_dir(path: Option<&Path>) -> Option<String> {
    path.filter(|p| !p.is_dir())
        .map(|p| format!("{} is not a directory", p.display()))
}

/// One route being checked: errors name its key as `route[i] (prefix "...").key`.
struct RouteCheck<'a> {
    cfg: &'a Config,
    i: usize,
    r: &'a Route,
}

impl RouteCheck<'_> {
    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        let key = format!("route[{}] (prefix {:?}).{key}", self.i, self.r.prefix);
        self.cfg.invalid(key, reason)
    }

    /// A route's prefix (absolute, not an earlier route's), handler, tree and kernel.
    fn paths(&self) -> Result<(), ConfigError> {
        let (i, r) = (self.i, self.r);
        if !r.prefix.starts_with('/') {
            return Err(self.invalid("prefix", "must start with '/'"));
        }
        if self.cfg.routes[..i]
            .iter()
            .any(|o| o.prefix.trim_end_matches('/') == r.prefix.trim_end_matches('/'))
        {
            return Err(self.invalid("prefix", "used by an earlier route too"));
        }
        if let Some(reason) = not_a_file(Some(&r.handler)) {
            return Err(self.invalid("handler", reason));
        }
        if let Some(reason) = not_a_dir(r.tree.as_deref()) {
            return Err(self.invalid("tree", reason));
        }
        if let Some(reason) = not_a_file(r.kernel.as_deref()) {
            return Err(self.invalid("kernel", reason));
        }
        Ok(())
    }

    /// A route's guest memory, VMs kept prepared, vCPUs and timeout.
    fn sizes(&self) -> Result<(), ConfigError> {
        let r = self.r;
        if r.memory_mib < 32 {
            return Err(self.invalid(
                "memory_mib",
                format!(
                    "{} MiB is too little for a guest: at least 32",
                    r.memory_mib
                ),
            ));
        }
        if r.memory_mib > 64 * 1024 {
            return Err(self.invalid("memory_mib", "at most 65536 (64 GiB)"));
        }
        if r.prepared > 64 {
            return Err(self.invalid(
                "prepared",
                format!("{} is too many VMs to keep ready: at most 64", r.prepared),
            ));
        }
        if r.vcpus == 0 || r.vcpus > 32 {
            return Err(self.invalid("vcpus", "must be 1 to 32"));
        }
        if r.timeout_ms == 0 {
            return Err(self.invalid("timeout_ms", "must be at least 1"));
        }
        if r.memory_max_mib.is_some_and(|m| m < 16) {
            return Err(self.invalid(
                "memory_max_mib",
                "at least 16: a VM process needs that much of its own",
            ));
        }
        if r.pids_max.is_some_and(|p| p < 2 + u32::from(r.vcpus)) {
            return Err(self.invalid(
                "pids_max",
                "at least 2 + vcpus: the VM process's main thread, a vCPU thread each, a device thread",
            ));
        }
        if r.cpu_percent.is_some_and(|p| p == 0 || p > 100 * 64) {
            return Err(self.invalid("cpu_percent", "must be 1 to 6400 (64 CPUs)"));
        }
        Ok(())
    }

    /// No NUL in a route's strings; its `env` names are well formed and none is a variable
    /// the server sets itself.
    fn strings(&self) -> Result<(), ConfigError> {
        let r = self.r;
        for (k, v) in [
            ("prefix", r.prefix.as_str()),
            ("document_root", r.document_root.as_str()),
            ("program", r.program.as_deref().unwrap_or("")),
        ] {
            if v.contains('\0') {
                return Err(self.invalid(k, "contains a NUL character"));
            }
        }
        for (name, value) in &r.env {
            let k = format!("env.{name}");
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(
                    self.invalid(&k, "a variable name must be non-empty, without '=' or NUL")
                );
            }
            if value.contains('\0') {
                return Err(self.invalid(&k, "contains a NUL character"));
            }
            if crate::cgi::is_gateway_variable(name) {
                return Err(self.invalid(
                    &k,
                    "the server sets this CGI variable itself (only PATH may be overridden)",
                ));
            }
        }
        Ok(())
    }

    /// Whether a route's handler (program or image), mode, program and port go together
    /// and with the isolation.
    fn handler(&self) -> Result<(), ConfigError> {
        let r = self.r;
        let is_image = crate::images::image_kind(&r.handler).is_some();
        if is_image && self.cfg.server.isolation == Isolation::Process {
            return Err(self.invalid(
                "handler",
                "an image handler needs isolation \"vm\" (process isolation runs a program)",
            ));
        }
        if is_image && r.tree.is_some() {
            return Err(self.invalid(
                "tree",
                "only for a handler program (an image handler is used as it is)",
            ));
        }
        if r.program.is_some() && !(is_image && r.mode == Mode::Cgi) {
            return Err(self.invalid("program", "only for a CGI route whose handler is an image"));
        }
        if r.program.as_ref().is_some_and(|p| !p.starts_with('/')) {
            return Err(self.invalid("program", "must be an absolute path in the image"));
        }
        if r.mode == Mode::Http && self.cfg.server.isolation == Isolation::Process {
            return Err(self.invalid(
                "mode",
                "http mode needs isolation \"vm\" (process isolation runs CGI handlers only)",
            ));
        }
        if r.port == 0 {
            return Err(self.invalid("port", "must be 1 to 65535"));
        }
        if r.mode == Mode::Http && !r.env.is_empty() {
            // It used to be accepted and dropped without a word.
            return Err(self.invalid(
                "env",
                "only for CGI mode: an http-mode guest runs its own server, whose environment \
                 is the image's (set it there)",
            ));
        }
        if r.start == Some(Start::Snapshot) {
            let why = if self.cfg.server.isolation == Isolation::Process {
                Some("snapshots are of VMs: it needs isolation \"vm\"")
            } else if r.mode == Mode::Http {
                Some(
                    "http mode boots every VM (clones of one template would share its address; \
                     docs/serve.md, \"Snapshots\"): use start = \"boot\"",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(self.invalid("start", why));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_handler() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("h"), b"#!/bin/sh\n").unwrap();
        d
    }

    fn parse(d: &tempfile::TempDir, text: &str) -> Result<Config, ConfigError> {
        Config::parse(&d.path().join("xcgi.toml"), text)
    }

    #[test]
    fn defaults_and_relative_paths() {
        let d = dir_with_handler();
        let c = parse(&d, "[[route]]\nprefix = \"/a\"\nhandler = \"h\"\n").unwrap();
        assert_eq!(c.server.listen, default_listen());
        assert_eq!(c.server.isolation, Isolation::Vm);
        let r = &c.routes[0];
        assert_eq!(r.handler, d.path().join("h"));
        assert_eq!((r.memory_mib, r.vcpus, r.mode), (128, 1, Mode::Cgi));
        assert!(r.working_set, "clones touch their working set by default");
        assert!(!c.needs_network());
        let c = parse(
            &d,
            "[[route]]\nprefix = \"/a\"\nhandler = \"h\"\nworking_set = false\n",
        )
        .unwrap();
        assert!(!c.routes[0].working_set);
    }

    /// `start`: snapshot by default where it applies, boot elsewhere; `snapshot` asked for
    /// where it cannot apply is refused, saying why.
    #[test]
    fn start_defaults_to_snapshot_where_it_applies() {
        let d = dir_with_handler();
        let route = |extra: &str| format!("[[route]]\nprefix = \"/a\"\nhandler = \"h\"\n{extra}\n");
        let start = |server: &str, extra: &str| {
            let c = parse(&d, &format!("{server}\n{}", route(extra))).unwrap();
            c.routes[0].start_mode(c.server.isolation)
        };
        assert_eq!(start("", ""), Start::Snapshot);
        assert_eq!(start("", "start = \"boot\""), Start::Boot);
        assert_eq!(start("", "mode = \"http\""), Start::Boot);
        assert_eq!(start("", "hugepages = true"), Start::Boot);
        assert_eq!(
            start("", "hugepages = true\nstart = \"snapshot\""),
            Start::Snapshot
        );
        assert_eq!(start("[server]\nisolation = \"process\"", ""), Start::Boot);
        for (server, extra, why) in [
            (
                "",
                "mode = \"http\"\nstart = \"snapshot\"",
                "http mode boots every VM",
            ),
            (
                "[server]\nisolation = \"process\"",
                "start = \"snapshot\"",
                "it needs isolation",
            ),
        ] {
            let e = parse(&d, &format!("{server}\n{}", route(extra)))
                .unwrap_err()
                .to_string();
            assert!(e.contains(".start") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn server_user_and_cgroup_limits_are_checked() {
        let d = dir_with_handler();
        let cgi = "[[route]]\nprefix = \"/a\"\nhandler = \"h\"\n";
        let c = parse(&d, &format!("[server]\nuser = \"xcgi\"\n{cgi}")).unwrap();
        assert_eq!(c.server.user.as_deref(), Some("xcgi"));
        assert!(c.server.jail, "the jail is on by default");
        for (server, route, want) in [
            ("user = \"root\"", "", "not root"),
            ("user = \"0:0\"", "", "not root"),
            (
                "user = \"xcgi\"\nisolation = \"process\"",
                "",
                "jail = true",
            ),
            ("user = \"xcgi\"\njail = false", "", "jail = true"),
            ("", "memory_max_mib = 8", "memory_max_mib"),
            ("", "pids_max = 2", "pids_max"),
            ("", "cpu_percent = 0", "cpu_percent"),
        ] {
            let e = err(&d, &format!("[server]\n{server}\n{cgi}{route}\n"));
            assert!(e.contains(want), "{server} / {route}: {e}");
        }
    }

    #[test]
    fn routes_match_whole_segments_longest_first() {
        let d = dir_with_handler();
        let c = parse(
            &d,
            "[[route]]\nprefix = \"/\"\nhandler = \"h\"\n[[route]]\nprefix = \"/a\"\nhandler = \"h\"\nmode = \"http\"\n",
        )
        .unwrap();
        assert_eq!(c.route_for("/a").unwrap().0, 1);
        assert_eq!(c.route_for("/a/b").unwrap().0, 1);
        assert_eq!(c.route_for("/ab").unwrap().0, 0);
        assert_eq!(c.route_for("/").unwrap().0, 0);
        assert!(c.needs_network());
    }

    fn err(d: &tempfile::TempDir, text: &str) -> String {
        parse(d, text).unwrap_err().to_string()
    }

    #[test]
    fn image_handlers_are_checked() {
        let d = dir_with_handler();
        std::fs::write(d.path().join("app.cpio"), b"070701rest-of-a-cpio-header").unwrap();
        let c = parse(
            &d,
            "[[route]]\nprefix = \"/\"\nhandler = \"app.cpio\"\nprogram = \"/cgi-bin/app\"\n",
        )
        .unwrap();
        assert_eq!(c.routes[0].program.as_deref(), Some("/cgi-bin/app"));
        let e = err(
            &d,
            "[server]\nisolation = \"process\"\n[[route]]\nprefix = \"/\"\nhandler = \"app.cpio\"\n",
        );
        assert!(e.contains(".handler") && e.contains("isolation"), "{e}");
        let e = err(
            &d,
            "[[route]]\nprefix = \"/\"\nhandler = \"h\"\nprogram = \"/x\"\n",
        );
        assert!(e.contains(".program") && e.contains("image"), "{e}");
        let e = err(
            &d,
            "[[route]]\nprefix = \"/\"\nhandler = \"app.cpio\"\nprogram = \"rel\"\n",
        );
        assert!(e.contains(".program") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn a_debug_probe_must_parse_and_come_with_debug_dump() {
        let cfg = |server: &str| {
            format!("[server]\n{server}\n[[route]]\nprefix = \"/x\"\nhandler = \"/bin/true\"\n")
        };
        for (server, want) in [
            (
                "debug_dump = true\ndebug_probe = \"jiffies ffffffff818b5c40 zz\"",
                "debug probe line 1: length \"zz\"",
            ),
            (
                "debug_probe = \"jiffies ffffffff818b5c40 8\"",
                "set debug_dump = true too",
            ),
        ] {
            let e = Config::parse(Path::new("/tmp/x.toml"), &cfg(server))
                .unwrap_err()
                .to_string();
            assert!(e.contains("server.debug_probe") && e.contains(want), "{e}");
        }
        let ok = Config::parse(
            Path::new("/tmp/x.toml"),
            &cfg("debug_dump = true\ndebug_probe = \"\"\"\njiffies ffffffff818b5c40 8\nhvc ffffffff818c00d0 * -198 64\n\"\"\""),
        )
        .unwrap();
        assert_eq!(
            ok.server.probe().map(|p| p.to_line()).as_deref(),
            Some("jiffies 0xffffffff818b5c40 8;hvc 0xffffffff818c00d0 * -198 64")
        );
    }

    #[test]
    fn route_env_cannot_shadow_cgi_variables_and_nul_is_refused() {
        let route =
            |extra: &str| format!("[[route]]\nprefix = \"/x\"\nhandler = \"/bin/true\"\n{extra}\n");
        for (extra, want) in [
            ("env = { REQUEST_METHOD = \"GET\" }", "env.REQUEST_METHOD"),
            ("env = { HTTP_HOST = \"evil\" }", "env.HTTP_HOST"),
            ("env = { \"A=B\" = \"1\" }", "env.A=B"),
            ("env = { A = \"x\\u0000y\" }", "contains a NUL"),
            ("document_root = \"/srv\\u0000x\"", "document_root"),
            ("mode = \"http\"\nenv = { A = \"1\" }", "only for CGI mode"),
        ] {
            let e = Config::parse(Path::new("/tmp/x.toml"), &route(extra))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let ok = Config::parse(
            Path::new("/tmp/x.toml"),
            &route("env = { PATH = \"/bin\", GREETING = \"hi\" }"),
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn the_admin_prefix_is_reserved_and_well_formed() {
        let d = dir_with_handler();
        let r = |p: &str| format!("[[route]]\nprefix = \"{p}\"\nhandler = \"h\"\n");
        let c = parse(&d, &r("/")).unwrap();
        assert_eq!(c.server.admin_prefix, "/_xcgi");
        assert!(!c.server.reuse_port && c.server.admin_listen.is_none());
        for p in ["/_xcgi", "/_xcgi/", "/_xcgi/app"] {
            let e = err(&d, &r(p));
            assert!(e.contains("reserved admin prefix \"/_xcgi\""), "{p}: {e}");
        }
        assert!(parse(&d, &r("/_xcgiapp")).is_ok());
        for bad in ["/", "", "x", "/a/", "/a/../b", "/a%20", "/a?b", "/a/./b"] {
            let e = err(
                &d,
                &format!("[server]\nadmin_prefix = \"{bad}\"\n{}", r("/")),
            );
            assert!(e.contains("server.admin_prefix"), "{bad:?}: {e}");
        }
        let c = parse(
            &d,
            &format!("[server]\nadmin_prefix = \"/-/a\"\n{}", r("/_xcgi")),
        )
        .unwrap();
        assert_eq!(c.server.admin_prefix, "/-/a");
        let e = err(
            &d,
            &format!(
                "[server]\nlisten = \"127.0.0.1:9\"\nadmin_listen = \"127.0.0.1:9\"\n{}",
                r("/")
            ),
        );
        assert!(
            e.contains("server.admin_listen") && e.contains("own port"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let d = dir_with_handler();
        let e = err(
            &d,
            "[[route]]\nprefix = \"/a\"\nhandler = \"h\"\nmemroy_mib = 3\n",
        );
        assert!(e.contains("xcgi.toml") && e.contains("memroy_mib"), "{e}");
        let e = err(
            &d,
            "[[route]]\nprefix = \"/a\"\nhandler = \"h\"\nmemory_mib = 16\n",
        );
        assert!(
            e.contains("route[0] (prefix \"/a\").memory_mib") && e.contains("at least 32"),
            "{e}"
        );
        let e = err(&d, "[[route]]\nprefix = \"/a\"\nhandler = \"missing\"\n");
        assert!(e.contains(".handler") && e.contains("is not a file"), "{e}");
        let e = err(&d, "[[route]]\nprefix = \"a\"\nhandler = \"h\"\n");
        assert!(
            e.contains(".prefix") && e.contains("must start with '/'"),
            "{e}"
        );
        let e = err(
            &d,
            "[server]\nconcurrency = 0\n[[route]]\nprefix = \"/\"\nhandler = \"h\"\n",
        );
        assert!(e.contains("server.concurrency"), "{e}");
        let e = err(&d, "[server]\nlisten = \"nope\"\n");
        assert!(e.contains("listen"), "{e}");
        let e = err(&d, "");
        assert!(e.contains("no routes"), "{e}");
        let e = err(
            &d,
            "[[route]]\nprefix = \"/\"\nhandler = \"h\"\nmode = \"fast\"\n",
        );
        assert!(e.contains("mode") || e.contains("fast"), "{e}");
        let e = err(
            &d,
            "[[route]]\nprefix = \"/\"\nhandler = \"h\"\n[[route]]\nprefix = \"/\"\nhandler = \"h\"\n",
        );
        assert!(e.contains("route[1]") && e.contains("earlier route"), "{e}");
        let e = err(
            &d,
            "[[route]]\nprefix = \"/\"\nhandler = \"h\"\nenv = { \"A=B\" = \"x\" }\n",
        );
        assert!(e.contains("env.A=B"), "{e}");
    }
}
