//! The minimal guest kernel: built from Debian's `linux-source` tarball (or an unpacked tree),
//! the repository's config fragment and patches, and cached by a hash of all of them.
//!
//! Steps of a build (see [`KernelBuild::build`]): unpack the source into a private work
//! directory under the cache, apply [`PATCHES`] in order with `patch -p1`, `make tinyconfig`,
//! merge [`CONFIG_FRAGMENT`] (plus the [`Variant`]'s options) with
//! `scripts/kconfig/merge_config.sh -m` and `make olddefconfig`, check that every requested
//! option kept its value ([`verify_config`]), then `make vmlinux`. The result lands atomically
//! (one `rename`) in `<cache>/kernels/<key>/` as `vmlinux`, `config` (the final `.config`) and
//! `fragment` (what was requested). The work tree (about 1 GB) is deleted afterwards.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use sha2::{Digest, Sha256};

/// The config fragment applied on top of `make tinyconfig` (`kernel/config.fragment`).
pub const CONFIG_FRAGMENT: &str = include_str!("../../../kernel/config.fragment");

/// The kernel patches, in the order they are applied: (file name, contents).
/// Keep in step with `kernel/patches/` (a unit test checks).
pub const PATCHES: &[(&str, &str)] = &[(
    "0001-ipconfig-no-post-open-sleep.patch",
    include_str!("../../../kernel/patches/0001-ipconfig-no-post-open-sleep.patch"),
)];

/// Where `scripts/setup.sh` (package `linux-source-6.12`) installs the kernel source.
pub const DEFAULT_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

/// Part of the cache key: bump when the build steps change in a way that changes the output.
const RECIPE: &str = "xcgi-kernel-recipe-1";

/// Hex digits of the sha256 used as the cache directory name.
const KEY_LEN: usize = 24;

/// Errors of the kernel build.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `creating cache directory <path>`.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The source tarball does not exist.
    #[error(
        "kernel source tarball {0} not found: install it with scripts/setup.sh \
         (apt-get install linux-source-6.12) or pass --source DIR with an unpacked tree"
    )]
    SourceMissing(PathBuf),
    /// The directory has no top `Makefile` with `VERSION`, `PATCHLEVEL` and `SUBLEVEL`.
    #[error(
        "{0} is not a Linux source tree (no Makefile with VERSION/PATCHLEVEL/SUBLEVEL); \
         pass the top directory of an unpacked kernel source"
    )]
    NotAKernelTree(PathBuf),
    /// Build tools that are not executable files in any `PATH` directory.
    #[error("missing build tools: {}; run scripts/setup.sh to install them", .0.join(", "))]
    MissingTools(Vec<String>),
    /// A config fragment line does not parse, or sets an option already set.
    #[error("config fragment line {line}: {message}")]
    Fragment {
        /// The line number (from 1).
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A patch does not apply to the source.
    #[error(
        "kernel patch {name} does not apply to the source; fix or refresh it in kernel/patches/:\n{output}"
    )]
    PatchFailed {
        /// The patch's file name.
        name: String,
        /// What `patch` printed (stdout, then stderr).
        output: String,
    },
    /// A build tool could not be started.
    #[error("could not run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A build step exited unsuccessfully.
    #[error("kernel build step `{step}` failed ({status}){}", tail_suffix(.log_tail))]
    StepFailed {
        /// The step, e.g. `make vmlinux`.
        step: String,
        /// Its exit status.
        status: ExitStatus,
        /// With [`BuildOutput::Quiet`], the last 40 lines of the build log; else empty.
        log_tail: String,
    },
    /// Requested options that the final `.config` does not have (see [`verify_config`]).
    #[error(
        "{} option(s) requested by the kernel config did not take (an unmet dependency, or \
         another option overrides them): {}. Add the missing dependencies to \
         kernel/config.fragment (scripts/kconfig shows them: `make menuconfig`, then `/` and \
         the option name)",
        .0.len(),
        .0.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("; ")
    )]
    OptionsNotApplied(Vec<ConfigMismatch>),
    /// `make` succeeded but there is no `vmlinux` at this path.
    #[error(
        "make finished but {0} is missing; the build tree is broken, rerun `xcgi kernel build`"
    )]
    NoVmlinux(PathBuf),
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last lines of its output:\n{tail}")
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// One `CONFIG_X=value` request. `value` is as written in a .config: `y`, `m`, `n` (also
/// written `# CONFIG_X is not set`), a number, or a quoted string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOption {
    /// The option name, `CONFIG_` included (e.g. `CONFIG_SMP`).
    pub name: String,
    /// The value, as written after `=`.
    pub value: String,
}

impl fmt::Display for ConfigOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

/// An option whose value in the final `.config` differs from the requested one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMismatch {
    /// The option name, `CONFIG_` included.
    pub name: String,
    /// The requested value.
    pub requested: String,
    /// `None`: absent from `.config` (its dependencies are not met). `Some("n")`: not set.
    pub actual: Option<String>,
}

impl fmt::Display for ConfigMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.actual {
            None => write!(
                f,
                "{}={} (absent from the final .config)",
                self.name, self.requested
            ),
            Some(v) if v == "n" => {
                write!(
                    f,
                    "{}={} (final .config: is not set)",
                    self.name, self.requested
                )
            }
            Some(v) => write!(f, "{}={} (final .config: ={v})", self.name, self.requested),
        }
    }
}

/// Build variants, each adding options to the fragment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Variant {
    /// `CONFIG_SMP=y`: more than one vCPU.
    pub smp: bool,
    /// `CONFIG_IA32_EMULATION=y` and `CONFIG_COMPAT_32BIT_TIME=y`: run i386 programs.
    pub ia32: bool,
    /// Without [`PATCHES`] (for measuring what they save).
    pub unpatched: bool,
}

impl Variant {
    /// The options this variant adds (they override the fragment's).
    pub fn options(&self) -> Vec<ConfigOption> {
        let mut v = Vec::new();
        let y = |name: &str| ConfigOption {
            name: name.to_string(),
            value: "y".to_string(),
        };
        if self.smp {
            v.push(y("CONFIG_SMP"));
        }
        if self.ia32 {
            v.push(y("CONFIG_IA32_EMULATION"));
            v.push(y("CONFIG_COMPAT_32BIT_TIME"));
        }
        v
    }

    /// A short name: `default`, or the variant's parts joined with `+` (`smp+ia32`,
    /// `unpatched`).
    pub fn name(&self) -> String {
        let parts: Vec<&str> = [
            (self.smp, "smp"),
            (self.ia32, "ia32"),
            (self.unpatched, "unpatched"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        if parts.is_empty() {
            "default".into()
        } else {
            parts.join("+")
        }
    }

    /// The patches this variant applies.
    pub fn patches(&self) -> &'static [(&'static str, &'static str)] {
        if self.unpatched {
            &[]
        } else {
            PATCHES
        }
    }
}

fn valid_option_name(name: &str) -> bool {
    name.len() > "CONFIG_".len()
        && name.starts_with("CONFIG_")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses a config fragment: `CONFIG_X=value` lines and `# CONFIG_X is not set` lines (read as
/// `=n`); blank lines and other `#` comments are skipped. An option given twice is an error.
pub fn parse_fragment(text: &str) -> Result<Vec<ConfigOption>, KernelError> {
    let mut out: Vec<ConfigOption> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        let opt = if line.is_empty() {
            continue;
        } else if let Some(name) = not_set_name(line) {
            ConfigOption {
                name: name.to_string(),
                value: "n".to_string(),
            }
        } else if line.starts_with('#') {
            continue;
        } else if let Some((name, value)) = line.split_once('=') {
            let (name, value) = (name.trim(), value.trim());
            if !valid_option_name(name) {
                return Err(KernelError::Fragment {
                    line: line_no,
                    message: format!("`{name}` is not an option name (CONFIG_[A-Z0-9_]+)"),
                });
            }
            if value.is_empty() {
                return Err(KernelError::Fragment {
                    line: line_no,
                    message: format!("{name} has no value; write {name}=y, =n, =m or a value"),
                });
            }
            ConfigOption {
                name: name.to_string(),
                value: value.to_string(),
            }
        } else {
            return Err(KernelError::Fragment {
                line: line_no,
                message: format!("expected CONFIG_X=value, got `{line}`"),
            });
        };
        if let Some(prev) = seen.insert(opt.name.clone(), line_no) {
            return Err(KernelError::Fragment {
                line: line_no,
                message: format!("{} is already set on line {prev}", opt.name),
            });
        }
        out.push(opt);
    }
    Ok(out)
}

/// `# CONFIG_X is not set` → `Some("CONFIG_X")`.
fn not_set_name(line: &str) -> Option<&str> {
    let name = line
        .strip_prefix('#')?
        .trim_start()
        .strip_suffix("is not set")?
        .trim();
    valid_option_name(name).then_some(name)
}

/// Reads a `.config`: option name → value, with `# CONFIG_X is not set` read as `n`.
pub fn parse_dotconfig(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = not_set_name(line) {
            map.insert(name.to_string(), "n".to_string());
        } else if line.starts_with('#') {
            continue;
        } else if let Some((name, value)) = line.split_once('=') {
            if valid_option_name(name) {
                map.insert(name.to_string(), value.to_string());
            }
        }
    }
    map
}

/// The options a build requests: the embedded fragment, with the variant's options overriding.
pub fn requested_options(variant: Variant) -> Result<Vec<ConfigOption>, KernelError> {
    merge_options(parse_fragment(CONFIG_FRAGMENT)?, variant.options())
}

fn merge_options(
    mut base: Vec<ConfigOption>,
    overrides: Vec<ConfigOption>,
) -> Result<Vec<ConfigOption>, KernelError> {
    for o in overrides {
        match base.iter_mut().find(|b| b.name == o.name) {
            Some(b) => b.value = o.value,
            None => base.push(o),
        }
    }
    Ok(base)
}

/// The fragment given to `merge_config.sh` for a variant (the embedded fragment, then the
/// variant's options, which override earlier lines).
pub fn fragment_text(variant: Variant) -> String {
    let mut text = CONFIG_FRAGMENT.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let extra = variant.options();
    if !extra.is_empty() {
        text.push_str(&format!("# variant: {}\n", variant.name()));
        for o in extra {
            text.push_str(&format!("{o}\n"));
        }
    }
    text
}

/// Checks that every requested option has its requested value in the final `.config`.
/// A request for `n` is met by `# CONFIG_X is not set`, `=n` or absence; any other value must
/// be present verbatim. All mismatches are reported together.
pub fn verify_config(requested: &[ConfigOption], dotconfig: &str) -> Result<(), KernelError> {
    let actual = parse_dotconfig(dotconfig);
    let mismatches: Vec<ConfigMismatch> = requested
        .iter()
        .filter_map(|req| {
            let got = actual.get(&req.name);
            let ok = if req.value == "n" {
                got.is_none_or(|v| v == "n")
            } else {
                got == Some(&req.value)
            };
            (!ok).then(|| ConfigMismatch {
                name: req.name.clone(),
                requested: req.value.clone(),
                actual: got.cloned(),
            })
        })
        .collect();
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(KernelError::OptionsNotApplied(mismatches))
    }
}

/// Where the kernel source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// A `.tar.xz` (or any tarball `tar -xf` reads) with one top directory.
    Tarball(PathBuf),
    /// An unpacked source tree; it is copied, never modified.
    Dir(PathBuf),
}

impl Default for KernelSource {
    fn default() -> Self {
        KernelSource::Tarball(PathBuf::from(DEFAULT_SOURCE_TARBALL))
    }
}

impl KernelSource {
    /// A string that changes when the source changes: for a tarball its path, size and mtime;
    /// for a tree its path and the version in its Makefile.
    pub fn identity(&self) -> Result<String, KernelError> {
        match self {
            KernelSource::Tarball(path) => {
                let meta = fs::metadata(path).map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        KernelSource::missing(path)
                    } else {
                        io_err(format!("reading {}", path.display()))(e)
                    }
                })?;
                let canon = fs::canonicalize(path)
                    .map_err(io_err(format!("resolving {}", path.display())))?;
                Ok(format!(
                    "tarball:{}:{}:{}.{}",
                    canon.display(),
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec()
                ))
            }
            KernelSource::Dir(dir) => {
                let version = tree_version(dir)?;
                let canon = fs::canonicalize(dir)
                    .map_err(io_err(format!("resolving {}", dir.display())))?;
                Ok(format!("tree:{}:{version}", canon.display()))
            }
        }
    }

    fn missing(path: &Path) -> KernelError {
        KernelError::SourceMissing(path.to_path_buf())
    }
}

/// `6.12.117` (plus EXTRAVERSION) from a tree's top Makefile.
pub fn tree_version(dir: &Path) -> Result<String, KernelError> {
    let makefile = dir.join("Makefile");
    let text = match fs::read_to_string(&makefile) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KernelError::NotAKernelTree(dir.to_path_buf()))
        }
        Err(e) => return Err(io_err(format!("reading {}", makefile.display()))(e)),
    };
    let field = |key: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    match (field("VERSION"), field("PATCHLEVEL"), field("SUBLEVEL")) {
        (Some(v), Some(p), Some(s)) if !v.is_empty() && !p.is_empty() => Ok(format!(
            "{v}.{p}.{s}{}",
            field("EXTRAVERSION").unwrap_or_default()
        )),
        _ => Err(KernelError::NotAKernelTree(dir.to_path_buf())),
    }
}

/// The cache key: sha256 over the recipe version, source identity, fragment, patches (names
/// and contents, in order) and variant; the first 24 (`KEY_LEN`) hex digits.
pub fn cache_key(
    source_identity: &str,
    fragment: &str,
    patches: &[(&str, &str)],
    variant: Variant,
) -> String {
    let mut h = Sha256::new();
    let mut field = |label: &str, data: &[u8]| {
        h.update(label.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    field("recipe", RECIPE.as_bytes());
    field("source", source_identity.as_bytes());
    field("fragment", fragment.as_bytes());
    for (name, text) in patches {
        field("patch-name", name.as_bytes());
        field("patch", text.as_bytes());
    }
    field("smp", &[variant.smp as u8]);
    field("ia32", &[variant.ia32 as u8]);
    // Only when set, so that adding the flag kept every existing key.
    if variant.unpatched {
        field("unpatched", &[1]);
    }
    let mut key = hex::encode(h.finalize());
    key.truncate(KEY_LEN);
    key
}

/// Where the output of `make` and the tools goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BuildOutput {
    /// Straight to our stderr (the CLI).
    #[default]
    Stderr,
    /// Into a log file in the work directory; its tail is put in the error if a step fails.
    Quiet,
}

/// A built kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelArtifact {
    /// The uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// The final `.config` it was built with.
    pub config: PathBuf,
    /// The cache key (name of the directory holding both).
    pub key: String,
    /// `true` if this call built it, `false` if it was already in the cache.
    pub built: bool,
}

/// A kernel build request. [`KernelBuild::build`] returns the cached kernel or builds it.
#[derive(Debug, Clone)]
pub struct KernelBuild {
    /// Where the kernel source comes from.
    pub source: KernelSource,
    /// The extra options and the patches to build with.
    pub variant: Variant,
    /// Parallel jobs for `make`; `None`: the number of CPUs.
    pub jobs: Option<usize>,
    /// The xcgi cache directory (see [`crate::cache_dir`]); kernels go in its `kernels/`.
    pub cache_dir: PathBuf,
    /// Where the output of the build steps goes.
    pub output: BuildOutput,
}

impl KernelBuild {
    /// The default source and variant, cached under `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        KernelBuild {
            source: KernelSource::default(),
            variant: Variant::default(),
            jobs: None,
            cache_dir: cache_dir.into(),
            output: BuildOutput::default(),
        }
    }

    /// This build's cache key.
    pub fn key(&self) -> Result<String, KernelError> {
        Ok(cache_key(
            &self.source.identity()?,
            &fragment_text(self.variant),
            self.variant.patches(),
            self.variant,
        ))
    }

    fn kernels_dir(&self) -> PathBuf {
        self.cache_dir.join("kernels")
    }

    /// The kernel if it is already in the cache; never builds.
    pub fn cached(&self) -> Result<Option<KernelArtifact>, KernelError> {
        let key = self.key()?;
        Ok(self.lookup(&key))
    }

    fn lookup(&self, key: &str) -> Option<KernelArtifact> {
        let dir = self.kernels_dir().join(key);
        let art = KernelArtifact {
            vmlinux: dir.join("vmlinux"),
            config: dir.join("config"),
            key: key.to_string(),
            built: false,
        };
        (art.vmlinux.is_file() && art.config.is_file()).then_some(art)
    }

    /// Returns the cached kernel, building it first if needed. Concurrent builds of the same
    /// key wait for each other (a lock file per key); a failed or killed build leaves no cache
    /// entry, and its work directory is removed (at once, or by the next build).
    pub fn build(&self) -> Result<KernelArtifact, KernelError> {
        let key = self.key()?;
        if let Some(art) = self.lookup(&key) {
            tracing::debug!(vmlinux = %art.vmlinux.display(), "kernel found in cache");
            return Ok(art);
        }
        let kernels = self.kernels_dir();
        fs::create_dir_all(&kernels).map_err(io_err(format!(
            "creating cache directory {}",
            kernels.display()
        )))?;
        let _lock = KeyLock::acquire(&kernels, &key, true)?;
        if let Some(art) = self.lookup(&key) {
            return Ok(art);
        }
        remove_stale_work_dirs(&kernels);
        check_tools(&[
            "make", "gcc", "ld", "flex", "bison", "bc", "patch", "tar", "xz", "perl",
        ])?;

        let work = RemoveOnDrop(kernels.join(format!(".build-{key}")));
        if work.0.exists() {
            fs::remove_dir_all(&work.0)
                .map_err(io_err(format!("removing stale {}", work.0.display())))?;
        }
        fs::create_dir(&work.0).map_err(io_err(format!("creating {}", work.0.display())))?;
        let steps = Steps {
            output: self.output,
            log: work.0.join("build.log"),
        };
        self.progress(&format!(
            "building guest kernel {key} (variant {}) in {}",
            self.variant.name(),
            work.0.display()
        ));

        let tree = work.0.join("linux");
        fs::create_dir(&tree).map_err(io_err(format!("creating {}", tree.display())))?;
        self.unpack(&tree, &steps)?;
        for (name, text) in self.variant.patches() {
            self.progress(&format!("applying patch {name}"));
            apply_patch(&tree, name, text)?;
        }
        self.progress("make tinyconfig");
        steps.run("make tinyconfig", make(&tree).arg("tinyconfig"))?;

        let frag_path = work.0.join("xcgi.fragment");
        let fragment = fragment_text(self.variant);
        fs::write(&frag_path, &fragment)
            .map_err(io_err(format!("writing {}", frag_path.display())))?;
        self.progress("merging the xcgi config fragment");
        let mut merge = Command::new("sh");
        merge
            .arg("scripts/kconfig/merge_config.sh")
            .arg("-m")
            .arg(".config")
            .arg(&frag_path)
            .current_dir(&tree)
            .env_remove("KCONFIG_CONFIG");
        steps.run("merge_config.sh -m .config xcgi.fragment", &mut merge)?;
        steps.run("make olddefconfig", make(&tree).arg("olddefconfig"))?;

        let dotconfig_path = tree.join(".config");
        let dotconfig = fs::read_to_string(&dotconfig_path)
            .map_err(io_err(format!("reading {}", dotconfig_path.display())))?;
        verify_config(&requested_options(self.variant)?, &dotconfig)?;
        self.progress("config verified: every requested option took");

        let jobs = self.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        self.progress(&format!("make -j{jobs} vmlinux (a few minutes)"));
        steps.run(
            "make vmlinux",
            make(&tree).arg(format!("-j{jobs}")).arg("vmlinux"),
        )?;

        let built = tree.join("vmlinux");
        if !built.is_file() {
            return Err(KernelError::NoVmlinux(built));
        }
        let entry = work.0.join("entry");
        fs::create_dir(&entry).map_err(io_err(format!("creating {}", entry.display())))?;
        fs::rename(&built, entry.join("vmlinux"))
            .map_err(io_err(format!("moving {}", built.display())))?;
        fs::write(entry.join("config"), &dotconfig).map_err(io_err("writing the final config"))?;
        fs::write(entry.join("fragment"), &fragment).map_err(io_err("writing the fragment"))?;
        fs::write(
            entry.join("source"),
            format!("{}\n", self.source.identity()?),
        )
        .map_err(io_err("writing the source identity"))?;
        let dest = kernels.join(&key);
        fs::rename(&entry, &dest).map_err(io_err(format!(
            "moving the built kernel into {}",
            dest.display()
        )))?;
        self.progress("removing the build tree");
        drop(work);
        let mut art = self
            .lookup(&key)
            .ok_or_else(|| KernelError::NoVmlinux(dest.join("vmlinux")))?;
        art.built = true;
        tracing::info!(vmlinux = %art.vmlinux.display(), "guest kernel built");
        Ok(art)
    }

    fn progress(&self, msg: &str) {
        tracing::info!("{msg}");
        if self.output == BuildOutput::Stderr {
            eprintln!("xcgi kernel: {msg}");
        }
    }

    fn unpack(&self, tree: &Path, steps: &Steps) -> Result<(), KernelError> {
        match &self.source {
            KernelSource::Tarball(tar) => {
                if !tar.is_file() {
                    return Err(KernelSource::missing(tar));
                }
                self.progress(&format!("unpacking {}", tar.display()));
                let mut cmd = Command::new("tar");
                cmd.arg("-xf")
                    .arg(tar)
                    .arg("-C")
                    .arg(tree)
                    .arg("--strip-components=1");
                steps.run("tar -xf", &mut cmd)?;
                tree_version(tree)?;
            }
            KernelSource::Dir(src) => {
                tree_version(src)?;
                self.progress(&format!("copying {}", src.display()));
                let mut cmd = Command::new("cp");
                cmd.arg("-a")
                    .arg("--reflink=auto")
                    .arg(src.join("."))
                    .arg(tree);
                steps.run("cp -a", &mut cmd)?;
            }
        }
        Ok(())
    }
}

fn make(tree: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(tree)
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("KCONFIG_CONFIG");
    cmd
}

fn apply_patch(tree: &Path, name: &str, text: &str) -> Result<(), KernelError> {
    let mut child = Command::new("patch")
        .args(["-p1", "--forward", "--batch", "--no-backup-if-mismatch"])
        .arg("-d")
        .arg(tree)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| KernelError::Spawn {
            program: "patch".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(io_err(format!("feeding {name} to patch")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err("waiting for patch"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(KernelError::PatchFailed {
            name: name.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// Runs build steps, sending their output to stderr or to a log file.
struct Steps {
    output: BuildOutput,
    log: PathBuf,
}

impl Steps {
    fn run(&self, step: &str, cmd: &mut Command) -> Result<(), KernelError> {
        tracing::debug!(?cmd, "running");
        match self.output {
            BuildOutput::Stderr => {
                let err = stderr_fd().map_err(io_err("duplicating stderr"))?;
                cmd.stdout(err);
                cmd.stderr(Stdio::inherit());
            }
            BuildOutput::Quiet => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .map_err(io_err(format!("opening {}", self.log.display())))?;
                let f2 = f
                    .try_clone()
                    .map_err(io_err(format!("opening {}", self.log.display())))?;
                cmd.stdout(f).stderr(f2);
            }
        }
        cmd.stdin(Stdio::null());
        let program = cmd.get_program().to_string_lossy().into_owned();
        let status = cmd
            .status()
            .map_err(|source| KernelError::Spawn { program, source })?;
        if status.success() {
            Ok(())
        } else {
            let log_tail = match self.output {
                BuildOutput::Stderr => String::new(),
                BuildOutput::Quiet => log_tail(&self.log, 40),
            };
            Err(KernelError::StepFailed {
                step: step.to_string(),
                status,
                log_tail,
            })
        }
    }
}

/// A duplicate of our stderr, for a child's stdout.
fn stderr_fd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    io::stderr().as_fd().try_clone_to_owned()
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn check_tools(tools: &[&str]) -> Result<(), KernelError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| {
            !std::env::split_paths(&path).any(|d| {
                let p = d.join(t);
                fs::metadata(&p)
                    .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
        })
        .map(|t| t.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingTools(missing))
    }
}

/// Removes a directory tree when dropped (the work directory of a build).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), "could not remove build directory: {e}");
            }
        }
    }
}

/// An exclusive `flock` on `<kernels>/.<key>.lock`. The holder removes the file when it is
/// done (on drop, before unlocking), so no lock files pile up; a waiter that then wins the
/// lock on the removed file sees that it is gone and starts over on the current one.
struct KeyLock {
    file: File,
    path: PathBuf,
}

impl KeyLock {
    /// With `wait`, blocks until the lock is free (telling the user once); without, returns
    /// `Ok(None)` if another process holds it.
    fn acquire(kernels: &Path, key: &str, wait: bool) -> Result<Option<KeyLock>, KernelError> {
        let path = kernels.join(format!(".{key}.lock"));
        let mut told = false;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err(format!("opening lock {}", path.display())))?;
            if !try_flock(&file, true)? {
                if !wait {
                    return Ok(None);
                }
                if !told {
                    eprintln!("xcgi kernel: waiting for another build of the same kernel ({key})");
                    told = true;
                }
                try_flock(&file, false)?;
            }
            let ours = file
                .metadata()
                .map_err(io_err(format!("reading lock {}", path.display())))?;
            match fs::metadata(&path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {
                    return Ok(Some(KeyLock { file, path }))
                }
                _ => continue,
            }
        }
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        // Remove first, unlock (close) after: see the type's documentation.
        let _ = fs::remove_file(&self.path);
        tracing::trace!(fd = self.file.as_raw_fd(), "kernel cache lock released");
    }
}

/// `flock(LOCK_EX)`; with `nonblock`, returns `Ok(false)` if another process holds it.
fn try_flock(file: &File, nonblock: bool) -> Result<bool, KernelError> {
    flock_exclusive(file, nonblock).map_err(io_err("locking the kernel cache entry"))
}

/// `flock(LOCK_EX)` on `file`, retried on EINTR; with `nonblock`, `Ok(false)` when another
/// open file description holds it (a live process: the kernel drops a dead one's lock).
pub fn flock_exclusive(file: &File, nonblock: bool) -> io::Result<bool> {
    let op = libc::LOCK_EX | if nonblock { libc::LOCK_NB } else { 0 };
    loop {
        // SAFETY: flock on a valid, open file descriptor owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblock => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Removes `.build-<key>` directories left by killed builds (those whose lock nobody holds).
fn remove_stale_work_dirs(kernels: &Path) {
    let Ok(entries) = fs::read_dir(kernels) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(|n| n.strip_prefix(".build-")) else {
            continue;
        };
        // Our own key is already locked by us through another open file: the non-blocking
        // attempt fails, so our own work dir is left alone (build() handles it).
        if let Ok(Some(lock)) = KeyLock::acquire(kernels, key, false) {
            tracing::info!(dir = %entry.path().display(), "removing a killed build's directory");
            drop(RemoveOnDrop(entry.path()));
            drop(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fragment_lines() {
        let opts = parse_fragment(
            "# comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=n\nCONFIG_D=\"x y\"\n  CONFIG_E=16  \n",
        )
        .unwrap();
        let pairs: Vec<(&str, &str)> = opts
            .iter()
            .map(|o| (o.name.as_str(), o.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("CONFIG_A", "y"),
                ("CONFIG_B", "n"),
                ("CONFIG_C", "n"),
                ("CONFIG_D", "\"x y\""),
                ("CONFIG_E", "16")
            ]
        );
    }

    #[test]
    fn fragment_errors_name_the_line() {
        let e = parse_fragment("CONFIG_A=y\nNOT_AN_OPTION=y\n").unwrap_err();
        assert!(matches!(e, KernelError::Fragment { line: 2, .. }), "{e}");
        let e = parse_fragment("CONFIG_A=y\nCONFIG_A=n\n").unwrap_err();
        assert!(
            matches!(&e, KernelError::Fragment { line: 2, message } if message.contains("line 1")),
            "{e}"
        );
        let e = parse_fragment("CONFIG_A=\n").unwrap_err();
        assert!(matches!(e, KernelError::Fragment { line: 1, .. }), "{e}");
        let e = parse_fragment("garbage\n").unwrap_err();
        assert!(matches!(e, KernelError::Fragment { line: 1, .. }), "{e}");
    }

    #[test]
    fn embedded_fragment_parses_and_has_the_essentials() {
        let opts = requested_options(Variant::default()).unwrap();
        let get = |n: &str| opts.iter().find(|o| o.name == n).map(|o| o.value.as_str());
        assert_eq!(get("CONFIG_VIRTIO_MMIO"), Some("y"));
        assert_eq!(get("CONFIG_SERIAL_8250_CONSOLE"), Some("y"));
        assert_eq!(get("CONFIG_SMP"), Some("n"));
        assert_eq!(get("CONFIG_TMPFS"), Some("y"));
        assert_eq!(get("CONFIG_SHMEM"), Some("y"), "TMPFS depends on SHMEM");
    }

    #[test]
    fn variants_override_the_fragment() {
        let smp = requested_options(Variant {
            smp: true,
            ia32: false,
            ..Default::default()
        })
        .unwrap();
        let smp_opts: Vec<_> = smp.iter().filter(|o| o.name == "CONFIG_SMP").collect();
        assert_eq!(smp_opts.len(), 1);
        assert_eq!(smp_opts[0].value, "y");

        let ia32 = requested_options(Variant {
            smp: false,
            ia32: true,
            ..Default::default()
        })
        .unwrap();
        for n in ["CONFIG_IA32_EMULATION", "CONFIG_COMPAT_32BIT_TIME"] {
            assert!(ia32.iter().any(|o| o.name == n && o.value == "y"), "{n}");
        }
        // The text handed to merge_config.sh puts the override last, so it wins there too.
        let text = fragment_text(Variant {
            smp: true,
            ia32: false,
            ..Default::default()
        });
        let last_smp = text.lines().rfind(|l| l.starts_with("CONFIG_SMP="));
        assert_eq!(last_smp, Some("CONFIG_SMP=y"));
    }

    #[test]
    fn verify_reports_dropped_options_by_name() {
        let req = parse_fragment("CONFIG_A=y\nCONFIG_TMPFS=y\nCONFIG_M=m\n").unwrap();
        let dot = "CONFIG_A=y\nCONFIG_M=y\n# CONFIG_X is not set\n";
        let err = verify_config(&req, dot).unwrap_err();
        let KernelError::OptionsNotApplied(m) = &err else {
            panic!("unexpected {err}");
        };
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "CONFIG_TMPFS");
        assert_eq!(m[0].actual, None);
        assert_eq!(m[1].name, "CONFIG_M");
        assert_eq!(m[1].actual.as_deref(), Some("y"));
        let text = err.to_string();
        assert!(text.contains("CONFIG_TMPFS=y (absent"), "{text}");
        assert!(text.contains("CONFIG_M=m (final .config: =y)"), "{text}");
        assert!(text.contains("kernel/config.fragment"), "{text}");
    }

    #[test]
    fn verify_treats_not_set_and_absent_as_n() {
        let req =
            parse_fragment("CONFIG_PCI=n\n# CONFIG_ACPI is not set\nCONFIG_GONE=n\n").unwrap();
        verify_config(&req, "# CONFIG_PCI is not set\nCONFIG_ACPI=n\n").unwrap();
        let err = verify_config(&req, "CONFIG_PCI=y\n").unwrap_err();
        assert!(
            err.to_string().contains("CONFIG_PCI=n (final .config: =y)"),
            "{err}"
        );
        // Requested y but the .config says not set.
        let req = parse_fragment("CONFIG_SMP=y\n").unwrap();
        let err = verify_config(&req, "# CONFIG_SMP is not set\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("CONFIG_SMP=y (final .config: is not set)"),
            "{err}"
        );
    }

    #[test]
    fn verify_compares_strings_and_numbers_exactly() {
        let req = parse_fragment("CONFIG_S=\"a\"\nCONFIG_N=16\n").unwrap();
        verify_config(&req, "CONFIG_S=\"a\"\nCONFIG_N=16\n").unwrap();
        assert!(verify_config(&req, "CONFIG_S=\"b\"\nCONFIG_N=16\n").is_err());
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let v = Variant::default();
        let base = cache_key("src", "CONFIG_A=y\n", &[("p", "x")], v);
        assert_eq!(base.len(), KEY_LEN);
        assert_eq!(base, cache_key("src", "CONFIG_A=y\n", &[("p", "x")], v));
        let others = [
            cache_key("src2", "CONFIG_A=y\n", &[("p", "x")], v),
            cache_key("src", "CONFIG_A=n\n", &[("p", "x")], v),
            cache_key("src", "CONFIG_A=y\n", &[("p", "y")], v),
            cache_key("src", "CONFIG_A=y\n", &[("q", "x")], v),
            cache_key("src", "CONFIG_A=y\n", &[], v),
            cache_key(
                "src",
                "CONFIG_A=y\n",
                &[("p", "x")],
                Variant {
                    smp: true,
                    ia32: false,
                    ..Default::default()
                },
            ),
            cache_key(
                "src",
                "CONFIG_A=y\n",
                &[("p", "x")],
                Variant {
                    smp: false,
                    ia32: true,
                    ..Default::default()
                },
            ),
        ];
        for (i, k) in others.iter().enumerate() {
            assert_ne!(&base, k, "input {i} did not change the key");
        }
        let unpatched = Variant {
            unpatched: true,
            ..Default::default()
        };
        assert_ne!(
            base,
            cache_key("src", "CONFIG_A=y\n", &[("p", "x")], unpatched),
            "the unpatched variant has a key of its own"
        );
        assert!(unpatched.patches().is_empty());
        assert_eq!(Variant::default().patches().len(), PATCHES.len());
        assert_eq!(unpatched.name(), "unpatched");
    }

    #[test]
    fn build_key_depends_on_variant_and_source() {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("linux.tar.xz");
        fs::write(&tar, b"not really a tarball").unwrap();
        let mut b = KernelBuild::new(dir.path());
        b.source = KernelSource::Tarball(tar.clone());
        let k1 = b.key().unwrap();
        b.variant.smp = true;
        let k2 = b.key().unwrap();
        assert_ne!(k1, k2);
        fs::write(&tar, b"a different, longer tarball").unwrap();
        assert_ne!(b.key().unwrap(), k2);
        assert!(b.cached().unwrap().is_none());
    }

    #[test]
    fn patch_manifest_matches_the_patches_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernel/patches");
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".patch"))
            .collect();
        on_disk.sort();
        let listed: Vec<&str> = PATCHES.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            on_disk, listed,
            "update PATCHES in crates/image/src/kernel.rs"
        );
        for (name, text) in PATCHES {
            assert_eq!(fs::read_to_string(dir.join(name)).unwrap(), *text);
        }
    }

    #[test]
    fn missing_sources_are_reported_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let e = KernelSource::Tarball(dir.path().join("nope.tar.xz"))
            .identity()
            .unwrap_err();
        assert!(matches!(e, KernelError::SourceMissing(_)), "{e}");
        assert!(e.to_string().contains("--source"), "{e}");
        let e = KernelSource::Dir(dir.path().to_path_buf())
            .identity()
            .unwrap_err();
        assert!(matches!(e, KernelError::NotAKernelTree(_)), "{e}");
    }

    #[test]
    fn tree_version_reads_the_makefile() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("Makefile"),
            "# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\nEXTRAVERSION = -rc1\nNAME = x\n",
        )
        .unwrap();
        assert_eq!(tree_version(dir.path()).unwrap(), "6.12.117-rc1");
        let id = KernelSource::Dir(dir.path().to_path_buf())
            .identity()
            .unwrap();
        assert!(id.contains("6.12.117-rc1"), "{id}");
    }

    #[test]
    fn cached_entry_is_found_without_building() {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("linux.tar.xz");
        fs::write(&tar, b"x").unwrap();
        let mut b = KernelBuild::new(dir.path().join("cache"));
        b.source = KernelSource::Tarball(tar);
        b.output = BuildOutput::Quiet;
        let key = b.key().unwrap();
        let entry = dir.path().join("cache/kernels").join(&key);
        fs::create_dir_all(&entry).unwrap();
        fs::write(entry.join("vmlinux"), b"elf").unwrap();
        fs::write(entry.join("config"), b"CONFIG_A=y\n").unwrap();
        // The fake tarball would fail to unpack, so success proves nothing was built.
        let art = b.build().unwrap();
        assert_eq!(art.vmlinux, entry.join("vmlinux"));
        assert!(!art.built);
    }

    #[test]
    fn failed_build_leaves_no_entry_and_no_work_dir() {
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("linux.tar.xz");
        fs::write(&tar, b"this is not a tarball").unwrap();
        let mut b = KernelBuild::new(dir.path().join("cache"));
        b.source = KernelSource::Tarball(tar);
        b.output = BuildOutput::Quiet;
        let err = b.build().unwrap_err();
        assert!(
            matches!(&err, KernelError::StepFailed { step, log_tail, .. }
                if step.starts_with("tar") && !log_tail.is_empty()),
            "{err}"
        );
        let left: Vec<String> = fs::read_dir(dir.path().join("cache/kernels"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn killed_builds_are_cleaned_unless_still_running() {
        let dir = tempfile::tempdir().unwrap();
        let kernels = dir.path();
        fs::create_dir_all(kernels.join(".build-dead/linux")).unwrap();
        fs::create_dir_all(kernels.join(".build-alive/linux")).unwrap();
        let held = KeyLock::acquire(kernels, "alive", false).unwrap().unwrap();
        // A second holder is refused while the first holds it.
        assert!(KeyLock::acquire(kernels, "alive", false).unwrap().is_none());
        remove_stale_work_dirs(kernels);
        assert!(!kernels.join(".build-dead").exists());
        assert!(kernels.join(".build-alive/linux").is_dir());
        drop(held);
        remove_stale_work_dirs(kernels);
        let left: Vec<_> = fs::read_dir(kernels).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
