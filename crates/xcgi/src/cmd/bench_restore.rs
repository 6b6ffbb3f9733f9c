//! `xcgi bench restore`: issue 13's clones on this host, up to the first KVM_RUN (the PVM
//! /dev/kvm sets every piece of state natively; no guest needs to run): a VM of the machine is
//! started with the CGI channel and captured at once (VM, vCPU and device states to a state
//! file, memory to a sparse memory file), then cloned again and again:
//! - the cold restore (`prepare` of a shape with `snapshot`): the state file read and its
//!   identity checked, a new VM, memory mapped `MAP_PRIVATE` from the file, memory slots,
//!   interrupt controllers, vCPUs and every piece of their state set;
//! - the cold restore into a shell built ahead (`prepare_shell` of the shape, timed apart, then
//!   `prepare_in`): what is left when the VM, its memory slots over fresh zero-fill memory, its
//!   interrupt controllers and vCPUs exist before the snapshot does: the state file read and
//!   checked, the memory file mapped over the slots, the state set;
//! - the request path of a clone prepared ahead (`launch`, setup only): its devices attached
//!   and given their saved states, up to the first KVM_RUN.
//!
//! Against them, in the same run, a boot's: building the machine (`prepare`) and its request
//! path (devices and boot parameters).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::bench::{median, percentile};

#[derive(clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    m: super::bench::Machines,
    /// Also on 2 MiB pages: vm.nr_hugepages is raised for it (and put back), the template's
    /// memory goes to a hugetlb memfd (as to a file on a hugetlbfs mount).
    #[arg(long)]
    hugepages: bool,
}

/// A hugetlb memfd for a huge-page template's memory, and its path (`/proc/self/fd/N`).
fn hugetlb_memfd() -> anyhow::Result<(std::fs::File, std::path::PathBuf)> {
    use std::os::fd::AsRawFd;
    let f = xcgi_vmm::memory::hugetlb_memfd(c"xcgi-bench-template").context("a hugetlb memfd")?;
    let path = format!("/proc/self/fd/{}", f.as_raw_fd()).into();
    Ok((f, path))
}

/// A run's attachments: a fresh CGI channel (the far end dropped at once: nothing runs).
fn channel() -> anyhow::Result<xcgi_vmm::Attachments> {
    let (a, _b) = std::os::unix::net::UnixStream::pair().context("a socket pair")?;
    Ok(xcgi_vmm::Attachments {
        channel: Some(Arc::new(OwnedFd::from(a))),
        ..Default::default()
    })
}

/// The request path of a VM prepared ahead: `launch` up to its first KVM_RUN, ms.
fn request_path(p: xcgi_vmm::PreparedVm) -> anyhow::Result<f64> {
    let opts = xcgi_vmm::RunOptions {
        setup_only: true,
        ..Default::default()
    };
    let t = Instant::now();
    let out = xcgi_vmm::launch(p, &channel()?, &opts, t, None)?;
    Ok(out.timings.setup.as_secs_f64() * 1e3)
}

pub fn restore(a: RestoreArgs) -> anyhow::Result<i32> {
    let m = &a.m;
    println!(
        "# clones of a snapshot (VM, vCPU and device states; MAP_PRIVATE memory) against boots, up to the first KVM_RUN, {} runs each",
        m.runs
    );
    println!("| memory | cold restore, all of it (median, p90) | its steps (median ms) | shell built ahead (median) | cold restore into the shell (median, p90) | its steps (median ms) | prepared clone: request path (median, p90) | boot: building (median) | boot: request path (median) | memory file on disk |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let max_mem = m.mem.iter().copied().max().unwrap_or(128);
    // A clone's (or a boot's) pages, and the template's memory file; put back at the end.
    let _pool = if a.hugepages {
        Some(xcgi_vmm::memory::HugePagePool::raise_to(max_mem / 2 + 32)?)
    } else {
        None
    };
    let pages: &[bool] = if a.hugepages {
        &[false, true]
    } else {
        &[false]
    };
    for (&huge, &mem) in pages
        .iter()
        .flat_map(|h| m.mem.iter().map(move |mem| (h, mem)))
    {
        let shape = xcgi_vmm::MachineShape {
            kernel: m.kernel.clone(),
            initramfs: Some(m.initramfs.clone()),
            memory: xcgi_vmm::memory::MemoryConfig {
                size_mib: mem,
                hugepages: huge,
                populate: false,
            },
            ..Default::default()
        };
        let dir = tempfile::tempdir().context("a directory for the snapshot")?;
        let memfd = if huge { Some(hugetlb_memfd()?) } else { None };
        let now = xcgi_vmm::Cancel::new();
        now.cancel();
        let opts = xcgi_vmm::RunOptions {
            timeout: Duration::from_secs(3),
            capture: Some(xcgi_vmm::Capture {
                now,
                marker: None,
                dir: dir.path().to_path_buf(),
                memory_file: memfd.as_ref().map(|(_, p)| p.clone()),
            }),
            ..Default::default()
        };
        let out = xcgi_vmm::run(&shape, &channel()?, &opts, Instant::now(), None)
            .context("the template")?;
        anyhow::ensure!(
            out.reason == xcgi_vmm::ExitReason::Captured,
            "the template was not captured: {}",
            out.reason.describe()
        );
        let clone_shape = xcgi_vmm::MachineShape {
            snapshot: Some(dir.path().to_path_buf()),
            ..shape.clone()
        };
        let (mut cold, mut clone_path, mut build, mut boot_path) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut shells, mut into) = (Vec::new(), Vec::new());
        let mut phases = Phases::default();
        let mut into_phases = Phases::default();
        for _ in 0..m.runs {
            let t = Instant::now();
            let p = xcgi_vmm::prepare(&clone_shape, t)?;
            cold.push(t.elapsed().as_secs_f64() * 1e3);
            phases.add(p.phases());
            clone_path.push(request_path(p)?);
            let t = Instant::now();
            let shell = xcgi_vmm::prepare_shell(&shape)?;
            shells.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let p = xcgi_vmm::prepare_in(shell, &clone_shape, t)?;
            into.push(t.elapsed().as_secs_f64() * 1e3);
            into_phases.add(p.phases());
            drop(p);
            let t = Instant::now();
            let p = xcgi_vmm::prepare(&shape, t)?;
            build.push(t.elapsed().as_secs_f64() * 1e3);
            boot_path.push(request_path(p)?);
        }
        let on_disk = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path().join(xcgi_vmm::snapshot::MEMORY_FILE))
                .map(|md| md.blocks() * 512)
                .unwrap_or(0)
        };
        drop(memfd);
        println!(
            "| {mem} MiB, {} | **{:.3} ms** ({:.3}) | {} | {:.3} ms | **{:.3} ms** ({:.3}) | {} | **{:.3} ms** ({:.3}) | {:.2} ms | {:.3} ms | {:.1} MiB |",
            if huge { "2 MiB pages" } else { "4 KiB pages" },
            median(&mut cold),
            percentile(&mut cold, 0.9),
            phases.medians(),
            median(&mut shells),
            median(&mut into),
            percentile(&mut into, 0.9),
            into_phases.medians(),
            median(&mut clone_path),
            percentile(&mut clone_path, 0.9),
            median(&mut build),
            median(&mut boot_path),
            on_disk as f64 / 1048576.0
        );
    }
    Ok(0)
}

/// Each named step's times over the runs, in first-seen order.
#[derive(Default)]
struct Phases(Vec<(&'static str, Vec<f64>)>);

impl Phases {
    fn add(&mut self, run: &[(&'static str, Duration)]) {
        for &(name, d) in run {
            let ms = d.as_secs_f64() * 1e3;
            match self.0.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(ms),
                None => self.0.push((name, vec![ms])),
            }
        }
    }

    /// "step median, ..." (ms), without the process start.
    fn medians(&mut self) -> String {
        self.0
            .iter_mut()
            .filter(|(n, _)| *n != "process start")
            .map(|(n, v)| format!("{n} {:.3}", median(v)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
