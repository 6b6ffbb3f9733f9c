//! Process isolation's jail: each handler process runs as an unprivileged user, with rlimits,
//! in a process group of its own and, where the server can make one, a cgroup v2 of its own.
//! When the handler is done (response end, deadline, client gone) the whole group and cgroup
//! are killed: a child the handler did not `exec`, or one that left the process group with
//! `setsid`, dies with it and keeps no pipe (and so no server fd) open.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::ProcessSection;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("process.user: no user {0:?} on this host: name an existing unprivileged user")]
    NoUser(String),
    #[error("process.user: {0:?} is uid 0: handlers must not run as root")]
    RootUser(String),
    #[error("handler {path}: user {user} cannot run it: {why} (make it and its directories readable and executable for that user, or set [process] user)")]
    NotExecutable {
        path: PathBuf,
        user: String,
        why: String,
    },
}

/// The user handlers run as.
#[derive(Debug, Clone)]
struct User {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// How every handler process of this server is confined.
#[derive(Debug)]
pub struct ProcessJail {
    /// None when the server is not root (it cannot switch users; handlers run as it).
    user: Option<User>,
    limits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// This server's cgroup for handlers (one child cgroup per handler).
    cgroups: Option<PathBuf>,
}

impl ProcessJail {
    pub fn new(cfg: &ProcessSection) -> Result<ProcessJail, JailError> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let user = if root {
            let u = lookup_user(&cfg.user).ok_or_else(|| JailError::NoUser(cfg.user.clone()))?;
            if u.uid == 0 {
                return Err(JailError::RootUser(cfg.user.clone()));
            }
            Some(u)
        } else {
            // SAFETY: geteuid has no preconditions.
            let uid = unsafe { libc::geteuid() };
            info!(
                uid,
                "the server is not root: handler processes run as its own user"
            );
            None
        };
        let limits = vec![
            (libc::RLIMIT_CPU, cfg.cpu_seconds),
            (libc::RLIMIT_AS, cfg.memory_mib.saturating_mul(1 << 20)),
            (libc::RLIMIT_NPROC, cfg.processes),
            (libc::RLIMIT_CORE, 0),
        ];
        let cgroups = if cfg.cgroup {
            make_cgroup_parent()
        } else {
            None
        };
        Ok(ProcessJail {
            user,
            limits,
            cgroups,
        })
    }

    /// Checks that the handler user can run `path` (every directory searchable, the file
    /// executable and, for a script, readable).
    pub fn check_executable(&self, path: &Path) -> Result<(), JailError> {
        let Some(u) = &self.user else { return Ok(()) };
        let fail = |why: String| JailError::NotExecutable {
            path: path.to_path_buf(),
            user: u.name.clone(),
            why,
        };
        let abs = std::path::absolute(path).map_err(|e| fail(e.to_string()))?;
        let mut dirs: Vec<&Path> = abs.ancestors().skip(1).collect();
        dirs.reverse();
        for d in dirs {
            if !allows(u, d, 0o1).map_err(|e| fail(format!("{}: {e}", d.display())))? {
                return Err(fail(format!("{} is not searchable", d.display())));
            }
        }
        if !allows(u, &abs, 0o5).map_err(|e| fail(e.to_string()))? {
            return Err(fail("the file is not readable and executable".into()));
        }
        Ok(())
    }

    /// Sets `cmd` up to run jailed; call [`HandlerGroup::started`] with the child's pid.
    pub fn prepare(
        &self,
        cmd: &mut tokio::process::Command,
        id: u64,
    ) -> std::io::Result<HandlerGroup> {
        cmd.process_group(0);
        let cgroup = self.cgroups.as_ref().and_then(|parent| {
            let dir = parent.join(format!("h{id}"));
            match std::fs::create_dir(&dir).and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
            }) {
                Ok(f) => Some((dir, OwnedFd::from(f))),
                Err(e) => {
                    warn!(error = %e, "cannot make a cgroup for a handler: process group only");
                    let _ = std::fs::remove_dir(&dir);
                    None
                }
            }
        });
        let procs_fd = cgroup.as_ref().map(|(_, f)| f.as_raw_fd());
        let user = self.user.clone();
        let limits = self.limits.clone();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let setup = move || -> std::io::Result<()> {
            // Runs in the child between fork and exec: system calls only, no allocation.
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            if let Some(fd) = procs_fd {
                // SAFETY: fd is the open cgroup.procs of this handler's cgroup; "0" moves
                // the calling process. Done first, while still root.
                let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &(res, value) in &limits {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                // SAFETY: lim is a valid rlimit for this call.
                check(unsafe { libc::setrlimit(res, &lim) })?;
            }
            if let Some(u) = &user {
                // Groups first, the uid last (after it, nothing else may be changed).
                // SAFETY: drops every supplementary group of this (child) process; a null
                // list with length 0 is valid.
                check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
                // SAFETY: a plain credential change of this (child) process.
                check(unsafe { libc::setgid(u.gid) })?;
                // SAFETY: a plain credential change of this (child) process.
                check(unsafe { libc::setuid(u.uid) })?;
            }
            // Die with the server. Set after the uid change, which clears it.
            // SAFETY: prctl with an integer argument.
            check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) })?;
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != parent {
                return Err(std::io::Error::other("the server went away"));
            }
            Ok(())
        };
        // SAFETY: the closure only makes async-signal-safe system calls (see above).
        unsafe {
            cmd.pre_exec(setup);
        }
        Ok(HandlerGroup { pgid: None, cgroup })
    }
}

impl Drop for ProcessJail {
    fn drop(&mut self) {
        if let Some(p) = &self.cgroups {
            if let Err(e) = std::fs::remove_dir(p) {
                warn!(error = %e, cgroup = %p.display(), "cannot remove the handlers' cgroup");
            }
        }
    }
}

/// One handler's process group and cgroup.
#[derive(Debug)]
pub struct HandlerGroup {
    pgid: Option<i32>,
    cgroup: Option<(PathBuf, OwnedFd)>,
}

impl HandlerGroup {
    /// The handler started as `pid` (its process group's id).
    pub fn started(&mut self, pid: Option<u32>) {
        self.pgid = pid.and_then(|p| i32::try_from(p).ok()).filter(|&p| p > 0);
    }

    /// Kills every process of the handler: the cgroup (all descendants, wherever they
    /// went) and the process group.
    pub fn kill(&self) {
        if let Some((dir, _)) = &self.cgroup {
            let _ = std::fs::write(dir.join("cgroup.kill"), b"1");
        }
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) on our child's process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }

    /// After the handler's own process ended: kills what is left and removes its cgroup once
    /// empty (bounded wait).
    pub async fn finish(mut self) {
        self.kill();
        let Some((dir, fd)) = self.cgroup.take() else {
            return;
        };
        drop(fd);
        let t = std::time::Instant::now();
        loop {
            let populated = std::fs::read_to_string(dir.join("cgroup.events"))
                .map(|s| s.lines().any(|l| l == "populated 1"))
                .unwrap_or(false);
            if !populated && std::fs::remove_dir(&dir).is_ok() {
                return;
            }
            if t.elapsed() > Duration::from_secs(5) {
                warn!(cgroup = %dir.display(), "a handler's cgroup is still busy after 5 s");
                return;
            }
            let _ = std::fs::write(dir.join("cgroup.kill"), b"1");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn lookup_user(name: &str) -> Option<User> {
    let cname = CString::new(name).ok()?;
    // SAFETY: passwd is a plain C struct of integers and pointers: all zeroes is a valid value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into pw and buf (sized as passed); out points to pw or null.
    let r = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if r != 0 || out.is_null() {
        return None;
    }
    Some(User {
        name: name.to_string(),
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// Whether user `u` has all of `bits` (r=4, w=2, x=1) on `path` by its mode bits.
fn allows(u: &User, path: &Path, bits: u32) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let mode = m.mode();
    let granted = if m.uid() == u.uid {
        (mode >> 6) & 7
    } else if m.gid() == u.gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    Ok(granted & bits == bits)
}

/// This server's cgroup for handlers: a child of its own cgroup in the cgroup v2 hierarchy.
/// None (with a warning) where there is no writable cgroup v2.
fn make_cgroup_parent() -> Option<PathBuf> {
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        });
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        });
    let (Some(mount), Some(own)) = (mount, own) else {
        warn!("no cgroup v2 hierarchy: handler processes are killed by process group only");
        return None;
    };
    let base = mount.join(own.trim_start_matches('/'));
    remove_stale_cgroups(&base);
    let dir = base.join(format!("xcgi-handlers-{}", std::process::id()));
    match std::fs::create_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            warn!(error = %e, cgroup = %dir.display(),
                "cannot make a cgroup for handlers: they are killed by process group only");
            None
        }
    }
}

/// Removes what servers killed without a chance to clean up (SIGKILL) left in `base`: their
/// `xcgi-handlers-PID` cgroups, once no process is left in them.
fn remove_stale_cgroups(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("xcgi-handlers-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(children) = std::fs::read_dir(e.path()) {
            for c in children.flatten().filter(|c| c.path().is_dir()) {
                let _ = std::fs::write(c.path().join("cgroup.kill"), b"1");
                let _ = std::fs::remove_dir(c.path());
            }
        }
        if std::fs::remove_dir(e.path()).is_ok() {
            info!(cgroup = %e.path().display(), "removed a cgroup left by an earlier server");
        }
    }
}
