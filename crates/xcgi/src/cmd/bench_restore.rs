//! `xcgi bench restore`: issue 13's cold restore on this host, up to the first KVM_RUN (the
//! PVM /dev/kvm sets every piece of state natively; no guest runs): a machine prepared as for
//! a boot is captured (its VM and vCPU state to a state file, its memory to a sparse memory
//! file), then restored again and again: the state file read and checked, a new VM, its
//! memory mapped `MAP_PRIVATE` from the file, memory slots, interrupt controllers, vCPUs and
//! every piece of their state set. Against it, in the same run, what building the same
//! machine for a boot costs (`prepare`). The devices' state is not part of it yet.

use std::time::Instant;

use anyhow::Context;

use super::bench::{median, percentile};

#[derive(clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    m: super::bench::Machines,
}

pub fn restore(a: RestoreArgs) -> anyhow::Result<i32> {
    let m = &a.m;
    println!(
        "# cold restore from a snapshot to the first KVM_RUN (state file read, VM, MAP_PRIVATE memory, state set), against building the machine for a boot, {} runs each",
        m.runs
    );
    println!("| memory | cold restore (median, p90) | of it: state file read | steps (median ms) | building for a boot (median) | memory file on disk |");
    println!("|---|---|---|---|---|---|");
    for &mem in &m.mem {
        let shape = xcgi_vmm::MachineShape {
            kernel: m.kernel.clone(),
            initramfs: Some(m.initramfs.clone()),
            memory: xcgi_vmm::memory::MemoryConfig {
                size_mib: mem,
                hugepages: false,
                populate: false,
            },
            ..Default::default()
        };
        let identity = xcgi_vmm::snapshot::Identity {
            xcgi_version: env!("CARGO_PKG_VERSION").into(),
            kernel: m.kernel.display().to_string(),
            root: m.initramfs.display().to_string(),
            memory_mib: mem,
            vcpus: 1,
            hugepages: false,
        };
        let dir = tempfile::tempdir().context("a directory for the snapshot")?;
        let (memfile, statefile) = (dir.path().join("memory"), dir.path().join("state"));
        let template = xcgi_vmm::prepare(&shape, Instant::now()).context("the template")?;
        let snap = xcgi_vmm::vm::capture(&template, identity.clone(), &memfile)?;
        xcgi_vmm::snapshot::write(&statefile, &snap)?;
        drop(template);
        let (mut restore, mut read, mut build) = (Vec::new(), Vec::new(), Vec::new());
        let mut phases: Vec<(&'static str, Vec<f64>)> = Vec::new();
        for _ in 0..m.runs {
            let t = Instant::now();
            let snap = xcgi_vmm::snapshot::read(&statefile, &identity)?;
            let r = t.elapsed();
            let machine = xcgi_vmm::vm::restore(&shape, &snap, &memfile)?;
            restore.push(t.elapsed().as_secs_f64() * 1e3);
            read.push(r.as_secs_f64() * 1e3);
            for &(name, d) in &machine.phases {
                match phases.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.push(d.as_secs_f64() * 1e3),
                    None => phases.push((name, vec![d.as_secs_f64() * 1e3])),
                }
            }
            drop(machine);
            let t = Instant::now();
            let built = xcgi_vmm::prepare(&shape, t)?;
            build.push(t.elapsed().as_secs_f64() * 1e3);
            drop(built);
        }
        let on_disk = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&memfile)
                .map(|md| md.blocks() * 512)
                .unwrap_or(0)
        };
        let breakdown: Vec<String> = phases
            .into_iter()
            .map(|(n, mut v)| format!("{n} {:.3}", median(&mut v)))
            .collect();
        println!(
            "| {mem} MiB | **{:.3} ms** ({:.3}) | {:.3} ms | {} | {:.2} ms | {:.1} MiB |",
            median(&mut restore),
            percentile(&mut restore, 0.9),
            median(&mut read),
            breakdown.join(", "),
            median(&mut build),
            on_disk as f64 / 1048576.0
        );
    }
    Ok(0)
}
