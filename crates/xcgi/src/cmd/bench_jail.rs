//! `xcgi bench jail`: what a VM in a jailed process costs on this host (docs/benchmarks.md,
//! section 12): the request path of a prepared jailed VM process (the hand-off of the CGI
//! channel over its control socket, the launch in the VM process, up to the first KVM_RUN)
//! against the same launch in this process; the cold start of one (spawn, build the VM,
//! confine, filters: until it says ready); the host memory of a waiting VM process.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::bench::{median, percentile};
use xcgi_gateway::exec::jailed::{Helper, HelperSettings, Workers};
use xcgi_gateway::exec::vm_cgroup::VmLimits;
use xcgi_gateway::exec::{GuestRoot, VmSpec};

#[derive(clap::Args)]
pub struct JailArgs {
    #[command(flatten)]
    m: super::bench::Machines,
}

/// kB fields of /proc/PID/status.
fn status_kb(pid: i32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn channel() -> anyhow::Result<(std::os::unix::net::UnixStream, xcgi_vmm::Attachments)> {
    let (host, guest) = std::os::unix::net::UnixStream::pair().context("a channel socketpair")?;
    let attach = xcgi_vmm::Attachments {
        channel: Some(Arc::new(OwnedFd::from(guest))),
        ..Default::default()
    };
    Ok((host, attach))
}

/// The same launch in this process, of a VM prepared here (ms).
fn in_process(shape: &xcgi_vmm::MachineShape) -> anyhow::Result<f64> {
    let prepared = xcgi_vmm::prepare(shape, Instant::now())?;
    std::thread::sleep(Duration::from_millis(2));
    let (_host, attach) = channel()?;
    let opts = xcgi_vmm::RunOptions {
        setup_only: true,
        ..Default::default()
    };
    let t = Instant::now();
    let out = xcgi_vmm::launch(prepared, &attach, &opts, t, None)?;
    Ok(out.timings.setup.as_secs_f64() * 1e3)
}

pub fn jail(a: JailArgs) -> anyhow::Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("xcgi bench jail needs root (it starts jailed VM processes)");
    }
    jail_table(&a.m)?;
    Ok(0)
}

/// The jail's table (also printed by `xcgi bench setup --prepared` as root): a row per
/// memory size, the jailed and the in-process request path measured in the same run.
pub(super) fn jail_table(m: &super::bench::Machines) -> anyhow::Result<()> {
    println!(
        "# request path of a prepared jailed VM process (hand-off over its control socket, launch to the first KVM_RUN) against the same launch in-process, {} runs each",
        m.runs
    );
    let program = std::env::current_exe().context("the xcgi binary")?;
    // As the server starts them: through a jail helper, a cgroup per VM process with its
    // limits set (warned about where cgroup v2 is missing).
    let helper = Helper::start(&HelperSettings {
        program,
        uid_base: 3_100_000_000,
        uid_count: 64,
        cgroup_parent: None,
    })
    .context("starting the jail helper")?;
    println!(
        "| memory | jailed request path (median, p90) | of it: hand-off | in-process request path (median) | cold jailed start (median, p90) | waiting VM process RSS / anon / file KiB |"
    );
    println!("|---|---|---|---|---|---|");
    for &mem in &m.mem {
        let spec = VmSpec {
            kernel: m.kernel.clone(),
            root: GuestRoot::Initramfs(m.initramfs.clone()),
            memory_mib: mem,
            hugepages: false,
            vcpus: 1,
            timeout: Duration::from_secs(10),
            pool: None,
            jail: None,
            debug_dump: false,
            debug_probe: None,
            snapshot: None,
            working_set: false,
        };
        let shape = spec.shape();
        let workers = Workers::start(
            &spec,
            &helper,
            VmLimits::for_guest(mem, 1),
            0,
            Arc::default(),
        )?;
        let (mut handoff, mut cold, mut local) = (Vec::new(), Vec::new(), Vec::new());
        let mut message = Vec::new();
        let (mut rss, mut anon, mut file) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..m.runs {
            let t = Instant::now();
            let w = workers
                .bench_start()
                .context("starting a jailed VM process")?;
            cold.push(t.elapsed().as_secs_f64() * 1e3);
            // Settled, as in a pool.
            std::thread::sleep(Duration::from_millis(5));
            rss.push(status_kb(w.pid(), "VmRSS"));
            anon.push(status_kb(w.pid(), "RssAnon"));
            file.push(status_kb(w.pid(), "RssFile"));
            let (_host, attach) = channel()?;
            let (got, ready) = Workers::bench_handoff(w, &attach).map_err(anyhow::Error::msg)?;
            message.push(got.as_secs_f64() * 1e3);
            handoff.push(ready.as_secs_f64() * 1e3);
            local.push(in_process(&shape)?);
        }
        println!(
            "| {mem} MiB | **{:.3} ms** ({:.3}) | {:.3} ms | {:.3} ms | {:.2} ms ({:.2}) | {:.0} / {:.0} / {:.0} |",
            median(&mut handoff),
            percentile(&mut handoff, 0.9),
            median(&mut message),
            median(&mut local),
            median(&mut cold),
            percentile(&mut cold, 0.9),
            median(&mut rss),
            median(&mut anon),
            median(&mut file),
        );
    }
    Ok(())
}
