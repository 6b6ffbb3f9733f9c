//! `xcgi run --jail` on this host (no lab: the jail needs no guest boot, and a VM is built
//! natively on any /dev/kvm, PVM included). The guest loops forever (examples/loop-forever),
//! so the jailed process is alive until its deadline, long enough to look at it from outside
//! through /proc, each layer of the jail in turn; then nothing may be left.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A /proc/PID/status field, whitespace-normalised.
fn status_field(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The soft limit named `name` in /proc/PID/limits.
fn limit(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l[name.len()..].split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The host's mounts on the directory the jail mounts its empty root on (the temp dir): the
/// jail's own must never show here. (Not the whole table: other tests may mount meanwhile.)
fn mounts() -> Vec<String> {
    let dir = std::env::temp_dir();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.split_whitespace().nth(4).map(Path::new) == Some(dir.as_path()))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_jailed_vm_process_is_confined_by_every_layer_and_leaves_nothing() {
    if !is_root() {
        eprintln!("not root: --jail needs root; nothing to check");
        return;
    }
    let kernel = kernel();
    let image = example("loop-forever.cpio");
    let mounts_before = mounts();
    let child = Command::new(xcgi())
        .args([
            "run",
            "--jail",
            "--debug-dump",
            "--timeout",
            "3",
            "--kernel",
        ])
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&image)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start xcgi run --jail");
    let parent = child.id();
    let jail_uid = 2_000_000_000 + parent;
    // The worker: the parent's child, once it has dropped to its uid (after building the VM).
    let t = Instant::now();
    let worker = loop {
        let w = children(parent)
            .into_iter()
            .find(|&c| status_field(c, "Uid").starts_with(&jail_uid.to_string()));
        if let Some(w) = w {
            // The filters go in once the vCPU has started.
            if status_field(w, "Seccomp") == "2" {
                break w;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "no jailed worker under {parent} after 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    // 5. An unprivileged user, no capability anywhere.
    let ids = format!("{jail_uid} {jail_uid} {jail_uid} {jail_uid}");
    assert_eq!(status_field(worker, "Uid"), ids);
    assert_eq!(status_field(worker, "Gid"), ids);
    assert_eq!(status_field(worker, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(worker, caps), "0000000000000000", "{caps}");
    }
    // 4. No new privileges; limits.
    assert_eq!(status_field(worker, "NoNewPrivs"), "1");
    assert_eq!(limit(worker, "Max open files"), "128");
    assert_eq!(limit(worker, "Max processes"), "9");
    assert_eq!(limit(worker, "Max core file size"), "0");
    assert_eq!(limit(worker, "Max file size"), "0");
    // 6. Seccomp: a filter on the main thread and on every other thread too (each installs
    // its own as it starts: give a thread just started a moment).
    let unfiltered = || -> Vec<u32> {
        std::fs::read_dir(format!("/proc/{worker}/task"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .filter(|tid: &u32| {
                        let s =
                            std::fs::read_to_string(format!("/proc/{worker}/task/{tid}/status"))
                                .unwrap_or_default();
                        !s.lines()
                            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"]))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let tasks = std::fs::read_dir(format!("/proc/{worker}/task"))
        .expect("tasks")
        .count();
    assert!(tasks >= 2, "main and vCPU threads: {tasks}");
    let t = Instant::now();
    while !unfiltered().is_empty() && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        unfiltered().is_empty(),
        "threads without their filter: {:?}",
        unfiltered()
    );
    // 1. An empty root: no host file reachable by path, no /proc.
    let root = Path::new("/proc").join(worker.to_string()).join("root");
    let entries: Vec<_> = std::fs::read_dir(&root)
        .expect("the worker's root")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert!(entries.is_empty(), "the jail's root holds {entries:?}");
    // 2. Namespaces of its own.
    for ns in ["pid", "mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{worker}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(theirs, ours, "the worker shares our {ns} namespace");
    }
    assert_eq!(status_field(worker, "NSpid").split(' ').nth(1), Some("1"));

    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The deadline ends it. (A PVM /dev/kvm, which cannot run this guest, may stop it a
    // moment earlier with an internal error, some 3.9 s in: an end of the VM all the same.)
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let ended = match out.status.code() {
        Some(124) => stdout.contains("deadline reached, VM killed"),
        Some(125) => pvm && stdout.contains("KVM internal error"),
        _ => false,
    };
    assert!(ended, "{:?}\n{stdout}\n{stderr}", out.status);
    // The debug dump, taken under the filters (it reads every vCPU and VM state).
    assert!(
        stderr.contains("xcgi: vcpu0: mp_state="),
        "no dump:\n{stderr}"
    );
    // Nothing left: no process of the jail's user, no mount on the host.
    let left: Vec<_> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| status_field(p, "Uid").starts_with(&jail_uid.to_string()))
        .collect();
    assert!(
        left.is_empty(),
        "processes of the jail's user left: {left:?}"
    );
    assert_eq!(
        mounts(),
        mounts_before,
        "a mount on the host's temp dir appeared"
    );
}

#[test]
fn a_jailed_run_refuses_what_it_cannot_jail() {
    let out = Command::new(xcgi())
        .args(["run", "--jail", "--net", "--kernel", "/nonexistent"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--net"), "{err}");
}

/// Real guests under the jail (in the lab where this host cannot boot them): each seccomp
/// filter must cover a whole boot, the console and the root disk. First in log mode, where
/// the kernel logs (type=1326) every call outside a list instead of killing: none may be
/// logged; then in kill mode, the default.
#[test]
fn jailed_guests_boot_print_and_exit_under_their_filters() {
    let kernel = kernel();
    let c_cpio = example("hello-c.cpio");
    let c_ext4 = example("hello-c.ext4");
    let go_ext4 = example("hello-go.ext4");
    let script = r#"
        run() { name=$1; shift; echo "===$name==="; "$@"; echo "rc=$?"; echo "===end $name==="; }
        dmesg -c > /dev/null 2>&1
        run log-cpio env XCGI_SECCOMP=log xcgi run --jail --kernel "$K" --initramfs "$C_CPIO"
        run log-ext4 env XCGI_SECCOMP=log xcgi run --jail --kernel "$K" --rootfs "$C_EXT4"
        echo "===logged==="; dmesg | grep 'type=1326'; echo "===end logged==="
        run c-cpio xcgi run --jail --kernel "$K" --initramfs "$C_CPIO"
        run c-ext4 xcgi run --jail --kernel "$K" --rootfs "$C_EXT4"
        run go-ext4 xcgi run --jail --kernel "$K" --rootfs "$GO_EXT4" --mem 256
        n=0; for s in /proc/[0-9]*/status; do grep -q '^Uid:.*2000' "$s" 2>/dev/null && n=$((n+1)); done
        echo "leftover_jailed=$n"
    "#;
    let r = run_script(
        script,
        &[
            (&kernel, "K"),
            (&c_cpio, "C_CPIO"),
            (&c_ext4, "C_EXT4"),
            (&go_ext4, "GO_EXT4"),
        ],
        Duration::from_secs(600),
    );
    assert_eq!(r.code, 0, "script failed:\n{}", r.output);
    let logged = section(&r.output, "logged");
    assert!(
        logged.trim().is_empty(),
        "system calls outside the filters (log mode):\n{logged}\n{}",
        r.output
    );
    for (name, greeting, code) in [
        ("log-cpio", "Hello!", 4),
        ("log-ext4", "Hello!", 4),
        ("c-cpio", "Hello!", 4),
        ("c-ext4", "Hello!", 4),
        ("go-ext4", "Hello Go!", 5),
    ] {
        let s = section(&r.output, name);
        assert!(s.contains(greeting), "{name}: no greeting:\n{s}");
        assert_eq!(rc(s), code, "{name}:\n{s}");
    }
    assert!(r.output.contains("leftover_jailed=0"), "{}", r.output);
}

/// `[server] jail = true` on this host: a jailed VM process killed in the middle of its
/// request (as the OOM killer or a seccomp kill would) is that request's 502, with a log line
/// saying so; the server keeps serving with a fresh process. (The guest need not boot: on a
/// PVM host the VM runs until its deadline, a request that ends in 504.)
#[test]
fn a_jailed_vm_process_killed_mid_request_is_a_502_and_the_server_goes_on() {
    if !is_root() {
        eprintln!("not root: [server] jail needs root; nothing to check");
        return;
    }
    let srv = JailedServer::start("");
    let helper = srv.helper();
    let (server_pid, port, log) = (srv.pid, srv.port, srv.log.clone());
    let mut server = srv.child;
    let url = format!("http://127.0.0.1:{port}/cgi");
    assert!(
        all_pids()
            .into_iter()
            .any(|p| status_field(p, "PPid") == helper.to_string()
                && status_field(p, "Uid").starts_with("3000000")),
        "ready without a jailed VM process waiting"
    );
    let first = curl(&url);
    // The launched worker: a process of the jail's range with a vCPU thread.
    let jailed_with_vcpu = || {
        all_pids().into_iter().find(|&c| {
            status_field(c, "PPid") == helper.to_string()
                && status_field(c, "Uid").starts_with("3000000")
                && status_field(c, "Threads").parse::<u32>().unwrap_or(0) >= 2
        })
    };
    let t = Instant::now();
    let worker = loop {
        if let Some(w) = jailed_with_vcpu() {
            break w;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no launched VM process"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let killed_at = Instant::now();
    // SAFETY: kill(2) on a pid just read from /proc (SIGKILL reaches a namespace's PID 1).
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let code = first.join().expect("curl thread");
    assert_eq!(code, "502", "the request whose VM process was killed");
    assert!(
        killed_at.elapsed() < Duration::from_secs(3),
        "the 502 took {:?}",
        killed_at.elapsed()
    );
    // The server goes on: the next request gets a fresh VM process (and, on a host that
    // cannot boot the guest, its deadline).
    let second = curl(&url).join().expect("curl thread");
    assert!(
        second == "504" || second == "502" || second == "200",
        "{second}"
    );
    // SAFETY: SIGTERM to the server we started.
    unsafe { libc::kill(server_pid as i32, libc::SIGTERM) };
    let status = server.0.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("the jailed VM process was killed (SIGKILL"),
        "no log line says which:\n{text}"
    );
    let left: Vec<_> = all_pids()
        .into_iter()
        .filter(|&p| status_field(p, "Uid").starts_with("3000000"))
        .collect();
    assert!(left.is_empty(), "jailed processes left: {left:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{helper}")).exists(),
        "the jail helper outlived the server"
    );
}

/// `xcgi serve` with the jail (the default) on this host: one CGI route of the looping guest,
/// one VM process kept prepared; `extra` goes into `[server]`. Waits until it is ready.
struct JailedServer {
    child: KillOnDrop,
    pid: u32,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl JailedServer {
    fn start(extra: &str) -> JailedServer {
        // `start = "boot"`: a snapshot route boots its template at start, which this host's
        // PVM /dev/kvm cannot; these tests are about the jail around each VM, whose guest
        // fails at its request.
        let route = format!(
            "[[route]]\nprefix = \"/cgi\"\nstart = \"boot\"\nhandler = \"{}\"\nprepared = 1\ntimeout_ms = 2500\n",
            example("loop-forever/loop").display()
        );
        JailedServer::start_with(extra, &route)
    }

    /// With `extra` in `[server]` and `rest` after it (more sections, the routes).
    fn start_with(extra: &str, rest: &str) -> JailedServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("addr").port()
        };
        let cfg = dir.path().join("x.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nkernel = \"{}\"\n{extra}\n{rest}",
                kernel().display(),
            ),
        )
        .expect("config");
        let log = dir.path().join("log");
        let child = KillOnDrop(
            Command::new(xcgi())
                .args(["serve", "--config"])
                .arg(&cfg)
                .stderr(std::fs::File::create(&log).expect("log"))
                .stdout(Stdio::null())
                .spawn()
                .expect("start xcgi serve"),
        );
        let pid = child.0.id();
        let text = || std::fs::read_to_string(&log).unwrap_or_default();
        let t = Instant::now();
        while !text().contains("listening on") {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the server did not start:\n{}",
                text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Ready once the route's jailed VM process is (prepared = 1).
        let readyz = format!("http://127.0.0.1:{port}/_xcgi/readyz");
        let t = Instant::now();
        loop {
            let code = curl(&readyz).join().expect("curl thread");
            if code == "200" {
                break;
            }
            assert_eq!(code, "503", "readyz before the VM process is ready");
            assert!(t.elapsed() < Duration::from_secs(20), "never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        JailedServer {
            child,
            pid,
            port,
            log,
            _dir: dir,
        }
    }

    /// Its jail helper (root, its child), which starts the VM processes.
    fn helper(&self) -> u32 {
        all_pids()
            .into_iter()
            .find(|&p| {
                status_field(p, "PPid") == self.pid.to_string()
                    && std::fs::read(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"jail-helper"))
            })
            .expect("no jail helper under the server")
    }
}

/// GETs `url` with curl on a thread: the status code.
fn curl(url: &str) -> std::thread::JoinHandle<String> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-m",
                "30",
                &url,
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// `[server] user`: after its start-up the server runs as that user with no capability in
/// any thread (and no_new_privs); its jail helper stays root and still starts VM processes
/// (a request is served by one: on this host, its deadline); on SIGTERM everything goes, the
/// work directory the server had to give itself included.
#[test]
fn a_server_with_a_user_keeps_no_privilege_and_its_helper_still_starts_vm_processes() {
    if !is_root() {
        eprintln!("not root: nothing to drop; nothing to check");
        return;
    }
    let srv = JailedServer::start("user = \"65534:65534\"");
    let helper = srv.helper();
    let pid = srv.pid;
    let threads: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    assert!(threads.len() > 1, "a multi-threaded server: {threads:?}");
    for t in &threads {
        let st =
            std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap_or_default();
        let field = |k: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(field("Uid"), "65534 65534 65534 65534", "thread {t}");
        assert_eq!(field("Gid"), "65534 65534 65534 65534", "thread {t}");
        assert_eq!(field("Groups"), "65534", "thread {t}");
        for cap in ["CapEff", "CapPrm", "CapAmb"] {
            assert_eq!(field(cap), "0000000000000000", "thread {t}: {cap}");
        }
        assert_eq!(field("NoNewPrivs"), "1", "thread {t}");
    }
    assert_eq!(status_field(helper, "Uid"), "0 0 0 0", "the helper is root");
    // A request still gets a fresh jailed VM process (on a host that cannot boot the guest:
    // its deadline), and the prepared one is replaced.
    let code = curl(&format!("http://127.0.0.1:{}/cgi", srv.port))
        .join()
        .expect("curl thread");
    assert!(code == "504" || code == "502", "{code}");
    let log = srv.log.clone();
    let workdir = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("image="))
                .map(str::to_string)
        })
        .and_then(|img| Path::new(&img).parent().map(Path::to_path_buf))
        .expect("a route image in the log");
    let mut server = srv.child;
    // SAFETY: SIGTERM to the server we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = server.0.wait().expect("wait");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("switched to the server's user"), "{text}");
    assert!(!workdir.exists(), "{} is left", workdir.display());
    assert!(
        !Path::new(&format!("/proc/{helper}")).exists(),
        "the jail helper outlived the server"
    );
    let left: Vec<_> = all_pids()
        .into_iter()
        .filter(|&p| status_field(p, "Uid").starts_with("3000000"))
        .collect();
    assert!(left.is_empty(), "jailed processes left: {left:?}");
}

/// `[server] user` with an HTTP-mode route: the server, unprivileged, cannot make TAPs; its
/// jail helper makes them in the guests' namespace and hands them over (one per VM, made on
/// demand past the pool's prefill), and removes the namespace's mount when the server stops.
#[test]
fn an_unprivileged_server_gets_each_vms_tap_from_its_helper() {
    if !is_root() {
        eprintln!("not root: nothing to drop; nothing to check");
        return;
    }
    let netns = format!("xcgi-jail-test-{}", std::process::id());
    let rest = format!(
        "[network]\nbase = \"172.16.12.0\"\nsize = 4\nprefill = 1\nnetns = \"{netns}\"\n\
         [[route]]\nprefix = \"/\"\nmode = \"http\"\nhandler = \"{}\"\nprepared = 0\n\
         timeout_ms = 1500\n",
        example("hello-c.ext4").display()
    );
    let srv = JailedServer::start_with("user = \"65534:65534\"", &rest);
    assert_eq!(status_field(srv.pid, "Uid"), "65534 65534 65534 65534");
    assert!(
        Path::new("/run/netns").join(&netns).exists(),
        "no namespace"
    );
    // Three VMs one after the other: the first takes the prefilled TAP, each return is
    // refilled by the helper (the guest cannot boot here: each request ends in 502/504).
    for _ in 0..3 {
        let code = curl(&format!("http://127.0.0.1:{}/", srv.port))
            .join()
            .expect("curl thread");
        assert!(code == "502" || code == "504", "{code}");
    }
    let metrics = Command::new("curl")
        .args([
            "-s",
            &format!("http://127.0.0.1:{}/_xcgi/metrics", srv.port),
        ])
        .output()
        .expect("curl");
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let log = srv.log.clone();
    let mut server = srv.child;
    // SAFETY: SIGTERM to the server we started.
    unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    let status = server.0.wait().expect("wait");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(
        !text.contains("TAP maker failed") && !text.contains("cannot make"),
        "{text}"
    );
    assert!(
        metrics.contains("xcgi_tap_slots{state=\"stuck\"} 0"),
        "{metrics}"
    );
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "the namespace's mount is left:\n{text}"
    );
}

/// A child killed if a failed assertion leaves it running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}
