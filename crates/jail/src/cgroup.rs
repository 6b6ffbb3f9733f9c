//! cgroup v2 directories for the processes xcgi starts: finding the hierarchy and this
//! process's place in it, making a parent with controllers enabled for its children, limits,
//! kill, events, removal, and the clean-up of what a killed server left behind.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the cgroup v2 hierarchy is mounted (from /proc/self/mountinfo), if it is.
pub fn mount_point() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
}

/// The cgroup v2 directory of process `pid` ("self" for this one), if there is a hierarchy.
pub fn of_process(pid: &str) -> Option<PathBuf> {
    let mount = mount_point()?;
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))?;
    Some(mount.join(own.trim_start_matches('/')))
}

/// One cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// The cgroup at `dir` (not checked).
    pub fn at(dir: impl Into<PathBuf>) -> Cgroup {
        Cgroup { dir: dir.into() }
    }

    /// Makes `parent/name`.
    pub fn create(parent: &Path, name: &str) -> io::Result<Cgroup> {
        let dir = parent.join(name);
        std::fs::create_dir(&dir)?;
        Ok(Cgroup { dir })
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The controllers its parent gives it (`cgroup.controllers`).
    pub fn controllers(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("cgroup.controllers"))
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Enables `name` for its children (`+name` into `cgroup.subtree_control`).
    pub fn enable(&self, name: &str) -> io::Result<()> {
        std::fs::write(self.dir.join("cgroup.subtree_control"), format!("+{name}"))
    }

    /// The controllers enabled for its children.
    pub fn enabled(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("cgroup.subtree_control"))
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Writes `value` into its interface file `file` (e.g. `memory.max`).
    pub fn set(&self, file: &str, value: &str) -> io::Result<()> {
        std::fs::write(self.dir.join(file), value)
    }

    /// The number after `key` in its flat-keyed file `file` (e.g. `memory.events`,
    /// `oom_kill`).
    pub fn event(&self, file: &str, key: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Whether a process is in it or below it.
    pub fn populated(&self) -> bool {
        self.event("cgroup.events", "populated") == Some(1)
    }

    /// Kills every process in it and below it (`cgroup.kill`, Linux 5.14+).
    pub fn kill(&self) -> io::Result<()> {
        std::fs::write(self.dir.join("cgroup.kill"), b"1")
    }

    /// Removes it once empty. A process just reaped may keep it busy a moment (the kernel
    /// finishes its exit after the parent's wait): retried for up to `within`.
    pub fn remove(&self, within: Duration) -> io::Result<()> {
        let t = Instant::now();
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && t.elapsed() < within => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What [`Cgroup::make_parent`] made.
#[derive(Debug)]
pub struct Parent {
    /// The parent, enabled controllers for its children.
    pub cgroup: Cgroup,
    /// The wanted controllers its children cannot have, each with why.
    pub missing: Vec<(String, String)>,
}

impl Cgroup {
    /// Makes `base/name` as a parent for cgroups with the `wanted` controllers, enabling each
    /// in `base` and in the new parent. `base` holding processes of its own cannot give its
    /// children controllers (cgroup v2's "no internal processes" rule, the root excepted):
    /// when `base` is this process's own cgroup, this process moves into a leaf `base/leaf`
    /// first (as a systemd unit with `Delegate=yes` is expected to). A controller that cannot
    /// be had is named in [`Parent::missing`]; the parent is made regardless.
    pub fn make_parent(base: &Path, name: &str, wanted: &[&str], leaf: &str) -> io::Result<Parent> {
        let base_cg = Cgroup::at(base);
        let offered = base_cg.controllers();
        let mut missing = Vec::new();
        let mut moved = false;
        for &c in wanted {
            if base_cg.enabled().iter().any(|e| e == c) {
                continue;
            }
            if !offered.iter().any(|o| o == c) {
                missing.push((
                    c.to_string(),
                    "not offered to this cgroup (bound to a cgroup v1 hierarchy, or not \
                     delegated)"
                        .to_string(),
                ));
                continue;
            }
            let mut r = base_cg.enable(c);
            if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EBUSY)) && !moved {
                moved = true;
                if of_process("self").as_deref() == Some(base) {
                    base_cg.move_processes_to(leaf)?;
                    r = base_cg.enable(c);
                }
            }
            if let Err(e) = r {
                missing.push((
                    c.to_string(),
                    format!("enabling it in {}: {e}", base.display()),
                ));
            }
        }
        let parent = match Cgroup::create(base, name) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Cgroup::at(base.join(name)),
            Err(e) => return Err(e),
        };
        for &c in wanted {
            if missing.iter().any(|(m, _)| m == c) {
                continue;
            }
            if let Err(e) = parent.enable(c) {
                missing.push((
                    c.to_string(),
                    format!("enabling it in {}: {e}", parent.dir.display()),
                ));
            }
        }
        Ok(Parent {
            cgroup: parent,
            missing,
        })
    }
}

impl Cgroup {
    /// Moves every process in it into its child `leaf` (made if missing): this process and
    /// those it started (a server and its helper), as a delegated systemd unit must before
    /// it can give controllers to cgroups of its own.
    fn move_processes_to(&self, leaf: &str) -> io::Result<()> {
        let l = match Cgroup::create(&self.dir, leaf) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Cgroup::at(self.dir.join(leaf)),
            Err(e) => return Err(e),
        };
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs"))?;
        for pid in procs.split_whitespace() {
            // One that exits meanwhile is no matter.
            let _ = l.set("cgroup.procs", pid);
        }
        Ok(())
    }
}

/// Removes what servers killed without a chance to clean up (SIGKILL) left in `base`: its
/// `<prefix>PID` cgroups whose PID is gone, with their children (killed first). Returns the
/// ones removed.
pub fn remove_stale(base: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(children) = std::fs::read_dir(e.path()) {
            for c in children.flatten().filter(|c| c.path().is_dir()) {
                let child = Cgroup::at(c.path());
                let _ = child.kill();
                let _ = child.remove(Duration::from_millis(500));
            }
        }
        if Cgroup::at(e.path())
            .remove(Duration::from_millis(100))
            .is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_read_by_its_whole_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n",
        )
        .expect("write");
        let cg = Cgroup::at(dir.path());
        assert_eq!(cg.event("memory.events", "oom"), Some(2));
        assert_eq!(cg.event("memory.events", "oom_kill"), Some(1));
        assert_eq!(cg.event("memory.events", "max"), Some(7));
        assert_eq!(cg.event("memory.events", "nothing"), None);
        assert_eq!(cg.event("no.such.file", "oom"), None);
    }

    #[test]
    fn this_process_has_a_cgroup_where_there_is_a_hierarchy() {
        match mount_point() {
            None => eprintln!("no cgroup v2 here: nothing to check"),
            Some(m) => {
                let own = of_process("self").expect("a cgroup v2 hierarchy but no 0:: line");
                assert!(
                    own.starts_with(&m),
                    "{} not under {}",
                    own.display(),
                    m.display()
                );
                assert!(
                    own.join("cgroup.procs").exists(),
                    "{} is no cgroup",
                    own.display()
                );
            }
        }
    }
}
