//! `xcgi run`: boot a kernel straight into a program; exit with the program's exit code.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use xcgi_vmm::arch::x86_64::loader::LoadMode;
use xcgi_vmm::memory::MemoryConfig;

use xcgi_vmm::{Attachments, Cancel, ExitReason, MachineShape, RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Guest kernel: an ELF vmlinux or a bzImage (`xcgi kernel build` prints one).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Root filesystem image (ext4), attached read-only as /dev/vda; /init is run.
    #[arg(
        long,
        conflicts_with = "initramfs",
        required_unless_present = "initramfs"
    )]
    pub rootfs: Option<PathBuf>,
    /// initramfs (newc cpio); its /init is run.
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u64,
    /// Number of vCPUs (the default kernel is built without SMP: use `xcgi kernel build --smp`).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Back guest memory with 2 MiB huge pages.
    #[arg(long)]
    pub hugepages: bool,
    /// Pre-fault all guest memory at creation (MAP_POPULATE).
    #[arg(long)]
    pub populate: bool,
    /// Extra kernel command-line parameters, appended last.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Deadline in seconds; a VM still running then is killed (exit code 124).
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Copy the kernel and initramfs into guest memory instead of mapping their pages
    /// copy-on-write from the files (for comparison; mapping is faster to set up).
    #[arg(long)]
    pub copy_kernel: bool,
    /// Build the VM and stop right before the first KVM_RUN; prints the setup phases.
    #[arg(long)]
    pub setup_only: bool,
    /// Give the guest a network interface: virtio-net on a TAP device in a network namespace
    /// of its own, the guest's IPv4 address set by the kernel (`ip=`). Needs CAP_NET_ADMIN.
    #[arg(long)]
    pub net: bool,
    /// Name of that network namespace (visible as /run/netns/NAME, so `ip netns exec NAME
    /// curl ...` reaches the guest); removed when the VM ends. Default: xcgi-<pid>.
    #[arg(long, requires = "net")]
    pub netns: Option<String>,
    /// The /30 the guest's link uses: host side base+1, guest base+2.
    #[arg(long, requires = "net", default_value = "172.16.0.0")]
    pub net_base: std::net::Ipv4Addr,
    /// Print the host memory behind the VM when it ends: guest pages touched (4 KiB resident,
    /// 2 MiB huge pages) and the process's peak resident memory beyond them.
    #[arg(long)]
    pub memory_stats: bool,
    /// Print no summary line.
    #[arg(long, short)]
    pub quiet: bool,
    /// When the VM ends badly (triple fault, deadline, signal, panic), print a debug dump to
    /// stderr: vCPU registers, local APIC and timers, interrupt controllers, each virtio
    /// queue's indices, device counters, the last console lines (docs/networking.md). Add
    /// `--cmdline loglevel=7` for the guest kernel's own messages.
    #[arg(long)]
    pub debug_dump: bool,
    /// Run the VM jailed (docs/security.md, "The jail"): in a child process of its own, in
    /// new PID, mount, IPC, UTS and network namespaces, on an empty read-only root, with
    /// rlimits, no capabilities, as an unprivileged uid, under per-thread seccomp filters
    /// (`XCGI_SECCOMP=log` logs instead of killing, to derive the lists). Needs root.
    #[arg(long, conflicts_with_all = ["net", "memory_stats"])]
    pub jail: bool,
    /// With --jail: the uid and gid the VM process runs as (default: 2000000000 + this
    /// process's pid, a user of its own).
    #[arg(long, requires = "jail")]
    pub jail_uid: Option<u32>,
    /// Take a snapshot of the running guest into this directory (its `state` and `memory`
    /// files) when a console line contains the --snapshot-at text, and stop the VM there (exit
    /// 0). `--restore DIR` starts clones of it.
    #[arg(long, conflicts_with_all = ["restore", "jail", "net", "setup_only"])]
    pub snapshot_out: Option<PathBuf>,
    /// The console text that triggers --snapshot-out (a line containing it; the guest goes on
    /// a little before it is stopped, which is harmless: any moment after it is a whole
    /// state).
    #[arg(long, requires = "snapshot_out", default_value = "xcgi-snapshot-here")]
    pub snapshot_at: String,
    /// With --snapshot-out: write the memory to this file instead (the directory's `memory`
    /// becomes a link to it). Needed with --hugepages: a file on hugetlbfs (e.g.
    /// /dev/hugepages/NAME), whose clones share its 2 MiB pages; remove it when done (it holds
    /// huge pages).
    #[arg(long, requires = "snapshot_out", value_name = "FILE")]
    pub snapshot_memory: Option<PathBuf>,
    /// Start the VM as a clone of the snapshot in this directory (taken by --snapshot-out with
    /// the same kernel, root, --mem, --vcpus and --hugepages: anything else is refused, naming
    /// the difference) instead of booting: its memory mapped copy-on-write from the snapshot's
    /// memory file, which no clone ever changes.
    #[arg(long, conflicts_with_all = ["net", "copy_kernel"])]
    pub restore: Option<PathBuf>,
    /// With --restore: when the clone ends, record the pages the guest touched as the
    /// snapshot's working set (DIR/working-set, unless it has one); later clones of it touch
    /// those pages before they run, so the guest does not fault them in one by one.
    #[arg(long, requires = "restore", conflicts_with = "jail")]
    pub record_working_set: bool,
    /// Internal: this process is the jailed VM process `--jail` started.
    #[arg(long, hide = true)]
    pub jail_worker: bool,
}

/// The machine, and how this run goes.
pub fn config(a: &Args) -> anyhow::Result<(MachineShape, RunOptions)> {
    if !(a.timeout.is_finite() && a.timeout > 0.0 && a.timeout <= 86_400.0) {
        anyhow::bail!(
            "--timeout {} is not a number of seconds between 0 and 86400",
            a.timeout
        );
    }
    for (what, p) in [
        ("kernel", Some(&a.kernel)),
        ("rootfs", a.rootfs.as_ref()),
        ("initramfs", a.initramfs.as_ref()),
    ] {
        if let Some(p) = p {
            if !p.is_file() {
                anyhow::bail!(
                    "{what} {} does not exist or is not a file{}",
                    p.display(),
                    if what == "kernel" {
                        "; build one with `xcgi kernel build`"
                    } else {
                        "; build one with `xcgi image build`"
                    }
                );
            }
        }
    }
    if a.hugepages && a.snapshot_out.is_some() && a.snapshot_memory.is_none() {
        anyhow::bail!(
            "--snapshot-out with --hugepages keeps the memory on hugetlbfs: add --snapshot-memory \
             FILE on a hugetlbfs mount (e.g. /dev/hugepages/snapshot; `mount -t hugetlbfs none \
             /dev/hugepages` where none is mounted)"
        );
    }
    let shape = MachineShape {
        kernel: a.kernel.clone(),
        rootfs: a.rootfs.clone(),
        initramfs: a.initramfs.clone(),
        memory: MemoryConfig {
            size_mib: a.mem,
            hugepages: a.hugepages,
            populate: a.populate,
        },
        vcpus: a.vcpus,
        load_mode: if a.copy_kernel {
            LoadMode::Copy
        } else {
            LoadMode::Map
        },
        snapshot: a.restore.clone(),
    };
    let opts = RunOptions {
        timeout: Duration::from_secs_f64(a.timeout),
        cancel: Cancel::new(),
        setup_only: a.setup_only,
        measure_memory: a.memory_stats,
        debug_dump: a.debug_dump,
        debug_probe: None,
        capture: a.snapshot_out.as_ref().map(|dir| xcgi_vmm::Capture {
            now: Cancel::new(),
            marker: Some(a.snapshot_at.clone()),
            dir: dir.clone(),
            memory_file: a.snapshot_memory.clone(),
        }),
        record_working_set: a.record_working_set,
    };
    Ok((shape, opts))
}

/// The guest's network for one `xcgi run`: a namespace, a one-slot pool, one lease.
struct Network {
    lease: xcgi_net::Lease,
    _pool: xcgi_net::Pool,
}

impl Network {
    fn open(a: &Args) -> anyhow::Result<Network> {
        let name = a
            .netns
            .clone()
            .unwrap_or_else(|| format!("xcgi-{}", std::process::id()));
        let ns = xcgi_net::NetNs::create(Some(&name))
            .with_context(|| format!("creating network namespace {name}"))?;
        let pool = xcgi_net::Pool::new(
            std::sync::Arc::new(ns),
            xcgi_net::PoolConfig {
                base: a.net_base,
                size: 1,
                prefill: 0,
            },
        )
        .context("setting up the guest network")?;
        let lease = pool.lease().context("creating the guest's TAP device")?;
        eprintln!(
            "xcgi: guest network: {} (MAC {}) via {} ({}) in network namespace {name}; try `ip netns exec {name} curl http://{}/`",
            lease.guest_ip(),
            lease.guest_mac(),
            lease.ifname(),
            lease.host_ip(),
            lease.guest_ip()
        );
        Ok(Network { lease, _pool: pool })
    }

    fn attachment(&self) -> anyhow::Result<xcgi_vmm::vm::NetAttachment> {
        Ok(xcgi_vmm::vm::NetAttachment {
            tap: std::sync::Arc::new(self.lease.try_clone_tap_fd()?),
            mac: self.lease.guest_mac().0,
            ip_param: self.lease.kernel_ip_param(),
            rx_ready: None,
        })
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// SIGINT, SIGTERM and SIGHUP stop the VM cleanly (so everything it holds is released)
/// instead of killing xcgi outright ([`on_stop_signal`]).
fn stop_on_signals(cancel: Cancel) -> std::sync::Arc<std::sync::atomic::AtomicI32> {
    on_stop_signal(move || cancel.cancel())
}

/// Blocks SIGINT, SIGTERM and SIGHUP in every thread (threads started later inherit the
/// mask) and takes them on one thread with sigwait, which then runs `action`. Returns the
/// signal, once taken (0 before).
pub(super) fn on_stop_signal(
    action: impl FnOnce() + Send + 'static,
) -> std::sync::Arc<std::sync::atomic::AtomicI32> {
    use std::sync::atomic::{AtomicI32, Ordering};
    let got = std::sync::Arc::new(AtomicI32::new(0));
    // SAFETY: plain signal-mask calls on a local sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let seen = got.clone();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait writes the signal number into `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                seen.store(sig, Ordering::SeqCst);
                action();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch for SIGINT/SIGTERM: {e}");
    }
    got
}

pub fn run(a: Args, start: Instant) -> anyhow::Result<i32> {
    if a.jail_worker {
        return super::jail::worker(&a, start);
    }
    if a.jail {
        config(&a)?; // bad arguments are refused here, not in the jailed process
        return super::jail::parent(&a);
    }
    let (shape, opts) = config(&a)?;
    if !opts.setup_only && xcgi_vmm::hypervisor::kvm::host_is_pvm() {
        eprintln!(
            "xcgi: warning: this host's /dev/kvm is PVM, which cannot boot a standard Linux guest \
             (it will not get far before the deadline); run it in the lab: `xcgi lab -- xcgi run ...`"
        );
    }
    let signal = stop_on_signals(opts.cancel.clone());
    let mut attach = Attachments {
        cmdline_extra: a.cmdline.clone(),
        ..Attachments::default()
    };
    // Declared before the VM so that it is released after it: lease, pool, then namespace.
    let network = if a.net {
        Some(Network::open(&a)?)
    } else {
        None
    };
    if let Some(n) = &network {
        attach.net = Some(n.attachment()?);
    }
    let live = Some(Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>);
    let outcome =
        xcgi_vmm::run(&shape, &attach, &opts, start, live).context("cannot start the VM")?;
    // The VM's own copy of the TAP descriptor is closed; ours goes before the lease returns.
    let setup_only = opts.setup_only;
    drop(attach);
    drop(network);
    report(
        &a,
        &outcome,
        setup_only,
        signal.load(std::sync::atomic::Ordering::SeqCst),
    )
}

/// Prints what `xcgi run` prints after the VM (the summary, memory, dump, why it stopped);
/// returns the exit code.
pub(super) fn report(
    a: &Args,
    outcome: &xcgi_vmm::Outcome,
    setup_only: bool,
    signal: i32,
) -> anyhow::Result<i32> {
    let t = &outcome.timings;
    if setup_only {
        super::bench::print_setup_mark(t);
        for (name, d) in &t.phases {
            println!("phase {:<14} {}", name.replace(' ', "_"), ms(*d));
        }
        println!("teardown {}", ms(t.teardown));
    }
    if !a.quiet {
        let first = t.first_output.map(ms).unwrap_or_else(|| "none".into());
        println!(
            "xcgi: setup {} | first output {} | total {} | {} | exit {}",
            ms(t.setup),
            first,
            ms(t.total),
            outcome.reason.describe(),
            outcome.exit_code()
        );
    }
    if let Some(m) = &outcome.memory {
        println!(
            "xcgi: memory: guest touched {} KiB in 4 KiB pages + {} huge pages | {} KiB of them shared with the page cache | process peak RSS {} KiB | overhead beyond guest pages {} KiB, {} KiB of it private",
            m.guest_resident_kib,
            m.guest_huge_pages,
            m.guest_shared_file_kib,
            m.process_peak_kib,
            m.overhead_kib(),
            m.private_overhead_kib()
        );
    }
    if let Some(dump) = &outcome.dump {
        for line in dump.lines() {
            eprintln!("xcgi: {line}");
        }
    }
    if let (Some(set), Some(dir)) = (&outcome.working_set, &a.restore) {
        let written = set
            .write_new(dir)
            .with_context(|| format!("recording the working set into {}", dir.display()))?;
        let writes = set
            .pages()
            .iter()
            .filter(|&&p| p & xcgi_vmm::prefault::WRITE != 0)
            .count();
        println!(
            "xcgi: working set: {} pages ({writes} written) {}",
            set.pages().len(),
            if written {
                "recorded"
            } else {
                "not recorded: the snapshot has one"
            }
        );
    }
    if outcome.reason == ExitReason::Cancelled {
        let sig = signal;
        eprintln!("xcgi: stopped by signal {sig}; the VM was killed and its resources released");
        return Ok(128 + sig);
    }
    if outcome.reason == ExitReason::Timeout {
        eprintln!(
            "xcgi: the guest did not finish within {}s and was killed (raise --timeout if it needs longer)",
            a.timeout
        );
    }
    Ok(outcome.exit_code())
}
