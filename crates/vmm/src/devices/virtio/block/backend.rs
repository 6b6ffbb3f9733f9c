//! The file side of virtio-blk: the disk image, opened read-only, and positional reads from
//! it.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::debug;

use super::{SECTOR_SHIFT, SECTOR_SIZE};

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened read-only.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The disk image.
        path: PathBuf,
        /// The error from open.
        #[source]
        source: io::Error,
    },
    /// Seeking to the image's end (to learn its size) failed.
    #[error("cannot determine the size of disk image {path}: {source}")]
    Size {
        /// The disk image.
        path: PathBuf,
        /// The error from the seek.
        #[source]
        source: io::Error,
    },
    /// The image's size is not a whole number of 512-byte sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of the {SECTOR_SIZE}-byte sector")]
    UnalignedSize {
        /// The disk image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

/// A disk image opened read-only: a whole number of sectors.
pub(super) struct DiskImage {
    file: File,
    path: PathBuf,
    /// Size in 512-byte sectors.
    capacity: u64,
}

impl DiskImage {
    /// Open `path` read-only. Its size must be a whole number of 512-byte sectors.
    pub(super) fn open(path: &Path) -> Result<DiskImage, BlockError> {
        let mut file = File::open(path).map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
        // Seeking to the end works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_owned(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize {
                path: path.to_owned(),
                size,
            });
        }
        let capacity = size >> SECTOR_SHIFT;
        debug!(path = %path.display(), capacity, "virtio-blk: opened disk image");
        Ok(DiskImage {
            file,
            path: path.to_owned(),
            capacity,
        })
    }

    /// Capacity in 512-byte sectors.
    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` from byte `offset` of the image.
    pub(super) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}
