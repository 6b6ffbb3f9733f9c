//! xcgi: every request served by a brand-new microVM. The one CLI.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xcgi",
    version,
    about = "Serve every request from a fresh Linux microVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel straight into a program and exit with its exit code.
    Run(cmd::run::Args),
    /// Build (or find in the cache) the minimal guest kernel.
    Kernel(cmd::kernel::Args),
    /// Build a root filesystem or initramfs from a program or a directory.
    Image(cmd::image::Args),
    /// Run a command inside the nested-KVM lab (QEMU/TCG with a KVM-capable Linux).
    Lab(cmd::lab::Args),
    /// Measure VMM setup and boot times.
    Bench(cmd::bench::Args),
    /// Serve HTTP: every request answered by a fresh microVM (CGI/1.1 or HTTP handlers).
    Serve(cmd::serve::Args),
    /// Internal: one jailed VM process of `xcgi serve` (`[server] jail`).
    #[command(hide = true)]
    VmmWorker(cmd::jail::WorkerCli),
    /// Internal: the jail helper of `xcgi serve` (starts its jailed VM processes).
    #[command(hide = true)]
    JailHelper,
}

/// `xcgi run` alone. Building the whole command tree (every subcommand's arguments) is most
/// of clap's start-up cost, and `xcgi run`'s setup time counts from process start.
#[derive(Parser)]
#[command(
    name = "xcgi run",
    version,
    about = "Boot a kernel straight into a program and exit with its exit code"
)]
struct RunCli {
    #[command(flatten)]
    args: cmd::run::Args,
}

/// Logs go to stderr: warnings and errors by default (`xcgi serve`: also its per-request
/// lines, at info), `XCGI_LOG` (an env-filter such as `debug` or `xcgi_vmm=trace`) for more.
fn init_logging() {
    let serving = std::env::args_os().nth(1).is_some_and(|a| a == "serve");
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match std::env::var("XCGI_LOG") {
        Ok(filter) if !filter.is_empty() => builder
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_new(&filter)
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init(),
        _ if serving => builder
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,xcgi_gateway=info,xcgi_net=info",
            ))
            .init(),
        _ => builder.with_max_level(tracing::Level::WARN).init(),
    }
}

fn main() {
    // Taken first: `xcgi run` reports times relative to process start.
    let start = std::time::Instant::now();
    init_logging();
    let result = if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        let argv = std::iter::once("xcgi run".into()).chain(std::env::args_os().skip(2));
        cmd::run::run(RunCli::parse_from(argv).args, start)
    } else {
        dispatch(Cli::parse().command, start)
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("xcgi: error: {}", error_chain(&e));
            std::process::exit(cmd::EXIT_USAGE);
        }
    }
}

/// The error and its causes, joined with ": ", leaving out a cause whose text the message
/// already carries (library errors often include their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn dispatch(command: Command, start: std::time::Instant) -> anyhow::Result<i32> {
    match command {
        Command::Run(a) => cmd::run::run(a, start),
        Command::Kernel(a) => cmd::kernel::run(a),
        Command::Image(a) => cmd::image::run(a),
        Command::Lab(a) => cmd::lab::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::VmmWorker(a) => Ok(cmd::jail::serve_worker(a)),
        Command::JailHelper => Ok(xcgi_gateway::exec::jailed::helper_main()),
    }
}
