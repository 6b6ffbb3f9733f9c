//! End to end: `xcgi run` boots the real guest kernel into the example programs on real KVM
//! (inside the lab when this host has no hardware KVM).

mod common;

use std::time::Duration;

use common::*;

fn assert_stamped_line(section: &str, text: &str) {
    let line = section
        .lines()
        .find(|l| l.ends_with(text))
        .unwrap_or_else(|| panic!("no console line {text:?} in:\n{section}"));
    // "SS.micros text": host timestamp first.
    let stamp = line.split(' ').next().unwrap();
    let (s, us) = stamp
        .split_once('.')
        .unwrap_or_else(|| panic!("no timestamp on {line:?}"));
    assert!(
        s.len() >= 2 && s.chars().all(|c| c.is_ascii_digit()),
        "{line}"
    );
    assert!(
        us.len() == 6 && us.chars().all(|c| c.is_ascii_digit()),
        "{line}"
    );
}

fn assert_summary(section: &str, reason: &str) {
    let summary = section
        .lines()
        .find(|l| l.starts_with("xcgi: setup "))
        .unwrap_or_else(|| panic!("no summary line in:\n{section}"));
    assert!(summary.contains("first output"), "{summary}");
    assert!(summary.contains(reason), "{summary}");
}

#[test]
fn hello_programs_boot_as_init_and_pass_their_exit_codes() {
    let kernel = kernel();
    let c_ext4 = example("hello-c.ext4");
    let c_cpio = example("hello-c.cpio");
    let go_ext4 = example("hello-go.ext4");
    let script = r#"
        count_xcgi() { n=0; for c in /proc/[0-9]*/comm; do [ "$(cat "$c" 2>/dev/null)" = xcgi ] && n=$((n+1)); done; echo $n; }
        run() { name=$1; shift; echo "===$name==="; xcgi run --kernel "$K" "$@"; echo "rc=$?"; echo "===end $name==="; }
        run c-ext4 --rootfs "$C_EXT4"
        run c-cpio --initramfs "$C_CPIO"
        run go-ext4 --rootfs "$GO_EXT4" --mem 256
        free_before=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
        run c-huge --rootfs "$C_EXT4" --hugepages --mem 64
        echo "huge_free_before=$free_before huge_free_after=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)"
        echo "leftover_vmms=$(count_xcgi)"
    "#;
    let r = run_script(
        script,
        &[
            (&kernel, "K"),
            (&c_ext4, "C_EXT4"),
            (&c_cpio, "C_CPIO"),
            (&go_ext4, "GO_EXT4"),
        ],
        Duration::from_secs(400),
    );
    assert_eq!(r.code, 0, "script failed:\n{}", r.output);

    let c = section(&r.output, "c-ext4");
    assert_stamped_line(c, "Hello!");
    assert_summary(c, "init exited with status 4");
    assert_eq!(rc(c), 4, "{c}");

    let cpio = section(&r.output, "c-cpio");
    assert_stamped_line(cpio, "Hello!");
    assert_eq!(rc(cpio), 4, "{cpio}");

    let go = section(&r.output, "go-ext4");
    assert_stamped_line(go, "Hello Go!");
    assert_summary(go, "init exited with status 5");
    assert_eq!(rc(go), 5, "{go}");

    let huge = section(&r.output, "c-huge");
    assert_stamped_line(huge, "Hello!");
    assert_eq!(rc(huge), 4, "{huge}");

    // Huge pages all returned, no VMM process left.
    let line = r
        .output
        .lines()
        .find(|l| l.starts_with("huge_free_before="))
        .expect("huge page line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse().ok()))
        .collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert_eq!(nums[0], nums[1], "huge pages leaked: {line}");
    assert!(
        nums[0] >= 32,
        "the lab should have reserved huge pages: {line}"
    );
    assert!(r.output.contains("leftover_vmms=0"), "{}", r.output);
}

#[test]
fn a_guest_that_never_ends_is_killed_at_its_deadline() {
    let kernel = kernel();
    let looping = example("loop-forever.ext4");
    let script = r#"
        count_xcgi() { n=0; for c in /proc/[0-9]*/comm; do [ "$(cat "$c" 2>/dev/null)" = xcgi ] && n=$((n+1)); done; echo $n; }
        echo "===loop==="
        start=$(date +%s)
        xcgi run --kernel "$K" --rootfs "$LOOP" --timeout 10
        echo "rc=$?"
        echo "elapsed=$(( $(date +%s) - start ))"
        echo "leftover_vmms=$(count_xcgi)"
        echo "===end loop==="
        echo "===term==="
        xcgi run --kernel "$K" --rootfs "$LOOP" --timeout 120 > term.log 2>&1 &
        pid=$!
        sleep 4
        kill -TERM $pid
        wait $pid
        echo "rc=$?"
        cat term.log
        echo "leftover_vmms=$(count_xcgi)"
        echo "===end term==="
    "#;
    let r = run_script(
        script,
        &[(&kernel, "K"), (&looping, "LOOP")],
        Duration::from_secs(300),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "loop");
    assert_eq!(rc(s), 124, "deadline exit code:\n{s}");
    assert!(
        s.contains("looping"),
        "the guest ran before it was killed:\n{s}"
    );
    assert!(
        s.contains("did not finish within 10s"),
        "clear message:\n{s}"
    );
    assert_summary(s, "deadline reached");
    let elapsed: u64 = s
        .lines()
        .find_map(|l| {
            l.strip_prefix("elapsed=")
                .and_then(|v| v.trim().parse().ok())
        })
        .expect("elapsed");
    assert!(
        (10..=14).contains(&elapsed),
        "killed at the 10 s deadline, took {elapsed} s"
    );
    assert!(s.contains("leftover_vmms=0"), "{s}");

    // SIGTERM stops the VM cleanly: its own exit code, a message, nothing left running.
    let t = section(&r.output, "term");
    assert_eq!(rc(t), 143, "SIGTERM exit code:\n{t}");
    assert!(t.contains("stopped by signal 15"), "{t}");
    assert_summary(t, "stopped on request");
    assert!(t.contains("leftover_vmms=0"), "{t}");
}

#[test]
fn a_bzimage_kernel_boots_too() {
    // Debian's distribution kernel (a bzImage, from the lab's assets): the other boot format,
    // and a kernel that was not built for us.
    let assets = xcgi_lab::prepare_assets().expect("lab assets");
    let c_cpio = example("hello-c.cpio");
    let script = r#"
        echo "===bz==="
        xcgi run --kernel "$BZ" --initramfs "$C_CPIO" --mem 256 --timeout 240
        echo "rc=$?"
        echo "===end bz==="
    "#;
    let r = run_script(
        script,
        &[(&assets.bzimage, "BZ"), (&c_cpio, "C_CPIO")],
        Duration::from_secs(500),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "bz");
    assert_stamped_line(s, "Hello!");
    assert_summary(s, "init exited with status 4");
    assert_eq!(rc(s), 4, "{s}");
}

/// Issue 13, `xcgi run`: a guest captured when its console says it is looping
/// (`--snapshot-out`, `--snapshot-at`), then a clone of it restored (`--restore`) that goes on
/// looping in user space until its deadline, saying so once a second (a bad restore would
/// crash it: triple fault, panic), and records its working set (`--record-working-set`); a
/// second clone touches that set ahead and goes on the same; a snapshot of another root or
/// memory size is refused, naming the difference.
#[test]
fn a_snapshot_taken_at_a_console_marker_restores_and_the_guest_goes_on() {
    let kernel = kernel();
    let looping = example("loop-forever.ext4");
    let other = example("hello-c.ext4");
    let assets = xcgi_lab::prepare_assets().expect("lab assets");
    let script = r#"
        run() { name=$1; shift; echo "===$name==="; xcgi run "$@" 2>&1; echo "rc=$?"; echo "===end $name==="; }
        run snap --kernel "$K" --rootfs "$LOOP" --snapshot-out snap --snapshot-at looping --timeout 60
        ls snap
        run restore --kernel "$K" --rootfs "$LOOP" --restore snap --timeout 6 --record-working-set
        echo "ws_file=$(ls snap | grep -c '^working-set$')"
        run prefaulted --kernel "$K" --rootfs "$LOOP" --restore snap --setup-only
        run restore2 --kernel "$K" --rootfs "$LOOP" --restore snap --timeout 6
        run other-root --kernel "$K" --rootfs "$OTHER" --restore snap
        run other-mem --kernel "$K" --rootfs "$LOOP" --mem 256 --restore snap
        run other-kernel --kernel "$BZ" --rootfs "$LOOP" --restore snap
    "#;
    let r = run_script(
        script,
        &[
            (&kernel, "K"),
            (&looping, "LOOP"),
            (&other, "OTHER"),
            (&assets.bzimage, "BZ"),
        ],
        Duration::from_secs(300),
    );
    assert_eq!(r.code, 0, "{}", r.output);
    let s = section(&r.output, "snap");
    assert_eq!(rc(s), 0, "{s}");
    assert!(s.contains("looping"), "{s}");
    assert_summary(s, "snapshot taken");
    let s = section(&r.output, "restore");
    assert_eq!(rc(s), 124, "the clone ran to its deadline:\n{s}");
    assert!(
        !s.contains("looping"),
        "the clone printed its boot output again:\n{s}"
    );
    // Its program goes on where the template was: its once-a-second line, through the
    // restored serial port. (Where the vCPU happens to be at the deadline is no proof: with
    // HZ=250 and the lab's emulated exits, a sample can land in the timer tick; one .ci/run
    // in five of session 10 did.)
    assert!(
        s.lines().any(|l| l.contains("alive ")),
        "the clone's user space did not go on:\n{s}"
    );
    // The clone recorded the pages it touched as the snapshot's working set; the next clone
    // touches them while it is prepared (its setup has the step), then goes on as the first.
    assert!(
        s.contains("xcgi: working set: ") && s.contains(" recorded"),
        "{s}"
    );
    assert!(r.output.contains("ws_file=1"), "{}", r.output);
    let p = section(&r.output, "prefaulted");
    assert_eq!(rc(p), 0, "{p}");
    assert!(p.contains("phase working_set"), "{p}");
    let s = section(&r.output, "restore2");
    assert_eq!(rc(s), 124, "the second clone ran to its deadline:\n{s}");
    assert!(
        s.lines().any(|l| l.contains("alive ")),
        "the second clone's user space did not go on:\n{s}"
    );
    for (name, what) in [
        ("other-root", "guest root"),
        ("other-mem", "memory (MiB)"),
        ("other-kernel", "guest kernel"),
    ] {
        let s = section(&r.output, name);
        assert_ne!(rc(s), 0, "{s}");
        assert!(
            s.contains("does not fit this VM") && s.contains(what),
            "{name}: the refusal names the difference:\n{s}"
        );
    }
}
