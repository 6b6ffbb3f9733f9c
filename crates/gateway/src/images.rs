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
use crate::exec::{GuestRoot, VmSpec};

/// A handler that is a prebuilt image (`xcgi image build`), told by its content: a newc cpio
/// archive is an initramfs, an ext4 filesystem a read-only root disk. Anything else (an ELF
/// program, a script) is a program to pack.
pub fn image_kind(handler: &Path) -> Option<fn(PathBuf) -> GuestRoot> {
    use std::io::Read;
    let mut head = [0u8; 1082];
    let mut f = fs::File::open(handler).ok()?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    if n >= 6 && &head[..6] == b"070701" {
        return Some(GuestRoot::Initramfs);
    }
    // The ext2/3/4 superblock starts at byte 1024; its magic 0xEF53 is at offset 56.
    if n >= 1082 && head[1080..1082] == [0x53, 0xef] {
        return Some(GuestRoot::Disk);
    }
    None
}

/// A guest root [`pack_root`] wrote.
#[derive(Debug, Clone)]
pub struct Packed {
    /// The handler program's path in the guest.
    pub program: PathBuf,
    /// Its working directory in the guest.
    pub cwd: PathBuf,
    /// What a dynamically linked program needed and the tree lacked, taken from this host
    /// (guest paths): its interpreter and libraries ([`xcgi_image::deps`]).
    pub libraries: Vec<PathBuf>,
}

/// Packs a guest root for a handler program: the `tree` first, then (CGI) `/init` = xcgi-init
/// and the program at `/cgi-bin/<name>`, or (HTTP) the program as `/init`; then, for a
/// dynamically linked program, its interpreter and libraries the tree lacks (from this host;
/// one found nowhere is an error naming it). Writes `output` in `format`. `stage` is a
/// scratch directory (removed afterwards).
pub fn pack_root(
    mode: Mode,
    init: &Path,
    handler: &Path,
    tree: Option<&Path>,
    stage: &Path,
    output: &Path,
    format: ImageFormat,
) -> Result<Packed, String> {
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let _ = fs::remove_dir_all(stage);
    fs::create_dir_all(stage).map_err(|e| io("creating the staging directory", e))?;
    let result = (|| {
        if let Some(tree) = tree {
            copy_tree(tree, stage).map_err(|e| io(&format!("copying {}", tree.display()), e))?;
        }
        for d in ["dev", "proc", "tmp"] {
            fs::create_dir_all(stage.join(d)).map_err(|e| io("creating /dev, /proc, /tmp", e))?;
        }
        let (program, cwd) = match mode {
            Mode::Cgi => {
                copy_file(init, &stage.join("init")).map_err(|e| io("copying xcgi-init", e))?;
                let name = handler
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "handler".into());
                fs::create_dir_all(stage.join("cgi-bin")).map_err(|e| io("mkdir cgi-bin", e))?;
                copy_file(handler, &stage.join("cgi-bin").join(&name))
                    .map_err(|e| io("copying the handler", e))?;
                (
                    PathBuf::from("/cgi-bin").join(&name),
                    PathBuf::from("/cgi-bin"),
                )
            }
            Mode::Http => {
                copy_file(handler, &stage.join("init"))
                    .map_err(|e| io("copying the handler", e))?;
                (PathBuf::from("/init"), PathBuf::from("/"))
            }
        };
        let libraries = xcgi_image::deps::add_dynamic_deps(stage, &program.to_string_lossy())
            .map_err(|e| e.to_string())?;
        rootfs::build_image(&ImageOptions {
            source: ImageSource::Dir(stage.to_path_buf()),
            format,
            output: output.to_path_buf(),
            ia32: false,
        })
        .map_err(|e| e.to_string())?;
        Ok(Packed {
            program,
            cwd,
            libraries,
        })
    })();
    let _ = fs::remove_dir_all(stage);
    result
}

/// Why the routes could not be made ready at start.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No kernel for a route: none configured and none cached by `xcgi kernel build`.
    #[error(
        "no guest kernel: build one with `xcgi kernel build`, or set `kernel` in [server] or \
         the route (or pass --kernel)"
    )]
    NoKernel,
    /// Looking for the cached kernel failed (no cache directory, an unreadable cache).
    #[error("looking up the cached kernel: {0}")]
    KernelLookup(String),
    /// A CGI route's handler is a program to pack, and `xcgi-init` is not at this path.
    #[error(
        "xcgi-init (the guest side of CGI mode) not found at {0}: build it with \
         `cargo build --release -p xcgi-init`, or set `init` in [server] (or pass --init)"
    )]
    NoInit(PathBuf),
    /// Packing a route's guest image from its handler (and tree) failed.
    #[error("route {prefix:?}: packing the guest image: {detail}")]
    Image {
        /// The route's prefix.
        prefix: String,
        /// What failed.
        detail: String,
    },
    /// A file error for a route (not produced at present).
    #[error("route {prefix:?}: {detail}")]
    Io {
        /// The route's prefix.
        prefix: String,
        /// What failed.
        detail: String,
    },
}

/// A route ready to serve.
#[derive(Debug, Clone)]
pub struct ServedRoute {
    /// The route as configured.
    pub route: Route,
    /// How to boot its VM (VM isolation).
    pub spec: Option<VmSpec>,
    /// The handler as the guest's init sees it (CGI in a VM), or the host path (process).
    pub program: PathBuf,
    /// Its working directory.
    pub cwd: PathBuf,
    /// How its requests run: set by the server once its pools, jail and network exist.
    pub exec: Option<crate::exec::RouteExec>,
}

/// The default kernel: the one `xcgi kernel build` cached.
pub fn default_kernel() -> Result<PathBuf, ImageError> {
    let cache = xcgi_image::cache_dir().map_err(|e| ImageError::KernelLookup(e.to_string()))?;
    match xcgi_image::kernel::KernelBuild::new(cache).cached() {
        Ok(Some(a)) => Ok(a.vmlinux),
        Ok(None) => Err(ImageError::NoKernel),
        Err(e) => Err(ImageError::KernelLookup(e.to_string())),
    }
}

/// `xcgi-init` next to the running executable (both are built into the same target dir).
pub fn default_init() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("xcgi-init")))
        .unwrap_or_else(|| PathBuf::from("xcgi-init"))
}

/// Every route ready to serve: with process isolation the handler runs as it is, in its own
/// directory; with VM isolation each route gets a guest root (its prebuilt image, or one
/// packed under `workdir`) and a kernel.
pub fn build_routes(cfg: &Config, workdir: &Path) -> Result<Vec<ServedRoute>, ImageError> {
    if cfg.server.isolation == Isolation::Process {
        return Ok(cfg.routes.iter().map(process_route).collect());
    }
    let server_kernel = match &cfg.server.kernel {
        Some(k) => Some(k.clone()),
        None if cfg.routes.iter().all(|r| r.kernel.is_some()) => None,
        None => Some(default_kernel()?),
    };
    let init = cfg.server.init.clone().unwrap_or_else(default_init);
    if cfg
        .routes
        .iter()
        .any(|r| r.mode == Mode::Cgi && image_kind(&r.handler).is_none())
        && !init.is_file()
    {
        return Err(ImageError::NoInit(init));
    }
    let mut out = Vec::with_capacity(cfg.routes.len());
    for (i, r) in cfg.routes.iter().enumerate() {
        let (root, program, cwd) = guest_root(i, r, &init, workdir)?;
        let kernel = match (&r.kernel, &server_kernel) {
            (Some(k), _) | (None, Some(k)) => k.clone(),
            (None, None) => return Err(ImageError::NoKernel),
        };
        tracing::info!(
            prefix = %r.prefix,
            mode = ?r.mode,
            image = %root.path().display(),
            kernel = %kernel.display(),
            "route ready"
        );
        out.push(ServedRoute {
            route: r.clone(),
            spec: Some(VmSpec {
                kernel,
                root,
                memory_mib: r.memory_mib,
                hugepages: r.hugepages,
                vcpus: r.vcpus,
                // The server enforces the route's timeout; the VM's own deadline is a backstop.
                timeout: r.timeout() + std::time::Duration::from_secs(1),
                pool: None,
                jail: None,
                debug_dump: cfg.server.debug_dump,
                debug_probe: cfg.server.probe().map(std::sync::Arc::new),
                snapshot: None,
                working_set: r.working_set,
            }),
            program,
            cwd,
            exec: None,
        });
    }
    Ok(out)
}

/// A route run as a host process: the handler itself, in its own directory.
fn process_route(r: &Route) -> ServedRoute {
    let cwd = r
        .handler
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    ServedRoute {
        route: r.clone(),
        spec: None,
        program: r.handler.clone(),
        cwd,
        exec: None,
    }
}

/// Route `i`'s guest root, and its program and working directory in the guest: a prebuilt
/// image used as it is (CGI: its /init must be xcgi-init), or an initramfs packed from the
/// handler program as `workdir/route<i>.cpio`.
fn guest_root(
    i: usize,
    r: &Route,
    init: &Path,
    workdir: &Path,
) -> Result<(GuestRoot, PathBuf, PathBuf), ImageError> {
    if let Some(kind) = image_kind(&r.handler) {
        let program = match (r.mode, &r.program) {
            (Mode::Cgi, Some(p)) => PathBuf::from(p),
            (Mode::Cgi, None) => PathBuf::from("/cgi-bin/handler"),
            (Mode::Http, _) => PathBuf::from("/init"),
        };
        let cwd = program
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        return Ok((kind(r.handler.clone()), program, cwd));
    }
    let image = workdir.join(format!("route{i}.cpio"));
    let packed = pack_root(
        r.mode,
        init,
        &r.handler,
        r.tree.as_deref(),
        &workdir.join(format!("route{i}")),
        &image,
        ImageFormat::Initramfs,
    )
    .map_err(|detail| ImageError::Image {
        prefix: r.prefix.clone(),
        detail,
    })?;
    if !packed.libraries.is_empty() {
        tracing::info!(
            prefix = %r.prefix,
            libraries = ?packed.libraries,
            "route's handler is dynamically linked: its interpreter and libraries were packed from this host"
        );
    }
    Ok((GuestRoot::Initramfs(image), packed.program, packed.cwd))
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
