//! `xcgi bench boot`: boot to init with xcgi and with QEMU `-M microvm -enable-kvm`, same kernel
//! and initramfs, same machine, same run (in the lab where hardware KVM is missing), for each
//! memory size and page size asked for.
//!
//! 2 MiB pages: xcgi maps guest RAM with MAP_HUGETLB (`xcgi run --hugepages`); QEMU gets a
//! hugetlbfs-backed memory backend (`memory-backend-file` on a hugetlbfs mount, `share=off`,
//! no prealloc, so both fault their pages in on demand). Huge pages are reserved here when
//! too few are free (the old `vm.nr_hugepages` is put back at the end), and hugetlbfs is
//! mounted at /dev/hugepages when no hugetlbfs is mounted (unmounted at the end).

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::bench::median;

/// Guest RAM page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    /// 4 KiB pages (ordinary anonymous memory).
    Small,
    /// 2 MiB huge pages (hugetlb).
    Huge,
}

impl Pages {
    fn label(self) -> &'static str {
        match self {
            Pages::Small => "4K",
            Pages::Huge => "2M",
        }
    }
}

/// `--pages` values: `4k` or `2m` (case does not matter; `4KiB`, `2MiB` accepted too).
fn parse_pages(s: &str) -> Result<Pages, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "4k" | "4kib" | "4096" => Ok(Pages::Small),
        "2m" | "2mib" | "2048k" => Ok(Pages::Huge),
        other => Err(format!("{other:?}: a page size is 4k or 2m")),
    }
}

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
    /// Measured runs per (memory, pages, VMM).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Runs per (memory, pages, VMM) before the measured ones, not counted (first touch of
    /// freshly reserved or freed memory).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Guest memory sizes in MiB, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [128u64])]
    mem: Vec<u64>,
    /// Guest page sizes, comma separated: 4k (ordinary memory), 2m (hugetlb).
    #[arg(long, value_delimiter = ',', value_parser = parse_pages, default_value = "4k")]
    pages: Vec<Pages>,
    /// Also write boot to init exit (host wall time, median) against memory as an SVG chart.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Skip the QEMU side.
    #[arg(long)]
    no_qemu: bool,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// QEMU's firmware directory (-L), e.g. when QEMU was copied into the lab.
    #[arg(long)]
    qemu_datadir: Option<PathBuf>,
}

/// Checks the (memory, pages) grid before anything is booted.
fn check_grid(mem: &[u64], pages: &[Pages]) -> anyhow::Result<()> {
    if mem.is_empty() || pages.is_empty() {
        bail!("--mem and --pages need at least one value each");
    }
    for &m in mem {
        if m < 32 {
            bail!("--mem {m}: at least 32 MiB");
        }
        if pages.contains(&Pages::Huge) && m % 2 != 0 {
            bail!("--mem {m}: with 2 MiB pages the size must be a multiple of 2 MiB");
        }
    }
    Ok(())
}

/// Guest timestamp `[    0.123456]` at the start of a console line's text.
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
    /// The end of the VMM's stderr, kept for runs that never reached init.
    stderr_tail: String,
}

/// Spawns `cmd` and stamps each console line as it arrives; stops the VMM once the guest's
/// init has exited (how long a VMM takes to exit after that is not boot time).
fn time_boot(mut cmd: Command, marker: &str, timeout: Duration) -> anyhow::Result<BootRun> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    });
    let mut run = BootRun {
        marker_ms: f64::NAN,
        init_exit_ms: f64::NAN,
        guest_init_exit_ms: None,
        code: None,
        stderr_tail: String::new(),
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
    run.stderr_tail = err_reader.join().unwrap_or_default();
    Ok(run)
}

/// Medians of one (memory, pages, VMM) cell.
struct Row {
    marker_ms: f64,
    init_exit_ms: f64,
    guest_ms: f64,
    guest_min: f64,
    guest_max: f64,
    codes: String,
}

fn summarize(runs: &[BootRun]) -> Row {
    let mut m: Vec<f64> = runs.iter().map(|r| r.marker_ms).collect();
    let mut e: Vec<f64> = runs.iter().map(|r| r.init_exit_ms).collect();
    let mut g: Vec<f64> = runs.iter().filter_map(|r| r.guest_init_exit_ms).collect();
    let codes: Vec<String> = runs
        .iter()
        .map(|r| r.code.map(|c| c.to_string()).unwrap_or("killed".into()))
        .collect();
    let guest_ms = median(&mut g); // sorts g
    Row {
        marker_ms: median(&mut m),
        init_exit_ms: median(&mut e),
        guest_ms,
        guest_min: g.first().copied().unwrap_or(f64::NAN),
        guest_max: g.last().copied().unwrap_or(f64::NAN),
        codes: codes.join(","),
    }
}

fn print_header() {
    println!(
        "{:>7} {:>5} {:>5} {:>12} {:>14} {:>30}  exit codes",
        "mem MiB", "pages", "vmm", "to marker ms", "to init exit", "guest clock at init exit ms"
    );
}

fn print_row(mem: u64, pages: Pages, vmm: &str, r: &Row, extra: &str) {
    let guest = format!("{:.1} ({:.1}-{:.1})", r.guest_ms, r.guest_min, r.guest_max);
    println!(
        "{mem:>7} {:>5} {vmm:>5} {:>12.1} {:>14.1} {guest:>30}  {}{extra}",
        pages.label(),
        r.marker_ms,
        r.init_exit_ms,
        r.codes
    );
}

/// A hugetlbfs mount point from /proc/mounts text (2 MiB pages: the x86 default size, or an
/// explicit `pagesize=2M`).
fn hugetlbfs_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[2] != "hugetlbfs" {
            return None;
        }
        let size = f[3]
            .split(',')
            .find_map(|o| o.strip_prefix("pagesize="))
            .unwrap_or("2M");
        matches!(size, "2M" | "2048k" | "2048K").then(|| PathBuf::from(f[1]))
    })
}

/// What was changed on the machine for the 2 MiB runs; put back on drop.
#[derive(Default)]
struct HugeSetup {
    /// The hugetlbfs directory QEMU's memory backend uses.
    dir: Option<PathBuf>,
    /// We mounted `dir` ourselves.
    mounted: bool,
    /// vm.nr_hugepages raised for the 2 MiB runs (put back on drop, after the unmount).
    pool: Option<xcgi_vmm::memory::HugePagePool>,
}

impl HugeSetup {
    /// Makes `need` free 2 MiB pages available (and a hugetlbfs mount when QEMU needs one).
    fn prepare(need: u64, qemu: bool) -> anyhow::Result<Self> {
        let mut h = HugeSetup::default();
        let free = xcgi_vmm::memory::free_huge_pages().unwrap_or(0);
        let pool = xcgi_vmm::memory::HugePagePool::raise_to(need).with_context(|| {
            format!("2 MiB pages: {need} free huge pages needed, {free} free (or leave 2m out of --pages)")
        })?;
        if let Some((old, want)) = pool.raised() {
            h.pool = Some(pool);
            let now = xcgi_vmm::memory::free_huge_pages().unwrap_or(0);
            if now < need {
                bail!(
                    "2 MiB pages: {need} free huge pages needed, only {now} after raising \
                     vm.nr_hugepages to {want} (memory too small or fragmented); use smaller \
                     --mem sizes or reserve the pages at boot"
                );
            }
            eprintln!("xcgi bench: vm.nr_hugepages {old} -> {want} (put back at the end)");
        }
        if qemu {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            if let Some(dir) = hugetlbfs_mount(&mounts) {
                h.dir = Some(dir);
            } else {
                let dir = PathBuf::from("/dev/hugepages");
                mount_hugetlbfs(&dir).with_context(|| {
                    format!(
                        "QEMU with 2 MiB pages needs a hugetlbfs mount and none is mounted; \
                         mounting one at {} failed (needs root): \
                         `mount -t hugetlbfs none {}`, or pass --no-qemu or leave 2m out of --pages",
                        dir.display(),
                        dir.display()
                    )
                })?;
                eprintln!(
                    "xcgi bench: mounted hugetlbfs at {} (unmounted at the end)",
                    dir.display()
                );
                h.dir = Some(dir);
                h.mounted = true;
            }
        }
        Ok(h)
    }
}

impl Drop for HugeSetup {
    fn drop(&mut self) {
        if self.mounted {
            if let Some(dir) = &self.dir {
                if let Ok(c) = CString::new(dir.as_os_str().as_encoded_bytes()) {
                    // SAFETY: umount(2) with a valid NUL-terminated path.
                    unsafe { libc::umount(c.as_ptr()) };
                }
            }
        }
    }
}

fn mount_hugetlbfs(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let src = CString::new("none")?;
    let fstype = CString::new("hugetlbfs")?;
    // SAFETY: mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// QEMU's memory options: plain `-m`, or `-m` plus a hugetlbfs-backed memory backend.
fn qemu_memory_args(mem: u64, hugetlbfs: Option<&Path>) -> (String, Vec<String>) {
    match hugetlbfs {
        None => ("microvm".into(), vec!["-m".into(), mem.to_string()]),
        Some(dir) => (
            "microvm,memory-backend=mem".into(),
            vec![
                "-m".into(),
                mem.to_string(),
                "-object".into(),
                format!(
                    "memory-backend-file,id=mem,size={mem}M,mem-path={},share=off",
                    dir.display()
                ),
            ],
        ),
    }
}

/// How long one boot may take before its console is no longer read.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// xcgi's own command line, except the reboot method: QEMU's microvm has no i8042 (the guest
/// would spin on the missing controller), so there the guest ends by triple fault.
const QEMU_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 no_timer_check quiet rdinit=/init";

/// The two VMMs' command lines for one (memory, pages) cell.
struct Vmms<'a> {
    /// This xcgi executable.
    exe: PathBuf,
    b: &'a BootArgs,
    /// The hugetlbfs directory QEMU's 2 MiB memory backend uses.
    hugetlbfs: Option<&'a Path>,
}

impl Vmms<'_> {
    fn xcgi(&self, mem: u64, pages: Pages) -> Command {
        let b = self.b;
        let mut c = Command::new(&self.exe);
        c.args(["run", "--quiet", "--timeout", "100", "--kernel"])
            .arg(&b.kernel)
            .arg("--initramfs")
            .arg(&b.initramfs)
            .args(["--mem", &mem.to_string()]);
        if pages == Pages::Huge {
            c.arg("--hugepages");
        }
        c
    }

    fn qemu(&self, mem: u64, pages: Pages) -> Command {
        let b = self.b;
        let dir = match pages {
            Pages::Small => None,
            Pages::Huge => self.hugetlbfs,
        };
        let (machine, mem_args) = qemu_memory_args(mem, dir);
        let mut q = Command::new(&b.qemu);
        if let Some(dir) = &b.qemu_datadir {
            q.arg("-L").arg(dir);
        }
        q.args(["-M", &machine, "-enable-kvm", "-cpu", "host", "-smp", "1"])
            .args(&mem_args)
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio", "-kernel"])
            .arg(&b.kernel)
            .arg("-initrd")
            .arg(&b.initramfs)
            .args(["-append", QEMU_CMDLINE]);
        q
    }
}

/// One (memory, pages) cell's medians: xcgi's, and QEMU's unless `--no-qemu`.
struct Cell {
    mem: u64,
    pages: Pages,
    xcgi: Row,
    qemu: Option<Row>,
}

/// Runs that went wrong somewhere in the grid (each already reported on stderr).
#[derive(Default)]
struct Bad {
    /// An xcgi run never showed the marker or ended with another exit code.
    xcgi: bool,
    /// A QEMU run never reached init exit.
    qemu: bool,
}

/// Boots every (memory, pages) cell with xcgi (and QEMU), prints the table and, with `--svg`,
/// the chart. The exit code is 1 when a run did not end as expected (each one is reported).
pub fn boot(b: BootArgs) -> anyhow::Result<i32> {
    check_grid(&b.mem, &b.pages)?;
    let exe = std::env::current_exe().context("finding the xcgi executable")?;
    // One VM runs at a time: the largest size decides how many huge pages are needed.
    let huge = if b.pages.contains(&Pages::Huge) {
        let need = b.mem.iter().copied().max().unwrap_or(0) / 2;
        HugeSetup::prepare(need, !b.no_qemu)?
    } else {
        HugeSetup::default()
    };
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let vmms = Vmms {
        exe,
        b: &b,
        hugetlbfs: huge.dir.as_deref(),
    };
    let mut bad = Bad::default();
    let results = measure_grid(&b, &vmms, &mut bad)?;
    print_results(&b, &results, huge.dir.as_deref(), &thp);
    if let Some(path) = &b.svg {
        write_chart(path, &results)?;
    }
    if bad.xcgi {
        eprintln!(
            "xcgi bench: not every xcgi run showed {:?} and exited {}",
            b.marker, b.expect_exit
        );
    }
    if bad.qemu {
        eprintln!("xcgi bench: not every QEMU run reached init exit");
    }
    drop(huge);
    Ok(if bad.xcgi || bad.qemu { 1 } else { 0 })
}

/// Every (memory, pages) cell in turn: warm-up runs, then the measured ones, each xcgi run
/// followed by a QEMU run.
fn measure_grid(b: &BootArgs, vmms: &Vmms<'_>, bad: &mut Bad) -> anyhow::Result<Vec<Cell>> {
    let cells = b.mem.len() * b.pages.len();
    let mut cell = 0;
    let mut results = Vec::new();
    for &mem in &b.mem {
        for &pages in &b.pages {
            cell += 1;
            for _ in 0..b.warmup {
                time_boot(vmms.xcgi(mem, pages), &b.marker, BOOT_TIMEOUT)?;
                if !b.no_qemu {
                    time_boot(vmms.qemu(mem, pages), &b.marker, BOOT_TIMEOUT)?;
                }
            }
            let mut ours = Vec::new();
            let mut qemu = Vec::new();
            for _ in 0..b.runs {
                ours.push(time_boot(vmms.xcgi(mem, pages), &b.marker, BOOT_TIMEOUT)?);
                if !b.no_qemu {
                    qemu.push(time_boot(vmms.qemu(mem, pages), &b.marker, BOOT_TIMEOUT)?);
                }
            }
            report_bad_runs(b, mem, pages, &ours, &qemu, bad);
            eprintln!(
                "xcgi bench: {mem} MiB {} done ({cell}/{cells})",
                pages.label()
            );
            results.push(Cell {
                mem,
                pages,
                xcgi: summarize(&ours),
                qemu: (!b.no_qemu).then(|| summarize(&qemu)),
            });
        }
    }
    Ok(results)
}

/// Tells on stderr of each xcgi run without the marker or the expected exit code, and each
/// QEMU run that never reached init exit; notes them in `bad`.
fn report_bad_runs(
    b: &BootArgs,
    mem: u64,
    pages: Pages,
    ours: &[BootRun],
    qemu: &[BootRun],
    bad: &mut Bad,
) {
    for r in ours {
        if r.marker_ms.is_nan() || r.code != Some(b.expect_exit) {
            bad.xcgi = true;
            eprintln!(
                "xcgi bench: xcgi {mem} MiB {}: marker {}, exit {:?}; stderr: {}",
                pages.label(),
                if r.marker_ms.is_nan() {
                    "missing"
                } else {
                    "seen"
                },
                r.code,
                r.stderr_tail.trim()
            );
        }
    }
    for r in qemu {
        if r.init_exit_ms.is_nan() {
            bad.qemu = true;
            eprintln!(
                "xcgi bench: QEMU {mem} MiB {}: no init exit seen; stderr: {}",
                pages.label(),
                r.stderr_tail.trim()
            );
        }
    }
}

/// The table: a heading, then a row per cell and VMM (QEMU's with its ratios to xcgi).
fn print_results(b: &BootArgs, results: &[Cell], hugetlbfs: Option<&Path>, thp: &str) {
    println!(
        "# boot to init: host wall time from spawn, median of {} runs ({} warm-up not counted), kernel {}",
        b.runs,
        b.warmup,
        b.kernel.display()
    );
    println!(
        "# 2M: xcgi MAP_HUGETLB, QEMU memory-backend-file on {} (share=off, no prealloc); THP: {thp}",
        hugetlbfs
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "-".into())
    );
    print_header();
    for c in results {
        print_row(c.mem, c.pages, "xcgi", &c.xcgi, "");
        if let Some(q) = &c.qemu {
            let ratio = format!(
                "  | qemu/xcgi: marker {:.2}x, init exit {:.2}x",
                q.marker_ms / c.xcgi.marker_ms,
                q.init_exit_ms / c.xcgi.init_exit_ms
            );
            print_row(c.mem, c.pages, "qemu", q, &ratio);
        }
    }
}

/// Boot to init exit against memory, a line per VMM and page size, as an SVG file.
fn write_chart(path: &Path, results: &[Cell]) -> anyhow::Result<()> {
    let points = results.iter().flat_map(|c| {
        let ours = (
            format!("xcgi {}", c.pages.label()),
            c.mem as f64,
            c.xcgi.init_exit_ms,
        );
        let qemu = c.qemu.as_ref().map(|q| {
            (
                format!("QEMU microvm {}", c.pages.label()),
                c.mem as f64,
                q.init_exit_ms,
            )
        });
        std::iter::once(ours).chain(qemu)
    });
    let mut series = super::svg::Series::grouped(points);
    // Legend order: xcgi first, then QEMU; 4K before 2M.
    series.sort_by_key(|s| (s.name.starts_with("QEMU"), s.name.ends_with("2M")));
    super::svg::write_memory_chart(path, "Boot to init exit (host wall time, median)", &series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        b: BootArgs,
    }

    fn parse(extra: &[&str]) -> Result<BootArgs, clap::Error> {
        let mut argv = vec!["t", "--kernel", "k", "--initramfs", "i"];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).map(|t| t.b)
    }

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

    #[test]
    fn page_sizes_parse() {
        assert_eq!(parse_pages("4k"), Ok(Pages::Small));
        assert_eq!(parse_pages("4KiB"), Ok(Pages::Small));
        assert_eq!(parse_pages(" 2M "), Ok(Pages::Huge));
        assert_eq!(parse_pages("2mib"), Ok(Pages::Huge));
        assert!(parse_pages("1g").unwrap_err().contains("4k or 2m"));
        assert!(parse_pages("").is_err());
    }

    #[test]
    fn memory_and_page_lists_parse() {
        let b = parse(&[]).unwrap();
        assert_eq!(
            (b.mem, b.pages, b.runs, b.warmup),
            (vec![128], vec![Pages::Small], 5, 1)
        );
        let b = parse(&[
            "--mem",
            "128,512,2048",
            "--pages",
            "4k,2m",
            "--svg",
            "x.svg",
        ])
        .unwrap();
        assert_eq!(b.mem, vec![128, 512, 2048]);
        assert_eq!(b.pages, vec![Pages::Small, Pages::Huge]);
        assert_eq!(b.svg, Some(PathBuf::from("x.svg")));
        assert!(parse(&["--pages", "4k,1g"]).is_err());
        assert!(parse(&["--mem", "128,lots"]).is_err());
    }

    #[test]
    fn grid_is_checked() {
        assert!(check_grid(&[128, 4096], &[Pages::Small, Pages::Huge]).is_ok());
        assert!(check_grid(&[16], &[Pages::Small]).is_err());
        assert!(check_grid(&[129], &[Pages::Small]).is_ok());
        let e = check_grid(&[129], &[Pages::Huge]).unwrap_err().to_string();
        assert!(e.contains("multiple of 2 MiB"), "{e}");
        assert!(check_grid(&[], &[Pages::Small]).is_err());
    }

    #[test]
    fn finds_a_2m_hugetlbfs_mount() {
        let m = "proc /proc proc rw 0 0\n\
                 none /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n\
                 hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n";
        assert_eq!(hugetlbfs_mount(m), Some(PathBuf::from("/dev/hugepages")));
        let m = "none /mnt/h hugetlbfs rw,relatime 0 0\n";
        assert_eq!(hugetlbfs_mount(m), Some(PathBuf::from("/mnt/h")));
        assert_eq!(hugetlbfs_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn qemu_gets_a_hugetlbfs_backend_for_2m() {
        let (m, a) = qemu_memory_args(512, None);
        assert_eq!(
            (m.as_str(), a),
            ("microvm", vec!["-m".into(), "512".into()])
        );
        let (m, a) = qemu_memory_args(512, Some(Path::new("/dev/hugepages")));
        assert_eq!(m, "microvm,memory-backend=mem");
        assert_eq!(
            a,
            vec![
                "-m",
                "512",
                "-object",
                "memory-backend-file,id=mem,size=512M,mem-path=/dev/hugepages,share=off"
            ]
        );
    }
}
