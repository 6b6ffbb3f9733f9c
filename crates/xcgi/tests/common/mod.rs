//! Shared helpers for the end-to-end tests: the xcgi binary, the cached guest kernel, the
//! example images, and running a shell script either directly (hardware KVM) or in the lab.
#![allow(dead_code)]

pub mod served;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub fn xcgi() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xcgi"))
}

/// xcgi-init, built next to xcgi (`cargo build --workspace` builds both).
pub fn xcgi_init() -> PathBuf {
    let p = xcgi().with_file_name("xcgi-init");
    assert!(
        p.is_file(),
        "{p:?} missing: build it with `cargo build -p xcgi-init` (scripts/test.sh does)"
    );
    p
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The default guest kernel, built on first use (cached by `xcgi kernel build`).
pub fn kernel() -> PathBuf {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        let out = Command::new(xcgi())
            .args(["kernel", "build"])
            .output()
            .expect("run xcgi kernel build");
        assert!(
            out.status.success(),
            "xcgi kernel build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            path.is_file(),
            "kernel build printed {path:?}, which is not a file"
        );
        path
    })
    .clone()
}

/// target/examples/<file>, building the examples first if it is missing.
pub fn example(file: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = workspace().join("target/examples").join(file);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let st = Command::new(workspace().join("scripts/build-examples.sh"))
                .env("XCGI", xcgi())
                .status()
                .expect("run scripts/build-examples.sh");
            assert!(st.success(), "scripts/build-examples.sh failed");
        });
    }
    assert!(
        path.exists(),
        "{path:?} missing after building the examples"
    );
    path
}

pub struct Ran {
    pub code: i32,
    pub output: String,
}

/// Runs `script` with `sh -c` where VMs can boot: on this host when it has hardware KVM,
/// else inside the lab (one lab CPU, [`xcgi_lab::DEFAULT_CPUS`]: with two, its kernel
/// soft-locked now and then, e.g. in a CI run of run_e2e's snapshot test). `files` are (host
/// path, name): the script sees each one as `$name` (an environment variable holding its
/// path), and `xcgi` on PATH.
pub fn run_script(script: &str, files: &[(&Path, &str)], timeout: Duration) -> Ran {
    run_script_mem(script, files, timeout, 2048, xcgi_lab::DEFAULT_CPUS)
}

/// [`run_script`] with the lab's memory (MiB) and CPUs chosen, for scripts that run many VMs
/// at once.
pub fn run_script_mem(
    script: &str,
    files: &[(&Path, &str)],
    timeout: Duration,
    lab_mem_mib: u32,
    lab_cpus: u32,
) -> Ran {
    run_script_with_binaries(script, files, &[], timeout, lab_mem_mib, lab_cpus)
}

/// [`run_script_mem`] with more programs: `binaries` are (host path, name) of dynamically
/// linked executables the script runs by `name` (e.g. Debian's haproxy): in the lab they are
/// copied to /usr/local/bin with their shared libraries; on a host with hardware KVM they run
/// from where they are.
pub fn run_script_with_binaries(
    script: &str,
    files: &[(&Path, &str)],
    binaries: &[(&Path, &str)],
    timeout: Duration,
    lab_mem_mib: u32,
    lab_cpus: u32,
) -> Ran {
    if xcgi_lab::host_has_hardware_kvm() {
        if binaries.is_empty() {
            return run_on_host(script, files);
        }
        let dir = tempfile::tempdir().expect("a directory for the binaries' links");
        for (host, name) in binaries {
            std::os::unix::fs::symlink(host, dir.path().join(name)).expect("link a binary");
        }
        let script = format!("PATH=\"{}:$PATH\"; {script}", dir.path().display());
        return run_on_host(&script, files);
    }
    let mut prelude = String::new();
    let mut cmd = xcgi_lab::LabCommand::new(String::new())
        .binary(xcgi(), "/usr/bin/xcgi")
        .binary("/usr/bin/curl", "/usr/bin/curl")
        .file(xcgi_init(), "/usr/bin/xcgi-init")
        .timeout(timeout)
        .mem_mib(lab_mem_mib)
        .cpus(lab_cpus);
    if !binaries.is_empty() {
        prelude.push_str("PATH=\"/usr/local/bin:$PATH\"; ");
    }
    for (host, name) in binaries {
        cmd = cmd.binary(host.to_path_buf(), format!("/usr/local/bin/{name}"));
    }
    for (host, name) in files {
        let guest = format!("/xcgi/{name}");
        cmd = cmd.file(host.to_path_buf(), guest.clone());
        prelude.push_str(&format!("{name}={guest}; "));
    }
    cmd.command = format!("{prelude}{script}");
    let lab = xcgi_lab::Lab::prepare().expect("prepare the lab");
    // The lab's own kernel (Debian's, nested SVM under QEMU/TCG) sometimes dies or hangs
    // after many nested guests: QEMU exits, its console stops without the command's exit
    // marker, or it reports a soft lockup (`Wedged`). Run the script once more, loudly; a
    // deterministic failure (an xcgi hang included: every request in these scripts has a
    // deadline) fails both times.
    let mut tries = 0;
    let out = loop {
        tries += 1;
        match lab.run(&cmd, |line| println!("lab| {line}")) {
            Ok(out) => break out,
            Err(
                e @ (xcgi_lab::LabError::Exited { .. }
                | xcgi_lab::LabError::Wedged { .. }
                | xcgi_lab::LabError::Timeout { booted: true, .. }),
            ) if tries < 2 => {
                eprintln!("LAB FAILED (no exit marker): {e}\nrunning the script once more");
            }
            Err(e) => panic!("lab run: {e:?}"),
        }
    };
    Ran {
        code: out.exit_code,
        output: out.output,
    }
}

/// Runs `script` with `sh` on this host (hardware KVM): xcgi on the PATH, `files` in the
/// environment by name.
fn run_on_host(script: &str, files: &[(&Path, &str)]) -> Ran {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    let dir = xcgi().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    for (host, name) in files {
        cmd.env(name, host);
    }
    let out = cmd.output().expect("run script");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    println!("{output}");
    Ran {
        code: out.status.code().unwrap_or(-1),
        output,
    }
}

/// Lines of `output` between `begin` and `end` markers printed by a script.
pub fn section<'a>(output: &'a str, name: &str) -> &'a str {
    let begin = format!("==={name}===");
    let end = format!("===end {name}===");
    let start = output
        .find(&begin)
        .unwrap_or_else(|| panic!("no section {name} in:\n{output}"));
    let rest = &output[start + begin.len()..];
    let stop = rest.find(&end).unwrap_or(rest.len());
    &rest[..stop]
}

/// The `rc=N` a script section printed.
pub fn rc(section: &str) -> i32 {
    section
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("rc=").and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no rc= in:\n{section}"))
}
