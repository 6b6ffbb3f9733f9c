//! A snapshot's state file: everything of a stopped VM that is not its memory (issue 13). The
//! memory goes to a file of its own, mapped `MAP_PRIVATE` by each clone.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! "XCGISNAP"  u32 format version  u32 section count
//! sections:   u16 name length, name (UTF-8), u32 length, bytes      (count times)
//! u64 FNV-1a (over 64-bit words) of everything before it
//! ```
//!
//! The first section, `identity`, says what the snapshot belongs to (`key=value` lines: the
//! xcgi version, the kernel's and the root's digests, memory, vCPUs, huge pages); a snapshot
//! is refused, with the reason named, when any of it differs from what the restoring side
//! expects. The VM's own state (`vm.*`) and each vCPU's (`vcpuN.*`) are KVM's structures as
//! bytes, each section checked against the structure's size; devices put their own state in
//! `dev.<name>` sections ([`Snapshot::devices`]).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::hypervisor::{
    ClockData, Fpu, IrqChip, LapicState, MpState, MsrEntry, PitState, Regs, SpecialRegs,
    VcpuEvents, VcpuState, VmState, Xcrs, Xsave,
};

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"XCGISNAP";
/// The layout version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// A snapshot's state is small (the VM's memory is elsewhere); a larger file is refused.
const MAX_STATE_BYTES: u64 = 64 << 20;

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// A file's identity for a snapshot: its size, modification time, inode and device. Cheap
/// (one `stat`), so every clone checks it; a file written anew (an image rebuilt, a kernel
/// replaced) has another, and its old snapshots are refused.
pub fn fingerprint(path: &Path) -> Result<String, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!(
        "size {} mtime {}.{:09} inode {}:{}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.dev(),
        m.ino()
    ))
}

/// What a snapshot belongs to: it may only be restored where all of it matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The xcgi that took it (`CARGO_PKG_VERSION`; a monitor of another version may lay out
    /// devices differently).
    pub xcgi_version: String,
    /// The guest kernel's digest (any stable digest the caller chooses, e.g. SHA-256 hex).
    pub kernel: String,
    /// The guest root's digest (initramfs or disk image).
    pub root: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory on 2 MiB pages.
    pub hugepages: bool,
}

impl Identity {
    /// The identity of `shape`'s machine as it is now: this xcgi, the kernel's and the root's
    /// [`fingerprint`]s, memory, vCPUs and huge pages.
    pub fn of_shape(shape: &crate::MachineShape) -> Result<Identity, SnapshotError> {
        let root = shape
            .rootfs
            .as_deref()
            .or(shape.initramfs.as_deref())
            .unwrap_or(Path::new("/"));
        Ok(Identity {
            xcgi_version: env!("CARGO_PKG_VERSION").into(),
            kernel: fingerprint(&shape.kernel)?,
            root: fingerprint(root)?,
            memory_mib: shape.memory.size_mib,
            vcpus: shape.vcpus,
            hugepages: shape.memory.hugepages,
        })
    }

    fn encode(&self) -> Vec<u8> {
        format!(
            "xcgi_version={}\nkernel={}\nroot={}\nmemory_mib={}\nvcpus={}\nhugepages={}\n",
            self.xcgi_version, self.kernel, self.root, self.memory_mib, self.vcpus, self.hugepages
        )
        .into_bytes()
    }

    fn decode(b: &[u8]) -> Result<Identity, SnapshotError> {
        let text = std::str::from_utf8(b).map_err(|_| corrupt("identity is not UTF-8"))?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| corrupt("identity without one of its keys"))
        };
        let num = |k: &str| -> Result<u64, SnapshotError> {
            get(k)?
                .parse()
                .map_err(|_| corrupt("identity with a bad number"))
        };
        Ok(Identity {
            xcgi_version: get("xcgi_version")?,
            kernel: get("kernel")?,
            root: get("root")?,
            memory_mib: num("memory_mib")?,
            vcpus: u8::try_from(num("vcpus")?).map_err(|_| corrupt("identity: vcpus"))?,
            hugepages: get("hugepages")? == "true",
        })
    }

    /// The first difference from `want`, as a sentence naming both sides.
    fn mismatch(&self, want: &Identity) -> Option<String> {
        let pairs: [(&str, String, String); 6] = [
            (
                "xcgi version",
                self.xcgi_version.clone(),
                want.xcgi_version.clone(),
            ),
            ("guest kernel", self.kernel.clone(), want.kernel.clone()),
            ("guest root (image)", self.root.clone(), want.root.clone()),
            (
                "memory (MiB)",
                self.memory_mib.to_string(),
                want.memory_mib.to_string(),
            ),
            ("vCPUs", self.vcpus.to_string(), want.vcpus.to_string()),
            (
                "huge pages",
                self.hugepages.to_string(),
                want.hugepages.to_string(),
            ),
        ];
        pairs
            .into_iter()
            .find(|(_, have, want)| have != want)
            .map(|(what, have, want)| format!("its {what} is {have:?}, this one's is {want:?}"))
    }
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Not a snapshot, or one this build cannot read.
    #[error("snapshot {path}: {reason}")]
    Unreadable {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A snapshot of another machine, kernel, image or xcgi: it must not be restored here.
    #[error("snapshot {path} does not fit this VM: {reason}; take a new one (`xcgi serve` takes a route's template again when its kernel or image changes; `xcgi run --snapshot-out` saves one)")]
    Mismatch {
        /// The state file.
        path: PathBuf,
        /// The first difference.
        reason: String,
    },
}

/// Without a path yet (added by [`read`]).
fn corrupt(reason: &str) -> SnapshotError {
    SnapshotError::Unreadable {
        path: PathBuf::new(),
        reason: reason.to_string(),
    }
}

/// A stopped VM's state, outside its memory.
#[derive(Debug)]
pub struct Snapshot {
    /// What it belongs to.
    pub identity: Identity,
    /// The interrupt controllers, PIT and clock.
    pub vm: VmState,
    /// Each vCPU's registers and more, in vCPU order.
    pub vcpus: Vec<VcpuState>,
    /// Each device's own state, by its name (what its save gave, restored by its restore).
    pub devices: Vec<(String, Vec<u8>)>,
    /// Where the memory file holds data: (offset, length) ranges, in order (what
    /// [`crate::memory::save`] wrote; the rest is holes). None when not recorded.
    pub memory_data: Option<Vec<(u64, u64)>>,
}

/// The bytes of a plain KVM structure.
fn pod<T>(v: &T) -> &[u8] {
    // SAFETY: T is one of KVM's plain structures (integers and arrays of them, no padding
    // that matters: it is written back as read); the slice covers exactly the value.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A plain KVM structure from bytes; refused unless the size is the structure's.
fn from_pod<T>(name: &str, b: &[u8]) -> Result<T, SnapshotError> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(corrupt(&format!(
            "section {name} is {} bytes, this build's structure {}",
            b.len(),
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: the length is the structure's; every bit pattern is a valid value of KVM's
    // plain structures (integers and arrays of integers); read_unaligned copes with the
    // byte buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// 64-bit FNV-1a over little-endian 64-bit words (the last one zero-padded, the length mixed
/// in last): catches a truncated or altered file (not an attacker: the file is the server's
/// own, in its own directory). A word at a time: a byte at a time took ~20 µs of a clone's
/// restore (format 1).
fn fnv1a(b: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut words = b.chunks_exact(8);
    let mut h = words.by_ref().fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        (h ^ u64::from_le_bytes(std::array::from_fn(|i| w[i]))).wrapping_mul(PRIME)
    });
    let tail = words.remainder();
    if !tail.is_empty() {
        let last = u64::from_le_bytes(std::array::from_fn(|i| tail.get(i).copied().unwrap_or(0)));
        h = (h ^ last).wrapping_mul(PRIME);
    }
    (h ^ b.len() as u64).wrapping_mul(PRIME)
}

impl Snapshot {
    fn sections(&self) -> Vec<(String, Vec<u8>)> {
        let mut s: Vec<(String, Vec<u8>)> = vec![("identity".into(), self.identity.encode())];
        let vm = &self.vm;
        s.push(("vm.pic_master".into(), pod(&vm.pic_master).to_vec()));
        s.push(("vm.pic_slave".into(), pod(&vm.pic_slave).to_vec()));
        s.push(("vm.ioapic".into(), pod(&vm.ioapic).to_vec()));
        s.push(("vm.pit".into(), pod(&vm.pit).to_vec()));
        s.push(("vm.clock".into(), pod(&vm.clock).to_vec()));
        for (i, c) in self.vcpus.iter().enumerate() {
            let mut add = |what: &str, b: &[u8]| s.push((format!("vcpu{i}.{what}"), b.to_vec()));
            add("regs", pod(&c.regs));
            add("sregs", pod(&c.sregs));
            add("fpu", pod(&c.fpu));
            add("xsave", pod(&c.xsave));
            add("xcrs", pod(&c.xcrs));
            add("lapic", pod(&c.lapic));
            add("events", pod(&c.events));
            add("mp_state", pod(&c.mp_state));
            let msrs: Vec<u8> = c.msrs.iter().flat_map(|m| pod(m).to_vec()).collect();
            add("msrs", &msrs);
        }
        for (name, b) in &self.devices {
            s.push((format!("dev.{name}"), b.clone()));
        }
        if let Some(ranges) = &self.memory_data {
            let b: Vec<u8> = ranges
                .iter()
                .flat_map(|(at, len)| [at.to_le_bytes(), len.to_le_bytes()])
                .flatten()
                .collect();
            s.push(("memory.data".into(), b));
        }
        s
    }

    /// The whole file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let sections = self.sections();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
        for (name, b) in &sections {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// A snapshot from a file's bytes; refused unless it is whole, of this format and of
    /// `want` (without a path in the error: [`read`] adds it).
    pub fn decode(b: &[u8], want: &Identity) -> Result<Snapshot, SnapshotError> {
        if b.len() < 8 + 4 + 4 + 8 || b[..8] != MAGIC {
            return Err(corrupt("not an xcgi snapshot (no XCGISNAP header)"));
        }
        let (body, sum) = b.split_at(b.len() - 8);
        if fnv1a(body).to_le_bytes() != sum {
            return Err(corrupt(
                "its checksum does not match: the file is cut short or altered",
            ));
        }
        let mut r = Reader { b: body, at: 8 };
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(corrupt(&format!(
                "format version {version}, this build reads {FORMAT_VERSION}: take a new snapshot"
            )));
        }
        let count = r.u32()?;
        let mut sections: Vec<(String, &[u8])> = Vec::new();
        for _ in 0..count {
            let n = usize::from(r.u16()?);
            let name = std::str::from_utf8(r.take(n)?)
                .map_err(|_| corrupt("a section name is not UTF-8"))?
                .to_string();
            let len = r.u32()? as usize;
            sections.push((name, r.take(len)?));
        }
        let get = |name: &str| {
            sections
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b)
                .ok_or_else(|| corrupt(&format!("no section {name}")))
        };
        let identity = Identity::decode(get("identity")?)?;
        if let Some(reason) = identity.mismatch(want) {
            return Err(SnapshotError::Mismatch {
                path: PathBuf::new(),
                reason,
            });
        }
        let vm = VmState {
            pic_master: from_pod::<IrqChip>("vm.pic_master", get("vm.pic_master")?)?,
            pic_slave: from_pod::<IrqChip>("vm.pic_slave", get("vm.pic_slave")?)?,
            ioapic: from_pod::<IrqChip>("vm.ioapic", get("vm.ioapic")?)?,
            pit: from_pod::<PitState>("vm.pit", get("vm.pit")?)?,
            clock: from_pod::<ClockData>("vm.clock", get("vm.clock")?)?,
        };
        let vcpus = (0..identity.vcpus)
            .map(|i| {
                let s = |what: &str| get(&format!("vcpu{i}.{what}"));
                let msr_bytes = s("msrs")?;
                let size = std::mem::size_of::<MsrEntry>();
                if msr_bytes.len() % size != 0 {
                    return Err(corrupt("the MSR section is not whole entries"));
                }
                Ok(VcpuState {
                    regs: from_pod::<Regs>("regs", s("regs")?)?,
                    sregs: from_pod::<SpecialRegs>("sregs", s("sregs")?)?,
                    fpu: from_pod::<Fpu>("fpu", s("fpu")?)?,
                    xsave: from_pod::<Xsave>("xsave", s("xsave")?)?,
                    xcrs: from_pod::<Xcrs>("xcrs", s("xcrs")?)?,
                    lapic: from_pod::<LapicState>("lapic", s("lapic")?)?,
                    events: from_pod::<VcpuEvents>("events", s("events")?)?,
                    mp_state: from_pod::<MpState>("mp_state", s("mp_state")?)?,
                    msrs: msr_bytes
                        .chunks(size)
                        .map(|c| from_pod::<MsrEntry>("msrs", c))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let devices = sections
            .iter()
            .filter_map(|(n, b)| Some((n.strip_prefix("dev.")?.to_string(), b.to_vec())))
            .collect();
        let memory_data = match sections.iter().find(|(n, _)| n == "memory.data") {
            None => None,
            Some((_, b)) if b.len() % 16 == 0 => Some(
                b.chunks_exact(16)
                    .map(|c| {
                        let word =
                            |i: usize| u64::from_le_bytes(std::array::from_fn(|j| c[i * 8 + j]));
                        (word(0), word(1))
                    })
                    .collect(),
            ),
            Some(_) => return Err(corrupt("section memory.data is not a list of ranges")),
        };
        Ok(Snapshot {
            identity,
            vm,
            vcpus,
            devices,
            memory_data,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| corrupt("a section runs past the end of the file"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Writes `s` to `path` (a temporary file renamed over it: a reader never sees half a file).
pub fn write(path: &Path, s: &Snapshot) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&s.encode()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads the snapshot at `path`, refused unless it is whole, of this format and of `want`.
pub fn read(path: &Path, want: &Identity) -> Result<Snapshot, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    // Its size first, so that it is read in one go into a buffer of that size (reading an
    // unknown size probes in small reads, each a system call on a restore's path); never more
    // than the limit, whatever the file does meanwhile.
    let len = f.metadata().map_err(io)?.len();
    let mut b = Vec::new();
    if len <= MAX_STATE_BYTES {
        b.reserve_exact(len as usize + 64);
        f.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut b)
            .map_err(io)?;
    }
    if len > MAX_STATE_BYTES || b.len() as u64 > MAX_STATE_BYTES {
        return Err(SnapshotError::Unreadable {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_STATE_BYTES} bytes: not a state file"),
        });
    }
    Snapshot::decode(&b, want).map_err(|e| match e {
        SnapshotError::Unreadable { reason, .. } => SnapshotError::Unreadable {
            path: path.to_path_buf(),
            reason,
        },
        SnapshotError::Mismatch { reason, .. } => SnapshotError::Mismatch {
            path: path.to_path_buf(),
            reason,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::kvm::KvmHypervisor;
    use crate::hypervisor::Hypervisor;

    fn identity() -> Identity {
        Identity {
            xcgi_version: env!("CARGO_PKG_VERSION").into(),
            kernel: "k1".into(),
            root: "r1".into(),
            memory_mib: 128,
            vcpus: 2,
            hugepages: false,
        }
    }

    /// A real state (this host's /dev/kvm reads and sets it natively; nothing runs): two
    /// vCPUs with distinct registers, the VM's controllers and clock, a device's bytes.
    fn taken() -> Snapshot {
        let hv = KvmHypervisor::get().expect("/dev/kvm");
        let vm = hv.create_vm().expect("vm");
        vm.set_tss_address(0xfffb_d000).expect("tss");
        vm.create_irqchip().expect("irqchip");
        vm.create_pit().expect("pit");
        let vcpus = (0..2u8)
            .map(|i| {
                let c = vm.create_vcpu(i).expect("vcpu");
                c.set_cpuid(&hv.supported_cpuid().expect("cpuid"))
                    .expect("set cpuid");
                let mut r = c.regs().expect("regs");
                r.rip = 0x1000 + u64::from(i);
                r.rflags = 2;
                c.set_regs(&r).expect("set regs");
                c.state().expect("state")
            })
            .collect();
        Snapshot {
            identity: identity(),
            vm: vm.state().expect("vm state"),
            vcpus,
            devices: vec![("serial".into(), b"lcr=3".to_vec())],
            memory_data: Some(vec![(0, 65536), (1 << 20, 4096)]),
        }
    }

    #[test]
    fn a_state_file_round_trips_into_a_new_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let s = taken();
        write(&path, &s).expect("write");
        let back = read(&path, &identity()).expect("read");
        assert_eq!(back.identity, s.identity);
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[1].regs.rip, 0x1001);
        assert_eq!(back.vcpus[0].msrs.len(), s.vcpus[0].msrs.len());
        assert_eq!(back.vm.clock.clock, s.vm.clock.clock);
        assert_eq!(back.devices, s.devices);
        assert_eq!(back.memory_data, s.memory_data);
        // And KVM takes it: into a fresh VM, read back the same.
        let hv = KvmHypervisor::get().expect("/dev/kvm");
        let vm = hv.create_vm().expect("vm");
        vm.set_tss_address(0xfffb_d000).expect("tss");
        vm.create_irqchip().expect("irqchip");
        vm.create_pit().expect("pit");
        vm.set_state(&back.vm).expect("set vm state");
        let c = vm.create_vcpu(1).expect("vcpu");
        c.set_cpuid(&hv.supported_cpuid().expect("cpuid"))
            .expect("set cpuid");
        c.set_state(&back.vcpus[1]).expect("set vcpu state");
        assert_eq!(c.regs().expect("regs").rip, 0x1001);
    }

    #[test]
    fn a_snapshot_of_something_else_is_refused_naming_the_difference() {
        let bytes = taken().encode();
        let other_kernel = Identity {
            kernel: "k2".into(),
            ..identity()
        };
        let e = Snapshot::decode(&bytes, &other_kernel).expect_err("another kernel");
        assert!(
            e.to_string()
                .contains("guest kernel is \"k1\", this one's is \"k2\""),
            "{e}"
        );
        let other_root = Identity {
            root: "r2".into(),
            ..identity()
        };
        let e = Snapshot::decode(&bytes, &other_root).expect_err("another image");
        assert!(e.to_string().contains("guest root (image)"), "{e}");
        let other_version = Identity {
            xcgi_version: "0.0.0-other".into(),
            ..identity()
        };
        let e = Snapshot::decode(&bytes, &other_version).expect_err("another xcgi");
        assert!(e.to_string().contains("xcgi version"), "{e}");
        let other_memory = Identity {
            memory_mib: 256,
            ..identity()
        };
        assert!(Snapshot::decode(&bytes, &other_memory).is_err());
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused() {
        let bytes = taken().encode();
        let mut flipped = bytes.clone();
        flipped[100] ^= 1;
        let e = Snapshot::decode(&flipped, &identity()).expect_err("altered");
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = Snapshot::decode(&bytes[..bytes.len() / 2], &identity()).expect_err("cut");
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = Snapshot::decode(b"not a snapshot at all, no", &identity()).expect_err("foreign");
        assert!(e.to_string().contains("XCGISNAP"), "{e}");
        // Another format version, with a correct checksum.
        let mut v1 = bytes[..bytes.len() - 8].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let sum = fnv1a(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        let e = Snapshot::decode(&v1, &identity()).expect_err("version 1");
        assert!(e.to_string().contains("format version 1"), "{e}");
        // Every byte counts, the last partial word's and the length included.
        assert_ne!(fnv1a(b"abcdefghi"), fnv1a(b"abcdefghj"));
        assert_ne!(fnv1a(b"abcdefgh"), fnv1a(b"abcdefgh\0"));
    }
}
