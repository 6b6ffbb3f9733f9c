//! A writer of "newc" cpio archives (the format the kernel's initramfs unpacker reads).
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex fields), the
//! NUL-terminated name, padding to 4 bytes, the data, padding to 4 bytes; the archive ends
//! with an entry named `TRAILER!!!`. Names are relative (`init`, `dev/console`); the kernel
//! does not create missing parent directories, so add directories before their contents.
//! Owner is always 0:0 and mtime 0 (reproducible archives).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

const TRAILER: &str = "TRAILER!!!";
/// Fields of newc headers are 32-bit.
const MAX_FIELD: u64 = u32::MAX as u64;

/// Mask of the file-type bits of a mode.
pub const S_IFMT: u32 = 0o170000;
/// File type: directory.
pub const S_IFDIR: u32 = 0o040000;
/// File type: regular file.
pub const S_IFREG: u32 = 0o100000;
/// File type: symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// File type: character device.
pub const S_IFCHR: u32 = 0o020000;
/// File type: block device.
pub const S_IFBLK: u32 = 0o060000;
/// File type: FIFO.
pub const S_IFIFO: u32 = 0o010000;

/// Errors writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Reading an entry's data or writing the archive failed.
    #[error("writing the cpio archive: {0}")]
    Io(#[from] io::Error),
    /// (name, reason): the name is empty, has a NUL or a `.`/`..` part, is `TRAILER!!!`, or
    /// is 4096 bytes or longer.
    #[error("invalid archive path {0:?}: {1}")]
    BadName(String, &'static str),
    /// The (normalised) name was added before.
    #[error("{0}: added twice to the archive")]
    Duplicate(String),
    /// (name, size in bytes): more than a 32-bit newc size field holds.
    #[error("{0}: {1} bytes is more than a newc cpio entry can hold (4 GiB)")]
    TooBig(String, u64),
    /// A reader ran out before the announced size; the archive written so far is unusable.
    #[error("{path}: the source gave {got} bytes, {expected} were announced (file changed while archiving?)")]
    SizeMismatch {
        /// The entry's name in the archive.
        path: String,
        /// The announced size in bytes.
        expected: u64,
        /// The bytes the reader gave.
        got: u64,
    },
}

/// Writes a newc archive to `W`. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    names: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// A writer that has written nothing yet; inode numbers start at 1.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            names: BTreeSet::new(),
        }
    }

    /// Names already added (normalised, without leading `/`).
    pub fn contains(&self, name: &str) -> bool {
        normalise(name).is_ok_and(|n| self.names.contains(&n))
    }

    /// A directory; `perm` is the permission bits (e.g. `0o755`).
    pub fn add_dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(
            name,
            S_IFDIR | (perm & 0o7777),
            2,
            0,
            (0, 0),
            &mut io::empty(),
        )
    }

    /// A regular file with the given contents.
    pub fn add_file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let mut r = data;
        self.add_file_from(name, perm, data.len() as u64, &mut r)
    }

    /// A regular file of `size` bytes read from `data` (which must give exactly that many).
    pub fn add_file_from(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, size, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn add_symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let mut t = target.as_bytes();
        self.entry(name, S_IFLNK | 0o777, 1, t.len() as u64, (0, 0), &mut t)
    }

    /// A character device node, e.g. `dev/console` (5, 1).
    pub fn add_char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.add_special(name, S_IFCHR | (perm & 0o7777), major, minor)
    }

    /// A device node or FIFO: `mode` includes the file type (`S_IFCHR`, `S_IFBLK`, `S_IFIFO`).
    pub fn add_special(
        &mut self,
        name: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(name, mode, 1, 0, (major, minor), &mut io::empty())
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(TRAILER, 0, 0, 1, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u64,
        rdev: (u32, u32),
        data: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let name = normalise(name)?;
        if size > MAX_FIELD {
            return Err(CpioError::TooBig(name, size));
        }
        if self.names.contains(&name) {
            return Err(CpioError::Duplicate(name));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(&name, ino, mode, nlink, size, rdev)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        self.written += copied;
        if copied != size {
            return Err(CpioError::SizeMismatch {
                path: name,
                expected: size,
                got: copied,
            });
        }
        self.pad()?;
        self.names.insert(name);
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u64,
        (rmajor, rminor): (u32, u32),
    ) -> Result<(), CpioError> {
        let namesize = name.len() + 1;
        let fields: [u64; 13] = [
            u64::from(ino),
            u64::from(mode),
            0, // uid
            0, // gid
            u64::from(nlink),
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            u64::from(rmajor),
            u64::from(rminor),
            namesize as u64,
            0, // check
        ];
        let mut h = String::with_capacity(110 + namesize);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        h.push_str(name);
        h.push('\0');
        self.out.write_all(h.as_bytes())?;
        self.written += h.len() as u64;
        self.pad()
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..n])?;
        self.written += n as u64;
        Ok(())
    }
}

/// `/dev//console/` → `dev/console`; rejects empty names, `.`/`..` parts, NUL, the trailer.
fn normalise(name: &str) -> Result<String, CpioError> {
    let bad = |why| CpioError::BadName(name.to_string(), why);
    if name.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(bad("empty (the root directory is implicit)"));
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(bad("`.` and `..` are not allowed"));
    }
    let n = parts.join("/");
    if n == TRAILER {
        return Err(bad("reserved for the end of the archive"));
    }
    if n.len() >= 4096 {
        return Err(bad("longer than PATH_MAX"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("dev", 0o755).unwrap();
        w.add_char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.add_dir("tmp", 0o1777).unwrap();
        w.add_file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.add_file("empty", 0o644, b"").unwrap();
        w.add_symlink("sh", "/bin/busybox").unwrap();
        w.finish().unwrap()
    }

    fn cpio(args: &[&str], input: &[u8], cwd: Option<&std::path::Path>) -> String {
        let mut cmd = Command::new("cpio");
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().expect("cpio is needed for these tests");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn archive_layout_is_aligned_and_terminated() {
        let a = sample();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        let tail = String::from_utf8_lossy(&a[a.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
        // First header: ino 1, mode dir 0755, nlink 2, namesize 4 ("dev\0").
        let h = std::str::from_utf8(&a[..110]).unwrap();
        assert_eq!(&h[6..14], "00000001");
        assert_eq!(&h[14..22], format!("{:08x}", S_IFDIR | 0o755));
        assert_eq!(&h[94..102], "00000004");
    }

    #[test]
    fn cpio_tool_lists_what_we_wrote() {
        let listing = cpio(&["-t", "-v", "--quiet"], &sample(), None);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 6, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"));
        assert!(lines[1].starts_with("crw-------"), "{}", lines[1]);
        assert!(lines[1].contains("5,"), "{}", lines[1]);
        assert!(lines[1].ends_with(" dev/console"));
        assert!(lines[2].starts_with("drwxrwxrwt"), "{}", lines[2]);
        assert!(lines[3].starts_with("-rwxr-xr-x") && lines[3].ends_with(" init"));
        assert!(lines[5].starts_with("lrwxrwxrwx") && lines[5].ends_with("sh -> /bin/busybox"));
    }

    #[test]
    fn cpio_tool_extracts_contents() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("a", 0o755).unwrap();
        let big: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
        w.add_file("a/big", 0o644, &big).unwrap();
        w.add_file("a/odd", 0o600, b"abc").unwrap();
        let archive = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        cpio(&["-i", "-d", "--quiet"], &archive, Some(dir.path()));
        assert_eq!(std::fs::read(dir.path().join("a/big")).unwrap(), big);
        assert_eq!(std::fs::read(dir.path().join("a/odd")).unwrap(), b"abc");
    }

    #[test]
    fn bad_names_and_duplicates_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for n in ["", "/", "a/../b", "./x", "TRAILER!!!", "a\0b"] {
            assert!(
                matches!(w.add_dir(n, 0o755), Err(CpioError::BadName(..))),
                "{n:?}"
            );
        }
        w.add_dir("x", 0o755).unwrap();
        assert!(w.contains("/x/"));
        assert!(matches!(
            w.add_dir("/x", 0o755),
            Err(CpioError::Duplicate(_))
        ));
    }

    #[test]
    fn short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let mut r: &[u8] = b"abc";
        let e = w.add_file_from("f", 0o644, 10, &mut r).unwrap_err();
        assert!(
            matches!(
                e,
                CpioError::SizeMismatch {
                    expected: 10,
                    got: 3,
                    ..
                }
            ),
            "{e}"
        );
    }
}
