//! End-to-end tests of the lab: each boots QEMU/TCG with the Debian kernel (several seconds
//! each), so they are few and run one at a time.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use xcgi_lab::{Lab, LabCommand, LabError};

/// One lab at a time: TCG keeps both cores busy, and the timing test needs them.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| Lab::prepare().expect("preparing lab assets"))
}

/// Our children that are QEMU processes (zombies included).
fn qemu_children() -> Vec<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) && comm.starts_with("qemu") {
            found.push(pid);
        }
    }
    found
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

/// (a) nested KVM works inside, (b) the exit code comes back, (c) --files and binaries with
/// their libraries arrive. One boot.
#[test]
fn kvm_inside_files_and_exit_code() {
    let _g = serial();
    let host = tempfile::tempdir().unwrap();
    let file = host.path().join("hello.txt");
    std::fs::write(&file, "hello from the host\n").unwrap();
    let tree = host.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/deep.txt"), "deep\n").unwrap();
    let scratch = tempfile::tempdir().unwrap();

    let cmd = LabCommand::new(
        "set -e; echo svm=$(grep -c svm /proc/cpuinfo); test -c /dev/kvm && echo kvm-ok; \
         echo pwd=$(pwd); cat hello.txt; cat /opt/t/sub/deep.txt; \
         /opt/bin/seq --version | head -n1; /opt/bin/seq 3 | tr '\\n' ' '; echo; \
         echo huge=$(cat /proc/sys/vm/nr_hugepages); ip -V; exit 7",
    )
    .file(&file, "")
    .file(&tree, "/opt/t")
    .binary("/usr/bin/seq", "/opt/bin/seq")
    .hugepages(16)
    .timeout(Duration::from_secs(180))
    .scratch_dir(scratch.path());
    let mut lines = Vec::new();
    let out = lab()
        .run(&cmd, |l| lines.push(l.to_string()))
        .expect("lab run");
    eprintln!(
        "boot {:.2}s, wall {:.2}s\n{}",
        out.boot.as_secs_f64(),
        out.wall.as_secs_f64(),
        out.output
    );
    assert_eq!(out.exit_code, 7, "output:\n{}", out.output);
    let svm: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("svm="))
        .and_then(|n| n.parse().ok())
        .expect("svm count line");
    assert!(svm > 0, "no svm flag in the lab's /proc/cpuinfo");
    for want in [
        "kvm-ok",
        "pwd=/work",
        "hello from the host",
        "deep",
        "1 2 3 ",
        "huge=16",
    ] {
        assert!(
            lines.iter().any(|l| l == want),
            "missing {want:?} in {lines:?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("GNU coreutils")),
        "seq is not the host's: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("iproute2")),
        "ip is not iproute2's: {lines:?}"
    );
    // Output is the lines joined; no kernel console noise in it.
    assert_eq!(out.output, lines.join("\n") + "\n");
    assert!(!out.output.contains("Unhandled WRMSR"));
    assert!(out.boot < out.wall);
    assert!(qemu_children().is_empty());
    assert!(dir_is_empty(scratch.path()), "scratch files left behind");
}

/// (d) output is streamed: "first" reaches the callback well before the run returns.
#[test]
fn output_is_streamed() {
    let _g = serial();
    let cmd = LabCommand::new("echo first; sleep 2; echo second >&2; printf tail")
        .hugepages(0)
        .timeout(Duration::from_secs(180));
    let mut seen: Vec<(String, Instant)> = Vec::new();
    let out = lab()
        .run(&cmd, |l| seen.push((l.to_string(), Instant::now())))
        .expect("lab run");
    let returned = Instant::now();
    let lines: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(lines, ["first", "second", "tail"]);
    assert_eq!(out.output, "first\nsecond\ntail");
    assert_eq!(out.exit_code, 0);
    let lead = returned - seen[0].1;
    eprintln!(
        "'first' arrived {:.2}s before the run returned",
        lead.as_secs_f64()
    );
    assert!(
        lead >= Duration::from_millis(1500),
        "'first' arrived only {lead:?} before the end: not streamed"
    );
}

/// (e) a command past the timeout: the timeout error, QEMU gone, scratch files removed.
#[test]
fn timeout_kills_qemu() {
    let _g = serial();
    let scratch = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(15);
    let cmd = LabCommand::new("echo started; sleep 600; echo never")
        .hugepages(0)
        .timeout(timeout)
        .scratch_dir(scratch.path());
    let mut lines = Vec::new();
    let start = Instant::now();
    let err = lab()
        .run(&cmd, |l| lines.push(l.to_string()))
        .expect_err("must time out");
    let took = start.elapsed();
    match &err {
        LabError::Timeout {
            timeout: t, booted, ..
        } => {
            assert_eq!(*t, timeout);
            // On a very loaded machine the boot alone may not finish in time.
            if *booted {
                assert_eq!(lines, ["started"]);
            }
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert_eq!(err.exit_code(), xcgi_lab::EXIT_TIMEOUT);
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(10),
        "took {took:?}"
    );
    assert!(qemu_children().is_empty(), "QEMU survived the timeout");
    assert!(dir_is_empty(scratch.path()), "scratch files left behind");
}

/// A QEMU that exits at once: a lab failure (not the command's exit code), no boot needed.
#[test]
fn qemu_failure_is_a_lab_error() {
    let lab = lab().clone().with_qemu("/bin/false");
    let err = lab
        .run(
            &LabCommand::new("true").timeout(Duration::from_secs(30)),
            |_| {},
        )
        .expect_err("must fail");
    assert!(
        matches!(err, LabError::Exited { booted: false, .. }),
        "got {err}"
    );
    assert_eq!(err.exit_code(), xcgi_lab::EXIT_LAB_ERROR);

    let lab = lab.with_qemu("/nonexistent/qemu-system-x86_64");
    let err = lab
        .run(&LabCommand::new("true"), |_| {})
        .expect_err("must fail");
    assert!(matches!(err, LabError::Spawn { .. }), "got {err}");
}

#[test]
fn bad_files_are_rejected_before_booting() {
    // Assets first (on a fresh machine this builds them): only the rejection is timed.
    let lab = lab();
    let start = Instant::now();
    let err = lab
        .run(
            &LabCommand::new("true").file("/nonexistent/file", "x"),
            |_| {},
        )
        .expect_err("must fail");
    assert!(matches!(err, LabError::Payload(_)), "got {err}");
    let err = lab
        .run(
            &LabCommand::new("true").file("/etc/hostname", "/tmp/x"),
            |_| {},
        )
        .expect_err("must fail");
    assert!(matches!(err, LabError::Invalid(_)), "got {err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// The lab's kernel ticks periodically (docs/networking.md, "The lab's lost timer"): with its
/// default one-shot timer, QEMU's TCG losing one timer interrupt stopped the whole lab. The
/// tick device reports mode 0 (periodic) and high resolution off; with the one-shot timer
/// it reads mode 1 (one-shot).
#[test]
fn the_lab_kernel_ticks_periodically() {
    let _g = serial();
    assert!(
        std::env::var_os(xcgi_lab::ONESHOT_TIMER_ENV).is_none(),
        "unset {} to run this test",
        xcgi_lab::ONESHOT_TIMER_ENV
    );
    let cmd = LabCommand::new(
        "grep -m1 'Tick Device: mode' /proc/timer_list; grep -m1 'hres_active' /proc/timer_list; \
         cat /proc/cmdline",
    )
    .hugepages(0)
    .timeout(Duration::from_secs(180));
    let out = lab().run(&cmd, |_| {}).expect("lab run");
    assert_eq!(out.exit_code, 0, "{}", out.output);
    assert!(
        out.output.contains("Tick Device: mode:     0"),
        "{}",
        out.output
    );
    assert!(out.output.contains(".hres_active    : 0"), "{}", out.output);
    assert!(
        out.output.contains("highres=off nohz=off"),
        "{}",
        out.output
    );
}
