//! One module per subcommand. Each exposes `Args` (clap) and `run(args) -> anyhow::Result<i32>`
//! where the i32 is the process exit code.

pub mod bench;
mod bench_boot;
mod bench_jail;
mod bench_restore;
pub mod image;
pub mod jail;
pub mod kernel;
pub mod lab;
pub mod run;
pub mod serve;
pub mod svg;

/// Exit code for errors in xcgi itself (bad input, missing files, setup failures).
pub const EXIT_USAGE: i32 = 2;
