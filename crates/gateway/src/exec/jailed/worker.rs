//! The VM process's side (`xcgi vmm-worker`): builds the route's VM, confines itself, says
//! ready, waits for its request, runs the guest and reports how it ended.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xcgi_vmm::{Attachments, NetAttachment, RunOptions};

use super::wire::{recv, send};
use crate::exec::vm::{VmEnd, VmSpec};

/// The worker's side: `xcgi vmm-worker --kernel K (--initramfs P | --rootfs P) --mem M
/// --vcpus N [--hugepages] --uid U`, started by [`Workers`] with its control socket as fd 3.
/// Returns the process's exit code.
pub fn worker_main(args: &WorkerArgs) -> i32 {
    // SAFETY: a descriptor the server passed as fd 3, ours alone.
    let control = unsafe { OwnedFd::from_raw_fd(3) };
    // Nothing else the server had open comes along.
    xcgi_jail::close_from(4);
    match worker_steps(args, control.as_fd()) {
        Ok(()) => 0,
        Err(e) => {
            let _ = send(control.as_fd(), format!("E{e}").as_bytes(), &[]);
            tracing::error!("jailed VM process: {e}");
            1
        }
    }
}

/// What the server tells `xcgi vmm-worker` on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The machine.
    pub spec: VmSpec,
    /// The uid and gid to drop to.
    pub uid: u32,
}

fn worker_steps(args: &WorkerArgs, control: BorrowedFd<'_>) -> Result<(), String> {
    let t0 = Instant::now();
    let shape = args.spec.shape();
    let mut prepared = xcgi_vmm::vm::prepare_touching_later(&shape, t0)
        .map_err(|e| format!("building the VM: {e}"))?;
    confine_vm_process(shape.vcpus, args.uid)?;
    silence_stdio().map_err(|e| format!("detaching stdio: {e}"))?;
    send(control, b"R", &[]).map_err(|e| format!("saying ready: {e}"))?;
    let mut buf = vec![0u8; 8192];
    // A clone touches its template's working set while it waits (at the lowest CPU weight),
    // a part at a time, and stops when its request comes: what is left, the guest faults in.
    let mut touching = true;
    let (n, fds) = loop {
        let wait = touching.then_some(Duration::ZERO);
        match recv(control, &mut buf, wait).map_err(|e| format!("waiting for a request: {e}"))? {
            Some(got) => break got,
            None => match prepared
                .touch_some(TOUCH_STEP)
                .map_err(|e| format!("touching the working set: {e}"))?
            {
                xcgi_vmm::vm::Touch::More => {}
                xcgi_vmm::vm::Touch::Done(pages) => {
                    touching = false;
                    // For the server's debug log: the whole set was touched ahead.
                    let _ = send(control, format!("T{pages}").as_bytes(), &[]);
                }
                xcgi_vmm::vm::Touch::Nothing => touching = false,
            },
        }
    };
    let (n, fds) = match (n, fds) {
        (0, _) => return Err("the server went away".into()),
        got => got,
    };
    let got_ns = xcgi_vmm::vm::monotonic_ns();
    if n == 0 || buf[0] != b'L' {
        return Err("the server closed the control socket".into());
    }
    let (attach, opts) = parse_launch(&buf[1..n], fds)?;
    stop_on_sigterm(&opts.cancel).map_err(|e| format!("SIGTERM's handler: {e}"))?;
    let (launched, launched_ns) = (Instant::now(), xcgi_vmm::vm::monotonic_ns());
    let r = xcgi_vmm::launch(prepared, &attach, &opts, launched, None);
    let mut end = VmEnd::from_run(&r);
    if let (true, Ok(out)) = (opts.setup_only, &r) {
        // `xcgi bench jail`: when the VM was ready for its first KVM_RUN (CLOCK_MONOTONIC,
        // ns; the launch's own measure, before the setup-only VM was torn down).
        let ready_ns = launched_ns + out.timings.setup.as_nanos();
        end.description = format!("setup-only got_ns={got_ns} ready_ns={ready_ns}");
    }
    if let Some(set) = &end.working_set {
        let mut w = vec![b'W'];
        w.extend_from_slice(&set.encode());
        send(control, &w, &[]).map_err(|e| format!("reporting the working set: {e}"))?;
    }
    let mut msg = format!("E{}", end.description.replace('\0', " ")).into_bytes();
    if let Some(d) = &end.dump {
        msg.push(0);
        msg.extend_from_slice(d.as_bytes());
    }
    msg.truncate(200 << 10);
    send(control, &msg, &[]).map_err(|e| format!("reporting the end: {e}"))
}

/// Pages of the working set touched between two looks at the control socket: a request that
/// comes meanwhile waits for at most these (~5 ms in the lab, microseconds on hardware).
const TOUCH_STEP: usize = 64;

/// The run's cancel, for [`on_sigterm`].
static STOP: std::sync::OnceLock<xcgi_vmm::Cancel> = std::sync::OnceLock::new();

extern "C" fn on_sigterm(_: libc::c_int) {
    // An atomic load and an atomic store: async-signal-safe.
    if let Some(c) = STOP.get() {
        c.cancel();
    }
}

/// SIGTERM (sent by the jail helper when the server asks: [`super::Helper::stop`]) cancels
/// the run: the VM ends, with its debug dump when it has one, and is reported as usual. As
/// PID 1 of its namespace the process gets no signal it has no handler for, SIGKILL aside.
fn stop_on_sigterm(cancel: &xcgi_vmm::Cancel) -> io::Result<()> {
    let _ = STOP.set(cancel.clone());
    // SAFETY: a zeroed sigaction with a handler that only touches atomics; the old action
    // is not asked for.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        if libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// From here on the guest may run: the VM process's stdin, stdout and stderr (the server's
/// own log, inherited) become pipes nobody reads or writes, so nothing it writes, compromised
/// or not, reaches the server's log except through the escaped report.
fn silence_stdio() -> io::Result<()> {
    // A read end with no writer (reads see EOF), a write end with no reader (writes fail:
    // EPIPE, SIGPIPE is ignored).
    let (r, _) = xcgi_jail::pipe()?;
    let (_, w) = xcgi_jail::pipe()?;
    // SAFETY: dup2 onto this process's own 0, 1 and 2.
    unsafe {
        if libc::dup2(r.as_raw_fd(), 0) < 0
            || libc::dup2(w.as_raw_fd(), 1) < 0
            || libc::dup2(w.as_raw_fd(), 2) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Confines a VM process whose VM is built (steps 3-5 of the jail, docs/security.md) and
/// sets the seccomp filters its threads install (step 6; `XCGI_SECCOMP=log` logs instead of
/// killing). Shared by the server's VM processes and `xcgi run --jail`.
pub fn confine_vm_process(vcpus: u8, uid: u32) -> Result<(), String> {
    xcgi_jail::confine(&xcgi_jail::Confinement {
        mount_point: std::env::temp_dir(),
        uid,
        gid: uid,
        limits: vec![
            (libc::RLIMIT_NOFILE, 128),
            // Threads count: main, vCPUs, device RX threads.
            (
                libc::RLIMIT_NPROC,
                u64::from(crate::exec::vm_cgroup::vm_process_tasks(vcpus)),
            ),
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_FSIZE, 0),
        ],
    })
    .map_err(|e| e.to_string())?;
    let mismatch = match std::env::var("XCGI_SECCOMP").as_deref() {
        Ok("log") => xcgi_vmm::seccomp::Mismatch::Log,
        _ => xcgi_vmm::seccomp::Mismatch::Kill,
    };
    let filters = xcgi_vmm::seccomp::Filters::new(mismatch).map_err(|e| e.to_string())?;
    xcgi_vmm::seccomp::set_process_filters(filters);
    Ok(())
}

fn parse_launch(b: &[u8], fds: Vec<OwnedFd>) -> Result<(Attachments, RunOptions), String> {
    let text = String::from_utf8_lossy(b);
    let l: Vec<&str> = text.split('\n').collect();
    if l.len() < 10 {
        return Err(format!("a launch message of {} lines", l.len()));
    }
    let timeout_ms: u64 = l[0].parse().map_err(|_| "a bad deadline")?;
    let mut fds = fds.into_iter();
    let channel = (l[2] == "1").then(|| fds.next().map(Arc::new)).flatten();
    let net = if l[3] == "1" {
        let tap = fds.next().ok_or("a NIC without its TAP")?;
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = l[4]
                .get(i * 2..i * 2 + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad MAC address")?;
        }
        Some(NetAttachment {
            tap: Arc::new(tap),
            mac,
            ip_param: l[5].to_string(),
            rx_ready: None,
        })
    } else {
        None
    };
    let attach = Attachments {
        channel,
        net,
        cmdline_extra: (!l[6].is_empty()).then(|| l[6].to_string()),
    };
    let opts = RunOptions {
        timeout: Duration::from_millis(timeout_ms),
        debug_dump: l[1] == "1",
        debug_probe: match l[8] {
            "" => None,
            p => Some(Arc::new(
                xcgi_vmm::diagnostics::Probe::parse(p).map_err(|e| e.to_string())?,
            )),
        },
        setup_only: l[7] == "1",
        record_working_set: l[9] == "1",
        ..RunOptions::default()
    };
    Ok((attach, opts))
}
