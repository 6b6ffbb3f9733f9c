//! Builds (or finds in the cache) the default guest kernel without the xcgi CLI:
//! `cargo run -p xcgi-image --example kernel-build [-- --smp] [--ia32]`. Prints the vmlinux path.

use xcgi_image::kernel::{KernelBuild, Variant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let variant = Variant {
        smp: args.iter().any(|a| a == "--smp"),
        ia32: args.iter().any(|a| a == "--ia32"),
    };
    let result = xcgi_image::cache_dir()
        .map_err(|e| e.to_string())
        .and_then(|cache| {
            let mut build = KernelBuild::new(cache);
            build.variant = variant;
            build.build().map_err(|e| e.to_string())
        });
    match result {
        Ok(art) => println!("{}", art.vmlinux.display()),
        Err(e) => {
            eprintln!("kernel-build: error: {e}");
            std::process::exit(1);
        }
    }
}
