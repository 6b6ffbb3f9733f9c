//! `xcgi serve`: an HTTP server in which every request gets a fresh microVM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use xcgi_gateway::config::{Config, Isolation, Mode, NetworkSection, Route, ServerSection};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["config", "handler"])))]
pub struct Args {
    /// The configuration file (routes, limits, network); see docs/serve.md.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Quick start: serve every path with this one handler (no config file): a program, or a
    /// prebuilt image (.cpio / .ext4).
    #[arg(long, value_name = "PROGRAM|IMAGE")]
    handler: Option<PathBuf>,
    /// With --handler IMAGE in CGI mode: the program's path inside the image.
    #[arg(long, value_name = "PATH")]
    program: Option<String>,
    /// With --handler: cgi (a CGI/1.1 program) or http (an HTTP server listening on --port).
    #[arg(long, value_enum, default_value = "cgi")]
    mode: ModeArg,
    /// With --handler: a directory copied into the guest's root (e.g. a busybox).
    #[arg(long, value_name = "DIR")]
    tree: Option<PathBuf>,
    /// With --handler: the port the HTTP handler listens on inside the guest.
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// With --handler: guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// With --handler: VMs kept prepared ahead (built, nothing run; one per request).
    #[arg(long, default_value_t = 2)]
    prepared: usize,
    /// With --handler: 2 MiB huge pages for guest memory (needs vm.nr_hugepages).
    #[arg(long)]
    hugepages: bool,
    /// With --handler: per-request timeout in milliseconds (then 504).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// Address to listen on [default: the config's, else 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// A second listener for /healthz, /readyz and /metrics [default: the config's; else
    /// they are served under /_xcgi/ on the serving port].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<std::net::SocketAddr>,
    /// SO_REUSEPORT: bind beside a running instance (rolling restart; docs/deploy.md).
    #[arg(long)]
    reuse_port: bool,
    /// Log a debug dump of every VM that ends badly (`[server] debug_dump`).
    #[arg(long)]
    debug_dump: bool,
    /// vm: a fresh microVM per request; process: a classic CGI child per request (baseline).
    #[arg(long, value_enum)]
    isolation: Option<IsolationArg>,
    /// Requests handled at once [default: the config's, else 8].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Requests waiting beyond that [default: the config's, else 64].
    #[arg(long)]
    queue: Option<usize>,
    /// The guest kernel [default: the config's, else the one `xcgi kernel build` cached].
    #[arg(long, value_name = "VMLINUX")]
    kernel: Option<PathBuf>,
    /// xcgi-init, the guest side of CGI mode [default: next to this binary].
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum ModeArg {
    Cgi,
    Http,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum IsolationArg {
    Vm,
    Process,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    // Before any thread starts: the variables that name them are removed.
    let inherited = xcgi_gateway::systemd::take_listen_fds()
        .context("taking the sockets passed by the service manager")?;
    // Nothing the server ever executes (its jail helper, VM processes, handlers) gains
    // privileges through execve: set while single-threaded, so every thread has it.
    xcgi_jail::no_new_privs().context("setting no_new_privs")?;
    let mut cfg = load_config(&args)?;
    apply_overrides(&args, &mut cfg)?;
    let cfg = cfg.checked()?;
    if cfg.server.isolation == Isolation::Vm && xcgi_vmm::hypervisor::kvm::host_is_pvm() {
        tracing::warn!(
            "this host's /dev/kvm cannot boot a standard Linux guest (PVM); VMs will fail. \
             Run inside the lab (`xcgi lab -- xcgi serve ...`) or use --isolation process"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("xcgi-serve")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg, inherited))?;
    Ok(0)
}

/// The configuration file, or (`--handler`) one route serving every path from the flags.
fn load_config(args: &Args) -> anyhow::Result<Config> {
    Ok(match (&args.config, &args.handler) {
        (Some(file), _) => Config::load(file)?,
        (None, Some(handler)) => {
            let mut route = Route::quick(
                handler.clone(),
                match args.mode {
                    ModeArg::Cgi => Mode::Cgi,
                    ModeArg::Http => Mode::Http,
                },
            );
            route.tree = args.tree.clone();
            route.program = args.program.clone();
            route.port = args.port;
            route.memory_mib = args.memory;
            route.prepared = args.prepared;
            route.hugepages = args.hugepages;
            route.timeout_ms = args.timeout_ms;
            Config::from_parts(
                ServerSection::default(),
                NetworkSection::default(),
                vec![route],
            )?
        }
        (None, None) => anyhow::bail!("give --config FILE or --handler PROGRAM"),
    })
}

/// The command-line flags that override the `[server]` section.
fn apply_overrides(args: &Args, cfg: &mut Config) -> anyhow::Result<()> {
    if let Some(l) = args.listen {
        cfg.server.listen = l;
    }
    if let Some(a) = args.admin_listen {
        cfg.server.admin_listen = Some(a);
    }
    cfg.server.reuse_port |= args.reuse_port;
    cfg.server.debug_dump |= args.debug_dump;
    if let Some(i) = args.isolation {
        cfg.server.isolation = match i {
            IsolationArg::Vm => Isolation::Vm,
            IsolationArg::Process => Isolation::Process,
        };
    }
    if let Some(c) = args.concurrency {
        anyhow::ensure!(c > 0, "--concurrency must be at least 1");
        cfg.server.concurrency = c;
    }
    if let Some(q) = args.queue {
        cfg.server.queue = q;
    }
    if args.kernel.is_some() {
        cfg.server.kernel = args.kernel.clone();
    }
    if args.init.is_some() {
        cfg.server.init = args.init.clone();
    }
    Ok(())
}

/// Prepares the routes, binds the listeners (or takes the inherited ones), says where it
/// listens, and serves until the server stops.
async fn serve(cfg: Config, inherited: xcgi_gateway::systemd::Inherited) -> anyhow::Result<()> {
    let server = Arc::new(xcgi_gateway::Server::new(cfg).context("preparing the routes")?);
    let listeners = xcgi_gateway::server::bind(server.config(), inherited).await?;
    server.drop_privileges()?;
    let addr = listeners
        .http
        .local_addr()
        .context("reading the listening address")?;
    let admin = match &listeners.admin {
        Some(l) => format!(
            "; admin on http://{}",
            l.local_addr().context("reading the admin address")?
        ),
        None => format!("; health at {}/readyz", server.config().server.admin_prefix),
    };
    eprintln!(
        "xcgi serve: listening on http://{addr} ({} route(s), isolation {:?}, concurrency {}{admin})",
        server.config().routes.len(),
        server.config().server.isolation,
        server.config().server.concurrency
    );
    xcgi_gateway::server::run(server, listeners).await;
    Ok(())
}
