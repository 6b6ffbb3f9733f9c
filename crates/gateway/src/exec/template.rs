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
use xcgi_vmm::{Attachments, Cancel, Capture, ExitReason, RunOptions};

use super::vm::{describe_outcome, VmSpec};

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
/// captures the VM into `dir`.
pub fn take(spec: &VmSpec, dir: &Path) -> Result<Template, TemplateError> {
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
        capture: Some(Capture {
            now: now.clone(),
            marker: None,
            dir: dir.to_path_buf(),
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
            memory_on_disk: on_disk(&dir.join(xcgi_vmm::snapshot::MEMORY_FILE)),
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

/// Bytes a (sparse) file holds on disk.
fn on_disk(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}
