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
}

/// Logs go to stderr: warnings and errors by default, `XCGI_LOG` (an env-filter such as
/// `debug` or `xcgi_vmm=trace`) for more. The filter parser is only built when asked for:
/// it is a noticeable part of `xcgi run`'s start-up.
fn init_logging() {
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match std::env::var("XCGI_LOG") {
        Ok(filter) if !filter.is_empty() => builder
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_new(&filter)
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init(),
        _ => builder.with_max_level(tracing::Level::WARN).init(),
    }
}

fn main() {
    // Taken first: `xcgi run` reports times relative to process start.
    let start = std::time::Instant::now();
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a, start),
        Command::Kernel(a) => cmd::kernel::run(a),
        Command::Image(a) => cmd::image::run(a),
        Command::Lab(a) => cmd::lab::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("xcgi: error: {e:#}");
            std::process::exit(cmd::EXIT_USAGE);
        }
    }
}
