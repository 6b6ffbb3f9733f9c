//! `xcgi kernel`: build (or find in the cache) the minimal guest kernel.

use std::path::PathBuf;

use anyhow::Context;
use xcgi_image::kernel::{self, BuildOutput, KernelBuild, KernelSource, Variant};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: KernelCommand,
}

#[derive(clap::Subcommand)]
enum KernelCommand {
    /// Build the guest vmlinux (or find it in the cache) and print its path on stdout.
    ///
    /// Source: Debian's linux-source tarball, tinyconfig + the embedded kernel/config.fragment
    /// and kernel/patches. Cached in $XCGI_CACHE_DIR (default ~/.cache/xcgi)/kernels/<hash>/.
    Build(BuildArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    /// An unpacked kernel source tree to use instead of the tarball (it is copied, not
    /// modified).
    #[arg(long, value_name = "DIR", conflicts_with = "tarball")]
    source: Option<PathBuf>,
    /// The kernel source tarball.
    #[arg(long, value_name = "FILE", default_value = kernel::DEFAULT_SOURCE_TARBALL)]
    tarball: PathBuf,
    /// Build with CONFIG_SMP=y (guests with more than one vCPU).
    #[arg(long)]
    smp: bool,
    /// Build with IA32 emulation (CONFIG_IA32_EMULATION, CONFIG_COMPAT_32BIT_TIME) to run
    /// i386 programs.
    #[arg(long)]
    ia32: bool,
    /// Without kernel/patches (to measure what they save; cached separately).
    #[arg(long)]
    no_patches: bool,
    /// Parallel make jobs (default: number of CPUs).
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    jobs: Option<u16>,
    /// Print the config fragment this build applies (fragment + variant) and exit.
    #[arg(long)]
    print_fragment: bool,
    /// Only look in the cache: print the path if the kernel is there, else exit with 1.
    #[arg(long)]
    cached_only: bool,
    /// Send make's output to a log instead of stderr (shown only if a step fails).
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    match args.command {
        KernelCommand::Build(b) => build(b),
    }
}

fn build(args: BuildArgs) -> anyhow::Result<i32> {
    let variant = Variant {
        smp: args.smp,
        ia32: args.ia32,
        unpatched: args.no_patches,
    };
    if args.print_fragment {
        print!("{}", kernel::fragment_text(variant));
        return Ok(0);
    }
    let cache = xcgi_image::cache_dir()?;
    let mut build = KernelBuild::new(cache);
    build.variant = variant;
    build.source = match args.source {
        Some(dir) => KernelSource::Dir(dir),
        None => KernelSource::Tarball(args.tarball),
    };
    build.jobs = args.jobs.map(usize::from);
    build.output = if args.quiet {
        BuildOutput::Quiet
    } else {
        BuildOutput::Stderr
    };
    if args.cached_only {
        return match build.cached()? {
            Some(art) => {
                println!("{}", art.vmlinux.display());
                Ok(0)
            }
            None => {
                eprintln!(
                    "xcgi kernel: the {} kernel is not built yet; run `xcgi kernel build{}{}{}`",
                    variant.name(),
                    if variant.smp { " --smp" } else { "" },
                    if variant.ia32 { " --ia32" } else { "" },
                    if variant.unpatched {
                        " --no-patches"
                    } else {
                        ""
                    },
                );
                Ok(1)
            }
        };
    }
    let art = build.build().context("building the guest kernel")?;
    if art.built {
        eprintln!("xcgi kernel: built {}", art.vmlinux.display());
    }
    println!("{}", art.vmlinux.display());
    Ok(0)
}
