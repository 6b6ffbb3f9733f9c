//! `xcgi serve` as a child of the test, with its log captured: start it from a TOML (or a
//! config file the test wrote), optionally under a wrapper (`prlimit ...`) or with extra
//! environment; curl it; and read the server's figures from /proc (fds, threads, RSS, CPU
//! time, limits, the processes below it).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::xcgi;

/// How to start the server, beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Extra environment for the server.
    pub env: Vec<(String, String)>,
    /// A command the server runs under, which must exec it (same pid), e.g.
    /// `["prlimit", "--nofile=64:64", "--"]`.
    pub wrapper: Vec<String>,
    /// The server's working directory (default: the test's).
    pub cwd: Option<PathBuf>,
}

impl Launch {
    pub fn wrapped(wrapper: &[&str]) -> Launch {
        Launch {
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            ..Launch::default()
        }
    }
}

pub struct Served {
    pub child: Child,
    pub addr: String,
    log: Arc<Mutex<String>>,
    _dir: Option<tempfile::TempDir>,
}

impl Served {
    /// Starts `xcgi serve --config` with `routes` (TOML) under a [server] with `server` lines
    /// (isolation "process" and listen on a free loopback port unless they say otherwise).
    pub fn start(server: &str, routes: &str) -> Served {
        Served::start_with(server, routes, &Launch::default())
    }

    /// [`Served::start`], launched as `launch` says.
    pub fn start_with(server: &str, routes: &str, launch: &Launch) -> Served {
        let isolation = if server.contains("isolation") {
            ""
        } else {
            "isolation = \"process\"\n"
        };
        let listen = if server.lines().any(|l| l.trim_start().starts_with("listen")) {
            ""
        } else {
            "listen = \"127.0.0.1:0\"\n"
        };
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("xcgi.toml");
        std::fs::write(
            &cfg,
            format!("[server]\n{listen}{isolation}{server}\n{routes}"),
        )
        .unwrap();
        Served::launch(&cfg, launch, Some(dir))
    }

    /// `xcgi serve --config <config>` as given (a relative path is relative to `launch.cwd`).
    /// `dir` is kept until the server is dropped.
    pub fn launch(config: &Path, launch: &Launch, dir: Option<tempfile::TempDir>) -> Served {
        let mut cmd = match launch.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(xcgi());
                c
            }
            None => Command::new(xcgi()),
        };
        cmd.args(["serve", "--config"])
            .arg(config)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(cwd) = &launch.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().expect("start xcgi serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                let mut g = l2.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let st = child.wait().ok();
                // The log thread may still be copying the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "server did not start (exit {:?}):\n{}",
                    st.and_then(|s| s.code()),
                    log.lock().unwrap()
                );
            }
        };
        Served {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The last `n` lines of the log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- server log (last {n} lines) ---\n{}",
            lines[from..].join("\n")
        )
    }

    /// Waits up to `timeout` for a log line that `pred` accepts; returns it.
    pub fn wait_log_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let t = Instant::now();
        loop {
            if let Some(l) = self.log().lines().find(|l| pred(l)) {
                return Some(l.to_string());
            }
            if t.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A gauge or counter from /metrics (`name value` lines).
    pub fn metric(&self, name: &str) -> Option<i64> {
        let (body, _) = curl(&["-m", "5", &self.url("/_xcgi/metrics")]);
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    }

    /// The server's figures now.
    pub fn figures(&self) -> ProcFigures {
        proc_figures(self.pid())
    }

    pub fn stop(mut self) -> i32 {
        // SAFETY: kill(2) on the server, a child of this test.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(t.elapsed() < Duration::from_secs(20), "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // Still running (a test failed, or did not stop it): kill it and whatever runs below
        // it, so no handler outlives the test.
        if let Ok(None) = self.child.try_wait() {
            let below = descendants(self.pid());
            let _ = self.child.kill();
            let _ = self.child.wait();
            kill_pids(&below);
        }
    }
}

/// `xcgi serve --config` with a file holding `config`, expected to refuse to start: asserts
/// that it exits non-zero and returns its stderr.
pub fn serve_refuses(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("xcgi.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(xcgi())
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "it started: {err}");
    err
}

/// curl with `args`; returns (stdout, http code).
pub fn curl(args: &[&str]) -> (String, u16) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (body.to_string(), code.trim().parse().unwrap_or(0))
}

/// A `[[route]]` table.
pub fn route(prefix: &str, handler: &Path, extra: &str) -> String {
    format!(
        "[[route]]\nprefix = \"{prefix}\"\nhandler = \"{}\"\n{extra}\n",
        handler.display()
    )
}

/// Polls `f` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children of the server (handler processes) still alive.
pub fn count_handlers(s: &Served) -> usize {
    parents().values().filter(|&&pp| pp == s.pid()).count()
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// What /proc says about a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcFigures {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
    /// User plus system CPU time so far.
    pub cpu: Duration,
}

pub fn proc_figures(pid: u32) -> ProcFigures {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    ProcFigures {
        fds: fd_count(pid),
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
        cpu: cpu_time(pid),
    }
}

/// utime + stime of `pid`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // pid (comm) state ppid ... utime is field 14, stime 15: after ")", fields 3.. start at 0.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// The soft and hard "Max open files" of `pid` (u64::MAX for unlimited).
pub fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limit_of(&limits, "Max open files")
}

/// (soft, hard) of the line `name` in a /proc/PID/limits text (u64::MAX for unlimited).
pub fn limit_of(limits: &str, name: &str) -> (u64, u64) {
    let line = limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name:?} in:\n{limits}"));
    let mut v = line[name.len()..].split_whitespace().map(|x| match x {
        "unlimited" => u64::MAX,
        n => n.parse().unwrap_or(0),
    });
    (v.next().unwrap_or(0), v.next().unwrap_or(0))
}

/// pid -> parent pid, for every process now.
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(st) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let ppid = st
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(pp) = ppid {
            map.insert(pid, pp);
        }
    }
    map
}

/// Every process whose parent chain reaches `pid` (children, grandchildren, ...).
pub fn descendants(pid: u32) -> Vec<u32> {
    let map = parents();
    let mut out: Vec<u32> = map
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            for _ in 0..64 {
                match map.get(&cur) {
                    Some(&pp) if pp == pid => return true,
                    Some(&pp) if pp > 1 => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect();
    out.sort_unstable();
    out
}

/// The command line of `pid`, one entry per argument (empty when gone or a kernel thread).
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line `pred` accepts.
pub fn find_processes(pred: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pred(&cmdline(pid)))
        .collect();
    out.sort_unstable();
    out
}

/// SIGKILL to each of `pids` (ones already gone are skipped).
pub fn kill_pids(pids: &[u32]) {
    for &p in pids {
        // SAFETY: kill(2) on a pid this test started (directly or through the server).
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

/// A connection whose receive buffer is as small as the kernel allows (set before
/// connecting, so the window it announces stays small): a client that barely reads.
pub fn connect_small_rcvbuf(addr: SocketAddr) -> Result<TcpStream, String> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(a) = addr else {
        return Err("not IPv4".into());
    };
    // SAFETY: a fresh socket, configured and connected with plain syscalls on local values;
    // the fd is owned by the returned stream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let c = TcpStream::from_raw_fd(fd);
        let size: libc::c_int = 1024;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if r != 0 {
            return Err(format!("connect: {}", std::io::Error::last_os_error()));
        }
        c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        Ok(c)
    }
}
