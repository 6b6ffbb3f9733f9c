//! Builds newc cpio archives (Linux initramfs) for the lab.
//!
//! Entries are collected in an [`Archive`] keyed by their guest path, so that parent
//! directories are always written before their contents (the kernel's initramfs unpacker
//! does not create missing parents) and a later entry for the same path replaces an earlier
//! one. File contents are streamed from the host when the archive is written. The encoding
//! itself is [`xcgi_image::cpio::CpioWriter`]'s.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use xcgi_image::cpio::{CpioError as EncodeError, CpioWriter};

/// Errors from building or writing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// A guest path that [`normalize_guest_path`] rejects.
    #[error("invalid guest path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// A path would be both a directory and a file or symlink (itself or as a parent).
    #[error("guest path /{path} is used both as a directory and as a non-directory")]
    Conflict {
        /// The normalized path, without the leading '/'.
        path: String,
    },
    /// Reading a host file, directory or symlink failed (also: a non-UTF-8 name or target).
    #[error("{path}: {source}")]
    Host {
        /// The host path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A host path that is not a regular file, directory or symlink (a device, socket, FIFO).
    #[error("{path}: unsupported file type (only regular files, directories and symlinks)")]
    Unsupported {
        /// The host path.
        path: PathBuf,
    },
    /// A host file's size changed between its `stat` and the end of its copy.
    #[error("{path}: file changed size while being archived")]
    Changed {
        /// The host path.
        path: PathBuf,
    },
    /// Writing the archive to its destination failed.
    #[error("writing cpio archive: {0}")]
    Write(#[source] io::Error),
    /// Refused by the encoder (e.g. an entry too big for newc).
    #[error(transparent)]
    Encode(EncodeError),
}

impl From<EncodeError> for CpioError {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::Io(e) => CpioError::Write(e),
            e => CpioError::Encode(e),
        }
    }
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Read from this host path (following symlinks) when the archive is written.
    Path(PathBuf),
    /// These bytes.
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { source: Source, mode: u32 },
    Symlink { target: String },
}

/// An in-memory description of a newc cpio archive.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    /// Keys are normalized guest paths without the leading '/'.
    entries: BTreeMap<String, Node>,
}

/// Normalizes an absolute guest path: collapses `//` and `.`, rejects `..`, relative paths
/// and the root itself. Returns it without the leading '/'.
pub fn normalize_guest_path(path: &str) -> Result<String, CpioError> {
    let invalid = |reason| CpioError::InvalidPath {
        path: path.to_string(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(invalid("must be absolute"));
    }
    if path.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(invalid("must not contain '..'")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(invalid("must name something below '/'"));
    }
    Ok(parts.join("/"))
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries (including implicit parent directories).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing has been added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True if the archive has an entry at this (absolute) guest path.
    pub fn contains(&self, guest: &str) -> bool {
        normalize_guest_path(guest).is_ok_and(|k| self.entries.contains_key(&k))
    }

    fn ensure_parents(&mut self, key: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(pos) = key[end..].find('/') {
            let parent = &key[..end + pos];
            match self.entries.get(parent) {
                None => {
                    self.entries
                        .insert(parent.to_string(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(CpioError::Conflict {
                        path: parent.to_string(),
                    })
                }
            }
            end += pos + 1;
        }
        Ok(())
    }

    fn insert(&mut self, guest: &str, node: Node) -> Result<(), CpioError> {
        let key = normalize_guest_path(guest)?;
        self.ensure_parents(&key)?;
        let is_dir = matches!(node, Node::Dir { .. });
        match self.entries.get(&key) {
            Some(Node::Dir { .. }) if !is_dir => return Err(CpioError::Conflict { path: key }),
            Some(Node::Dir { .. }) => {
                // Re-adding a directory only updates its mode.
                self.entries.insert(key, node);
                return Ok(());
            }
            Some(_) if is_dir => return Err(CpioError::Conflict { path: key }),
            _ => {}
        }
        self.entries.insert(key, node);
        Ok(())
    }

    /// Adds a directory (and its parents).
    pub fn add_dir(&mut self, guest: &str, mode: u32) -> Result<(), CpioError> {
        self.insert(
            guest,
            Node::Dir {
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a regular file (and its parent directories); replaces an earlier file there.
    pub fn add_file(&mut self, guest: &str, source: Source, mode: u32) -> Result<(), CpioError> {
        self.insert(
            guest,
            Node::File {
                source,
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn add_symlink(&mut self, guest: &str, target: &str) -> Result<(), CpioError> {
        self.insert(
            guest,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Adds a host file, symlink or directory tree at `guest`, keeping permission bits.
    pub fn add_host_path(&mut self, host: &Path, guest: &str) -> Result<(), CpioError> {
        let host_err = |source| CpioError::Host {
            path: host.to_path_buf(),
            source,
        };
        let meta = std::fs::symlink_metadata(host).map_err(host_err)?;
        let ft = meta.file_type();
        let mode = meta.permissions().mode();
        if ft.is_symlink() {
            let target = std::fs::read_link(host).map_err(host_err)?;
            let target = target.to_str().ok_or_else(|| CpioError::Host {
                path: host.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8"),
            })?;
            self.add_symlink(guest, target)
        } else if ft.is_file() {
            self.add_file(guest, Source::Path(host.to_path_buf()), mode)
        } else if ft.is_dir() {
            self.add_dir(guest, mode)?;
            let mut children = std::fs::read_dir(host)
                .map_err(host_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(host_err)?;
            children.sort_by_key(|e| e.file_name());
            for child in children {
                let name = child.file_name();
                let name = name.to_str().ok_or_else(|| CpioError::Host {
                    path: child.path(),
                    source: io::Error::new(io::ErrorKind::InvalidData, "file name is not UTF-8"),
                })?;
                self.add_host_path(&child.path(), &format!("{}/{}", guest, name))?;
            }
            Ok(())
        } else {
            Err(CpioError::Unsupported {
                path: host.to_path_buf(),
            })
        }
    }

    /// Writes the archive (with its trailer) through [`CpioWriter`] and returns the number of
    /// bytes written, which is always a multiple of 4 so that another archive can be appended
    /// directly.
    pub fn write_to<W: Write>(&self, out: W) -> Result<u64, CpioError> {
        let mut w = CpioWriter::new(Counter { inner: out, n: 0 });
        for (name, node) in &self.entries {
            match node {
                Node::Dir { mode } => w.add_dir(name, *mode)?,
                Node::Symlink { target } => w.add_symlink(name, target)?,
                Node::File {
                    source: Source::Bytes(bytes),
                    mode,
                } => w.add_file(name, *mode, bytes)?,
                Node::File {
                    source: Source::Path(path),
                    mode,
                } => {
                    let host_err = |source| CpioError::Host {
                        path: path.clone(),
                        source,
                    };
                    let file = File::open(path).map_err(host_err)?;
                    let len = file.metadata().map_err(host_err)?.len();
                    let mut reader = HostReader {
                        inner: file,
                        error: None,
                    };
                    w.add_file_from(name, *mode, len, &mut reader)
                        .map_err(|e| match (e, reader.error.take()) {
                            // The copy failed reading the host file, not writing the archive.
                            (EncodeError::Io(_), Some(source)) => host_err(source),
                            (EncodeError::SizeMismatch { .. }, _) => {
                                CpioError::Changed { path: path.clone() }
                            }
                            (e, _) => e.into(),
                        })?;
                }
            }
        }
        Ok(w.finish()?.n)
    }
}

/// Counts the bytes written through it (the archive's length, for the caller).
struct Counter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Keeps the error of a failed read of a host file, so that it can be reported against that
/// file rather than as a failure to write the archive.
struct HostReader {
    inner: File,
    error: Option<io::Error>,
}

impl Read for HostReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::Interrupted {
                return e; // retried by the copy
            }
            let copy = io::Error::new(e.kind(), e.to_string());
            self.error = Some(e);
            copy
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize_guest_path("/a//b/./c").unwrap(), "a/b/c");
        assert!(normalize_guest_path("a/b").is_err());
        assert!(normalize_guest_path("/a/../b").is_err());
        assert!(normalize_guest_path("/").is_err());
    }

    #[test]
    fn parents_first_and_conflicts() {
        let mut a = Archive::new();
        a.add_file("/x/y/z", Source::Bytes(b"hi".to_vec()), 0o644)
            .unwrap();
        a.add_symlink("/bin/sh", "busybox").unwrap();
        let keys: Vec<_> = a.entries.keys().cloned().collect();
        assert_eq!(keys, ["bin", "bin/sh", "x", "x/y", "x/y/z"]);
        assert!(matches!(
            a.add_dir("/x/y/z", 0o755),
            Err(CpioError::Conflict { .. })
        ));
        assert!(matches!(
            a.add_file("/x/y/z/w", Source::Bytes(vec![]), 0o644),
            Err(CpioError::Conflict { .. })
        ));
        // Re-adding a directory is fine, and replacing a file is fine.
        a.add_dir("/x", 0o700).unwrap();
        a.add_file("/x/y/z", Source::Bytes(b"new".to_vec()), 0o600)
            .unwrap();
    }

    /// Cross-checks the writer against GNU cpio, when it is installed.
    #[test]
    fn gnu_cpio_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host.txt");
        std::fs::write(&host, b"from host\n").unwrap();
        let mut a = Archive::new();
        a.add_file("/etc/motd", Source::Bytes(b"hello\n".to_vec()), 0o644)
            .unwrap();
        a.add_file("/data/h.txt", Source::Path(host), 0o600)
            .unwrap();
        a.add_symlink("/bin/sh", "busybox").unwrap();
        let mut buf = Vec::new();
        let n = a.write_to(&mut buf).unwrap();
        assert_eq!(n as usize, buf.len());
        assert_eq!(n % 4, 0);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let mut child = match std::process::Command::new("cpio")
            .args(["-id", "--quiet"])
            .current_dir(&out)
            .stdin(std::process::Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => return, // cpio not installed: nothing to cross-check
        };
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(out.join("etc/motd")).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::read(out.join("data/h.txt")).unwrap(),
            b"from host\n"
        );
        let meta = std::fs::metadata(out.join("data/h.txt")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_link(out.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
    }
}
