//! `xcgi-init`: PID 1 of a guest in CGI mode.
//!
//! It opens the host channel (`/dev/hvc0`, a virtio-console port) in raw mode, says hello,
//! receives one request ([`xcgi_channel::Start`]: program, argv, environment), runs the program
//! with pipes for stdin, stdout and stderr, and relays bytes both ways as frames until the
//! program has closed its output and exited. Then it reports the wait status and exits, which
//! ends the VM. One request per boot; nothing else runs. Static, std + libc only.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

use xcgi_channel as ch;

const CHANNEL: &str = "/dev/hvc0";
/// Outside a VM (tests), the channel can be another tty, e.g. a pty: `XCGI_INIT_CHANNEL=/dev/pts/N`.
const CHANNEL_ENV: &str = "XCGI_INIT_CHANNEL";
/// Body bytes held for a program that is slow to read its stdin; beyond this init stops
/// reading the channel, and the host's writes wait (no unbounded buffering in the guest).
const MAX_PENDING: usize = 1 << 20;

fn main() {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("xcgi-init: {e}");
            eprintln!("{msg}");
            if let Ok(fd) = open_channel_fd() {
                let _ = write_all(fd, &ch::frame(ch::FAILED, msg.as_bytes()));
            }
            1
        }
    };
    std::process::exit(code);
}

fn run() -> io::Result<i32> {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        setup_filesystems();
    }
    let chan =
        open_channel_fd().map_err(|e| annotate(e, &format!("opening {}", channel_path())))?;
    make_raw(chan).map_err(|e| annotate(e, "setting the channel to raw mode"))?;
    write_all(chan, &ch::frame(ch::HELLO, b""))?;

    let mut dec = ch::Decoder::new();
    let mut buf = vec![0u8; ch::CHUNK];
    // Frames that arrive with or right after Start (body bytes) are kept for the relay.
    let start = loop {
        if let Some((kind, payload)) = dec.next_frame().map_err(proto_err)? {
            if kind == ch::START {
                break ch::Start::decode(&payload).map_err(proto_err)?;
            }
            return Err(io::Error::other(format!(
                "expected the Start frame, got {:?}",
                kind as char
            )));
        }
        let n = read(chan, &mut buf)?;
        if n == 0 {
            return Err(io::Error::other("channel closed before the request"));
        }
        dec.feed(&buf[..n]);
    };
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        take_fresh_state(&start)?;
    }
    let child = spawn(&start)?;
    relay(chan, dec, child)
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// What the host sent fresh for this VM, before the program runs (and so before its
/// AT_RANDOM, stack canary and address layout are drawn): its seed mixed into the entropy
/// pool and the CRNG reseeded from it, the wall clock set. A booted VM has a pool of its own
/// and kvmclock's time already; a clone of a snapshot shares both with its template and its
/// siblings, and must not, so a failure fails the request.
fn take_fresh_state(start: &ch::Start) -> io::Result<()> {
    if !start.seed.is_empty() {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + start.seed.len());
        let bits = i32::try_from(start.seed.len() * 8).unwrap_or(i32::MAX);
        let size = i32::try_from(start.seed.len()).unwrap_or(i32::MAX);
        info.extend_from_slice(&bits.to_ne_bytes());
        info.extend_from_slice(&size.to_ne_bytes());
        info.extend_from_slice(&start.seed);
        // Room for the kernel's u32 reads past an odd-length seed.
        info.resize(info.len().next_multiple_of(4), 0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(|e| annotate(e, "opening /dev/urandom for the host's entropy"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: RNDADDENTROPY reads a rand_pool_info of `buf_size` bytes from `info`, which
        // holds its header and that many bytes.
        if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } < 0 {
            return Err(annotate(
                io::Error::last_os_error(),
                "adding the host's entropy",
            ));
        }
        // SAFETY: RNDRESEEDCRNG takes no argument.
        if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
            return Err(annotate(io::Error::last_os_error(), "reseeding the CRNG"));
        }
    }
    if start.now_ns > 0 {
        let ts = libc::timespec {
            tv_sec: i64::try_from(start.now_ns / 1_000_000_000).unwrap_or(i64::MAX),
            tv_nsec: i64::try_from(start.now_ns % 1_000_000_000).unwrap_or(0),
        };
        // SAFETY: clock_settime reads `ts`.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
            return Err(annotate(io::Error::last_os_error(), "setting the clock"));
        }
    }
    Ok(())
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn proto_err(e: ch::ProtoError) -> io::Error {
    io::Error::other(e.to_string())
}

/// devtmpfs for /dev/hvc0 (an initramfs has no automount), tmpfs on /tmp (the root may be a
/// read-only ext4), proc on /proc. Each only where its mount point exists; failures are left
/// to show up later (opening the channel names its own).
fn setup_filesystems() {
    if std::path::Path::new(CHANNEL).exists() {
        // devtmpfs already mounted (ext4 root with DEVTMPFS_MOUNT).
    } else {
        let _ = std::fs::create_dir("/dev");
        mount("devtmpfs", "/dev", "devtmpfs");
    }
    if std::path::Path::new("/tmp").is_dir() {
        mount("tmpfs", "/tmp", "tmpfs");
    }
    if std::path::Path::new("/proc").is_dir() {
        mount("proc", "/proc", "proc");
    }
}

fn mount(src: &str, target: &str, fstype: &str) {
    let (Ok(s), Ok(t), Ok(f)) = (
        CString::new(src),
        CString::new(target),
        CString::new(fstype),
    ) else {
        return;
    };
    // SAFETY: valid NUL-terminated strings; no data argument.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

fn channel_path() -> String {
    std::env::var(CHANNEL_ENV).unwrap_or_else(|_| CHANNEL.to_string())
}

fn open_channel_fd() -> io::Result<RawFd> {
    let path = CString::new(channel_path()).map_err(io::Error::other)?;
    // SAFETY: valid path; the fd is owned by this process until exit.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes only into `t`, a termios we own.
    cvt(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: t was filled by tcgetattr.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: tcsetattr only reads `t`, a termios filled above.
    cvt(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(())
}

struct Child {
    pid: libc::pid_t,
    stdin: Option<RawFd>,
    stdout: Option<RawFd>,
    stderr: Option<RawFd>,
}

fn spawn(start: &ch::Start) -> io::Result<Child> {
    let cstr = |b: &[u8]| CString::new(b.to_vec()).map_err(io::Error::other);
    let program = cstr(&start.program)?;
    let args: Vec<CString> = if start.args.is_empty() {
        vec![program.clone()]
    } else {
        start
            .args
            .iter()
            .map(|a| cstr(a))
            .collect::<io::Result<_>>()?
    };
    let env: Vec<CString> = start
        .env
        .iter()
        .map(|e| cstr(e))
        .collect::<io::Result<_>>()?;
    let cwd = if start.cwd.is_empty() {
        cstr(b"/")?
    } else {
        cstr(&start.cwd)?
    };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());

    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // What the child says when execve fails (static: nothing may allocate after fork).
    let exec_failed = |errno: i32| -> &'static [u8] {
        match errno {
            libc::ENOENT => b"xcgi-init: cannot execute the handler: not found (a dynamically linked program without its interpreter or libraries?)\n",
            libc::EACCES => b"xcgi-init: cannot execute the handler: permission denied\n",
            libc::ENOEXEC => b"xcgi-init: cannot execute the handler: not an executable format\n",
            _ => b"xcgi-init: cannot execute the handler\n",
        }
    };
    // SAFETY: after fork the child only calls async-signal-safe functions before execve.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(annotate(io::Error::last_os_error(), "fork"));
    }
    if pid == 0 {
        // SAFETY: the child: plain syscalls on fds and pointers prepared before fork.
        unsafe {
            libc::dup2(in_r, 0);
            libc::dup2(out_w, 1);
            libc::dup2(err_w, 2);
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::chdir(cwd.as_ptr());
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let msg = exec_failed(*libc::__errno_location());
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    for fd in [in_r, out_w, err_w] {
        // SAFETY: our copies of the child's ends.
        unsafe { libc::close(fd) };
    }
    set_nonblocking(in_w)?;
    Ok(Child {
        pid,
        stdin: Some(in_w),
        stdout: Some(out_r),
        stderr: Some(err_r),
    })
}

/// Moves bytes until the program's stdout and stderr are closed and it has exited.
fn relay(chan: RawFd, mut dec: ch::Decoder, mut child: Child) -> io::Result<i32> {
    let mut buf = vec![0u8; ch::CHUNK];
    let mut pending: Vec<u8> = Vec::new(); // body bytes not yet taken by the program
    let mut body_done = false;
    let mut chan_open = true;
    loop {
        // Decode whatever has arrived.
        while let Some((kind, payload)) = dec.next_frame().map_err(proto_err)? {
            match kind {
                ch::DATA if child.stdin.is_some() => pending.extend_from_slice(&payload),
                ch::DATA => {}
                ch::DATA_END => body_done = true,
                other => {
                    return Err(io::Error::other(format!(
                        "unexpected frame {:?} during the request",
                        other as char
                    )))
                }
            }
        }
        // Feed the program's stdin.
        if let Some(fd) = child.stdin {
            while !pending.is_empty() {
                // SAFETY: writing from a live buffer to our pipe end.
                let n = unsafe { libc::write(fd, pending.as_ptr().cast(), pending.len()) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => break,
                        Some(libc::EINTR) => continue,
                        _ => {
                            // EPIPE: the program stopped reading; drop the rest of the body.
                            pending.clear();
                            close(&mut child.stdin);
                            break;
                        }
                    }
                }
                pending.drain(..n as usize);
            }
            if body_done && pending.is_empty() {
                close(&mut child.stdin);
            }
        }
        if child.stdout.is_none() && child.stderr.is_none() {
            break;
        }
        let mut fds = Vec::with_capacity(4);
        if chan_open && pending.len() < MAX_PENDING {
            fds.push(pollfd(chan, libc::POLLIN));
        }
        for fd in [child.stdout, child.stderr].into_iter().flatten() {
            fds.push(pollfd(fd, libc::POLLIN));
        }
        if let (Some(fd), false) = (child.stdin, pending.is_empty()) {
            fds.push(pollfd(fd, libc::POLLOUT));
        }
        // SAFETY: fds is a valid array of pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(annotate(e, "poll"));
        }
        for p in &fds {
            if p.revents == 0 {
                continue;
            }
            if p.fd == chan {
                let n = read(chan, &mut buf)?;
                if n == 0 {
                    chan_open = false;
                } else {
                    dec.feed(&buf[..n]);
                }
            } else if Some(p.fd) == child.stdout {
                forward(chan, &mut child.stdout, ch::STDOUT, &mut buf)?;
                if child.stdout.is_none() {
                    write_all(chan, &ch::frame(ch::STDOUT_CLOSED, b""))?;
                }
            } else if Some(p.fd) == child.stderr {
                forward(chan, &mut child.stderr, ch::STDERR, &mut buf)?;
            }
        }
    }
    close(&mut child.stdin);
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(child.pid, &mut status, 0) };
        if r == child.pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(annotate(io::Error::last_os_error(), "waitpid"));
        }
    }
    write_all(chan, &ch::frame(ch::EXIT, &(status as u32).to_le_bytes()))?;
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// Reads what the program wrote on `fd` and sends it as `kind` frames; closes on EOF.
fn forward(chan: RawFd, fd: &mut Option<RawFd>, kind: u8, buf: &mut [u8]) -> io::Result<()> {
    let Some(raw) = *fd else { return Ok(()) };
    let n = read(raw, buf)?;
    if n == 0 {
        close(fd);
        return Ok(());
    }
    let mut out = Vec::with_capacity(ch::HEADER_LEN + n);
    ch::encode(&mut out, kind, &buf[..n]);
    write_all(chan, &out)
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on our own descriptor.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: fcntl on our own descriptor; it only changes its flags.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

fn close(fd: &mut Option<RawFd>) {
    if let Some(raw) = fd.take() {
        // SAFETY: we own raw and forget it here.
        unsafe { libc::close(raw) };
    }
}

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // A program that closed its end abruptly: treat as EOF.
            Some(libc::EIO) | Some(libc::ECONNRESET) => return Ok(0),
            _ => return Err(e),
        }
    }
}

fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: data is valid for data.len() bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(annotate(e, "writing to the channel"));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
