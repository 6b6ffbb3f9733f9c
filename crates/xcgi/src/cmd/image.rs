//! `xcgi image`: build a guest root image (ext4 or initramfs) from a program or a directory.

use std::path::PathBuf;

use anyhow::Context;
use xcgi_image::rootfs::{self, ImageFormat, ImageOptions, ImageSource};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(clap::Subcommand)]
enum ImageCommand {
    /// Build a read-only ext4 root filesystem or an initramfs; prints the image path on stdout.
    ///
    /// From --program FILE, FILE becomes /init (with empty /dev, /proc, /sys, /tmp); from
    /// --dir DIR, the tree is copied as it is and should hold /init.
    Build(BuildArgs),
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum Format {
    /// Read-only ext4 filesystem (root on virtio-blk).
    Ext4,
    /// Uncompressed newc cpio archive (initrd), with /dev/console.
    Initramfs,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(true).args(["program", "dir"])))]
struct BuildArgs {
    /// A static x86-64 ELF program to run as /init.
    #[arg(long, short, value_name = "FILE")]
    program: Option<PathBuf>,
    /// A directory tree to copy into the image as its root.
    #[arg(long, short, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Image format.
    #[arg(long, short, value_enum, default_value = "ext4")]
    format: Format,
    /// Where to write the image [default: the program or directory path + .ext4 / .cpio].
    #[arg(long, short, value_name = "PATH")]
    output: Option<PathBuf>,
    /// Accept 32-bit i386 programs (boot them with a kernel from `xcgi kernel build --ia32`).
    #[arg(long)]
    ia32: bool,
    /// A CGI image for `xcgi serve`: /init is xcgi-init, --program goes to
    /// /cgi-bin/<its name> (the route's `program`), --dir (optional) is copied in first.
    #[arg(long, requires = "program")]
    cgi: bool,
    /// With --cgi: xcgi-init [default: next to this binary].
    #[arg(long, value_name = "FILE", requires = "cgi")]
    init: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.command {
        ImageCommand::Build(b) => build(b),
    }
}

fn build(args: BuildArgs) -> anyhow::Result<i32> {
    if args.cgi {
        return build_cgi(args);
    }
    let source = match (args.program, args.dir) {
        (Some(p), None) => ImageSource::Program(p),
        (None, Some(d)) => ImageSource::Dir(d),
        _ => anyhow::bail!("give exactly one of --program FILE and --dir DIR"),
    };
    let format = match args.format {
        Format::Ext4 => ImageFormat::Ext4,
        Format::Initramfs => ImageFormat::Initramfs,
    };
    let output = args
        .output
        .unwrap_or_else(|| rootfs::default_output(&source, format));
    let report = rootfs::build_image(&ImageOptions {
        source,
        format,
        output,
        ia32: args.ia32,
    })
    .context("building the image")?;
    // The library logs each warning with tracing::warn!; print them ourselves only when that
    // log level is filtered out (XCGI_LOG), so they are shown once either way.
    if !tracing::enabled!(target: "xcgi_image::rootfs", tracing::Level::WARN) {
        for w in &report.warnings {
            eprintln!("xcgi image: warning: {w}");
        }
    }
    println!("{}", report.output.display());
    Ok(0)
}

fn build_cgi(args: BuildArgs) -> anyhow::Result<i32> {
    let program = args
        .program
        .ok_or_else(|| anyhow::anyhow!("--cgi needs --program FILE"))?;
    let init = args.init.unwrap_or_else(xcgi_gateway::images::default_init);
    anyhow::ensure!(
        init.is_file(),
        "xcgi-init not found at {}: build it with `cargo build --release -p xcgi-init`, or pass --init",
        init.display()
    );
    let format = match args.format {
        Format::Ext4 => ImageFormat::Ext4,
        Format::Initramfs => ImageFormat::Initramfs,
    };
    let output = args
        .output
        .unwrap_or_else(|| rootfs::default_output(&ImageSource::Program(program.clone()), format));
    let stage = tempfile::tempdir().context("creating a staging directory")?;
    let packed = xcgi_gateway::images::pack_root(
        xcgi_gateway::config::Mode::Cgi,
        &init,
        &program,
        args.dir.as_deref(),
        &stage.path().join("root"),
        &output,
        format,
    )
    .map_err(|e| anyhow::anyhow!("building the CGI image: {e}"))?;
    for lib in &packed.libraries {
        eprintln!(
            "xcgi image: {} is dynamically linked: added {} from this host",
            program.display(),
            lib.display()
        );
    }
    eprintln!(
        "xcgi image: CGI program at {} in the image (the route's `program`)",
        packed.program.display()
    );
    println!("{}", output.display());
    Ok(0)
}
