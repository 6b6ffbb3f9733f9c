//! Guest root images: a read-only ext4 filesystem (made by `mkfs.ext4 -d`, no root needed) or
//! an uncompressed newc initramfs (written by [`crate::cpio`]), from one program or a tree.
//!
//! From one program: the program becomes `/init` (mode 0755), next to empty `/dev`, `/proc`,
//! `/sys` and `/tmp`. From a directory: the tree is copied as it is. An initramfs always holds
//! `/dev/console` (character device 5,1), so the kernel can open the console without devtmpfs.
//!
//! The program (or the tree's `/init`) is checked first: it must be an x86-64 ELF executable
//! (i386 too with `ia32`), or, in a tree, a `#!` script whose interpreter the tree holds.
//! A dynamically linked program whose interpreter or libraries the image lacks is a warning.
//!
//! The output is written to a temporary file next to it and renamed into place: a failed
//! build leaves nothing behind.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::cpio::{self, CpioError, CpioWriter};
use crate::elf::{self, Arch, ElfError, ElfInfo, FileKind};

/// Errors of the image build.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `reading <path>`.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a program failed (I/O error, or larger than [`elf::MAX_PROGRAM_SIZE`]).
    #[error("{0}")]
    Elf(#[from] ElfError),
    /// Not an ELF executable: a library or object file, or no parsable ELF file at all.
    #[error("{}: {reason}; the guest runs x86-64 Linux programs (ELF executables)", .path.display())]
    NotAProgram {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        reason: String,
    },
    /// An i386 program, without [`ImageOptions::ia32`].
    #[error(
        "{} is a 32-bit i386 program: pass --ia32 to accept it, and boot a kernel built with \
         `xcgi kernel build --ia32` (the default kernel runs only 64-bit programs)",
        .0.display()
    )]
    Needs32Bit(PathBuf),
    /// An ELF file for an architecture other than x86-64 and i386.
    #[error("{}: built for {arch}; the guest is x86-64: rebuild it for x86-64 Linux", .path.display())]
    WrongArch {
        /// The file.
        path: PathBuf,
        /// The architecture it is built for.
        arch: Arch,
    },
    /// The one program of a program image is a `#!` script (the image holds no interpreter).
    #[error(
        "{} is a script for {interpreter}, which an image made from one program does not \
         contain: use --dir with a tree that holds the interpreter, or a static binary",
        .path.display()
    )]
    ScriptProgram {
        /// The script.
        path: PathBuf,
        /// The interpreter from its `#!` line.
        interpreter: String,
    },
    /// The tree's `/init` is a script whose interpreter the tree lacks.
    #[error(
        "/init in {} is a script for {interpreter}, which the tree does not contain: add the \
         interpreter (and its libraries) to the tree",
        .dir.display()
    )]
    ScriptInterpreterMissing {
        /// The tree.
        dir: PathBuf,
        /// The interpreter from the `#!` line.
        interpreter: String,
    },
    /// The tree's `/init` has no execute permission bit.
    #[error("{} is not executable: chmod +x it", .0.display())]
    NotExecutableMode(PathBuf),
    /// The program or tree does not exist.
    #[error("{} does not exist", .0.display())]
    SourceMissing(PathBuf),
    /// The tree source is not a directory.
    #[error("{} is not a directory (--dir takes a directory tree)", .0.display())]
    NotADirectory(PathBuf),
    /// The program, or the tree's `/init`, is not a regular file.
    #[error("{} is not a regular file (--program takes one executable file)", .0.display())]
    NotAFile(PathBuf),
    /// A path in the tree, or a symlink target, is not UTF-8 (initramfs only).
    #[error("{}: file name is not UTF-8; rename it (the initramfs writer takes UTF-8 names)", .0.display())]
    NonUtf8Name(PathBuf),
    /// The output's directory is inside the source tree.
    #[error(
        "the output {} is inside the source tree {}: write it elsewhere",
        .output.display(), .dir.display()
    )]
    OutputInsideSource {
        /// The output path.
        output: PathBuf,
        /// The tree.
        dir: PathBuf,
    },
    /// The output path is a directory.
    #[error("{} is a directory: give a file name for the image", .0.display())]
    OutputIsDir(PathBuf),
    /// `mkfs.ext4` could not be started.
    #[error("could not run {program}: {source}; install e2fsprogs (scripts/setup.sh)")]
    Tool {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` failed (on a lack of space, after up to 3 retries, each at double the size).
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    Mkfs {
        /// Its exit status, as text.
        status: String,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// Writing the initramfs failed.
    #[error(transparent)]
    Cpio(#[from] CpioError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// The kind of image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// A read-only ext4 root filesystem (for a virtio-blk root device).
    #[default]
    Ext4,
    /// An uncompressed newc cpio archive (for the kernel's initrd).
    Initramfs,
}

impl ImageFormat {
    /// File extension of the default output: `ext4` or `cpio`.
    pub fn extension(&self) -> &'static str {
        match self {
            ImageFormat::Ext4 => "ext4",
            ImageFormat::Initramfs => "cpio",
        }
    }
}

/// What goes into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// One program, which becomes `/init`.
    Program(PathBuf),
    /// A directory tree, copied as it is (it should hold `/init`).
    Dir(PathBuf),
}

/// An image build request.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// What goes into the image.
    pub source: ImageSource,
    /// Which kind of image to write.
    pub format: ImageFormat,
    /// Where to write the image (see [`default_output`]).
    pub output: PathBuf,
    /// Accept i386 programs (the guest kernel must be built with `--ia32`).
    pub ia32: bool,
}

/// The result of [`build_image`].
#[derive(Debug, Clone)]
pub struct ImageReport {
    /// Where the image was written.
    pub output: PathBuf,
    /// Size of the image file in bytes.
    pub size: u64,
    /// Problems that do not stop the build but may stop the guest (each also logged with
    /// `tracing::warn!`).
    pub warnings: Vec<String>,
}

/// The default output path: the program or directory path with `.ext4` / `.cpio` appended.
pub fn default_output(source: &ImageSource, format: ImageFormat) -> PathBuf {
    let p = match source {
        ImageSource::Program(p) | ImageSource::Dir(p) => p,
    };
    // Strip trailing slashes and `.` so `tree/` gives `tree.ext4`, not `tree/.ext4`.
    let mut clean = PathBuf::new();
    for c in p.components() {
        if c != Component::CurDir {
            clean.push(c);
        }
    }
    let mut s = clean.into_os_string();
    s.push(".");
    s.push(format.extension());
    PathBuf::from(s)
}

/// Checks the source, then writes the image. See the module documentation.
pub fn build_image(opts: &ImageOptions) -> Result<ImageReport, ImageError> {
    let mut warnings = Vec::new();
    if opts.output.is_dir() {
        return Err(ImageError::OutputIsDir(opts.output.clone()));
    }
    match &opts.source {
        ImageSource::Program(p) => check_program(p, opts.ia32, &mut warnings)?,
        ImageSource::Dir(d) => {
            check_tree(d, opts.ia32, opts.format, &mut warnings)?;
            check_output_outside(&opts.output, d)?;
        }
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let parent = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.",
            opts.output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
        .suffix(".tmp")
        .tempfile_in(&parent)
        .map_err(io_err(format!(
            "creating a temporary file in {}",
            parent.display()
        )))?;
    match opts.format {
        ImageFormat::Initramfs => write_initramfs(&opts.source, tmp.as_file(), &mut warnings)?,
        ImageFormat::Ext4 => write_ext4(&opts.source, tmp.path())?,
    }
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err("setting the image's permissions"))?;
    let size = tmp
        .as_file()
        .metadata()
        .map_err(io_err("reading the image size"))?
        .len();
    tmp.persist(&opts.output).map_err(|e| ImageError::Io {
        context: format!("moving the image to {}", opts.output.display()),
        source: e.error,
    })?;
    Ok(ImageReport {
        output: opts.output.clone(),
        size,
        warnings,
    })
}

/// Checks a program given with `--program`: an x86-64 (or, with `ia32`, i386) ELF executable.
/// A dynamically linked one is a warning: the image will hold only the program.
pub fn check_program(
    path: &Path,
    ia32: bool,
    warnings: &mut Vec<String>,
) -> Result<(), ImageError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::SourceMissing(path.to_path_buf()))
        }
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    if !meta.is_file() {
        return Err(ImageError::NotAFile(path.to_path_buf()));
    }
    match elf::inspect(path)? {
        FileKind::Elf(info) => {
            check_elf(path, &info, ia32)?;
            if let Some(interp) = &info.interpreter {
                warnings.push(format!(
                    "{} is dynamically linked (interpreter {interp}{}), and an image made \
                     from one program holds no libraries, so it will not start: link it \
                     statically (gcc -static; CGO_ENABLED=0 go build; RUSTFLAGS='-C \
                     target-feature=+crt-static') or use --dir with a tree holding them",
                    path.display(),
                    libs_suffix(&info.needed),
                ));
            }
            Ok(())
        }
        FileKind::Script { interpreter } => Err(ImageError::ScriptProgram {
            path: path.to_path_buf(),
            interpreter,
        }),
        FileKind::Other { reason } => Err(ImageError::NotAProgram {
            path: path.to_path_buf(),
            reason: reason_text(&reason),
        }),
    }
}

fn reason_text(reason: &str) -> String {
    format!("not an ELF executable ({reason})")
}

fn libs_suffix(needed: &[String]) -> String {
    if needed.is_empty() {
        String::new()
    } else {
        format!(", libraries {}", needed.join(", "))
    }
}

fn check_elf(path: &Path, info: &ElfInfo, ia32: bool) -> Result<(), ImageError> {
    match info.arch {
        Arch::X86_64 => {}
        Arch::I386 if ia32 => {}
        Arch::I386 => return Err(ImageError::Needs32Bit(path.to_path_buf())),
        arch => {
            return Err(ImageError::WrongArch {
                path: path.to_path_buf(),
                arch,
            })
        }
    }
    if !info.is_executable() {
        return Err(ImageError::NotAProgram {
            path: path.to_path_buf(),
            reason: format!("an ELF {:?}, not an executable", info.kind),
        });
    }
    Ok(())
}

/// Checks a tree given with `--dir`: its `/init` (if any) must be runnable; missing pieces
/// (no `/init`, no `/dev`, a dynamic `/init` without its libraries) are warnings.
pub fn check_tree(
    dir: &Path,
    ia32: bool,
    format: ImageFormat,
    warnings: &mut Vec<String>,
) -> Result<(), ImageError> {
    let meta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::SourceMissing(dir.to_path_buf()))
        }
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    if !meta.is_dir() {
        return Err(ImageError::NotADirectory(dir.to_path_buf()));
    }
    if format == ImageFormat::Ext4 && !dir.join("dev").is_dir() {
        warnings.push(format!(
            "{} has no /dev directory: the kernel cannot mount devtmpfs there, so programs \
             will find no device nodes; add an empty dev/",
            dir.display()
        ));
    }
    let Some(init) = resolve_in_root(dir, "/init") else {
        warnings.push(format!(
            "{} has no /init: the kernel will try /sbin/init, /etc/init, /bin/init and /bin/sh, \
             or the init= kernel argument; add /init to boot straight into your program",
            dir.display()
        ));
        return Ok(());
    };
    let init_meta = fs::metadata(&init).map_err(io_err(format!("reading {}", init.display())))?;
    if !init_meta.is_file() {
        return Err(ImageError::NotAFile(init));
    }
    if init_meta.mode() & 0o111 == 0 {
        return Err(ImageError::NotExecutableMode(init));
    }
    match elf::inspect(&init)? {
        FileKind::Elf(info) => {
            check_elf(&init, &info, ia32)?;
            check_dynamic_deps(dir, &init, &info, warnings);
        }
        FileKind::Script { interpreter } => {
            let Some(interp_path) = resolve_in_root(dir, &interpreter) else {
                return Err(ImageError::ScriptInterpreterMissing {
                    dir: dir.to_path_buf(),
                    interpreter,
                });
            };
            if let FileKind::Elf(info) = elf::inspect(&interp_path)? {
                check_elf(&interp_path, &info, ia32)?;
                check_dynamic_deps(dir, &interp_path, &info, warnings);
            }
        }
        FileKind::Other { reason } => {
            return Err(ImageError::NotAProgram {
                path: init,
                reason: reason_text(&reason),
            })
        }
    }
    Ok(())
}

/// Warns when a dynamic program's interpreter or libraries (searched, transitively, in the
/// standard library directories of the tree) are missing.
fn check_dynamic_deps(root: &Path, prog: &Path, info: &ElfInfo, warnings: &mut Vec<String>) {
    let Some(interp) = &info.interpreter else {
        return;
    };
    let shown = prog
        .strip_prefix(root)
        .unwrap_or(prog)
        .display()
        .to_string();
    if resolve_in_root(root, interp).is_none() {
        warnings.push(format!(
            "/{shown} is dynamically linked but the tree has no {interp} (its interpreter): \
             it will not start; copy the interpreter and libraries into the tree or link it \
             statically",
        ));
    }
    let dirs: &[&str] = match info.arch {
        Arch::I386 => &[
            "/lib/i386-linux-gnu",
            "/usr/lib/i386-linux-gnu",
            "/lib32",
            "/usr/lib32",
            "/lib",
            "/usr/lib",
        ],
        _ => crate::deps::LIBRARY_DIRS,
    };
    let mut missing = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut queue: VecDeque<String> = info.needed.iter().cloned().collect();
    while let Some(lib) = queue.pop_front() {
        if !seen.insert(lib.clone()) {
            continue;
        }
        let found = if lib.contains('/') {
            resolve_in_root(root, &lib)
        } else {
            dirs.iter()
                .find_map(|d| resolve_in_root(root, &format!("{d}/{lib}")))
        };
        match found {
            Some(path) => {
                if let Ok(FileKind::Elf(l)) = elf::inspect(&path) {
                    queue.extend(l.needed);
                }
            }
            None => missing.push(lib),
        }
    }
    if !missing.is_empty() {
        warnings.push(format!(
            "/{shown} needs libraries the tree does not hold in {}: {}; it will not start \
             unless they are found elsewhere (RUNPATH)",
            dirs.join(", "),
            missing.join(", ")
        ));
    }
}

/// Resolves `path` as the guest would see it inside `root`, following symlinks (absolute ones
/// relative to `root`), never leaving `root`. `None` if it does not exist.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: VecDeque<String> = path.split('/').map(str::to_string).collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = todo.pop_front() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let candidate = cur.join(&part);
        let meta = fs::symlink_metadata(root.join(&candidate)).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = fs::read_link(root.join(&candidate)).ok()?;
            let target = target.to_str()?.to_string();
            if target.starts_with('/') {
                cur = PathBuf::new();
            }
            for (i, p) in target.split('/').enumerate() {
                todo.insert(i, p.to_string());
            }
        } else {
            if !todo.iter().all(|p| p.is_empty()) && !meta.is_dir() {
                return None;
            }
            cur = candidate;
        }
    }
    Some(root.join(cur))
}

fn check_output_outside(output: &Path, dir: &Path) -> Result<(), ImageError> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let (Ok(p), Ok(d)) = (fs::canonicalize(parent), fs::canonicalize(dir)) {
        if p.starts_with(&d) {
            return Err(ImageError::OutputInsideSource {
                output: output.to_path_buf(),
                dir: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// The directories an image made from one program holds, with their modes.
const PROGRAM_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
];

fn write_initramfs(
    source: &ImageSource,
    out: &File,
    warnings: &mut Vec<String>,
) -> Result<(), ImageError> {
    let mut w = CpioWriter::new(io::BufWriter::new(out));
    match source {
        ImageSource::Program(p) => {
            for (d, mode) in PROGRAM_DIRS {
                w.add_dir(d, *mode)?;
            }
            w.add_char_dev("dev/console", 0o600, 5, 1)?;
            let mut f = File::open(p).map_err(io_err(format!("reading {}", p.display())))?;
            let len = f
                .metadata()
                .map_err(io_err(format!("reading {}", p.display())))?
                .len();
            w.add_file_from("init", 0o755, len, &mut f)?;
        }
        ImageSource::Dir(d) => {
            add_tree(&mut w, d, Path::new(""), warnings)?;
            if !w.contains("dev") {
                w.add_dir("dev", 0o755)?;
            }
            if !w.contains("dev/console") {
                if d.join("dev").is_dir() || !d.join("dev").exists() {
                    w.add_char_dev("dev/console", 0o600, 5, 1)?;
                } else {
                    warnings.push(format!(
                        "{}/dev is not a directory: no /dev/console in the initramfs",
                        d.display()
                    ));
                }
            }
        }
    }
    w.finish()?.into_inner().map_err(|e| ImageError::Io {
        context: "writing the initramfs".into(),
        source: e.into_error(),
    })?;
    Ok(())
}

/// Adds the contents of `root/rel` (sorted, directories before their contents).
fn add_tree<W: io::Write>(
    w: &mut CpioWriter<W>,
    root: &Path,
    rel: &Path,
    warnings: &mut Vec<String>,
) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .collect::<Result<_, _>>()
        .map_err(io_err(format!("reading {}", dir.display())))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let rel_path = rel.join(entry.file_name());
        let full = root.join(&rel_path);
        let name = rel_path
            .to_str()
            .ok_or_else(|| ImageError::NonUtf8Name(full.clone()))?
            .to_string();
        let meta =
            fs::symlink_metadata(&full).map_err(io_err(format!("reading {}", full.display())))?;
        let perm = meta.mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            w.add_dir(&name, perm)?;
            add_tree(w, root, &rel_path, warnings)?;
        } else if ft.is_file() {
            let mut f = File::open(&full).map_err(io_err(format!("reading {}", full.display())))?;
            w.add_file_from(&name, perm, meta.len(), &mut f)?;
        } else if ft.is_symlink() {
            let target =
                fs::read_link(&full).map_err(io_err(format!("reading {}", full.display())))?;
            let target = target
                .to_str()
                .ok_or_else(|| ImageError::NonUtf8Name(full.clone()))?;
            w.add_symlink(&name, target)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_char_device() {
                cpio::S_IFCHR
            } else if ft.is_block_device() {
                cpio::S_IFBLK
            } else {
                cpio::S_IFIFO
            };
            let rdev = meta.rdev();
            w.add_special(&name, kind | perm, libc::major(rdev), libc::minor(rdev))?;
        } else {
            warnings.push(format!("{}: skipped (a socket)", full.display()));
        }
    }
    Ok(())
}

/// Entries and bytes a tree needs in ext4 (4 KiB blocks).
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    entries: u64,
    bytes: u64,
}

fn tree_usage(dir: &Path) -> Result<Usage, ImageError> {
    let mut u = Usage {
        entries: 1,
        bytes: 4096,
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(io_err(format!("reading {}", d.display())))? {
            let entry = entry.map_err(io_err(format!("reading {}", d.display())))?;
            let meta = fs::symlink_metadata(entry.path())
                .map_err(io_err(format!("reading {}", entry.path().display())))?;
            u.entries += 1;
            if meta.is_dir() {
                u.bytes += 4096;
                stack.push(entry.path());
            } else if meta.is_file() || meta.file_type().is_symlink() {
                u.bytes += meta.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok(u)
}

/// Size of the filesystem for content of `u`: content plus a quarter, plus room for metadata
/// (inode tables, bitmaps, directories), at least 4 MiB, rounded up to a MiB.
fn ext4_size(u: Usage) -> u64 {
    const MIB: u64 = 1 << 20;
    let raw = u.bytes + u.bytes / 4 + u.entries * 512 + 2 * MIB;
    raw.max(4 * MIB).div_ceil(MIB) * MIB
}

fn write_ext4(source: &ImageSource, out: &Path) -> Result<(), ImageError> {
    // For one program, stage a tree; a directory goes to mkfs.ext4 as it is.
    let staging;
    let tree: &Path = match source {
        ImageSource::Dir(d) => d,
        ImageSource::Program(p) => {
            staging = tempfile::Builder::new()
                .prefix("xcgi-image-")
                .tempdir()
                .map_err(io_err("creating a staging directory"))?;
            let root = staging.path();
            fs::set_permissions(root, fs::Permissions::from_mode(0o755))
                .map_err(io_err("setting staging permissions"))?;
            for (d, mode) in PROGRAM_DIRS {
                let path = root.join(d);
                fs::create_dir(&path).map_err(io_err(format!("creating {}", path.display())))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(io_err(format!("setting permissions of {}", path.display())))?;
            }
            let init = root.join("init");
            fs::copy(p, &init).map_err(io_err(format!("copying {}", p.display())))?;
            fs::set_permissions(&init, fs::Permissions::from_mode(0o755))
                .map_err(io_err("setting /init's permissions"))?;
            staging.path()
        }
    };
    let usage = tree_usage(tree)?;
    let mut size = ext4_size(usage);
    let inodes = (usage.entries + 64).max(128);
    for attempt in 0..4 {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(io_err(format!("opening {}", out.display())))?;
        f.set_len(0)
            .and_then(|_| f.set_len(size))
            .map_err(io_err(format!("sizing {}", out.display())))?;
        drop(f);
        let result = Command::new("mkfs.ext4")
            .args(["-F", "-q", "-b", "4096", "-m", "0", "-L", "xcgi-root"])
            .arg("-N")
            .arg(inodes.to_string())
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-E", "root_owner=0:0,nodiscard"])
            .arg("-d")
            .arg(tree)
            .arg(out)
            .env("MKE2FS_CONFIG", "/etc/mke2fs.conf")
            .output()
            .map_err(|source| ImageError::Tool {
                program: "mkfs.ext4".into(),
                source,
            })?;
        if result.status.success() {
            tracing::debug!(size, attempt, "ext4 image made");
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&result.stderr).trim().to_string();
        let out_of_space = ["space", "allocate", "inode"]
            .iter()
            .any(|w| stderr.to_lowercase().contains(w));
        if !out_of_space || attempt == 3 {
            return Err(ImageError::Mkfs {
                status: result.status.to_string(),
                stderr,
            });
        }
        tracing::debug!(size, "ext4 image too small, retrying with twice the size");
        size *= 2;
    }
    unreachable!("the loop returns on its last attempt")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn static_prog(dir: &Path) -> PathBuf {
        let c = dir.join("p.c");
        fs::write(&c, "int main(void){return 4;}\n").unwrap();
        let out = dir.join("prog");
        let st = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&out)
            .arg(&c)
            .status()
            .expect("gcc is needed (scripts/setup.sh)");
        assert!(st.success());
        out
    }

    fn debugfs(img: &Path, req: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(req)
            .arg(img)
            .output()
            .expect("debugfs (e2fsprogs) is needed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn only_file(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn ext4_from_program_has_init_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let prog = static_prog(dir.path());
        let out = dir.path().join("img.ext4");
        let rep = build_image(&ImageOptions {
            source: ImageSource::Program(prog.clone()),
            format: ImageFormat::Ext4,
            output: out.clone(),
            ia32: false,
        })
        .unwrap();
        assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
        assert_eq!(rep.size, fs::metadata(&out).unwrap().len());
        let ls = debugfs(&out, "ls -l /");
        for name in ["init", "dev", "proc", "sys", "tmp"] {
            assert!(
                ls.lines()
                    .any(|l| l.split_whitespace().last() == Some(name)),
                "{name} missing:\n{ls}"
            );
        }
        let init_line = ls.lines().find(|l| l.ends_with(" init")).unwrap();
        assert!(init_line.contains("100755"), "{init_line}");
        assert!(init_line.contains(&fs::metadata(&prog).unwrap().len().to_string()));
        let tmp_line = ls.lines().find(|l| l.ends_with(" tmp")).unwrap();
        assert!(tmp_line.contains("41777"), "{tmp_line}");
        // Read-only image: no journal.
        let stats = debugfs(&out, "stats");
        assert!(!stats.contains("has_journal"), "{stats}");
        // The program comes back byte for byte.
        let dumped = dir.path().join("dumped");
        debugfs(&out, &format!("dump /init {}", dumped.display()));
        assert_eq!(fs::read(&dumped).unwrap(), fs::read(&prog).unwrap());
        // Nothing else left next to the output.
        assert_eq!(only_file(dir.path()), ["dumped", "img.ext4", "p.c", "prog"]);
    }

    #[test]
    fn initramfs_from_program_has_console_and_init() {
        let dir = tempfile::tempdir().unwrap();
        let prog = static_prog(dir.path());
        let out = dir.path().join("img.cpio");
        build_image(&ImageOptions {
            source: ImageSource::Program(prog.clone()),
            format: ImageFormat::Initramfs,
            output: out.clone(),
            ia32: false,
        })
        .unwrap();
        let list = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(list.status.success());
        let list = String::from_utf8(list.stdout).unwrap();
        let console = list.lines().find(|l| l.ends_with(" dev/console")).unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(console.contains("5,"), "{console}");
        let init = list.lines().find(|l| l.ends_with(" init")).unwrap();
        assert!(init.starts_with("-rwxr-xr-x"), "{init}");
        let size = fs::metadata(&prog).unwrap().len().to_string();
        assert!(init.contains(&size), "{init}");
    }

    #[test]
    fn dynamic_program_warns() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("true.ext4");
        let rep = build_image(&ImageOptions {
            source: ImageSource::Program("/bin/true".into()),
            format: ImageFormat::Ext4,
            output: out.clone(),
            ia32: false,
        })
        .unwrap();
        assert_eq!(rep.warnings.len(), 1, "{:?}", rep.warnings);
        assert!(rep.warnings[0].contains("dynamically linked"));
        assert!(rep.warnings[0].contains("libc.so.6"));
        assert!(rep.warnings[0].contains("statically"));
        assert!(out.is_file());
    }

    #[test]
    fn refusals_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        fs::write(&text, "hello\n").unwrap();
        let script = dir.path().join("s.sh");
        fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let mut m32 = fs::read("/bin/true").unwrap();
        m32.truncate(64);
        // Minimal ELF32 i386 executable header.
        let mut h = vec![0u8; 52];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1;
        h[5] = 1;
        h[6] = 1;
        h[16..18].copy_from_slice(&2u16.to_le_bytes());
        h[18..20].copy_from_slice(&3u16.to_le_bytes());
        let i386 = dir.path().join("i386");
        fs::write(&i386, &h).unwrap();
        let trunc = dir.path().join("trunc");
        fs::write(&trunc, &m32).unwrap();
        let before = only_file(dir.path());

        let build = |p: &Path, ia32: bool| {
            build_image(&ImageOptions {
                source: ImageSource::Program(p.to_path_buf()),
                format: ImageFormat::Ext4,
                output: dir.path().join("out.ext4"),
                ia32,
            })
        };
        let e = build(&text, false).unwrap_err();
        assert!(matches!(e, ImageError::NotAProgram { .. }), "{e}");
        assert!(e.to_string().contains("not an ELF executable"), "{e}");
        let e = build(&script, false).unwrap_err();
        assert!(matches!(e, ImageError::ScriptProgram { .. }), "{e}");
        assert!(e.to_string().contains("--dir"), "{e}");
        let e = build(&i386, false).unwrap_err();
        assert!(matches!(e, ImageError::Needs32Bit(_)), "{e}");
        assert!(e.to_string().contains("xcgi kernel build --ia32"), "{e}");
        let e = build(&trunc, false).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = build(&dir.path().join("missing"), false).unwrap_err();
        assert!(matches!(e, ImageError::SourceMissing(_)), "{e}");
        let e = build(dir.path(), false).unwrap_err();
        assert!(matches!(e, ImageError::NotAFile(_)), "{e}");
        assert_eq!(only_file(dir.path()), before);

        // With --ia32 the i386 header passes the check (and the image is written).
        build(&i386, true).unwrap();
    }

    #[test]
    fn dir_image_checks_init() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::create_dir(tree.join("dev")).unwrap();
        let opts = |format| ImageOptions {
            source: ImageSource::Dir(tree.clone()),
            format,
            output: dir.path().join("t.img"),
            ia32: false,
        };

        // No /init: a warning.
        let rep = build_image(&opts(ImageFormat::Ext4)).unwrap();
        assert!(
            rep.warnings.iter().any(|w| w.contains("no /init")),
            "{:?}",
            rep.warnings
        );

        // A script whose interpreter is missing: refused.
        fs::write(tree.join("init"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(tree.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        let e = build_image(&opts(ImageFormat::Ext4)).unwrap_err();
        assert!(
            matches!(e, ImageError::ScriptInterpreterMissing { .. }),
            "{e}"
        );

        // With the interpreter (a static program, via an absolute symlink): fine.
        let prog = static_prog(dir.path());
        fs::copy(&prog, tree.join("bin/busybox")).unwrap();
        symlink("/bin/busybox", tree.join("bin/sh")).unwrap();
        let rep = build_image(&opts(ImageFormat::Ext4)).unwrap();
        assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
        let ls = debugfs(&dir.path().join("t.img"), "ls -l /bin");
        assert!(ls.contains("busybox") && ls.contains(" sh"), "{ls}");

        // Not executable: refused.
        fs::set_permissions(tree.join("init"), fs::Permissions::from_mode(0o644)).unwrap();
        let e = build_image(&opts(ImageFormat::Ext4)).unwrap_err();
        assert!(matches!(e, ImageError::NotExecutableMode(_)), "{e}");

        // A dynamic /init without its libraries: warned, naming them.
        fs::remove_file(tree.join("init")).unwrap();
        fs::copy("/bin/true", tree.join("init")).unwrap();
        let rep = build_image(&opts(ImageFormat::Initramfs)).unwrap();
        let all = rep.warnings.join("\n");
        assert!(all.contains("ld-linux-x86-64.so.2"), "{all}");
        assert!(all.contains("libc.so.6"), "{all}");

        // Output inside the tree: refused.
        let mut inside = opts(ImageFormat::Ext4);
        inside.output = tree.join("img.ext4");
        let e = build_image(&inside).unwrap_err();
        assert!(matches!(e, ImageError::OutputInsideSource { .. }), "{e}");
        assert!(!tree.join("img.ext4").exists());
    }

    #[test]
    fn dir_initramfs_copies_the_tree_and_adds_console() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("etc/sub")).unwrap();
        let prog = static_prog(dir.path());
        fs::copy(&prog, tree.join("init")).unwrap();
        fs::write(tree.join("etc/sub/conf"), "x=1\n").unwrap();
        symlink("sub/conf", tree.join("etc/link")).unwrap();
        let out = dir.path().join("t.cpio");
        build_image(&ImageOptions {
            source: ImageSource::Dir(tree),
            format: ImageFormat::Initramfs,
            output: out.clone(),
            ia32: false,
        })
        .unwrap();
        let x = dir.path().join("x");
        fs::create_dir(&x).unwrap();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cpio -i -d --quiet --no-absolute-filenames < {} 2>/dev/null; cpio -t --quiet < {}",
                out.display(),
                out.display()
            ))
            .current_dir(&x)
            .output()
            .unwrap();
        let list = String::from_utf8(st.stdout).unwrap();
        let names: Vec<&str> = list.lines().collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/link",
                "etc/sub",
                "etc/sub/conf",
                "init",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(fs::read_to_string(x.join("etc/sub/conf")).unwrap(), "x=1\n");
        assert_eq!(
            fs::read_link(x.join("etc/link")).unwrap(),
            Path::new("sub/conf")
        );
        assert_eq!(fs::read(x.join("init")).unwrap(), fs::read(&prog).unwrap());
    }

    #[test]
    fn resolve_follows_symlinks_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("lib/x86_64-linux-gnu")).unwrap();
        fs::write(r.join("lib/x86_64-linux-gnu/ld.so"), "").unwrap();
        fs::create_dir(r.join("lib64")).unwrap();
        symlink("/lib/x86_64-linux-gnu/ld.so", r.join("lib64/ld.so")).unwrap();
        symlink("../../../../etc/passwd", r.join("escape")).unwrap();
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/lib64/ld.so"),
            Some(r.join("lib/x86_64-linux-gnu/ld.so"))
        );
        assert_eq!(
            resolve_in_root(r, "/escape"),
            None,
            "must not reach the host /etc"
        );
        assert_eq!(resolve_in_root(r, "/loop"), None);
        assert_eq!(resolve_in_root(r, "/lib64/ld.so/x"), None);
    }

    #[test]
    fn default_output_appends_the_extension() {
        assert_eq!(
            default_output(&ImageSource::Program("a/hello".into()), ImageFormat::Ext4),
            PathBuf::from("a/hello.ext4")
        );
        assert_eq!(
            default_output(&ImageSource::Dir("a/tree/".into()), ImageFormat::Initramfs),
            PathBuf::from("a/tree.cpio")
        );
    }

    #[test]
    fn size_estimate_has_headroom() {
        let u = Usage {
            entries: 10,
            bytes: 100 << 20,
        };
        let s = ext4_size(u);
        assert!(s >= 125 << 20 && s.is_multiple_of(1 << 20), "{s}");
        assert_eq!(ext4_size(Usage::default()), 4 << 20);
    }
}
