//! Booting the lab in QEMU and running one command in it.
//!
//! The guest has two serial ports: ttyS0 is the kernel console (written to a log file, used
//! for diagnostics), ttyS1 carries only the command's output and the init script's marker
//! lines, and is QEMU's stdout. So kernel noise such as `kvm: Unhandled WRMSR` never mixes
//! with the command's output.
//!
//! The per-run files (the initrd, up to tens of MB with the xcgi binary, and the console log)
//! are anonymous temporary files handed to QEMU as `/dev/fd/N`: nothing is left on disk even
//! if this process is killed.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, info, trace, warn};

use crate::assets::{self, AssetError, LabAssets};
use crate::cpio::{Archive, CpioError, Source};

/// Working directory of the command inside the lab; relative guest paths are relative to it.
pub const GUEST_WORKDIR: &str = "/work";
/// Exit code for "the lab timed out" (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code for "the lab itself failed" (boot failure, QEMU missing, assets): as `docker run`.
pub const EXIT_LAB_ERROR: i32 = 125;

/// Kernel command line of the lab (without its tick, [`PERIODIC_TICK`]). Besides the console:
/// `tsc=reliable` (TCG's TSC follows the host clock, so it is synchronized; without it the lab
/// falls back to HPET and nested guests lose a stable kvmclock), and boot-time savers that do
/// not matter in a test lab (`mitigations=off`, no crypto self-tests).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 rdinit=/init tsc=reliable \
     mitigations=off cryptomgr.notests";

/// A periodic local-APIC tick for the lab's kernel: with its default one-shot timer, QEMU
/// 7.2's TCG sometimes loses the lab's timer interrupt while nested guests run, and the whole
/// lab then sleeps forever (its vCPU halted, no timer armed: docs/networking.md, "The lab's
/// lost timer"). A periodic tick re-arms itself, so a lost one costs a tick.
/// [`ONESHOT_TIMER_ENV`] leaves it out, for comparisons.
pub const PERIODIC_TICK: &str = "highres=off nohz=off";

/// Set (to anything) to boot the lab with its kernel's default tickless, high-resolution
/// one-shot timer instead of the periodic tick (to reproduce the lost-timer stall).
pub const ONESHOT_TIMER_ENV: &str = "XCGI_LAB_ONESHOT_TIMER";

/// The lab kernel's command line for this run: [`KERNEL_CMDLINE`] and [`PERIODIC_TICK`],
/// or without the tick when [`ONESHOT_TIMER_ENV`] is set.
pub fn kernel_cmdline() -> String {
    if std::env::var_os(ONESHOT_TIMER_ENV).is_some() {
        KERNEL_CMDLINE.to_owned()
    } else {
        format!("{KERNEL_CMDLINE} {PERIODIC_TICK}")
    }
}

/// Guest directories that the lab's /init mounts over; payload files there would be hidden.
const MOUNTED_DIRS: &[&str] = &["/proc", "/sys", "/dev", "/tmp", "/run"];

/// Longest output line passed on in one piece; longer ones are split.
const MAX_LINE: usize = 64 * 1024;

/// Lab CPUs unless asked otherwise: one. With two (QEMU's multi-threaded TCG), the lab's kernel
/// soft-locks now and then: in three of four long serve runs (docs/benchmarks.md), and in two
/// of two 40-clone loops of `xcgi run --restore` (after 11 and 13 clones), where one CPU ran
/// 40 of 40. [`LabError::Wedged`] names it when it happens.
pub const DEFAULT_CPUS: u32 = 1;

/// Errors from running a command in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Finding or building the kernel and base initramfs failed, or `ldd` failed on one of
    /// [`LabCommand::binaries`].
    #[error("preparing lab assets: {0}")]
    Assets(#[from] AssetError),
    /// Building the per-run payload archive (the command's files and binaries) failed.
    #[error("building the lab payload: {0}")]
    Payload(#[from] CpioError),
    /// A [`LabCommand`] that cannot run: option out of range, unusable guest path, a binary
    /// that is not a file.
    #[error("invalid lab command: {0}")]
    Invalid(String),
    /// Creating or writing a per-run temporary file, or reading the base initramfs, failed.
    #[error("{path}: {source}")]
    Io {
        /// The file (`<lab initrd temporary file>` for the anonymous initrd), or the
        /// directory a temporary file was to be made in.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// QEMU could not be started.
    #[error("starting {program}: {source} (install qemu-system-x86: scripts/setup.sh)")]
    Spawn {
        /// The QEMU binary.
        program: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// The run exceeded [`LabCommand::timeout`]; QEMU was killed.
    #[error(
        "lab timed out after {}s ({}); QEMU was killed{}",
        timeout.as_secs_f64(),
        if *booted { "the command was still running" } else { "it had not booted yet" },
        tail_suffix(console_tail)
    )]
    Timeout {
        /// The timeout that expired.
        timeout: Duration,
        /// Whether the command had started.
        booted: bool,
        /// The end of the kernel console (its last 30 lines, known noise left out).
        console_tail: String,
    },
    /// The lab's own kernel reported a soft lockup on its console (a CPU stuck in the kernel
    /// for over 20 s): the lab is wedged, whatever runs in it will not go on. Seen with two
    /// lab CPUs under QEMU's multi-threaded TCG (both CPUs stuck, one in `rcu_preempt`, one in
    /// `kthreadd`); QEMU was killed at once instead of at the timeout.
    #[error(
        "the lab's kernel soft-locked ({line}) after {}s; QEMU was killed (a lab failure: \
         with more than one lab CPU, try --cpus 1){}",
        after.as_secs(),
        tail_suffix(console_tail)
    )]
    Wedged {
        /// The console line that said so.
        line: String,
        /// How long the run had been going.
        after: Duration,
        /// Whether the command had started.
        booted: bool,
        /// The end of the kernel console (its last 30 lines, known noise left out).
        console_tail: String,
    },
    /// QEMU exited before the command's exit marker (boot failure, guest panic, QEMU error).
    #[error(
        "lab exited ({status}) before the command {}{}{}",
        if *booted { "finished" } else { "started (boot failure?)" },
        tail_suffix(qemu_stderr),
        tail_suffix(console_tail)
    )]
    Exited {
        /// QEMU's exit status, or why waiting for it failed.
        status: String,
        /// Whether the command had started.
        booted: bool,
        /// The end of the kernel console (its last 30 lines, known noise left out).
        console_tail: String,
        /// The end of QEMU's stderr (its last 16 KiB).
        qemu_stderr: String,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines ---\n{}", tail.trim_end())
    }
}

impl LabError {
    /// The process exit code a CLI should use for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            LabError::Timeout { .. } => EXIT_TIMEOUT,
            _ => EXIT_LAB_ERROR,
        }
    }
}

/// What to run in the lab.
#[derive(Debug, Clone)]
pub struct LabCommand {
    /// Run with `sh -c` in [`GUEST_WORKDIR`], stdin from /dev/null.
    pub command: String,
    /// Host file or directory (copied recursively) -> guest path (relative: below
    /// [`GUEST_WORKDIR`]; empty: `GUEST_WORKDIR/<file name>`).
    pub files: Vec<(PathBuf, String)>,
    /// Like `files`, for dynamically linked executables: their shared libraries (per `ldd`)
    /// and dynamic loader are added at the same paths as on the host.
    pub binaries: Vec<(PathBuf, String)>,
    /// Whole run: boot plus command.
    pub timeout: Duration,
    /// Guest memory.
    pub mem_mib: u32,
    /// 2 MiB huge pages reserved (`/proc/sys/vm/nr_hugepages`) before the command starts.
    pub hugepages: u32,
    /// Guest CPUs (`-smp`); TCG runs one host thread per CPU.
    pub cpus: u32,
    /// Where the per-run temporary files go (default: the system temp dir). They are
    /// anonymous (unlinked from the start), so they never outlive the run.
    pub scratch_dir: Option<PathBuf>,
}

impl LabCommand {
    /// `command` with the defaults: no files, 600 s timeout, 2048 MiB, 64 huge pages, one CPU
    /// ([`DEFAULT_CPUS`]), scratch files in the system temp dir.
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            files: Vec::new(),
            binaries: Vec::new(),
            timeout: Duration::from_secs(600),
            mem_mib: 2048,
            hugepages: 64,
            cpus: DEFAULT_CPUS,
            scratch_dir: None,
        }
    }

    /// Adds a host file or directory at `guest` (see [`LabCommand::files`]).
    pub fn file(mut self, host: impl Into<PathBuf>, guest: impl Into<String>) -> Self {
        self.files.push((host.into(), guest.into()));
        self
    }

    /// Adds a host executable and its shared libraries (see [`LabCommand::binaries`]).
    pub fn binary(mut self, host: impl Into<PathBuf>, guest: impl Into<String>) -> Self {
        self.binaries.push((host.into(), guest.into()));
        self
    }

    /// Sets [`LabCommand::timeout`] (must not be zero).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the guest memory in MiB (at least 256, and 128 more than the huge pages take).
    pub fn mem_mib(mut self, mem_mib: u32) -> Self {
        self.mem_mib = mem_mib;
        self
    }

    /// Sets the number of 2 MiB huge pages to reserve.
    pub fn hugepages(mut self, hugepages: u32) -> Self {
        self.hugepages = hugepages;
        self
    }

    /// Sets the number of guest CPUs (1 to 64).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Sets [`LabCommand::scratch_dir`].
    pub fn scratch_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.scratch_dir = Some(dir.into());
        self
    }

    fn validate(&self) -> Result<(), LabError> {
        if self.command.contains('\0') {
            return Err(LabError::Invalid("command contains a NUL byte".into()));
        }
        if self.cpus == 0 || self.cpus > 64 {
            return Err(LabError::Invalid(format!(
                "cpus {} not in 1..=64",
                self.cpus
            )));
        }
        if self.mem_mib < 256 {
            return Err(LabError::Invalid(format!(
                "mem {} MiB is too small (at least 256)",
                self.mem_mib
            )));
        }
        if u64::from(self.hugepages) * 2 + 128 > u64::from(self.mem_mib) {
            return Err(LabError::Invalid(format!(
                "{} huge pages ({} MiB) do not fit in {} MiB of guest memory",
                self.hugepages,
                u64::from(self.hugepages) * 2,
                self.mem_mib
            )));
        }
        if self.timeout.is_zero() {
            return Err(LabError::Invalid("timeout must be positive".into()));
        }
        Ok(())
    }
}

/// The result of a command that ran to completion in the lab.
#[derive(Debug, Clone)]
pub struct LabOutput {
    /// The command's exit status as `sh` reports it (128+N if killed by signal N).
    pub exit_code: i32,
    /// Its stdout and stderr, interleaved as written, lines joined with '\n'.
    pub output: String,
    /// From QEMU's start until it was stopped after the command ended.
    pub wall: Duration,
    /// From QEMU's start until the command started (lab boot, including module loading
    /// and the huge page reservation).
    pub boot: Duration,
}

/// A prepared lab: assets located (or built) once, any number of runs.
#[derive(Debug, Clone)]
pub struct Lab {
    assets: LabAssets,
    qemu: PathBuf,
}

impl Lab {
    /// Finds or builds the assets in the xcgi cache (see [`assets::prepare`]). QEMU is
    /// `$XCGI_LAB_QEMU`, else `qemu-system-x86_64` from PATH.
    pub fn prepare() -> Result<Self, LabError> {
        Ok(Self::with_assets(assets::prepare()?))
    }

    /// A lab on already prepared assets. QEMU is `$XCGI_LAB_QEMU`, else `qemu-system-x86_64`
    /// from PATH.
    pub fn with_assets(assets: LabAssets) -> Self {
        let qemu = std::env::var_os("XCGI_LAB_QEMU")
            .filter(|q| !q.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        Self { assets, qemu }
    }

    /// Uses this QEMU binary instead.
    pub fn with_qemu(mut self, qemu: impl Into<PathBuf>) -> Self {
        self.qemu = qemu.into();
        self
    }

    /// The kernel and base initramfs this lab boots.
    pub fn assets(&self) -> &LabAssets {
        &self.assets
    }

    /// Boots the lab, runs `cmd.command`, and calls `on_line` with each line of its output
    /// (without the newline) as soon as it arrives, on the calling thread. Returns when the
    /// command has finished; QEMU is killed before this returns, in every case (and, through
    /// `PR_SET_PDEATHSIG`, if this thread dies).
    ///
    /// Runs from several threads of one process take turns; the timeout counts from the
    /// start of this run's turn.
    pub fn run(
        &self,
        cmd: &LabCommand,
        mut on_line: impl FnMut(&str),
    ) -> Result<LabOutput, LabError> {
        cmd.validate()?;
        let scratch = cmd.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
        let anon_file = || {
            tempfile::tempfile_in(&scratch).map_err(|source| LabError::Io {
                path: scratch.clone(),
                source,
            })
        };
        let marker = format!("XCGI-LAB-{}", nonce());
        let initrd = anon_file()?;
        build_initrd(&self.assets, cmd, &marker, &initrd)?;
        let mut console_log = anon_file()?;

        // One lab at a time per process: each keeps its CPUs' worth of host threads busy, so
        // parallel labs only slow each other down (and run into their timeouts). The clock
        // starts once it is our turn.
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let deadline = start + cmd.timeout;

        let mut qemu = self.spawn(cmd, &initrd, &console_log)?;
        let (rx, stdout_thread) = spawn_line_reader(qemu.stdout()?);
        let stderr_thread = spawn_tail_reader(qemu.stderr()?);

        let mut output = String::new();
        let mut boot = None;
        let mut exit_code = None;
        let mut timed_out = false;
        let mut deliver = |text: &str, newline: bool, output: &mut String| {
            on_line(text);
            output.push_str(text);
            if newline {
                output.push('\n');
            }
        };
        let (mut watch, mut looked) = (ConsoleWatch::default(), Instant::now());
        let mut wedged = None;
        while exit_code.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                timed_out = true;
                break;
            }
            if looked.elapsed() >= CONSOLE_POLL {
                looked = Instant::now();
                wedged = watch.soft_lockup(&console_log);
                if wedged.is_some() {
                    break;
                }
            }
            let line = match rx.recv_timeout(left.min(CONSOLE_POLL)) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let text = String::from_utf8_lossy(&line);
            match text.find(&marker) {
                None => deliver(&text, true, &mut output),
                Some(pos) => {
                    if pos > 0 {
                        deliver(&text[..pos], false, &mut output);
                    }
                    let rest = text[pos + marker.len()..].trim();
                    if rest == "START" {
                        let t = start.elapsed();
                        info!(boot_s = t.as_secs_f64(), "lab booted; command started");
                        boot = Some(t);
                    } else if let Some(code) = rest.strip_prefix("EXIT ") {
                        match code.trim().parse::<i32>() {
                            Ok(c) => exit_code = Some(c),
                            Err(_) => warn!(line = %text, "malformed exit marker"),
                        }
                    }
                }
            }
        }

        // The command is done (or we gave up): the guest has nothing left worth waiting for.
        let status = qemu.kill();
        let _ = stdout_thread.join();
        let qemu_stderr = stderr_thread.join().unwrap_or_default();
        let console_tail = console_tail(&mut console_log, 30);
        debug!(console = %console_tail, "lab console (tail)");
        let wall = start.elapsed();

        if let Some(code) = exit_code {
            debug!(code, wall_s = wall.as_secs_f64(), "lab command finished");
            return Ok(LabOutput {
                exit_code: code,
                output,
                wall,
                boot: boot.unwrap_or(wall),
            });
        }
        if let Some(line) = wedged {
            return Err(LabError::Wedged {
                line,
                after: wall,
                booted: boot.is_some(),
                console_tail,
            });
        }
        if timed_out {
            return Err(LabError::Timeout {
                timeout: cmd.timeout,
                booted: boot.is_some(),
                console_tail,
            });
        }
        Err(LabError::Exited {
            status: match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            },
            booted: boot.is_some(),
            console_tail,
            qemu_stderr,
        })
    }

    fn spawn(&self, cmd: &LabCommand, initrd: &File, console_log: &File) -> Result<Qemu, LabError> {
        // QEMU opens these through its own inherited descriptors.
        let inherit = [initrd.as_raw_fd(), console_log.as_raw_fd()];
        let mut c = Command::new(&self.qemu);
        c.args(["-M", "q35", "-accel", "tcg,thread=multi", "-cpu", "max"])
            .arg("-smp")
            .arg(cmd.cpus.to_string())
            .arg("-m")
            .arg(cmd.mem_mib.to_string())
            // Like -nographic, without the monitor muxed onto stdio and without default
            // devices (no NIC and its option ROM to load).
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.assets.kernel)
            .arg("-initrd")
            .arg(format!("/dev/fd/{}", inherit[0]))
            .arg("-append")
            .arg(kernel_cmdline())
            .arg("-chardev")
            .arg(format!("file,id=console,path=/dev/fd/{}", inherit[1]))
            .args(["-serial", "chardev:console"])
            .args([
                "-chardev",
                "stdio,id=out,signal=off",
                "-serial",
                "chardev:out",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = std::process::id();
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                // Own process group, so a timeout kill reaches everything QEMU started...
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // ...and die with the thread that started us (e.g. on Ctrl-C of xcgi).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                for fd in inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        debug!(cmd = ?c, "starting QEMU");
        let child = c.spawn().map_err(|source| LabError::Spawn {
            program: self.qemu.display().to_string(),
            source,
        })?;
        Ok(Qemu {
            child,
            reaped: false,
        })
    }
}

/// Convenience: [`Lab::prepare`] then [`Lab::run`].
pub fn run(cmd: &LabCommand, on_line: impl FnMut(&str)) -> Result<LabOutput, LabError> {
    Lab::prepare()?.run(cmd, on_line)
}

fn nonce() -> String {
    let mut buf = [0u8; 12];
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        buf[..8].copy_from_slice(&(t as u64 ^ u64::from(std::process::id())).to_le_bytes());
    }
    hex::encode(buf)
}

/// Resolves a guest path from `--files`: absolute as is, relative below the workdir, empty
/// as `<workdir>/<host file name>`.
fn guest_path(host: &Path, guest: &str) -> Result<String, LabError> {
    let path = if guest.is_empty() {
        let name = host.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            LabError::Invalid(format!(
                "{}: no usable file name; give a guest path",
                host.display()
            ))
        })?;
        format!("{GUEST_WORKDIR}/{name}")
    } else if guest.starts_with('/') {
        guest.to_string()
    } else {
        format!("{GUEST_WORKDIR}/{guest}")
    };
    let norm = format!("/{}", crate::cpio::normalize_guest_path(&path)?);
    for m in MOUNTED_DIRS {
        if norm == *m || norm.starts_with(&format!("{m}/")) {
            return Err(LabError::Invalid(format!(
                "guest path {norm}: {m} is mounted over by the lab's init; use another place (e.g. {GUEST_WORKDIR})"
            )));
        }
    }
    Ok(norm)
}

/// Writes base initramfs + payload (command, env, files, binaries) as one file.
fn build_initrd(
    assets: &LabAssets,
    cmd: &LabCommand,
    marker: &str,
    out: &File,
) -> Result<(), LabError> {
    let mut payload = Archive::new();
    payload.add_file(
        "/lab/command",
        Source::Bytes(cmd.command.clone().into_bytes()),
        0o644,
    )?;
    payload.add_file(
        "/lab/env",
        Source::Bytes(format!("HUGEPAGES={}\nMARKER={marker}\n", cmd.hugepages).into_bytes()),
        0o644,
    )?;
    for (host, guest) in &cmd.files {
        let guest = guest_path(host, guest)?;
        payload.add_host_path(host, &guest)?;
    }
    for (host, guest) in &cmd.binaries {
        let guest = guest_path(host, guest)?;
        if !host.is_file() {
            return Err(LabError::Invalid(format!("{}: not a file", host.display())));
        }
        payload.add_file(&guest, Source::Path(host.clone()), 0o755)?;
        for lib in assets::shared_libraries(host)? {
            let lib_guest = lib.to_str().ok_or_else(|| {
                LabError::Invalid(format!("{}: library path is not UTF-8", lib.display()))
            })?;
            payload.add_file(lib_guest, Source::Path(lib.clone()), 0o755)?;
        }
    }
    let io_err = |source| LabError::Io {
        path: PathBuf::from("<lab initrd temporary file>"),
        source,
    };
    let mut w = BufWriter::new(out);
    let mut base = File::open(&assets.initramfs).map_err(|source| LabError::Io {
        path: assets.initramfs.clone(),
        source,
    })?;
    let base_len = io::copy(&mut base, &mut w).map_err(io_err)?;
    // newc archives are 4-byte aligned; keep the payload aligned even if the base is not.
    let pad = (4 - base_len % 4) % 4;
    w.write_all(&[0u8; 4][..pad as usize]).map_err(io_err)?;
    let payload_len = payload.write_to(&mut w)?;
    w.flush().map_err(io_err)?;
    debug!(
        base_len,
        payload_len,
        entries = payload.len(),
        "initrd written"
    );
    Ok(())
}

/// Reads lines from QEMU's stdout on a thread. The channel closes at EOF (QEMU exited).
fn spawn_line_reader(stdout: ChildStdout) -> (mpsc::Receiver<Vec<u8>>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut stdout = stdout;
        let mut buf = [0u8; 8192];
        let mut line = Vec::new();
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(error = %e, "reading QEMU stdout");
                    break;
                }
            };
            for &b in &buf[..n] {
                if b == b'\n' {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if tx.send(std::mem::take(&mut line)).is_err() {
                        return;
                    }
                } else {
                    line.push(b);
                    if line.len() >= MAX_LINE && tx.send(std::mem::take(&mut line)).is_err() {
                        return;
                    }
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(line);
        }
    });
    (rx, handle)
}

/// Collects the last 16 KiB of QEMU's stderr on a thread.
fn spawn_tail_reader(stderr: ChildStderr) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut stderr = stderr;
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    trace!(stderr = %String::from_utf8_lossy(&buf[..n]), "qemu");
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 16 * 1024 {
                        kept.drain(..kept.len() - 16 * 1024);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// How often a run looks at the kernel console for a soft lockup (output or not).
const CONSOLE_POLL: Duration = Duration::from_secs(2);

/// Reads the kernel console log as it grows, for the kernel's soft-lockup report.
#[derive(Default)]
struct ConsoleWatch {
    /// Bytes of the log looked at.
    read: u64,
    /// The last line, not yet ended.
    partial: Vec<u8>,
}

impl ConsoleWatch {
    /// The first soft-lockup line written since the last call, if any.
    fn soft_lockup(&mut self, log: &File) -> Option<String> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match log.read_at(&mut buf, self.read) {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            self.read += n as u64;
            self.partial.extend_from_slice(&buf[..n]);
            let end = self
                .partial
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let whole: Vec<u8> = self.partial.drain(..end).collect();
            let found = String::from_utf8_lossy(&whole)
                .lines()
                .find(|l| l.contains("BUG: soft lockup"))
                .map(|l| l.trim().to_string());
            if found.is_some() {
                return found;
            }
            // A line longer than this is no kernel report: keep its end only.
            if self.partial.len() > 4096 {
                let cut = self.partial.len() - 4096;
                self.partial.drain(..cut);
            }
        }
    }
}

/// Known harmless kernel console noise inside the lab.
fn is_noise(line: &str) -> bool {
    line.contains("kvm: Unhandled WRMSR") || line.contains("kvm: Unhandled RDMSR")
}

/// The last `n` meaningful lines of the kernel console log.
fn console_tail(log: &mut File, n: usize) -> String {
    let mut bytes = Vec::new();
    if log.seek(SeekFrom::Start(0)).is_err() || log.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty() && !is_noise(l))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The QEMU child: killed (whole process group) and reaped on every path, including drop.
struct Qemu {
    child: Child,
    reaped: bool,
}

impl Qemu {
    fn stdout(&mut self) -> Result<ChildStdout, LabError> {
        self.child
            .stdout
            .take()
            .ok_or_else(|| LabError::Invalid("no QEMU stdout".into()))
    }

    fn stderr(&mut self) -> Result<ChildStderr, LabError> {
        self.child
            .stderr
            .take()
            .ok_or_else(|| LabError::Invalid("no QEMU stderr".into()))
    }

    /// Kills QEMU's process group and waits for QEMU.
    fn kill(&mut self) -> io::Result<ExitStatus> {
        if !self.reaped {
            // The leader is not reaped yet, so its pid cannot have been reused: the group
            // id is still ours to kill.
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: plain kill(2) on our own child's process group.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
        }
        let status = self.child.wait();
        self.reaped = true;
        status
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        let h = Path::new("/host/dir/file.txt");
        assert_eq!(guest_path(h, "").unwrap(), "/work/file.txt");
        assert_eq!(guest_path(h, "x/y").unwrap(), "/work/x/y");
        assert_eq!(guest_path(h, "/opt//x").unwrap(), "/opt/x");
        assert!(matches!(guest_path(h, "/tmp/x"), Err(LabError::Invalid(_))));
        assert!(matches!(guest_path(h, "/run"), Err(LabError::Invalid(_))));
        assert!(guest_path(h, "/runner").is_ok());
        assert!(guest_path(h, "../x").is_err());
    }

    #[test]
    fn validates_options() {
        assert!(LabCommand::new("true").validate().is_ok());
        assert!(LabCommand::new("true").hugepages(2000).validate().is_err());
        assert!(LabCommand::new("true").cpus(0).validate().is_err());
        assert!(LabCommand::new("true")
            .timeout(Duration::ZERO)
            .validate()
            .is_err());
    }

    #[test]
    fn line_reader_splits_and_flushes_partial_lines() {
        let mut child = Command::new("printf")
            .arg("a\\r\\nb\\n\\npartial")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (rx, h) = spawn_line_reader(child.stdout.take().unwrap());
        let lines: Vec<_> = rx.iter().collect();
        h.join().unwrap();
        child.wait().unwrap();
        assert_eq!(
            lines,
            vec![
                b"a".to_vec(),
                b"b".to_vec(),
                b"".to_vec(),
                b"partial".to_vec()
            ]
        );
    }

    #[test]
    fn a_soft_lockup_on_the_console_is_found_once_whole() {
        use std::io::Write;
        let mut f = tempfile::tempfile().expect("tempfile");
        let mut w = ConsoleWatch::default();
        assert_eq!(w.soft_lockup(&f), None);
        f.write_all(b"[ 1.0] kvm: Unhandled WRMSR\n[ 68.8] watchdog: BUG: soft ")
            .expect("write");
        assert_eq!(w.soft_lockup(&f), None, "half a line is not read as one");
        f.write_all(b"lockup - CPU#0 stuck for 23s! [rcu_preempt:15]\n")
            .expect("write");
        assert_eq!(
            w.soft_lockup(&f).as_deref(),
            Some("[ 68.8] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [rcu_preempt:15]")
        );
        assert_eq!(w.soft_lockup(&f), None, "each line is looked at once");
    }

    #[test]
    fn console_tail_drops_noise() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"one\r\n[ 1.0] kvm: Unhandled WRMSR(0xc0010007) = 0x0\r\ntwo\nthree\n")
            .unwrap();
        assert_eq!(console_tail(&mut f, 2), "two\nthree");
        assert_eq!(console_tail(&mut f, 10), "one\ntwo\nthree");
    }
}
