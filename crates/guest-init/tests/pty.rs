//! xcgi-init outside a VM: its channel is a pty (a tty, like /dev/hvc0), the test plays the
//! gateway. Checks raw mode (binary bytes pass untouched), the request/relay/exit protocol,
//! stdin EOF, stderr, exec failure and big bodies both ways.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xcgi_channel as ch;

struct Pty {
    master: std::fs::File,
    slave_path: String,
}

fn pty() -> Pty {
    // SAFETY: plain libc pty calls; the fd is owned by the File.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(fd >= 0);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        let slave_path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned();
        Pty {
            master: std::fs::File::from(OwnedFd::from_raw_fd(fd)),
            slave_path,
        }
    }
}

/// Reads frames until EXIT (or FAILED); returns them all.
fn frames_until_end(m: &mut std::fs::File, dec: &mut ch::Decoder) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let t = Instant::now();
    loop {
        while let Some(f) = dec.next_frame().expect("valid frames") {
            let end = f.0 == ch::EXIT || f.0 == ch::FAILED;
            out.push(f);
            if end {
                return out;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no exit frame: {out:?}"
        );
        let n = m.read(&mut buf).expect("read the pty");
        assert!(n > 0, "pty closed before the exit frame");
        dec.feed(&buf[..n]);
    }
}

type Frames = Vec<(u8, Vec<u8>)>;
/// stdout, stderr, every frame.
type Ran = (Vec<u8>, Vec<u8>, Frames);

fn run(program: &str, args: &[&str], env: &[&str], body: &[u8]) -> Ran {
    let mut p = pty();
    // Keep a slave fd open ourselves so the master never sees a hangup between opens.
    let _slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p.slave_path)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xcgi-init"))
        .env("XCGI_INIT_CHANNEL", &p.slave_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut dec = ch::Decoder::new();
    let mut buf = vec![0u8; 4096];
    // Wait for HELLO: the channel is raw from then on.
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            assert_eq!(f.0, ch::HELLO);
            break;
        }
        let n = p.master.read(&mut buf).unwrap();
        dec.feed(&buf[..n]);
    }
    let mut all_args = vec![program.as_bytes().to_vec()];
    all_args.extend(args.iter().map(|a| a.as_bytes().to_vec()));
    let start = ch::Start {
        program: program.as_bytes().to_vec(),
        args: all_args,
        env: env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        cwd: b"/".to_vec(),
        // Carried as the server sends them; applied only by a PID 1 (never here: the host's
        // clock and entropy pool stay untouched).
        seed: vec![7; 64],
        now_ns: 1,
    };
    let mut w = p.master.try_clone().unwrap();
    let body = body.to_vec();
    // Not joined: a program that ignores its body leaves the rest unread, as a VM would (the
    // gateway then stops the VM and its writer).
    std::thread::spawn(move || {
        let _ = w.write_all(&ch::frame(ch::START, &start.encode()));
        for c in body.chunks(ch::CHUNK) {
            if w.write_all(&ch::frame(ch::DATA, c)).is_err() {
                return;
            }
        }
        let _ = w.write_all(&ch::frame(ch::DATA_END, b""));
    });
    let frames = frames_until_end(&mut p.master, &mut dec);
    let st = child.wait().unwrap();
    let mut out = Vec::new();
    let mut err = Vec::new();
    for (k, d) in &frames {
        match *k {
            ch::STDOUT => out.extend_from_slice(d),
            ch::STDERR => err.extend_from_slice(d),
            _ => {}
        }
    }
    let _ = st;
    (out, err, frames)
}

fn exit_status(frames: &[(u8, Vec<u8>)]) -> u32 {
    let (k, d) = frames.last().unwrap();
    assert_eq!(*k, ch::EXIT, "{frames:?}");
    u32::from_le_bytes(d[..4].try_into().unwrap())
}

#[test]
fn runs_the_program_with_exactly_the_given_environment() {
    let (out, _, frames) = run("/usr/bin/env", &[], &["A=1", "QUERY_STRING=x=y&z"], b"");
    assert_eq!(String::from_utf8_lossy(&out), "A=1\nQUERY_STRING=x=y&z\n");
    assert!(frames.iter().any(|f| f.0 == ch::STDOUT_CLOSED));
    assert_eq!(exit_status(&frames), 0);
}

#[test]
fn binary_body_round_trips_through_raw_mode() {
    // Every byte value, including ^C, ^D, ^S, CR and LF: a cooked tty would eat or change them.
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 256) as u8).collect();
    let (out, _, frames) = run("/bin/cat", &[], &[], &body);
    assert_eq!(out.len(), body.len());
    assert!(out == body, "bytes changed on the way");
    assert_eq!(exit_status(&frames), 0);
}

#[test]
fn stderr_and_exit_status_are_reported() {
    let (out, err, frames) = run(
        "/bin/sh",
        &["-c", "echo out; echo err >&2; exit 7"],
        &[],
        b"",
    );
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    assert_eq!(exit_status(&frames), 7 << 8);
}

#[test]
fn a_program_that_cannot_run_exits_127_with_a_message() {
    let (_, err, frames) = run("/nonexistent/handler", &[], &[], b"");
    assert!(
        String::from_utf8_lossy(&err).contains("cannot execute"),
        "{err:?}"
    );
    assert_eq!(exit_status(&frames), 127 << 8);
}

#[test]
fn a_program_that_ignores_its_body_still_finishes() {
    let body = vec![b'x'; 2_000_000];
    let (out, _, frames) = run("/bin/echo", &["done"], &[], &body);
    assert_eq!(out, b"done\n");
    assert_eq!(exit_status(&frames), 0);
}
