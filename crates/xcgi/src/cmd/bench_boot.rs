//! `xcgi bench boot`: boot to init with xcgi and with QEMU `-M microvm -enable-kvm`, same kernel
//! and initramfs, same machine, same run (in the lab where hardware KVM is missing).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::bench::median;

#[derive(clap::Args)]
pub struct BootArgs {
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initramfs: PathBuf,
    /// Console text that marks "init is running" (the first line the program prints).
    #[arg(long, default_value = "Hello!")]
    marker: String,
    /// Exit code every xcgi run must end with (the hello example's is 4).
    #[arg(long, default_value_t = 4)]
    expect_exit: i32,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Skip the QEMU side.
    #[arg(long)]
    no_qemu: bool,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// QEMU's firmware directory (-L), e.g. when QEMU was copied into the lab.
    #[arg(long)]
    qemu_datadir: Option<PathBuf>,
}

fn guest_stamp(line: &str) -> Option<f64> {
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    line[open + 1..close].trim().parse().ok()
}

struct BootRun {
    /// The host saw the marker line (init is running).
    marker_ms: f64,
    /// The host saw the kernel's "Attempted to kill init" line.
    init_exit_ms: f64,
    /// The guest's own clock on that line.
    guest_init_exit_ms: Option<f64>,
    code: Option<i32>,
}

/// Spawns `cmd` and stamps each console line as it arrives; stops the VMM once the guest's
/// init has exited (how long a VMM takes to exit after that is not boot time).
fn time_boot(mut cmd: Command, marker: &str, timeout: Duration) -> anyhow::Result<BootRun> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut run = BootRun {
        marker_ms: f64::NAN,
        init_exit_ms: f64::NAN,
        guest_init_exit_ms: None,
        code: None,
    };
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let now = t0.elapsed().as_secs_f64() * 1e3;
        if run.marker_ms.is_nan() && line.contains(marker) {
            run.marker_ms = now;
        }
        if line.contains("Attempted to kill init") {
            run.init_exit_ms = now;
            run.guest_init_exit_ms = guest_stamp(&line).map(|s| s * 1e3);
            break;
        }
        if t0.elapsed() > timeout {
            break;
        }
    }
    // Let xcgi finish on its own (it ends at once); stop QEMU.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait()? {
            run.code = status.code();
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(run)
}

fn report(name: &str, runs: &[BootRun]) -> (f64, f64) {
    let mut m: Vec<f64> = runs.iter().map(|r| r.marker_ms).collect();
    let mut e: Vec<f64> = runs.iter().map(|r| r.init_exit_ms).collect();
    let mut g: Vec<f64> = runs.iter().filter_map(|r| r.guest_init_exit_ms).collect();
    let codes: Vec<String> = runs
        .iter()
        .map(|r| r.code.map(|c| c.to_string()).unwrap_or("killed".into()))
        .collect();
    let (mm, me) = (median(&mut m), median(&mut e));
    println!(
        "{name:<5} | marker {mm:>8.1} ms | init exit {me:>8.1} ms | guest clock at init exit {:>8.1} ms (min {:.1}, max {:.1}) | exit codes {}",
        median(&mut g),
        g.first().copied().unwrap_or(f64::NAN),
        g.last().copied().unwrap_or(f64::NAN),
        codes.join(",")
    );
    (mm, me)
}

pub fn boot(b: BootArgs) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("finding the xcgi executable")?;
    let timeout = Duration::from_secs(120);
    // xcgi's own command line, except the reboot method: QEMU's microvm has no i8042 (the
    // guest would spin on the missing controller), so there the guest ends by triple fault.
    let cmdline =
        "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 no_timer_check quiet rdinit=/init";
    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for i in 0..b.runs {
        let mut c = Command::new(&exe);
        c.args(["run", "--quiet", "--timeout", "100", "--kernel"])
            .arg(&b.kernel)
            .arg("--initramfs")
            .arg(&b.initramfs)
            .args(["--mem", &b.mem.to_string()]);
        ours.push(time_boot(c, &b.marker, timeout)?);
        if !b.no_qemu {
            let mut q = Command::new(&b.qemu);
            if let Some(dir) = &b.qemu_datadir {
                q.arg("-L").arg(dir);
            }
            q.args(["-M", "microvm", "-enable-kvm", "-cpu", "host", "-smp", "1"])
                .args(["-m", &b.mem.to_string()])
                .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
                .args(["-serial", "stdio", "-kernel"])
                .arg(&b.kernel)
                .arg("-initrd")
                .arg(&b.initramfs)
                .args(["-append", cmdline]);
            qemu.push(time_boot(q, &b.marker, timeout)?);
        }
        eprintln!("xcgi bench: run {}/{} done", i + 1, b.runs);
    }
    println!(
        "# boot to init: host wall time from spawn, median of {} runs, {} MiB, kernel {}",
        b.runs,
        b.mem,
        b.kernel.display()
    );
    let (om, oe) = report("xcgi", &ours);
    if !b.no_qemu {
        let (qm, qe) = report("qemu", &qemu);
        println!(
            "ratio qemu/xcgi: to marker {:.2}x, to init exit {:.2}x",
            qm / om,
            qe / oe
        );
    }
    let bad = ours
        .iter()
        .any(|r| r.marker_ms.is_nan() || r.code != Some(b.expect_exit));
    if bad {
        eprintln!(
            "xcgi bench: not every xcgi run showed {:?} and exited {}",
            b.marker, b.expect_exit
        );
    }
    Ok(if bad { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_stamp_parses_printk_time() {
        assert_eq!(
            guest_stamp(
                "00.512000 [    0.498765] Kernel panic - not syncing: Attempted to kill init!"
            ),
            Some(0.498765)
        );
        assert_eq!(guest_stamp("no stamp"), None);
    }
}
