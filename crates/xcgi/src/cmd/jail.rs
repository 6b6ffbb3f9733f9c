//! `xcgi run --jail`: the VM in a jailed process of its own (docs/security.md, "The jail").
//!
//! The parent (`xcgi run --jail ...`) starts `xcgi run ... --jail-worker` with
//! [`xcgi_jail::spawn`] in new PID, mount, IPC, UTS and network namespaces, relays its stdout
//! and stderr, forwards SIGINT/SIGTERM/SIGHUP as a kill, and exits with its exit code. The
//! worker opens everything the VM needs and builds it up to the first KVM_RUN (as root), then
//! confines itself ([`xcgi_jail::confine`]), sets the seccomp filters each of its threads
//! installs for itself (`xcgi_vmm::seccomp`), and only then launches the guest.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use xcgi_gateway::exec::vm_cgroup::{VmCgroups, VmLimits};
use xcgi_jail::{ChildSetup, Command, Stdio};
use xcgi_vmm::Attachments;

use super::run::Args;

/// The first uid of the range a jailed `xcgi run` takes its user from (plus its pid).
pub const JAIL_UID_BASE: u32 = 2_000_000_000;

/// `xcgi run --jail`: starts the jailed worker and waits for it.
pub fn parent(a: &Args) -> anyhow::Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "--jail needs root (new namespaces, pivot_root and a change of user); run it as root"
        );
    }
    let exe = std::env::current_exe().context("finding the xcgi binary to start the worker")?;
    let mut args: Vec<OsString> = vec!["run".into()];
    args.extend(std::env::args_os().skip(2));
    args.push("--jail-worker".into());
    if a.jail_uid.is_none() {
        args.push("--jail-uid".into());
        args.push((JAIL_UID_BASE + std::process::id()).to_string().into());
    }
    let env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    let cwd = std::env::current_dir().context("the current directory")?;
    let setup = ChildSetup {
        namespaces: xcgi_gateway::exec::jailed::VM_NAMESPACES,
        ..ChildSetup::default()
    };
    // Its cgroup, as the server makes one per VM process: guest memory plus the VM process's
    // own as memory.max (none where cgroup v2 is missing: warned about).
    let cgroup = match VmCgroups::new(None) {
        Some(c) => Some(c.make(&VmLimits::for_guest(a.mem, a.vcpus))?),
        None => None,
    };
    let cgroup_dir = match &cgroup {
        Some(c) => Some(std::fs::File::open(c.path()).context("opening the VM process's cgroup")?),
        None => None,
    };
    let cmd = Command {
        args: &args,
        stdio: Stdio::Piped,
        cgroup: cgroup_dir.as_ref().map(|f| f.as_fd()),
        ..Command::new(&exe, &env, &cwd, &setup)
    };
    // A stop signal kills the VM process (its pid known once it is started).
    let pid = Arc::new(AtomicI32::new(0));
    let to_kill = Arc::clone(&pid);
    let signal = super::run::on_stop_signal(move || {
        let p = to_kill.load(Ordering::SeqCst);
        if p > 0 {
            // SAFETY: kills our own child; it is not reaped before the wait below.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    });
    let mut child = xcgi_jail::spawn(&cmd).context("starting the jailed VM process")?;
    pid.store(child.pid, Ordering::SeqCst);
    let pipes = child
        .stdio
        .take()
        .context("the jailed process's output is not piped")?;
    drop(pipes.stdin);
    let relays = [
        relay(pipes.stdout, std::io::stdout()),
        relay(pipes.stderr, std::io::stderr()),
    ];
    let code = child
        .pidfd
        .wait_blocking()
        .context("waiting for the jailed VM process")?;
    for r in relays {
        let _ = r.join();
    }
    let sig = signal.load(Ordering::SeqCst);
    if sig != 0 {
        eprintln!("xcgi: stopped by signal {sig}; the jailed VM process was killed");
        return Ok(128 + sig);
    }
    if let Some(max) = cgroup.as_ref().and_then(|c| c.oom_killed()) {
        eprintln!(
            "xcgi: the jailed VM process was killed by the kernel's OOM killer: it reached its \
             cgroup's memory.max ({} MiB)",
            max >> 20
        );
    }
    if code == 128 + libc::SIGSYS {
        eprintln!(
            "xcgi: the jailed VM process was killed by its seccomp filter: a system call outside \
             its allow-list (the kernel log names it: audit type=1326; XCGI_SECCOMP=log allows \
             and logs instead)"
        );
    }
    Ok(code)
}

/// Copies a pipe from the worker to our own stdout or stderr until it closes.
fn relay(
    from: OwnedFd,
    mut to: impl std::io::Write + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut from = std::fs::File::from(from);
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                break;
            }
        }
    })
}

/// The jailed worker: builds the VM, confines itself, then runs the guest.
pub fn worker(a: &Args, start: Instant) -> anyhow::Result<i32> {
    // Nothing the parent had open comes along (the spawn passes 0-2 only; this is the rest
    // a library might have opened since).
    xcgi_jail::close_from(3);
    let (shape, opts) = super::run::config(a)?;
    let uid = a
        .jail_uid
        .context("internal: the jailed process has no --jail-uid")?;
    // Confined single-threaded: a clone's working set is touched after (on the thread that
    // then runs its vCPU).
    let mut prepared =
        xcgi_vmm::vm::prepare_touching_later(&shape, start).context("cannot build the VM")?;
    xcgi_gateway::exec::jailed::confine_vm_process(shape.vcpus, uid).map_err(anyhow::Error::msg)?;
    prepared
        .touch_some(usize::MAX)
        .context("cannot touch the snapshot's working set")?;
    let attach = Attachments {
        cmdline_extra: a.cmdline.clone(),
        ..Attachments::default()
    };
    let live = Some(Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>);
    let outcome =
        xcgi_vmm::launch(prepared, &attach, &opts, start, live).context("cannot start the VM")?;
    super::run::report(a, &outcome, opts.setup_only, 0)
}

/// `xcgi vmm-worker`: what the server passes a jailed VM process (its control socket is fd 3).
#[derive(clap::Args)]
pub struct WorkerCli {
    /// The guest kernel.
    #[arg(long)]
    kernel: std::path::PathBuf,
    /// The guest's initramfs.
    #[arg(long, conflicts_with = "rootfs", required_unless_present = "rootfs")]
    initramfs: Option<std::path::PathBuf>,
    /// The guest's root disk.
    #[arg(long)]
    rootfs: Option<std::path::PathBuf>,
    /// Guest memory, MiB.
    #[arg(long)]
    mem: u64,
    /// Guest vCPUs.
    #[arg(long)]
    vcpus: u8,
    /// Guest memory on huge pages.
    #[arg(long)]
    hugepages: bool,
    /// The route's snapshot directory: the VM is a clone of it.
    #[arg(long)]
    snapshot: Option<std::path::PathBuf>,
    /// The uid and gid to drop to.
    #[arg(long)]
    uid: u32,
}

/// Runs one jailed VM process of the server; returns its exit code.
pub fn serve_worker(a: WorkerCli) -> i32 {
    use xcgi_gateway::exec::{jailed, GuestRoot, VmSpec};
    let root = match (a.initramfs, a.rootfs) {
        (Some(p), _) => GuestRoot::Initramfs(p),
        (None, Some(p)) => GuestRoot::Disk(p),
        (None, None) => return super::EXIT_USAGE,
    };
    let spec = VmSpec {
        kernel: a.kernel,
        root,
        memory_mib: a.mem,
        hugepages: a.hugepages,
        vcpus: a.vcpus,
        timeout: std::time::Duration::from_secs(1),
        pool: None,
        jail: None,
        debug_dump: false,
        debug_probe: None,
        snapshot: a.snapshot,
        working_set: false,
    };
    jailed::worker_main(&jailed::WorkerArgs { spec, uid: a.uid })
}
