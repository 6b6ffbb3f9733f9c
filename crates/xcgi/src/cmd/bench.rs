//! `xcgi bench`: figures for docs/benchmarks.md.
//!
//! - `setup`: VMM setup (process start to the first KVM_RUN) measured on this host's /dev/kvm,
//!   which runs setup natively even where it cannot boot Linux. Each run is a fresh process; its
//!   start is taken by the parent just before spawning it.
//! - `boot`: boot to init with xcgi and with QEMU `-M microvm -enable-kvm`, same kernel and
//!   initramfs, same machine, same run (module `bench_boot`).
//! - `jail`: a VM in a jailed process: the request path of a prepared one against the same
//!   launch in-process, its cold start and memory (module `bench_jail`).
//! - `restore`: clones of a snapshot (cold restore, and a prepared clone's request path) up to
//!   the first KVM_RUN against a boot's building and request path (module `bench_restore`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// VMM setup time on this host: memory sizes x page sizes x populate.
    Setup(SetupArgs),
    /// Boot to init: xcgi vs QEMU microvm, same kernel and image, same run.
    Boot(super::bench_boot::BootArgs),
    /// A VM in a jailed process: request path of a prepared one, cold start, memory.
    Jail(super::bench_jail::JailArgs),
    /// Clones of a snapshot up to the first KVM_RUN: cold restore and a prepared clone's
    /// request path, against a boot's (issue 13).
    Restore(super::bench_restore::RestoreArgs),
}

/// The machine a setup benchmark builds, and how often: shared by `setup` and `jail`.
#[derive(clap::Args)]
pub(super) struct Machines {
    #[arg(long)]
    pub(super) kernel: PathBuf,
    #[arg(long)]
    pub(super) initramfs: PathBuf,
    /// Memory sizes in MiB, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [128u64, 1024])]
    pub(super) mem: Vec<u64>,
    /// Runs per configuration.
    #[arg(long, default_value_t = 20)]
    pub(super) runs: usize,
}

#[derive(clap::Args)]
struct SetupArgs {
    #[command(flatten)]
    m: Machines,
    /// Also measure with MAP_POPULATE.
    #[arg(long)]
    populate: bool,
    /// Raise vm.nr_hugepages for the 2 MiB runs and put the old value back afterwards.
    #[arg(long)]
    reserve_hugepages: bool,
    /// Also measure with a virtio-net device on a TAP (`xcgi run --net`): the VMM's cost of
    /// the device is the difference in the "devices" phase and in "vmm" (setup minus process
    /// start, which holds the host-side namespace and TAP).
    #[arg(long)]
    net: bool,
    /// Also measure the request path of a VM prepared ahead (as `xcgi serve` keeps them): in
    /// this process, `prepare` a VM (untimed), then time `launch` with a CGI channel device
    /// to the point of the first KVM_RUN; as root, also that of a prepared jailed VM process
    /// (the server's default) against the in-process launch, as `xcgi bench jail` does.
    #[arg(long)]
    prepared: bool,
    /// Also write the medians as an SVG chart (setup time against memory size, log-log).
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a.what {
        What::Setup(s) => setup(s),
        What::Boot(b) => super::bench_boot::boot(b),
        What::Jail(j) => super::bench_jail::jail(j),
        What::Restore(r) => super::bench_restore::restore(r),
    }
}

fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall wrapper filling a local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Printed by `xcgi run --setup-only` for the parent to read.
pub const SETUP_MARK: &str = "setup_done_monotonic_ns=";

pub fn print_setup_mark(t: &xcgi_vmm::Timings) {
    println!("{SETUP_MARK}{}", t.setup_end_clock_ns);
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

pub(super) fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

struct SetupRun {
    /// Parent's spawn to the child's first KVM_RUN.
    from_spawn_ms: f64,
    /// Child's main() to the first KVM_RUN.
    in_process_ms: f64,
    teardown_ms: f64,
    phases: Vec<(String, f64)>,
}

/// One configuration of the setup table: what `xcgi run --setup-only` is asked for.
#[derive(Clone, Copy)]
struct SetupCase {
    mem: u64,
    huge: bool,
    populate: bool,
    net: bool,
}

fn setup_once(exe: &PathBuf, s: &SetupArgs, c: SetupCase) -> anyhow::Result<SetupRun> {
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--setup-only", "--kernel"])
        .arg(&s.m.kernel)
        .arg("--initramfs")
        .arg(&s.m.initramfs)
        .args(["--mem", &c.mem.to_string()]);
    if c.huge {
        cmd.arg("--hugepages");
    }
    if c.populate {
        cmd.arg("--populate");
    }
    if c.net {
        cmd.arg("--net");
    }
    let t0 = monotonic_ns();
    let out = cmd.output().context("spawning xcgi run")?;
    if !out.status.success() {
        bail!(
            "xcgi run --setup-only failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = SetupRun {
        from_spawn_ms: f64::NAN,
        in_process_ms: f64::NAN,
        teardown_ms: f64::NAN,
        phases: vec![],
    };
    for line in text.lines() {
        if let Some(ns) = line.strip_prefix(SETUP_MARK) {
            let done: u128 = ns.trim().parse().context("bad setup mark")?;
            r.from_spawn_ms = done.saturating_sub(t0) as f64 / 1e6;
        } else if let Some(rest) = line.strip_prefix("phase ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(v)) = (it.next(), it.next()) {
                r.phases
                    .push((name.to_string(), v.parse().unwrap_or(f64::NAN)));
            }
        } else if let Some(rest) = line.strip_prefix("teardown ") {
            r.teardown_ms = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
        } else if let Some(rest) = line.strip_prefix("xcgi: setup ") {
            r.in_process_ms = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
        }
    }
    if r.from_spawn_ms.is_nan() {
        bail!("xcgi run --setup-only printed no setup mark:\n{text}");
    }
    Ok(r)
}

/// One VM prepared ahead, then launched (setup only) with a CGI channel device as a request
/// would: (request path ms, prepare ms, request path phases).
type PreparedRun = (f64, f64, Vec<(&'static str, f64)>);

fn prepared_once(s: &SetupArgs, mem: u64, huge: bool) -> anyhow::Result<PreparedRun> {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    let shape = xcgi_vmm::MachineShape {
        kernel: s.m.kernel.clone(),
        initramfs: Some(s.m.initramfs.clone()),
        memory: xcgi_vmm::memory::MemoryConfig {
            size_mib: mem,
            hugepages: huge,
            populate: false,
        },
        ..Default::default()
    };
    let opts = xcgi_vmm::RunOptions {
        setup_only: true,
        ..Default::default()
    };
    let prepared = xcgi_vmm::prepare(&shape, std::time::Instant::now())?;
    let took = prepared.took().as_secs_f64() * 1e3;
    // Let the preparation's own page faults and allocations settle, as they would in a pool.
    std::thread::sleep(std::time::Duration::from_millis(2));
    let (_host, guest) =
        std::os::unix::net::UnixStream::pair().context("creating the channel socketpair")?;
    let attach = xcgi_vmm::Attachments {
        channel: Some(Arc::new(OwnedFd::from(guest))),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let out = xcgi_vmm::launch(prepared, &attach, &opts, t, None)?;
    Ok((
        out.timings.setup.as_secs_f64() * 1e3,
        took,
        out.timings
            .phases
            .iter()
            .map(|(n, d)| (*n, d.as_secs_f64() * 1e3))
            .collect(),
    ))
}

/// The three slowest phases, "name ms, ...".
fn slowest<S: std::fmt::Display>(mut phases: Vec<(S, f64)>) -> String {
    phases.sort_by(|a, b| b.1.total_cmp(&a.1));
    phases
        .iter()
        .take(3)
        .map(|(n, v)| format!("{n} {v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A chart point: (series name, memory MiB, median ms).
type Plotted = (String, f64, f64);

/// The setup table (a row per memory size, page size, populate and net asked for), then
/// with `--prepared` the request-path table, then with `--svg` the chart of both. The exit
/// code is 1 when a run failed (its row shows what was measured before the failure).
fn setup(s: SetupArgs) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding the xcgi executable")?;
    let max_mem = s.m.mem.iter().copied().max().unwrap_or(128);
    // Put back when the benchmark ends, early or not.
    let _pool = if s.reserve_hugepages {
        Some(xcgi_vmm::memory::HugePagePool::raise_to(max_mem / 2)?)
    } else {
        None
    };
    let huge_ok = xcgi_vmm::memory::free_huge_pages().unwrap_or(0) * 2 >= max_mem;
    print_setup_header(&s);
    let mut failed = false;
    let mut plotted: Vec<Plotted> = Vec::new();
    for &mem in &s.m.mem {
        for huge in [false, true] {
            for (populate, net) in [(false, false), (true, false), (false, true)] {
                if (populate && !s.populate) || (net && !s.net) {
                    continue;
                }
                if huge && !huge_ok {
                    println!("{mem:>8} {:>6} {:>9} {net:>4}  skipped: not enough free huge pages (pass --reserve-hugepages or raise vm.nr_hugepages)", "2M", populate);
                    continue;
                }
                let c = SetupCase {
                    mem,
                    huge,
                    populate,
                    net,
                };
                failed |= setup_row(&exe, &s, c, &mut plotted);
            }
        }
    }
    if s.prepared {
        failed |= prepared_table(&s, huge_ok, &mut plotted);
        // The server's default: the prepared VM in a jailed process of its own.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            if let Err(e) = super::bench_jail::jail_table(&s.m) {
                println!("jailed request path: failed: {e:#}");
                failed = true;
            }
        } else {
            println!("# jailed request path: skipped (needs root: xcgi bench jail)");
        }
    }
    if let Some(path) = &s.svg {
        write_setup_chart(path, plotted)?;
    }
    Ok(if failed { 1 } else { 0 })
}

fn print_setup_header(s: &SetupArgs) {
    println!(
        "# VMM setup: process spawn -> first KVM_RUN, {} runs each, kernel {}",
        s.m.runs,
        s.m.kernel.display()
    );
    println!(
        "{:>8} {:>6} {:>9} {:>4} {:>10} {:>10} {:>12} {:>8} {:>8} {:>8} {:>12}  slowest phases (median ms)",
        "mem MiB",
        "pages",
        "populate",
        "net",
        "median ms",
        "p90 ms",
        "in-proc ms",
        "vmm ms",
        "slots",
        "devices",
        "teardown ms"
    );
}

/// The samples of one setup configuration's runs.
#[derive(Default)]
struct SetupSamples {
    spawn: Vec<f64>,
    inproc: Vec<f64>,
    teardown: Vec<f64>,
    phases: Vec<(String, Vec<f64>)>,
}

impl SetupSamples {
    /// A warm-up run, then `--runs` measured ones, stopping at the first failure (reported
    /// on stderr). The samples so far, and whether a run failed.
    fn measure(exe: &PathBuf, s: &SetupArgs, c: SetupCase) -> (SetupSamples, bool) {
        let _ = setup_once(exe, s, c);
        let mut r = SetupSamples::default();
        for _ in 0..s.m.runs {
            match setup_once(exe, s, c) {
                Ok(run) => {
                    r.spawn.push(run.from_spawn_ms);
                    r.inproc.push(run.in_process_ms);
                    r.teardown.push(run.teardown_ms);
                    for (name, v) in run.phases {
                        push_phase(&mut r.phases, name, v);
                    }
                }
                Err(e) => {
                    eprintln!("xcgi bench: {e:#}");
                    return (r, true);
                }
            }
        }
        (r, false)
    }
}

/// One configuration: measures it, prints its row and adds its median to `plotted`.
/// Returns whether a run failed.
fn setup_row(exe: &PathBuf, s: &SetupArgs, c: SetupCase, plotted: &mut Vec<Plotted>) -> bool {
    let (mut r, failed) = SetupSamples::measure(exe, s, c);
    let top = phase_medians(r.phases);
    let phase = |name: &str| {
        top.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    };
    let devices = phase("devices");
    let slots = phase("memory_slots");
    let in_proc = median(&mut r.inproc);
    let vmm = in_proc - phase("process_start");
    let top = slowest(top);
    let spawn = median(&mut r.spawn);
    plotted.push((
        format!(
            "{}{}{}",
            pages_name(c.huge),
            if c.populate { ", populate" } else { "" },
            if c.net { ", net" } else { "" }
        ),
        c.mem as f64,
        spawn,
    ));
    println!(
        "{:>8} {:>6} {:>9} {:>4} {:>10.3} {:>10.3} {:>12.3} {:>8.3} {:>8.3} {:>8.3} {:>12.3}  {}",
        c.mem,
        pages_label(c.huge),
        c.populate,
        c.net,
        spawn,
        percentile(&mut r.spawn, 0.9),
        in_proc,
        vmm,
        slots,
        devices,
        median(&mut r.teardown),
        top
    );
    failed
}

/// The request-path table (`--prepared`): a row per memory size and page size. Returns
/// whether a run failed.
fn prepared_table(s: &SetupArgs, huge_ok: bool, plotted: &mut Vec<Plotted>) -> bool {
    println!(
        "# request path: a VM prepared ahead (off the request path) launched to its first KVM_RUN, in-process, {} runs each",
        s.m.runs
    );
    println!(
        "{:>8} {:>6} {:>10} {:>10} {:>12}  slowest phases (median ms)",
        "mem MiB", "pages", "median ms", "p90 ms", "prepare ms"
    );
    let mut failed = false;
    for &mem in &s.m.mem {
        for huge in [false, true] {
            if huge && !huge_ok {
                println!("{mem:>8} {:>6}  skipped: not enough free huge pages", "2M");
                continue;
            }
            failed |= prepared_row(s, mem, huge, plotted);
        }
    }
    failed
}

/// One request-path row: a warm-up run, then `--runs` measured ones (stopping at the first
/// failure, which is reported); prints the row and adds its median to `plotted`. Returns
/// whether a run failed.
fn prepared_row(s: &SetupArgs, mem: u64, huge: bool, plotted: &mut Vec<Plotted>) -> bool {
    let mut failed = false;
    let mut req = Vec::new();
    let mut prep = Vec::new();
    let mut phases: Vec<(&'static str, Vec<f64>)> = Vec::new();
    // One warm-up run (process-level caches: /dev/kvm, CPUID), then the measured.
    for i in 0..=s.m.runs {
        let r = match prepared_once(s, mem, huge) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("xcgi bench: {e:#}");
                failed = true;
                break;
            }
        };
        if i == 0 {
            continue;
        }
        req.push(r.0);
        prep.push(r.1);
        for (name, v) in r.2 {
            push_phase(&mut phases, name, v);
        }
    }
    let top = slowest(phase_medians(phases));
    let m = median(&mut req);
    plotted.push((
        format!("{}, prepared ahead: request path", pages_name(huge)),
        mem as f64,
        m,
    ));
    println!(
        "{mem:>8} {:>6} {:>10.3} {:>10.3} {:>12.3}  {}",
        pages_label(huge),
        m,
        percentile(&mut req, 0.9),
        median(&mut prep),
        top
    );
    failed
}

/// The medians of both tables against memory size, a line per configuration, as an SVG file.
fn write_setup_chart(path: &std::path::Path, plotted: Vec<Plotted>) -> anyhow::Result<()> {
    super::svg::write_memory_chart(
        path,
        "VMM setup: process spawn to first KVM_RUN (median)",
        &super::svg::Series::grouped(plotted),
    )
}

/// "2 MiB pages" or "4 KiB pages", for the chart's series names.
fn pages_name(huge: bool) -> &'static str {
    if huge {
        "2 MiB pages"
    } else {
        "4 KiB pages"
    }
}

/// "2M" or "4K", for the tables' pages column.
fn pages_label(huge: bool) -> &'static str {
    if huge {
        "2M"
    } else {
        "4K"
    }
}

/// Adds `v` to the samples of phase `name`, in the order the phases first appear.
fn push_phase<S: PartialEq>(phases: &mut Vec<(S, Vec<f64>)>, name: S, v: f64) {
    match phases.iter_mut().find(|(n, _)| *n == name) {
        Some((_, vs)) => vs.push(v),
        None => phases.push((name, vec![v])),
    }
}

/// Each phase's median.
fn phase_medians<S>(phases: Vec<(S, Vec<f64>)>) -> Vec<(S, f64)> {
    phases
        .into_iter()
        .map(|(n, mut v)| (n, median(&mut v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&mut v), 3.0);
        assert_eq!(percentile(&mut v, 0.9), 5.0);
    }
}
