//! `start = "snapshot"`: a route's template (issue 13). Once, at start, one VM of the route
//! boots until its `xcgi-init` says hello on the channel (its mounts done, the channel raw,
//! waiting for its request); then the monitor stops it and captures it into a snapshot
//! directory, and the template is torn down: it never serves a request and is never resumed.
//! Every request's VM is then a clone of it ([`xcgi_vmm::MachineShape::snapshot`]) whose
//! init waits for its request already.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xcgi_channel as ch;
use xcgi_vmm::snapshot::Identity;
use xcgi_vmm::{Attachments, Cancel, Capture, ExitReason, RunOptions};

use super::huge_dir::HugeDir;
use super::vm::{describe_outcome, VmSpec};

/// The server's directory on the hugetlbfs mount `mount` for its huge-page templates (what
/// servers that are gone left there removed first); refused when `mount` is not hugetlbfs.
pub fn claim_huge_dir(mount: &Path) -> Result<Arc<HugeDir>, TemplateError> {
    if !xcgi_vmm::memory::is_hugetlbfs_dir(mount).unwrap_or(false) {
        return Err(TemplateError::NoHugetlbfs(mount.display().to_string()));
    }
    HugeDir::claim(mount)
        .map(Arc::new)
        .map_err(|e| TemplateError::HugeDir(mount.display().to_string(), e))
}

/// How long a template may take to boot to its hello (a boot in the lab takes ~2 s; on
/// hardware ~10 ms).
pub const TEMPLATE_BOOT_LIMIT: Duration = Duration::from_secs(60);

/// Why a route's template could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The channel's socket pair could not be made or read.
    #[error("the template VM's channel: {0}")]
    Channel(std::io::Error),
    /// The VM's thread could not start.
    #[error("cannot start the template VM's thread: {0}")]
    Thread(std::io::Error),
    /// The guest never said hello (its /init is not xcgi-init, or it failed before).
    #[error(
        "the template VM's init never said hello (is the image's /init xcgi-init?); the VM: {0}"
    )]
    NoHello(String),
    /// xcgi-init reported a failure instead of its hello.
    #[error("the template VM's init failed: {0}")]
    InitFailed(String),
    /// The VM said hello but could not be captured.
    #[error("capturing the template VM: {0}")]
    Capture(String),
    /// The route's kernel or image cannot be read (to fingerprint it).
    #[error("the route's kernel or image: {0}")]
    Identity(xcgi_vmm::snapshot::SnapshotError),
    /// A huge-page route's template memory has no hugetlbfs mount to go to.
    #[error(
        "{0} is not a hugetlbfs mount, where a huge-page route's template memory goes: mount \
         one (`mount -t hugetlbfs none {0}`) or set [server] hugetlbfs"
    )]
    NoHugetlbfs(String),
    /// The server's directory on the hugetlbfs mount could not be made.
    #[error("cannot make the server's directory on the hugetlbfs mount {0}: {1}")]
    HugeDir(String, std::io::Error),
}

/// A template taken: its snapshot directory, and how long booting and capturing took.
#[derive(Debug, Clone)]
pub struct Template {
    /// The snapshot directory (`state`, `memory`).
    pub dir: PathBuf,
    /// Start to xcgi-init's hello.
    pub boot: Duration,
    /// Hello to the snapshot written (stop, state, memory file).
    pub capture: Duration,
    /// Bytes of the memory file actually on disk (it is sparse).
    pub memory_on_disk: u64,
}

/// Boots `spec`'s machine (not a clone) with a channel, waits for xcgi-init's hello, and
/// captures the VM into `dir` (its memory into `memory_file` when given: a huge-page
/// machine's goes to hugetlbfs).
pub fn take(
    spec: &VmSpec,
    dir: &Path,
    memory_file: Option<&Path>,
) -> Result<Template, TemplateError> {
    let t0 = Instant::now();
    let (host, guest) = UnixStream::pair().map_err(TemplateError::Channel)?;
    host.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(TemplateError::Channel)?;
    let mut shape = spec.shape();
    shape.snapshot = None;
    let (now, cancel) = (Cancel::new(), Cancel::new());
    let opts = RunOptions {
        timeout: TEMPLATE_BOOT_LIMIT,
        cancel: cancel.clone(),
        debug_dump: spec.debug_dump,
        debug_probe: spec.debug_probe.clone(),
        capture: Some(Capture {
            now: now.clone(),
            marker: None,
            dir: dir.to_path_buf(),
            memory_file: memory_file.map(Path::to_path_buf),
        }),
        ..RunOptions::default()
    };
    let attach = Attachments {
        channel: Some(Arc::new(OwnedFd::from(guest))),
        ..Attachments::default()
    };
    let vm = std::thread::Builder::new()
        .name("xcgi-template".into())
        .spawn(move || xcgi_vmm::run(&shape, &attach, &opts, Instant::now(), None))
        .map_err(TemplateError::Thread)?;
    let said = wait_for_hello(host, &vm, t0);
    let hello_at = t0.elapsed();
    match &said {
        Ok(()) => now.cancel(),
        Err(_) => cancel.cancel(),
    }
    let ran = vm
        .join()
        .unwrap_or_else(|_| Err(xcgi_vmm::VmError::Capture("the VM thread panicked".into())));
    match (said, ran) {
        (Ok(()), Ok(out)) if out.reason == ExitReason::Captured => Ok(Template {
            dir: dir.to_path_buf(),
            boot: hello_at,
            capture: t0.elapsed().saturating_sub(hello_at),
            memory_on_disk: on_disk(
                memory_file.unwrap_or(&dir.join(xcgi_vmm::snapshot::MEMORY_FILE)),
            ),
        }),
        (Ok(()), ran) => Err(TemplateError::Capture(describe_outcome(&ran))),
        (Err(e @ TemplateError::InitFailed(_)), _) => Err(e),
        (Err(_), ran) => Err(TemplateError::NoHello(describe_outcome(&ran))),
    }
}

/// Reads the channel until xcgi-init's hello; an error if it fails, sends anything else,
/// or the VM ends (or the limit passes) first.
fn wait_for_hello(
    mut host: UnixStream,
    vm: &std::thread::JoinHandle<Result<xcgi_vmm::Outcome, xcgi_vmm::VmError>>,
    t0: Instant,
) -> Result<(), TemplateError> {
    let mut dec = ch::Decoder::new();
    let mut buf = vec![0u8; 4096];
    let no_hello = || TemplateError::NoHello(String::new());
    while t0.elapsed() < TEMPLATE_BOOT_LIMIT && !vm.is_finished() {
        let n = match host.read(&mut buf) {
            Ok(0) => return Err(no_hello()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(TemplateError::Channel(e)),
        };
        dec.feed(&buf[..n]);
        match dec.next_frame() {
            Ok(None) => {}
            Ok(Some((ch::HELLO, _))) => return Ok(()),
            Ok(Some((ch::FAILED, text))) => {
                // Guest text: escaped, capped.
                let text = String::from_utf8_lossy(&text);
                let text: String = text.chars().take(512).collect();
                return Err(TemplateError::InitFailed(xcgi_vmm::vm::escape_guest_text(
                    &text,
                )));
            }
            Ok(Some(_)) | Err(_) => return Err(no_hello()),
        }
    }
    Err(no_hello())
}

/// A `start = "snapshot"` route's template in use: its clones open `link` (a symbolic link
/// to the generation in use, `<link>.<gen>`), and what it was taken of.
pub struct Live {
    /// The route (its prefix), for the log.
    pub route: String,
    /// The route's machine (booted, not cloned: `snapshot` is ignored).
    spec: VmSpec,
    /// What the route's VMs are given as their snapshot directory.
    pub link: PathBuf,
    /// The generation the link points to (1 for the template taken at start).
    generation: u32,
    /// The kernel and image (and the rest) the template was taken of.
    taken_of: Identity,
    /// What a new template failed for: not tried again until something changes again.
    failed_for: Option<Identity>,
    /// A huge-page route's: the server's directory on hugetlbfs, where its templates' memory
    /// files go; removed with them when the last route's `Live` goes (its own drop).
    huge_dir: Option<Arc<HugeDir>>,
}

/// The directory of `link`'s generation `generation`.
fn generation_dir(link: &Path, generation: u32) -> PathBuf {
    let mut name = link.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{generation}"));
    link.with_file_name(name)
}

/// Takes route `route`'s template (`spec`'s machine) into `link`'s next generation and
/// points `link` at it: the first at start (generation 1), again when its kernel or image
/// changed. The generation before the previous one is removed (clones being prepared may
/// still read the previous one).
/// A huge-page route's memory files go to `huge_dir` ([`claim_huge_dir`]), required then.
pub fn take_live(
    route: &str,
    spec: &VmSpec,
    link: &Path,
    huge_dir: Option<&Arc<HugeDir>>,
) -> Result<(Live, Template), TemplateError> {
    let huge_dir = match (spec.hugepages, huge_dir) {
        (true, None) => {
            return Err(TemplateError::Capture(
                "a huge-page route's template needs the server's hugetlbfs directory".into(),
            ))
        }
        (true, Some(d)) => Some(Arc::clone(d)),
        (false, _) => None,
    };
    let mut live = Live {
        route: route.to_string(),
        spec: VmSpec {
            snapshot: None,
            pool: None,
            jail: None,
            ..spec.clone()
        },
        link: link.to_path_buf(),
        generation: 0,
        taken_of: Identity::default(),
        failed_for: None,
        huge_dir,
    };
    let identity = Identity::of_shape(&live.spec.shape()).map_err(TemplateError::Identity)?;
    let t = live.take_next(identity)?;
    Ok((live, t))
}

impl Live {
    /// Takes the next generation of what `identity` says the route's files are now (read
    /// before the boot: a change during it is seen at the next look).
    fn take_next(&mut self, identity: Identity) -> Result<Template, TemplateError> {
        let generation = self.generation + 1;
        let dir = generation_dir(&self.link, generation);
        self.remove(generation);
        let memory = self.memory_file(generation);
        let t = take(&self.spec, &dir, memory.as_deref()).inspect_err(|_| {
            self.remove(generation);
        })?;
        let swap = || -> std::io::Result<()> {
            let mut tmp = self.link.as_os_str().to_os_string();
            tmp.push(".next");
            let tmp = PathBuf::from(tmp);
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(dir.file_name().unwrap_or_default(), &tmp)?;
            std::fs::rename(&tmp, &self.link)
        };
        if let Err(e) = swap() {
            self.remove(generation);
            return Err(TemplateError::Capture(format!(
                "pointing {} at the new template: {e}",
                self.link.display()
            )));
        }
        if generation > 2 {
            self.remove(generation - 2);
        }
        self.generation = generation;
        self.taken_of = identity;
        self.failed_for = None;
        Ok(t)
    }

    /// A huge-page route's memory file of `generation`, in the server's directory on
    /// hugetlbfs, named as the generation's directory (`snapshot-N.G`).
    fn memory_file(&self, generation: u32) -> Option<PathBuf> {
        let dir = self.huge_dir.as_ref()?;
        let link = generation_dir(&self.link, generation);
        Some(dir.path().join(link.file_name().unwrap_or_default()))
    }

    /// Removes `generation`'s directory and memory file (clones that mapped it keep their
    /// pages until they go).
    fn remove(&self, generation: u32) {
        let _ = std::fs::remove_dir_all(generation_dir(&self.link, generation));
        if let Some(f) = self.memory_file(generation) {
            match std::fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
                    file = %f.display(),
                    "cannot remove a template's memory file (it holds huge pages): {e}; remove it by hand"
                ),
                _ => {}
            }
        }
    }

    /// Takes a new template if the route's kernel or image (or xcgi) is no longer what the
    /// template was taken of. None when nothing changed (or a template of this very change
    /// failed already).
    fn renew_if_changed(&mut self) -> Option<Result<Template, TemplateError>> {
        let now = Identity::of_shape(&self.spec.shape()).ok()?;
        if now == self.taken_of || self.failed_for.as_ref() == Some(&now) {
            return None;
        }
        tracing::info!(
            route = %self.route,
            "the route's kernel or image changed: taking a new template"
        );
        let r = self.take_next(now.clone());
        if r.is_err() {
            self.failed_for = Some(now);
        }
        Some(r)
    }
}

/// How often the keeper looks at the routes' kernels and images (a stat of each).
const KEEPER_PERIOD: Duration = Duration::from_millis(500);

/// Keeps each `start = "snapshot"` route's template current: when the route's kernel or
/// image file changes (size, modification time or inode: replaced or rewritten), a new
/// template is booted and captured, and the route's clones come from it from then on (VMs
/// already prepared serve as they are, as booted ones do). Until it is taken, clones of the
/// old one are refused (their fingerprints differ), and the failure of a new one is logged.
pub struct Keeper {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Starts looking after `lives` (none: no thread).
    pub fn start(
        mut lives: Vec<Live>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<Keeper> {
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        if lives.is_empty() {
            return Ok(Keeper { stop, thread: None });
        }
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("xcgi-templates".into())
            .spawn(move || loop {
                {
                    let (lock, cv) = &*s;
                    let Ok(stopped) = lock.lock() else { return };
                    let Ok((stopped, _)) = cv.wait_timeout_while(stopped, KEEPER_PERIOD, |s| !*s)
                    else {
                        return;
                    };
                    if *stopped {
                        return;
                    }
                }
                for live in &mut lives {
                    match live.renew_if_changed() {
                        None => {}
                        Some(Ok(t)) => {
                            metrics
                                .snapshot_templates
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            log_taken(&live.route, &t, live.generation);
                        }
                        Some(Err(e)) => tracing::error!(
                            route = %live.route,
                            "a new template could not be taken; its clones are refused until the kernel or image is fixed: {e}"
                        ),
                    }
                }
            })?;
        Ok(Keeper {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops looking (a template being taken is finished first) and waits for the thread.
    pub fn stop(&mut self) {
        if let Ok(mut s) = self.stop.0.lock() {
            *s = true;
        }
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The log line of a template taken.
pub fn log_taken(route: &str, t: &Template, generation: u32) {
    tracing::info!(
        route = %route,
        generation,
        boot_ms = t.boot.as_secs_f64() * 1e3,
        capture_ms = t.capture.as_secs_f64() * 1e3,
        memory_on_disk_kib = t.memory_on_disk >> 10,
        "template captured: requests run in clones of it"
    );
}

/// Bytes a (sparse) file holds on disk.
fn on_disk(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keeper's look: nothing while the kernel and image are what the template was taken
    /// of; a new template when either is replaced (here it fails: the "kernel" is no kernel),
    /// not tried again for the same change, tried again for the next one.
    #[test]
    fn a_changed_image_or_kernel_asks_for_a_new_template_once_per_change() {
        let d = tempfile::tempdir().unwrap();
        let (kernel, image) = (d.path().join("vmlinux"), d.path().join("root.cpio"));
        std::fs::write(&kernel, b"not a kernel").unwrap();
        std::fs::write(&image, b"070701").unwrap();
        let spec = VmSpec::for_test(
            kernel.clone(),
            super::super::vm::GuestRoot::Initramfs(image.clone()),
        );
        let link = d.path().join("snapshot-0");
        let mut live = Live {
            route: "/x".into(),
            taken_of: Identity::of_shape(&spec.shape()).unwrap(),
            spec,
            link: link.clone(),
            generation: 1,
            failed_for: None,
            huge_dir: None,
        };
        assert!(live.renew_if_changed().is_none(), "nothing changed");
        // Replaced (a new inode), as `mv new old` does.
        let new = d.path().join("root.new");
        std::fs::write(&new, b"070701 and more").unwrap();
        std::fs::rename(&new, &image).unwrap();
        match live.renew_if_changed() {
            Some(Err(_)) => {}
            other => panic!(
                "a changed image must ask for a template: {:?}",
                other.map(|r| r.map(|t| t.dir))
            ),
        }
        assert_eq!(
            live.generation, 1,
            "a failed template leaves the link as it was"
        );
        assert!(
            !generation_dir(&link, 2).exists(),
            "the failed generation is removed"
        );
        assert!(
            live.renew_if_changed().is_none(),
            "the same change is not tried again"
        );
        std::fs::write(&kernel, b"still not a kernel").unwrap();
        assert!(
            matches!(live.renew_if_changed(), Some(Err(_))),
            "the next change is tried"
        );
    }
}
