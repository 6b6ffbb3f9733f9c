//! Process isolation's jail: each handler process runs as an unprivileged user, with rlimits,
//! in a process group of its own and, where the server can make one, a cgroup v2 of its own.
//! When the handler is done (response end, deadline, client gone) the whole group and cgroup
//! are killed: a child the handler did not `exec`, or one that left the process group with
//! `setsid`, dies with it and keeps no pipe (and so no server fd) open.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::ProcessSection;
use crate::exec::Invocation;
use xcgi_jail::cgroup::{self, Cgroup};
use xcgi_jail::{spawn, ChildSetup, Command, SpawnError, Spawned};

/// Why the jail cannot be set up, or a handler cannot run in it (refused at start).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// `[process] user` names no user of this host.
    #[error("process.user: no user {0:?} on this host: name an existing unprivileged user")]
    NoUser(String),
    /// `[process] user` is root.
    #[error("process.user: {0:?} is uid 0: handlers must not run as root")]
    RootUser(String),
    /// The handlers' seccomp filters could not be built.
    #[error(transparent)]
    Seccomp(#[from] crate::handler_seccomp::HandlerSeccompError),
    /// The handler user cannot execute a route's handler (by its mode bits).
    #[error("handler {path}: user {user} cannot run it: {why} (make it and its directories readable and executable for that user, or set [process] user)")]
    NotExecutable {
        /// The handler.
        path: PathBuf,
        /// The handler user's name.
        user: String,
        /// Which directory or file refuses it.
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
    /// What each child does before `execve`: rlimits, the user switch.
    setup: ChildSetup,
    /// This server's cgroups for handlers (one per running handler, reused).
    cgroups: Option<Arc<CgroupPool>>,
}

impl ProcessJail {
    /// The jail `[process]` describes: looks the user up (as root), makes this server's
    /// cgroup for handlers where `cgroup` is on and cgroup v2 is writable (warns otherwise).
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
            make_cgroup_parent().map(|parent| {
                Arc::new(CgroupPool {
                    parent,
                    free: Mutex::new(Vec::new()),
                    next: AtomicU64::new(0),
                })
            })
        } else {
            None
        };
        let setup = ChildSetup {
            limits,
            creds: user.as_ref().map(|u| (u.uid, u.gid)),
            no_new_privs: true,
            seccomp: if cfg.seccomp {
                crate::handler_seccomp::handler_filters()?
            } else {
                Vec::new()
            },
            ..ChildSetup::default()
        };
        Ok(ProcessJail {
            user,
            setup,
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

    /// Starts `inv`'s program jailed: as the handler user, with the rlimits, in a process
    /// group of its own and (where there is a cgroup parent) in a cgroup of its own from its
    /// first instruction. A cgroup that cannot be used is warned about and the handler runs
    /// with its process group only.
    pub fn spawn(&self, inv: &Invocation) -> Result<(Spawned, HandlerGroup), SpawnError> {
        let cgroup = self.cgroups.as_ref().and_then(|pool| match pool.take() {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "cannot make a cgroup for a handler: process group only");
                None
            }
        });
        // Opened per handler, not kept: the server holds no descriptor for an idle cgroup.
        let (cgroup, dir_fd) = match cgroup.map(|c| (std::fs::File::open(c.cg.path()), c)) {
            Some((Ok(f), c)) => (Some(c), Some(OwnedFd::from(f))),
            Some((Err(e), c)) => {
                warn!(error = %e, cgroup = %c.cg.path().display(),
                    "cannot open a handler's cgroup: process group only");
                (None, None)
            }
            None => (None, None),
        };
        let mut cmd = Command::new(&inv.program, &inv.env, &inv.cwd, &self.setup);
        cmd.cgroup = dir_fd.as_ref().map(|f| f.as_fd());
        let first = spawn(&cmd);
        let (child, cgroup) = match (first, cgroup) {
            (Err(SpawnError::Clone(e)), Some(c)) => {
                // The cgroup refused the child (EBUSY, EACCES, an old kernel): run without.
                warn!(error = %e, cgroup = %c.cg.path().display(),
                    "cannot start a handler in its cgroup: process group only");
                cmd.cgroup = None;
                (spawn(&cmd)?, None)
            }
            (r, c) => (r?, c),
        };
        drop(dir_fd);
        let group = HandlerGroup {
            pgid: child.pid,
            cgroup: cgroup.zip(self.cgroups.clone()),
        };
        Ok((child, group))
    }
}

impl Drop for ProcessJail {
    fn drop(&mut self) {
        if let Some(pool) = &self.cgroups {
            pool.remove_all();
        }
    }
}

/// The handlers' cgroups of this server: children of `parent`, reused from one handler to
/// the next once empty (making and removing one per request costs more than the handler).
#[derive(Debug)]
struct CgroupPool {
    parent: PathBuf,
    free: Mutex<Vec<HandlerCgroup>>,
    next: AtomicU64,
}

/// One handler's cgroup.
#[derive(Debug)]
struct HandlerCgroup {
    cg: Cgroup,
    /// Written `cgroup.kill` once: never reused. (Linux 6.18 here: a child started into a
    /// cgroup that was ever killed this way is killed at once, by the cgroup's kill
    /// sequence; checked by `an_empty_cgroup_is_reused_and_a_killed_one_is_not`.)
    killed: AtomicBool,
}

impl HandlerCgroup {
    /// Kills everything in the cgroup, if anything is there.
    fn kill(&self) {
        if self.cg.populated() {
            self.kill_all();
        }
    }

    /// Writes `cgroup.kill` (and so marks the cgroup as never to be reused).
    fn kill_all(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let _ = self.cg.kill();
    }
}

impl CgroupPool {
    /// A free cgroup, made when none is.
    fn take(&self) -> std::io::Result<HandlerCgroup> {
        if let Some(c) = self.free.lock().ok().and_then(|mut f| f.pop()) {
            return Ok(c);
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(HandlerCgroup {
            cg: Cgroup::create(&self.parent, &format!("h{n}"))?,
            killed: AtomicBool::new(false),
        })
    }

    /// Takes back an empty cgroup: kept for the next handler, or removed if it was killed.
    fn give_back(&self, c: HandlerCgroup) {
        if c.killed.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir(c.cg.path());
        } else if let Ok(mut free) = self.free.lock() {
            free.push(c);
        }
    }

    fn remove_all(&self) {
        if let Ok(mut free) = self.free.lock() {
            for c in free.drain(..) {
                let _ = std::fs::remove_dir(c.cg.path());
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.parent) {
            warn!(error = %e, cgroup = %self.parent.display(), "cannot remove the handlers' cgroup");
        }
    }
}

/// One handler's process group and cgroup.
#[derive(Debug)]
pub struct HandlerGroup {
    /// The handler's pid, the id of its process group.
    pgid: libc::pid_t,
    cgroup: Option<(HandlerCgroup, Arc<CgroupPool>)>,
}

impl HandlerGroup {
    /// Kills every process of the handler: the cgroup (all descendants, wherever they
    /// went) and the process group.
    pub fn kill(&self) {
        if let Some((c, _)) = &self.cgroup {
            c.kill();
        }
        self.kill_process_group();
    }

    fn kill_process_group(&self) {
        // SAFETY: kill(2) on our child's process group.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
    }

    /// After the handler's own process ended: kills what is left and, once its cgroup is
    /// empty (bounded wait), gives the cgroup back for the next handler.
    pub async fn finish(mut self) {
        self.kill_process_group();
        let Some((c, pool)) = self.cgroup.take() else {
            return;
        };
        let t = std::time::Instant::now();
        while c.cg.populated() {
            if t.elapsed() > Duration::from_secs(5) {
                // Not reused (a process it cannot kill); removed, if ever, at exit.
                warn!(cgroup = %c.cg.path().display(), "a handler's cgroup is still busy after 5 s");
                return;
            }
            c.kill_all();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pool.give_back(c);
    }
}

/// `NAME` (looked up) or `UID[:GID]` (GID defaults to UID): the uid and gid.
pub fn resolve_user(spec: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let numeric = |s: &str| s.parse::<libc::uid_t>().ok();
    match spec.split_once(':') {
        Some((u, g)) => Some((numeric(u)?, numeric(g)?)),
        None => numeric(spec)
            .map(|u| (u, u))
            .or_else(|| lookup_user(spec).map(|u| (u.uid, u.gid))),
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
    let Some(base) = cgroup::of_process("self") else {
        warn!("no cgroup v2 hierarchy: handler processes are killed by process group only");
        return None;
    };
    for gone in cgroup::remove_stale(&base, "xcgi-handlers-") {
        info!(cgroup = %gone.display(), "removed a cgroup left by an earlier server");
    }
    match Cgroup::create(&base, &format!("xcgi-handlers-{}", std::process::id())) {
        Ok(c) => Some(c.path().to_path_buf()),
        Err(e) => {
            warn!(error = %e, cgroup = %base.display(),
                "cannot make a cgroup for handlers: they are killed by process group only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn handler(dir: &Path, name: &str, body: &str) -> Invocation {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Invocation {
            program: path,
            env: vec![],
            cwd: dir.to_path_buf(),
        }
    }

    fn free_cgroups(jail: &ProcessJail) -> Vec<PathBuf> {
        jail.cgroups
            .as_ref()
            .map(|p| {
                p.free
                    .lock()
                    .expect("pool")
                    .iter()
                    .map(|c| c.cg.path().to_path_buf())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `[process] seccomp`: a handler gets EPERM for reading process memory
    /// (`process_vm_readv`, even its own) and for a clone into a new namespace, while fork
    /// and posix_spawn (clone3 answered ENOSYS, glibc falls back to clone) still work; with
    /// `seccomp = false` the read works.
    #[test]
    fn handlers_run_under_the_seccomp_filter_unless_it_is_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let src = dir.path().join("probe.c");
        std::fs::write(
            &src,
            r#"#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
static int child(void *a) { (void)a; return 0; }
static char stack[65536];
int main(void) {
    int code = 0;
    char from[8] = "probe", to[8];
    struct iovec l = {to, sizeof to}, r = {from, sizeof from};
    if (process_vm_readv(getpid(), &l, 1, &r, 1, 0) < 0 && errno == EPERM) code += 8;
    if (clone(child, stack + sizeof stack, CLONE_NEWUSER | SIGCHLD, 0) < 0 && errno == EPERM) code += 16;
    pid_t p = fork();
    if (p == 0) _exit(0);
    if (p < 0 || waitpid(p, 0, 0) != p) code += 1;
    if (system("exit 0") != 0) code += 2;
    return code;
}
"#,
        )
        .expect("write");
        let prog = dir.path().join("probe");
        let cc = std::process::Command::new("gcc")
            .arg("-O2")
            .arg("-o")
            .arg(&prog)
            .arg(&src)
            .status()
            .expect("gcc (scripts/setup.sh installs it)");
        assert!(cc.success(), "gcc failed");
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let inv = Invocation {
            program: prog,
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: dir.path().to_path_buf(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let run = |seccomp: bool| {
            let cfg = ProcessSection {
                seccomp,
                cgroup: false,
                ..ProcessSection::default()
            };
            let jail = ProcessJail::new(&cfg).expect("jail");
            rt.block_on(async {
                let (mut child, group) = jail.spawn(&inv).expect("spawn");
                let code = child.pidfd.wait().await.expect("wait");
                group.finish().await;
                code
            })
        };
        assert_eq!(
            run(true),
            24,
            "under the filter: process_vm_readv and clone(CLONE_NEWUSER) EPERM (8 + 16), \
             fork and system still work (+1, +2 when not)"
        );
        // Without it the read works; the clone may still be refused by the host (no
        // unprivileged user namespaces): bit 16 is not checked.
        let off = run(false);
        assert_eq!(
            off & 8,
            0,
            "seccomp = false: process_vm_readv was refused ({off})"
        );
        assert_eq!(
            off & 3,
            0,
            "fork or system failed without the filter ({off})"
        );
    }

    #[test]
    fn an_empty_cgroup_is_reused_and_a_killed_one_is_not() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: handlers run without a cgroup of their own; nothing to check");
            return;
        }
        let jail = ProcessJail::new(&ProcessSection::default()).expect("jail");
        assert!(
            jail.cgroups.is_some(),
            "no cgroup v2 for handlers here (as root)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        // In its own cgroup, with no_new_privs, not as root.
        let quick = handler(
            dir.path(),
            "quick",
            "grep -q /h[0-9]*$ /proc/self/cgroup || exit 9; \
             grep -q '^NoNewPrivs:.1' /proc/self/status || exit 10; \
             [ \"$(id -u)\" != 0 ] || exit 11",
        );
        let stuck = handler(dir.path(), "stuck", "exec sleep 30");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let run = |inv: Invocation, kill: bool| {
                let jail = &jail;
                async move {
                    let (mut child, group) = jail.spawn(&inv).expect("spawn");
                    if kill {
                        group.kill();
                    }
                    let code = child.pidfd.wait().await.expect("wait");
                    group.finish().await;
                    code
                }
            };
            assert_eq!(
                run(quick.clone(), false).await,
                0,
                "not jailed (9: cgroup, 10: nnp)"
            );
            let first = free_cgroups(&jail);
            assert_eq!(first.len(), 1, "the cgroup was not given back");
            assert_eq!(run(quick.clone(), false).await, 0);
            assert_eq!(
                free_cgroups(&jail),
                first,
                "the empty cgroup was not reused"
            );
            // Killed through cgroup.kill: removed, and the next handler gets a new one (a
            // child started into the killed cgroup would be killed at once: exit 137).
            assert_eq!(run(stuck, true).await, 128 + libc::SIGKILL);
            assert!(free_cgroups(&jail).is_empty(), "a killed cgroup was kept");
            assert!(!first[0].exists(), "a killed cgroup was not removed");
            assert_eq!(
                run(quick, false).await,
                0,
                "the handler after a kill was killed"
            );
        });
        let parent = jail.cgroups.as_ref().map(|p| p.parent.clone());
        drop(jail);
        assert!(
            parent.is_some_and(|p| !p.exists()),
            "the handlers' cgroup is left"
        );
    }
}
