//! A server's own directory on the hugetlbfs mount, where its huge-page templates keep their
//! memory (`[server] hugetlbfs`, docs/serve.md). Those files hold huge pages for as long as
//! they exist, and a server killed with SIGKILL cannot remove them; the next server must, or
//! each crash takes a template's pages out of the pool for good. It cannot go by pid (another
//! server in another pid namespace may share the mount and the pid), so each server claims a
//! directory `xcgi-serve-PID-RANDOM` and holds an exclusive `flock` on it for its life: at
//! start, a server removes every `xcgi-serve-*` directory on the mount whose lock it can take
//! (its owner is gone: the kernel released the lock with the process), and leaves the others.
//!
//! The sweep removes a directory only while holding its lock, and a claim checks, once it
//! holds its own lock, that its directory is still there (a sweep may have taken the lock of
//! the empty directory in between the mkdir and the flock): no live server's files are ever
//! removed.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use xcgi_image::kernel::flock_exclusive;

/// What a server's directory is called: this, its pid, a dash, random hex.
const PREFIX: &str = "xcgi-serve-";

/// A server's directory on hugetlbfs, locked while this lives; removed (with what it still
/// holds) when dropped.
#[derive(Debug)]
pub struct HugeDir {
    path: PathBuf,
    /// Holds the directory's exclusive flock (released when closed, also by the kernel at
    /// the server's death).
    _lock: File,
}

impl HugeDir {
    /// Sweeps what dead servers left on `mount` ([`sweep`]), then claims a new directory
    /// there (mode 0700: the files are the server's; jailed VM processes open them before
    /// they drop root).
    pub fn claim(mount: &Path) -> io::Result<HugeDir> {
        for gone in sweep(mount) {
            tracing::info!(
                dir = %gone.display(),
                "removed huge-page template memory left by a server that is gone"
            );
        }
        for _ in 0..8 {
            let path = mount.join(format!("{PREFIX}{}-{:016x}", std::process::id(), nonce()));
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            let lock = File::open(&path)?;
            flock_exclusive(&lock, false)?;
            // Still ours? A sweep may have removed it between the mkdir and the flock.
            let (held, now) = (lock.metadata()?, std::fs::symlink_metadata(&path));
            if now.is_ok_and(|m| m.ino() == held.ino() && m.dev() == held.dev()) {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
                return Ok(HugeDir { path, _lock: lock });
            }
        }
        Err(io::Error::other(format!(
            "cannot claim a directory of its own on {} (removed under it 8 times)",
            mount.display()
        )))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HugeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(
                dir = %self.path.display(),
                "cannot remove the server's huge-page template directory (its files hold huge \
                 pages): {e}; remove it by hand"
            );
        }
    }
}

/// Removes each `xcgi-serve-*` directory on `mount` that no live server holds (its lock can
/// be taken), with its files; returns those removed. One it cannot remove is logged and left.
pub fn sweep(mount: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let is_ours = e.file_name().to_string_lossy().starts_with(PREFIX);
        if !is_ours || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        let Ok(dir) = File::open(&path) else { continue };
        if !flock_exclusive(&dir, true).unwrap_or(false) {
            continue; // a live server's
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!(
                dir = %path.display(),
                "cannot remove huge-page template memory a server that is gone left: {e}; \
                 remove it by hand"
            ),
        }
        // The lock goes with `dir`, after the removal.
    }
    removed
}

/// 64 random bits for a directory's name (the clock's nanoseconds if getrandom fails: the
/// name need only not collide, and a collision is retried).
fn nonce() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        return u64::from_ne_bytes(b);
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// What a server killed with SIGKILL left is removed by the next one; what a live server
    /// holds (even one with the same pid, in another pid namespace) is not; a server's own
    /// directory goes with it. (flock works alike on every file system: a temporary
    /// directory stands in for the hugetlbfs mount.)
    #[test]
    fn a_dead_servers_template_memory_is_swept_and_a_live_ones_is_kept() {
        let mount = tempfile::tempdir().unwrap();
        let m = mount.path();
        // A dead server's: its directory and a memory file, no lock held.
        let dead = m.join(format!("{PREFIX}{}-dead", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("snapshot-0.1"), b"pages").unwrap();
        // A live server's, same pid (another pid namespace): its lock is held.
        let live = m.join(format!("{PREFIX}{}-live", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        std::fs::write(live.join("snapshot-0.1"), b"pages").unwrap();
        let held = File::open(&live).unwrap();
        flock_exclusive(&held, false).unwrap();
        // Not ours at all.
        std::fs::write(m.join("other-file"), b"x").unwrap();

        let ours = HugeDir::claim(m).unwrap();
        assert!(!dead.exists(), "the dead server's files are left");
        assert!(
            live.join("snapshot-0.1").exists(),
            "a live server's files went"
        );
        assert!(m.join("other-file").exists());
        std::fs::write(ours.path().join("snapshot-1.1"), b"pages").unwrap();

        // Another server starting now leaves ours alone.
        let theirs = HugeDir::claim(m).unwrap();
        assert!(ours.path().join("snapshot-1.1").exists());
        assert_eq!(names(m).len(), 4, "{:?}", names(m));

        let (ours_path, theirs_path) = (ours.path().to_path_buf(), theirs.path().to_path_buf());
        drop(ours);
        drop(theirs);
        assert!(!ours_path.exists() && !theirs_path.exists());
        // The live server ends: its lock goes, and the next sweep takes its directory.
        drop(held);
        assert_eq!(sweep(m), vec![live]);
        assert_eq!(names(m), vec!["other-file".to_string()]);
    }
}
