//! `xcgi lab`: run a command inside the nested-KVM lab (QEMU/TCG with a KVM-capable Linux).
//!
//! Exit code: the command's own; 124 if the lab timed out; 125 if the lab itself failed
//! (boot failure, QEMU missing, assets); 2 for bad arguments or files.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use xcgi_lab::{Lab, LabCommand, LabError};

#[derive(clap::Args)]
#[command(
    after_help = "The command runs with `sh -c` in /work inside the lab, with this xcgi \
                  executable at /usr/bin/xcgi. Its output is streamed; the exit code is the \
                  command's, 124 on timeout, 125 if the lab failed."
)]
pub struct Args {
    /// Only build (or find) the cached lab assets and print their paths.
    #[arg(long, conflicts_with = "command")]
    pub prepare: bool,
    /// Copy a host file or directory into the lab: HOST_PATH[:GUEST_PATH]. A relative guest
    /// path is below /work; without one it goes to /work/<name>. Repeatable.
    #[arg(long = "files", value_name = "HOST_PATH[:GUEST_PATH]")]
    pub files: Vec<String>,
    /// Like --files, for a dynamically linked executable: also copies its shared libraries.
    #[arg(long = "bin", value_name = "HOST_PATH[:GUEST_PATH]")]
    pub bins: Vec<String>,
    /// Do not copy this xcgi executable to /usr/bin/xcgi in the lab.
    #[arg(long)]
    pub no_self: bool,
    /// Seconds for the whole run (boot included) before QEMU is killed.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    /// Lab memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 2048)]
    pub mem: u32,
    /// 2 MiB huge pages to reserve inside the lab.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub hugepages: u32,
    /// Lab CPUs (each one a busy host thread under TCG). One by default: with two, the lab's
    /// kernel now and then soft-locks (docs/benchmarks.md).
    #[arg(long, value_name = "N", default_value_t = xcgi_lab::DEFAULT_CPUS)]
    pub cpus: u32,
    /// The command (joined with spaces and run with `sh -c`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Splits `HOST[:GUEST]` at the first ':'.
fn split_spec(spec: &str) -> anyhow::Result<(PathBuf, String)> {
    let (host, guest) = match spec.split_once(':') {
        Some((h, g)) => (h, g.to_string()),
        None => (spec, String::new()),
    };
    if host.is_empty() {
        bail!("--files/--bin {spec:?}: empty host path");
    }
    let host = PathBuf::from(host);
    if !host.exists() {
        bail!("--files/--bin {spec:?}: {} does not exist", host.display());
    }
    Ok((host, guest))
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.prepare {
        let lab = Lab::prepare().context("preparing the lab assets")?;
        let a = lab.assets();
        println!("dir       {}", a.dir.display());
        println!("kernel    {}", a.kernel.display());
        println!("initramfs {}", a.initramfs.display());
        println!("release   {}", a.kernel_release);
        return Ok(0);
    }
    if args.command.is_empty() {
        bail!("no command given: xcgi lab [OPTIONS] -- COMMAND...");
    }
    let mut cmd = LabCommand::new(args.command.join(" "))
        .timeout(Duration::from_secs(args.timeout))
        .mem_mib(args.mem)
        .hugepages(args.hugepages)
        .cpus(args.cpus);
    for spec in &args.files {
        let (host, guest) = split_spec(spec)?;
        cmd = cmd.file(host, guest);
    }
    for spec in &args.bins {
        let (host, guest) = split_spec(spec)?;
        cmd = cmd.binary(host, guest);
    }
    if !args.no_self {
        let me = std::env::current_exe().context("finding the xcgi executable")?;
        cmd = cmd.binary(me, "/usr/bin/xcgi");
    }

    let lab = match Lab::prepare() {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("xcgi lab: {e}");
            return Ok(e.exit_code());
        }
    };
    let stdout = std::io::stdout();
    let result = lab.run(&cmd, |line| {
        let mut out = stdout.lock();
        // A closed stdout must not abort the run (QEMU still has to be cleaned up).
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    });
    match result {
        Ok(out) => {
            tracing::info!(
                exit_code = out.exit_code,
                boot_s = out.boot.as_secs_f64(),
                wall_s = out.wall.as_secs_f64(),
                "lab run finished"
            );
            Ok(out.exit_code)
        }
        // Bad input (options, --files) is a usage error, not a lab failure.
        Err(e @ (LabError::Invalid(_) | LabError::Payload(_))) => Err(e.into()),
        Err(e) => {
            eprintln!("xcgi lab: {e}");
            Ok(e.exit_code())
        }
    }
}
