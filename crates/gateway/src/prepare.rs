//! Work done once per route at start, never on the request path: find the kernel and
//! `xcgi-init`, and pack each route's guest root (initramfs) from its handler and tree.
//!
//! CGI mode: `/init` is `xcgi-init`, the handler is `/cgi-bin/<its file name>`.
//! HTTP mode: the handler itself is `/init` (as in `xcgi run`).
//! Either way the route's `tree`, if any, is copied in first (a busybox for shell scripts,
//! data files).

use std::fs;
use std::path::{Path, PathBuf};

use xcgi_image::rootfs::{self, ImageFormat, ImageOptions, ImageSource};

use crate::config::{Config, Isolation, Mode, Route};
use crate::exec::VmSpec;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "no guest kernel: build one with `xcgi kernel build`, or set `kernel` in [server] or \
         the route (or pass --kernel)"
    )]
    NoKernel,
    #[error("looking up the cached kernel: {0}")]
    KernelLookup(String),
    #[error(
        "xcgi-init (the guest side of CGI mode) not found at {0}: build it with \
         `cargo build --release -p xcgi-init`, or set `init` in [server] (or pass --init)"
    )]
    NoInit(PathBuf),
    #[error("route {prefix:?}: packing the guest image: {detail}")]
    Image { prefix: String, detail: String },
    #[error("route {prefix:?}: {detail}")]
    Io { prefix: String, detail: String },
}

/// A route ready to serve.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub route: Route,
    /// How to boot its VM (VM isolation).
    pub spec: Option<VmSpec>,
    /// The handler as the guest's init sees it (CGI in a VM), or the host path (process).
    pub program: PathBuf,
    /// Its working directory.
    pub cwd: PathBuf,
}

/// The default kernel: the one `xcgi kernel build` cached.
pub fn default_kernel() -> Result<PathBuf, PrepareError> {
    let cache = xcgi_image::cache_dir().map_err(|e| PrepareError::KernelLookup(e.to_string()))?;
    match xcgi_image::kernel::KernelBuild::new(cache).cached() {
        Ok(Some(a)) => Ok(a.vmlinux),
        Ok(None) => Err(PrepareError::NoKernel),
        Err(e) => Err(PrepareError::KernelLookup(e.to_string())),
    }
}

/// `xcgi-init` next to the running executable (both are built into the same target dir).
pub fn default_init() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("xcgi-init")))
        .unwrap_or_else(|| PathBuf::from("xcgi-init"))
}

pub fn prepare(cfg: &Config, workdir: &Path) -> Result<Vec<Prepared>, PrepareError> {
    let mut out = Vec::with_capacity(cfg.routes.len());
    if cfg.server.isolation == Isolation::Process {
        for r in &cfg.routes {
            let cwd = r
                .handler
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/"));
            out.push(Prepared {
                route: r.clone(),
                spec: None,
                program: r.handler.clone(),
                cwd,
            });
        }
        return Ok(out);
    }
    let server_kernel = match &cfg.server.kernel {
        Some(k) => Some(k.clone()),
        None if cfg.routes.iter().all(|r| r.kernel.is_some()) => None,
        None => Some(default_kernel()?),
    };
    let init = cfg.server.init.clone().unwrap_or_else(default_init);
    if cfg.routes.iter().any(|r| r.mode == Mode::Cgi) && !init.is_file() {
        return Err(PrepareError::NoInit(init));
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        let io = |what: &str, e: std::io::Error| PrepareError::Io {
            prefix: r.prefix.clone(),
            detail: format!("{what}: {e}"),
        };
        let stage = workdir.join(format!("route{i}"));
        fs::create_dir_all(&stage).map_err(|e| io("creating the staging directory", e))?;
        if let Some(tree) = &r.tree {
            copy_tree(tree, &stage).map_err(|e| io(&format!("copying {}", tree.display()), e))?;
        }
        for d in ["dev", "proc", "tmp"] {
            fs::create_dir_all(stage.join(d)).map_err(|e| io("creating /dev, /proc, /tmp", e))?;
        }
        let (program, cwd) = match r.mode {
            Mode::Cgi => {
                copy_file(&init, &stage.join("init")).map_err(|e| io("copying xcgi-init", e))?;
                let name = r
                    .handler
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "handler".into());
                fs::create_dir_all(stage.join("cgi-bin")).map_err(|e| io("mkdir cgi-bin", e))?;
                copy_file(&r.handler, &stage.join("cgi-bin").join(&name))
                    .map_err(|e| io("copying the handler", e))?;
                (
                    PathBuf::from("/cgi-bin").join(&name),
                    PathBuf::from("/cgi-bin"),
                )
            }
            Mode::Http => {
                copy_file(&r.handler, &stage.join("init"))
                    .map_err(|e| io("copying the handler", e))?;
                (PathBuf::from("/init"), PathBuf::from("/"))
            }
        };
        let image = workdir.join(format!("route{i}.cpio"));
        rootfs::build_image(&ImageOptions {
            source: ImageSource::Dir(stage.clone()),
            format: ImageFormat::Initramfs,
            output: image.clone(),
            ia32: false,
        })
        .map_err(|e| PrepareError::Image {
            prefix: r.prefix.clone(),
            detail: e.to_string(),
        })?;
        let _ = fs::remove_dir_all(&stage);
        let kernel = match (&r.kernel, &server_kernel) {
            (Some(k), _) | (None, Some(k)) => k.clone(),
            (None, None) => return Err(PrepareError::NoKernel),
        };
        tracing::info!(
            prefix = %r.prefix,
            mode = ?r.mode,
            image = %image.display(),
            kernel = %kernel.display(),
            "route ready"
        );
        out.push(Prepared {
            route: r.clone(),
            spec: Some(VmSpec {
                kernel,
                initramfs: image,
                memory_mib: r.memory_mib,
                hugepages: r.hugepages,
                vcpus: r.vcpus,
                // The server enforces the route's timeout; the VM's own deadline is a backstop.
                timeout: r.timeout() + std::time::Duration::from_secs(1),
            }),
            program,
            cwd,
        });
    }
    Ok(out)
}

fn copy_file(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::copy(from, to)?;
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(from)?.permissions().mode() | 0o555;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
}

/// Copies a directory tree: files, directories, symlinks (as links).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if ty.is_dir() {
            fs::create_dir_all(&dest)?;
            copy_tree(&entry.path(), &dest)?;
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &dest)?;
        } else if ty.is_file() {
            fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}
