//! Descriptor chains resolved to host memory, for the devices that move data between guest
//! memory and a file descriptor with one `readv`/`writev`/`sendmsg` and no bounce buffer
//! (virtio-net on a TAP, virtio-console on a socket), both ways.
//!
//! [`IoChain`] checks what every such chain must be, once for both devices and both
//! directions: at most [`MAX_CHAIN`] descriptors, not cut short (virtio-queue ends a broken chain
//! early without an error), every descriptor in the right direction and wholly in guest memory,
//! and a total length within the device's bounds. A device adds its own rules on top (see
//! [`ChainError`] for the whole list).
//!
//! The chain keeps host pointers into guest memory: it is not `Send`, lives on the thread that
//! loaded it (the vCPU for transmit, the RX worker for receive) and is only used while the
//! caller's `GuestMemoryMmap` keeps the regions mapped.

use std::io;
use std::ops::Range;
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap, Permissions};

use super::sys::{byte_count, MAX_IOVECS};

/// Longest descriptor chain accepted: no device here offers indirect descriptors and no queue
/// is longer than this, so nothing a conforming driver sends is longer.
pub(crate) const MAX_CHAIN: usize = 256;

/// Why a chain was not used. Only logged (at `debug`) and counted by the device.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChainError {
    #[error("descriptor chain longer than {MAX_CHAIN}")]
    TooLong,
    /// virtio-queue ends a chain early, without an error, when a descriptor cannot be read,
    /// the next index is out of range, it loops, or the lengths overflow 32 bits: the last
    /// descriptor we saw still says "next".
    #[error("broken descriptor chain (bad next index, loop, or over 4 GiB)")]
    Broken,
    #[error("device-writable descriptor in a transmit chain")]
    WritableInTx,
    #[error("device-readable descriptor in a receive chain")]
    ReadableInRx,
    #[error(transparent)]
    BadBuffer(#[from] BadBuffer),
    #[error("chain holds {len} bytes, less than {min}")]
    TooShort { len: u64, min: u64 },
    #[error("chain of {len} bytes or more exceeds {max}")]
    TooBig { len: u64, max: u64 },
    #[error("chain needs more than {MAX_IOVECS} iovecs")]
    TooManyIovecs,
}

/// A descriptor's buffer that is not (wholly) in guest memory.
#[derive(Debug, thiserror::Error)]
#[error("buffer at {addr:#x}+{len} is outside guest memory: {source}")]
pub(crate) struct BadBuffer {
    pub addr: u64,
    pub len: u32,
    #[source]
    pub source: GuestMemoryError,
}

/// A descriptor chain as host iovecs, ready for one system call. Reused from chain to chain
/// (its vectors keep their capacity). After a failed load it holds part of the chain (in guest
/// memory, as checked so far) and is not to be used until the next load.
#[derive(Default)]
pub(crate) struct IoChain {
    iovecs: Vec<libc::iovec>,
    /// The first iovec not consumed yet (see [`consume`](Self::consume)).
    start: usize,
    /// The chain's non-empty descriptors: guest address and length.
    segments: Vec<(GuestAddress, u32)>,
    /// Bytes the chain's descriptors hold.
    len: u64,
    /// Loaded as a receive chain: the only kind data may be read into.
    writable: bool,
}

impl IoChain {
    /// Loads a transmit chain (every descriptor device-readable) of `min..=max` bytes.
    pub(crate) fn load_readable(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        min: u64,
        max: u64,
    ) -> Result<(), ChainError> {
        self.load(chain, mem, false, min, max)
    }

    /// Loads a receive chain (every descriptor device-writable) of at least `min` bytes.
    pub(crate) fn load_writable(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        min: u64,
    ) -> Result<(), ChainError> {
        self.load(chain, mem, true, min, u64::MAX)
    }

    fn load(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        writable: bool,
        min: u64,
        max: u64,
    ) -> Result<(), ChainError> {
        self.iovecs.clear();
        self.segments.clear();
        self.start = 0;
        self.len = 0;
        self.writable = writable;
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut more = false;
        for (i, desc) in chain.enumerate() {
            if i == MAX_CHAIN {
                return Err(ChainError::TooLong);
            }
            more = desc.has_next();
            match (desc.is_write_only(), writable) {
                (true, false) => return Err(ChainError::WritableInTx),
                (false, true) => return Err(ChainError::ReadableInRx),
                _ => {}
            }
            if desc.len() == 0 {
                continue;
            }
            self.len += u64::from(desc.len());
            if self.len > max {
                return Err(ChainError::TooBig { len: self.len, max });
            }
            push_iovecs(mem, desc.addr(), desc.len(), access, &mut self.iovecs)?;
            self.segments.push((desc.addr(), desc.len()));
        }
        if more {
            return Err(ChainError::Broken);
        }
        if self.len < min {
            return Err(ChainError::TooShort { len: self.len, min });
        }
        Ok(())
    }

    /// Bytes the chain holds (consumed or not).
    pub(crate) fn size(&self) -> u64 {
        self.len
    }

    /// How many iovecs a system call on what is left of the chain takes.
    pub(crate) fn iovec_count(&self) -> usize {
        self.iovecs.len() - self.start
    }

    /// Whether every byte of the chain has been consumed.
    pub(crate) fn is_drained(&self) -> bool {
        self.start >= self.iovecs.len()
    }

    /// Drops the first `n` bytes of what is left: whole iovecs move the start on, a partial one
    /// is shortened from the front; iovecs left empty are skipped, so the next call starts on
    /// bytes.
    pub(crate) fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(iov) = self.iovecs.get_mut(self.start) else {
                return;
            };
            if n >= iov.iov_len {
                n -= iov.iov_len;
                self.start += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
        while self
            .iovecs
            .get(self.start)
            .is_some_and(|iov| iov.iov_len == 0)
        {
            self.start += 1;
        }
    }

    /// Puts `bytes` in front of what is left of a transmit chain: they go out first. Host
    /// memory that lives for ever, never written through (a receive chain refuses it).
    pub(crate) fn prepend(&mut self, bytes: &'static [u8]) {
        if self.writable {
            debug_assert!(false, "prepend on a receive chain");
            return;
        }
        self.iovecs.insert(
            self.start,
            libc::iovec {
                // writev/sendmsg only read through it: the chain is not writable.
                iov_base: bytes.as_ptr().cast_mut().cast(),
                iov_len: bytes.len(),
            },
        );
    }

    /// Reads from `fd` into a receive chain, then into `spare` (host memory after the chain: a
    /// read that reaches it did not fit); returns the byte count. At most [`MAX_IOVECS`] iovecs
    /// are used (`spare` included), so a longer chain takes fewer bytes.
    pub(crate) fn read_from(&mut self, fd: RawFd, spare: &mut [u8]) -> io::Result<u64> {
        if !self.writable {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let with_spare = !spare.is_empty();
        if with_spare {
            self.iovecs.push(libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            });
        }
        let rest = &self.iovecs[self.start.min(self.iovecs.len())..];
        let count = iov_count(rest.len());
        // SAFETY: the chain is writable, so every iovec points into guest memory that the
        // caller's `GuestMemoryMmap` keeps mapped (checked by push_iovecs) or into `spare`, all
        // valid for writes of their lengths for the duration of the call.
        let n = unsafe { libc::readv(fd, rest.as_ptr(), count) };
        if with_spare {
            self.iovecs.pop();
        }
        byte_count(n)
    }

    /// Writes what is left of a transmit chain to `fd` with one `writev` (at most
    /// [`MAX_IOVECS`] iovecs) and consumes what was written.
    pub(crate) fn write_to(&mut self, fd: RawFd) -> io::Result<u64> {
        let rest = self.readable_rest()?;
        let count = iov_count(rest.len());
        // SAFETY: every iovec points into guest memory that the caller's `GuestMemoryMmap`
        // keeps mapped (checked by push_iovecs) or at a prepended static, and writev only reads
        // through them.
        let n = byte_count(unsafe { libc::writev(fd, rest.as_ptr(), count) })?;
        self.consume(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(n)
    }

    /// Sends what is left of a transmit chain on the socket `fd` with one `sendmsg` (at most
    /// [`MAX_IOVECS`] iovecs, no address, no control data) and consumes what was sent.
    pub(crate) fn send_to(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<u64> {
        let rest = self.readable_rest()?;
        // SAFETY: msghdr is plain old data; all zeros is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = rest.as_ptr().cast_mut();
        msg.msg_iovlen = rest.len().min(MAX_IOVECS);
        // SAFETY: as in write_to: the iovecs are readable for their lengths and sendmsg only
        // reads through them (msg_iov is `*mut` only by the C declaration).
        let n = byte_count(unsafe { libc::sendmsg(fd, &msg, flags) })?;
        self.consume(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(n)
    }

    fn readable_rest(&self) -> io::Result<&[libc::iovec]> {
        if self.writable {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        Ok(&self.iovecs[self.start.min(self.iovecs.len())..])
    }

    /// Copies `buf.len()` bytes of the chain's data, from byte `offset` on, out of guest memory.
    pub(crate) fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        self.pieces(offset, buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr)
        })
    }

    /// Writes `data` into the chain's buffers from byte `offset` on.
    pub(crate) fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[u8],
    ) -> Result<(), GuestMemoryError> {
        self.pieces(offset, data.len(), |addr, range| {
            mem.write_slice(&data[range], addr)
        })
    }

    /// Calls `f` with the guest address of each piece of bytes `offset..offset + len` of the
    /// chain and the range of those bytes; an error if the chain is shorter.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0usize;
        let mut skip = offset;
        for &(addr, seg_len) in &self.segments {
            if done == len {
                break;
            }
            let seg_len = u64::from(seg_len);
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let here = usize::try_from(seg_len - skip).map_or(len - done, |n| n.min(len - done));
            let at = addr
                .0
                .checked_add(skip)
                .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
            f(GuestAddress(at), done..done + here)?;
            done += here;
            skip = 0;
        }
        if done < len {
            return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(offset)));
        }
        Ok(())
    }

    /// A chain made of host buffers, to test the iovec arithmetic.
    #[cfg(test)]
    pub(crate) fn from_iovecs(iovecs: Vec<libc::iovec>) -> IoChain {
        IoChain {
            iovecs,
            ..IoChain::default()
        }
    }

    /// What is left, as (address, length) of each iovec.
    #[cfg(test)]
    pub(crate) fn rest(&self) -> Vec<(usize, usize)> {
        self.iovecs[self.start..]
            .iter()
            .map(|iov| (iov.iov_base as usize, iov.iov_len))
            .collect()
    }
}

/// Appends iovecs covering the guest range `addr..addr + len` (one per memory region it
/// spans), for one `readv`/`writev`/`sendmsg` straight from or into guest memory.
fn push_iovecs(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    access: Permissions,
    out: &mut Vec<libc::iovec>,
) -> Result<(), BadBuffer> {
    let bad = |source| BadBuffer {
        addr: addr.0,
        len,
        source,
    };
    let slices =
        vm_memory::GuestMemory::get_slices(mem, addr, len as usize, access).map_err(bad)?;
    for slice in slices {
        let slice = slice.map_err(bad)?;
        // The mutable guard serves both directions: iovec only has `*mut`. Without Xen the guard
        // maps nothing; the pointer stays valid as long as the regions `mem` holds.
        let base = slice.ptr_guard_mut().as_ptr();
        out.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}

/// How many of `n` iovecs one readv/writev takes: at most [`MAX_IOVECS`] (1024), which fits a
/// `c_int`.
fn iov_count(n: usize) -> libc::c_int {
    libc::c_int::try_from(n.min(MAX_IOVECS)).unwrap_or(libc::c_int::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_moves_through_iovecs() {
        let mut data = *b"hhhhhhhhhhhhpayload!";
        let base = data.as_mut_ptr();
        let iov = |at: usize, len: usize| libc::iovec {
            iov_base: base.wrapping_add(at).cast(),
            iov_len: len,
        };
        let rest = |c: &IoChain| -> Vec<(usize, usize)> {
            c.rest()
                .into_iter()
                .map(|(at, len)| (at - base as usize, len))
                .collect()
        };
        // 5 + 0 + 7 bytes of header, then the payload.
        let mut c = IoChain::from_iovecs(vec![iov(0, 5), iov(5, 0), iov(5, 10), iov(15, 5)]);
        c.consume(12);
        assert_eq!(rest(&c), [(12, 3), (15, 5)]);
        // Exactly at a boundary.
        let mut c = IoChain::from_iovecs(vec![iov(0, 12), iov(12, 8)]);
        c.consume(12);
        assert_eq!(rest(&c), [(12, 8)]);
        assert_eq!(c.iovec_count(), 1);
        // Step by step, as partial sends go.
        let mut c = IoChain::from_iovecs(vec![iov(0, 10), iov(10, 0), iov(10, 10)]);
        c.consume(4);
        assert_eq!(rest(&c), [(4, 6), (10, 0), (10, 10)]);
        c.consume(6);
        assert_eq!(rest(&c), [(10, 10)]);
        c.consume(3);
        assert_eq!(rest(&c), [(13, 7)]);
        assert!(!c.is_drained());
        c.consume(7);
        assert!(c.is_drained());
        // More than there is: everything goes.
        let mut c = IoChain::from_iovecs(vec![iov(0, 4)]);
        c.consume(12);
        assert!(c.is_drained());
        assert_eq!(c.iovec_count(), 0);
    }
}
