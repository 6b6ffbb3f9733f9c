//! `xcgi run` with bad input: a clear message naming the problem, a nonzero exit, and nothing
//! left behind. These fail before any guest code runs, so they run on this host directly.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(xcgi())
        .arg("run")
        .args(args)
        .output()
        .expect("spawn xcgi");
    assert!(out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("Hello"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp_entries() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| d.count())
        .unwrap_or(0)
}

fn huge_free() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("HugePages_Free:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_nothing_behind() {
    let kernel = kernel();
    let image = example("hello-c.ext4");
    let k = kernel.to_str().unwrap();
    let img = image.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let not_kernel = dir.path().join("notes.txt");
    std::fs::write(&not_kernel, "this is not a kernel\n").unwrap();
    let truncated = dir.path().join("vmlinux-truncated");
    let bytes = std::fs::read(&kernel).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let tmp_before = tmp_entries();
    let huge_before = huge_free();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinux", "--rootfs", img],
            "kernel /nonexistent/vmlinux does not exist",
        ),
        (
            vec!["--kernel", not_kernel.to_str().unwrap(), "--rootfs", img],
            "is not a Linux kernel",
        ),
        (
            vec!["--kernel", truncated.to_str().unwrap(), "--rootfs", img],
            "truncated",
        ),
        (
            vec!["--kernel", k, "--rootfs", "/nonexistent/root.ext4"],
            "rootfs /nonexistent/root.ext4 does not exist",
        ),
        (
            vec!["--kernel", k, "--initramfs", "/nonexistent/x.cpio"],
            "initramfs /nonexistent/x.cpio does not exist",
        ),
        (
            vec!["--kernel", k, "--rootfs", img, "--mem", "16"],
            "below the minimum of 32 MiB",
        ),
        // Far more huge pages than any machine here has free.
        (
            vec![
                "--kernel",
                k,
                "--rootfs",
                img,
                "--mem",
                "262144",
                "--hugepages",
            ],
            "vm.nr_hugepages=",
        ),
        (
            vec!["--kernel", k, "--rootfs", img, "--timeout", "0"],
            "--timeout",
        ),
        // A huge-page snapshot's memory needs a place on hugetlbfs: said before any boot.
        (
            vec![
                "--kernel",
                k,
                "--rootfs",
                img,
                "--hugepages",
                "--snapshot-out",
                "/tmp/xcgi-never-written",
            ],
            "add --snapshot-memory FILE on a hugetlbfs mount",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, 2, "args {args:?}: exit code, stderr:\n{stderr}");
        assert!(
            stderr.contains(expected),
            "args {args:?}: expected {expected:?} in:\n{stderr}"
        );
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("xcgi: error:"),
            "ends with the error:\n{stderr}"
        );
    }
    // No huge pages held, no temp files, no child processes left.
    assert_eq!(huge_free(), huge_before);
    assert_eq!(tmp_entries(), tmp_before, "temp files left behind");
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        std::process::id(),
        std::process::id()
    ))
    .unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "child processes left: {children}"
    );
    assert!(Path::new(k).exists());
}
