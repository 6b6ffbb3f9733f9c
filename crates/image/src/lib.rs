//! xcgi-image: everything a guest needs on disk.
//!
//! - [`kernel`]: builds (or finds in the cache) the minimal guest `vmlinux` from Debian's
//!   `linux-source` tarball, the repository's config fragment and patches (both embedded).
//! - [`rootfs`]: builds a read-only ext4 root filesystem or a newc initramfs from one program
//!   or a directory tree.
//! - [`cpio`]: a small newc cpio writer.
//! - [`elf`]: a small ELF header / program header reader used to check guest programs.

#![warn(missing_docs)]

pub mod cpio;
pub mod deps;
pub mod elf;
pub mod kernel;
pub mod rootfs;

use std::path::PathBuf;

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_ENV: &str = "XCGI_CACHE_DIR";

/// Errors finding the cache directory.
#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    /// Neither `XCGI_CACHE_DIR` nor `HOME` is set to a non-empty value.
    #[error(
        "cannot find a cache directory: neither {CACHE_DIR_ENV} nor HOME is set; \
         set {CACHE_DIR_ENV} to a writable directory"
    )]
    NoHome,
}

/// The xcgi cache directory: `$XCGI_CACHE_DIR` if set (and not empty), else
/// `$HOME/.cache/xcgi`. The directory is not created here.
pub fn cache_dir() -> Result<PathBuf, CacheDirError> {
    cache_dir_from(
        std::env::var_os(CACHE_DIR_ENV).map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn cache_dir_from(
    explicit: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Result<PathBuf, CacheDirError> {
    match (explicit, home) {
        (Some(dir), _) if !dir.as_os_str().is_empty() => Ok(dir),
        (_, Some(home)) if !home.as_os_str().is_empty() => Ok(home.join(".cache").join("xcgi")),
        _ => Err(CacheDirError::NoHome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_prefers_env_then_home() {
        assert_eq!(
            cache_dir_from(Some("/c".into()), Some("/h".into())).unwrap(),
            PathBuf::from("/c")
        );
        assert_eq!(
            cache_dir_from(Some("".into()), Some("/h".into())).unwrap(),
            PathBuf::from("/h/.cache/xcgi")
        );
        assert_eq!(
            cache_dir_from(None, Some("/h".into())).unwrap(),
            PathBuf::from("/h/.cache/xcgi")
        );
        assert!(matches!(
            cache_dir_from(None, None),
            Err(CacheDirError::NoHome)
        ));
    }
}
