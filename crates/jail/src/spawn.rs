//! Starting a handler process: `clone3` straight into the handler's cgroup
//! (`CLONE_INTO_CGROUP`, no migration afterwards) with a pidfd (`CLONE_PIDFD`) to wait on and
//! signal, then the jail's steps and `execve` in the child. The child shares the server's
//! memory until `execve` (`CLONE_VM | CLONE_VFORK`, on a stack of its own) and only makes
//! system calls before it: no allocation, no lock, nothing another thread of the server
//! might hold.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tokio::io::unix::AsyncFd;

/// `CLONE_PIDFD` (linux/sched.h): the kernel writes a pidfd for the child.
const CLONE_PIDFD: u64 = 0x1000;
/// `CLONE_INTO_CGROUP` (linux/sched.h, Linux 5.7): the child starts in `clone_args.cgroup`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` (linux/sched.h), the version with `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What the child does between `clone3` and `execve`, decided before the clone.
#[derive(Debug, Clone, Default)]
pub struct ChildSetup {
    /// `CLONE_NEW*` flags: the namespaces the child is created in (PID, mount, IPC, UTS,
    /// network). In a new PID namespace the child is its PID 1.
    pub namespaces: u64,
    /// Resource limits (soft = hard) set in the child.
    pub limits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// `PR_SET_NO_NEW_PRIVS` before `execve`: no setuid or file-capability program it runs
    /// gains privileges.
    pub no_new_privs: bool,
    /// `(uid, gid)` the child switches to (supplementary groups dropped); None: stays as the
    /// server's user.
    pub creds: Option<(libc::uid_t, libc::gid_t)>,
    /// Seccomp filters the child installs last before `execve`, in this order (it needs
    /// `no_new_privs` or CAP_SYS_ADMIN): the program runs under them.
    pub seccomp: Vec<SeccompProgram>,
}

/// A compiled seccomp-bpf program (classic BPF instructions, as `SECCOMP_MODE_FILTER` takes).
#[derive(Clone, Default)]
pub struct SeccompProgram(pub std::sync::Arc<Vec<libc::sock_filter>>);

impl std::fmt::Debug for SeccompProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeccompProgram({} instructions)", self.0.len())
    }
}

/// What the child's stdin, stdout and stderr are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// Pipes to the parent ([`Spawned::stdio`]).
    Piped,
    /// The parent's own.
    Inherit,
}

/// A program to start, and how.
#[derive(Debug)]
pub struct Command<'a> {
    /// The program (argv[0] too).
    pub program: &'a Path,
    /// argv[1..].
    pub args: &'a [OsString],
    /// The whole environment, `KEY=value` strings.
    pub env: &'a [String],
    /// The working directory.
    pub cwd: &'a Path,
    /// The child's own steps before `execve`.
    pub setup: &'a ChildSetup,
    /// An open cgroup v2 directory the child starts in (`CLONE_INTO_CGROUP`).
    pub cgroup: Option<BorrowedFd<'a>>,
    /// Pipes or the parent's own stdio.
    pub stdio: Stdio,
    /// Descriptors the child gets as 3, 4, ... (every other one is closed at `execve`).
    pub pass_fds: &'a [BorrowedFd<'a>],
}

impl<'a> Command<'a> {
    /// `program` with no arguments, piped stdio, nothing passed, no cgroup.
    pub fn new(program: &'a Path, env: &'a [String], cwd: &'a Path, setup: &'a ChildSetup) -> Self {
        Command {
            program,
            args: &[],
            env,
            cwd,
            setup,
            cgroup: None,
            stdio: Stdio::Piped,
            pass_fds: &[],
        }
    }
}

/// The parent's ends of a child's stdin, stdout and stderr pipes.
#[derive(Debug)]
pub struct Pipes {
    /// Write end of the child's stdin.
    pub stdin: OwnedFd,
    /// Read end of the child's stdout.
    pub stdout: OwnedFd,
    /// Read end of the child's stderr.
    pub stderr: OwnedFd,
}

/// A started child: its pid, a pidfd, and (with [`Stdio::Piped`]) its pipes.
#[derive(Debug)]
pub struct Spawned {
    /// The child's pid as the parent sees it (also its process group's id).
    pub pid: libc::pid_t,
    /// Waits for and signals exactly this child, never a recycled pid.
    pub pidfd: PidFd,
    /// Its stdin, stdout and stderr, when piped.
    pub stdio: Option<Pipes>,
}

/// A child process's pidfd. Dropped before the child was reaped, it kills and reaps the
/// child (on a thread if it has not died yet), so no zombie outlives a request.
#[derive(Debug)]
pub struct PidFd {
    state: PidState,
}

#[derive(Debug)]
enum PidState {
    Open(OwnedFd),
    /// Registered with the runtime (the first `wait`).
    Waiting(AsyncFd<OwnedFd>),
    Reaped,
}

impl PidFd {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.state {
            PidState::Open(fd) => Some(fd.as_fd()),
            PidState::Waiting(a) => Some(a.get_ref().as_fd()),
            PidState::Reaped => None,
        }
    }

    /// Sends `sig` to the child (nothing once it has been reaped).
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(fd) = self.fd() {
            send_signal(fd, sig);
        }
    }

    /// The pidfd, to poll (readable once the child has exited); None once reaped.
    pub fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd()
    }

    /// Reaps the child if it has exited: its exit code (or 128 + the signal that killed
    /// it); None while it runs.
    pub fn try_wait(&mut self) -> io::Result<Option<i32>> {
        let Some(fd) = self.fd() else {
            return Err(io::Error::other("the child was already reaped"));
        };
        let code = reap(fd, libc::WNOHANG)?;
        if code.is_some() {
            self.state = PidState::Reaped;
        }
        Ok(code)
    }

    /// Waits, blocking the calling thread, until the child ends and reaps it: its exit code,
    /// or 128 + the signal that killed it. For code outside an async runtime.
    pub fn wait_blocking(&mut self) -> io::Result<i32> {
        let fd = match std::mem::replace(&mut self.state, PidState::Reaped) {
            PidState::Open(fd) => fd,
            PidState::Waiting(a) => a.into_inner(),
            PidState::Reaped => return Err(io::Error::other("the child was already reaped")),
        };
        match reap(fd.as_fd(), 0) {
            Ok(Some(code)) => Ok(code),
            Ok(None) => Err(io::Error::other("waitid returned no child")),
            Err(e) => {
                self.state = PidState::Open(fd);
                Err(e)
            }
        }
    }

    /// Waits until the child ends and reaps it: its exit code, or 128 + the signal that
    /// killed it. Cancel-safe: a wait dropped half-way leaves the child to the next one (or
    /// to drop).
    pub async fn wait(&mut self) -> io::Result<i32> {
        if let PidState::Open(_) = self.state {
            let PidState::Open(fd) = std::mem::replace(&mut self.state, PidState::Reaped) else {
                unreachable!("matched above")
            };
            // SAFETY: an OwnedFd is open and names the same pidfd until the AsyncFd gives it
            // back or closes it.
            let registered =
                unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
            self.state = match registered {
                Ok(a) => PidState::Waiting(a),
                Err(err) => {
                    let (fd, e) = err.into_parts();
                    self.state = PidState::Open(fd);
                    return Err(e);
                }
            };
        }
        let PidState::Waiting(afd) = &self.state else {
            return Err(io::Error::other("the child was already reaped"));
        };
        loop {
            // A pidfd is readable once its process has exited.
            let mut guard = afd.readable().await?;
            if let Some(code) = reap(guard.get_inner().as_fd(), libc::WNOHANG)? {
                drop(guard);
                self.state = PidState::Reaped;
                return Ok(code);
            }
            guard.clear_ready();
        }
    }
}

impl Drop for PidFd {
    fn drop(&mut self) {
        let fd = match std::mem::replace(&mut self.state, PidState::Reaped) {
            PidState::Open(fd) => fd,
            PidState::Waiting(a) => a.into_inner(),
            PidState::Reaped => return,
        };
        send_signal(fd.as_fd(), libc::SIGKILL);
        if let Ok(Some(_)) = reap(fd.as_fd(), libc::WNOHANG) {
            return;
        }
        // Killed but not dead yet: reap it off the async threads.
        let _ = std::thread::Builder::new()
            .name("xcgi-reap".into())
            .spawn(move || {
                let _ = reap(fd.as_fd(), 0);
            });
    }
}

/// `pidfd_send_signal`: signals exactly the process behind `fd` (an exited one ignores it).
fn send_signal(fd: BorrowedFd<'_>, sig: libc::c_int) {
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// `waitid(P_PIDFD)`: Some(exit code or 128 + signal) once reaped, None when `flags` has
/// WNOHANG and the child is still running.
fn reap(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<Option<i32>> {
    loop {
        // SAFETY: siginfo_t is plain data: all zeroes is valid (and how WNOHANG's "not yet"
        // is told apart: si_pid stays 0).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our child's pidfd, writing into `info`.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled `info` for a child event (or left it zeroed: pid 0).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(if info.si_code == libc::CLD_EXITED {
            status
        } else {
            128 + status
        }));
    }
}

/// What went wrong in the child before `execve` succeeded: the step and its errno. Written
/// by the child into memory it shares with the parent (`CLONE_VM`).
#[derive(Debug, Clone, Copy, Default)]
struct ChildFailure {
    /// 1 + the index in [`STEPS`]; 0: nothing failed.
    step: u32,
    errno: i32,
}

const STEPS: [&str; 11] = [
    "setting up stdin/stdout/stderr",
    "changing to the working directory",
    "making its process group",
    "resetting signals",
    "setting resource limits",
    "switching user",
    "setting the parent-death signal",
    "checking its parent (the server is going away)",
    "setting no_new_privs",
    "execve",
    "installing its seccomp filter",
];

/// Why a handler process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Before the clone: an argument with a NUL byte, no pipe or stack (descriptor or memory
    /// limit).
    #[error("cannot prepare the child: {0}")]
    Prepare(#[source] io::Error),
    /// `clone3` itself failed (process limit, memory; EBUSY/EACCES for the cgroup).
    #[error("clone3 failed: {0}")]
    Clone(#[source] io::Error),
    /// The child failed before the program ran.
    #[error("{step} failed in the child: {source}")]
    Child {
        /// What the child was doing.
        step: &'static str,
        /// Its errno.
        #[source]
        source: io::Error,
    },
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The stack a child runs on until `execve`: 64 KiB with a guard page below, one per server
/// thread (the thread is suspended while its child uses it: `CLONE_VFORK`).
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

const STACK_SIZE: usize = 64 << 10;
const GUARD: usize = 4096;

impl ChildStack {
    fn new() -> io::Result<ChildStack> {
        let len = STACK_SIZE + GUARD;
        // SAFETY: a new private anonymous mapping, nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // SAFETY: makes all but the lowest page of our own mapping usable.
        let r = unsafe {
            libc::mprotect(
                base.cast::<u8>().add(GUARD).cast(),
                STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The top of the stack (16-byte aligned, as a call expects).
    fn top(&self) -> u64 {
        self.base as u64 + self.len as u64
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping; no child runs on it (the thread is exiting).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

thread_local! {
    static STACK: std::cell::RefCell<Option<ChildStack>> = const { std::cell::RefCell::new(None) };
}

/// Everything the child reads (prepared before the clone: it must not allocate) and the
/// one thing it writes (`failure`).
struct ChildArgs<'a> {
    /// The child's 0, 1, 2 (None: inherited).
    stdio: Option<[RawFd; 3]>,
    /// Become 3, 4, ...: high-numbered duplicates, so that no dup2 clobbers another.
    pass: &'a [RawFd],
    dir: &'a CString,
    prog: &'a CString,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    setup: &'a ChildSetup,
    parent: libc::pid_t,
    failure: ChildFailure,
}

/// Starts `cmd`: in its own process group, in the namespaces `cmd.setup` asks for and, with
/// a cgroup, in that cgroup from its first instruction. Returns once the child has called
/// `execve` (or reports what failed before it).
///
/// The child shares the server's memory until `execve` (`CLONE_VM | CLONE_VFORK`, as
/// `posix_spawn` does): no page tables are copied and no page of the server is write-protected
/// for copy-on-write, which made a forked handler cost the server more than the handler's
/// own run. The calling thread waits meanwhile, with every signal blocked.
pub fn spawn(cmd: &Command<'_>) -> Result<Spawned, SpawnError> {
    let exec = Exec::new(cmd.program, cmd.args, cmd.env, cmd.cwd).map_err(SpawnError::Prepare)?;
    let pipes = match cmd.stdio {
        Stdio::Piped => Some(
            (|| -> io::Result<_> { Ok([pipe()?, pipe()?, pipe()?]) })()
                .map_err(SpawnError::Prepare)?,
        ),
        Stdio::Inherit => None,
    };
    // Duplicates above every number the child's dup2 targets, closed here after the clone.
    let high = cmd
        .pass_fds
        .iter()
        .map(|fd| {
            // SAFETY: duplicates a descriptor the caller lent us, close-on-exec.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: a new descriptor, ours alone.
                Ok(unsafe { OwnedFd::from_raw_fd(r) })
            }
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(SpawnError::Prepare)?;
    let pass: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
    let mut child = ChildArgs {
        stdio: pipes.as_ref().map(|[(in_r, _), (_, out_w), (_, err_w)]| {
            [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()]
        }),
        pass: &pass,
        dir: &exec.dir,
        prog: &exec.prog,
        argv: &exec.argv,
        envp: &exec.envp,
        setup: cmd.setup,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        failure: ChildFailure::default(),
    };
    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD
            | libc::CLONE_VM as u64
            | libc::CLONE_VFORK as u64
            | cmd.setup.namespaces,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(cg) = cmd.cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cg.as_raw_fd() as u64;
    }
    let ret = clone_on_thread_stack(&mut args, &mut child).map_err(SpawnError::Prepare)?;
    drop(high);
    if ret < 0 {
        return Err(SpawnError::Clone(io::Error::from_raw_os_error(-ret as i32)));
    }
    // SAFETY: the kernel wrote a new pidfd, ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut pidfd = PidFd {
        state: PidState::Open(fd),
    };
    // SAFETY: the child has exec'd or exited (CLONE_VFORK); it wrote `failure` before.
    let failure = unsafe { std::ptr::read_volatile(std::ptr::addr_of!(child.failure)) };
    if failure.step > 0 {
        if let PidState::Open(fd) = std::mem::replace(&mut pidfd.state, PidState::Reaped) {
            let _ = reap(fd.as_fd(), 0); // the child has exited (127)
        }
        return Err(SpawnError::Child {
            step: STEPS
                .get(failure.step as usize - 1)
                .copied()
                .unwrap_or("starting"),
            source: io::Error::from_raw_os_error(failure.errno),
        });
    }
    Ok(Spawned {
        pid: ret as libc::pid_t,
        pidfd,
        // The child's ends close here.
        stdio: pipes.map(|[(_, in_w), (out_r, _), (err_r, _)]| Pipes {
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        }),
    })
}

/// The program, its working directory, argv and envp as C strings and pointer arrays.
struct Exec {
    prog: CString,
    dir: CString,
    /// Owns what `envp` points to.
    _env: Vec<CString>,
    /// Owns what `argv` points to, after argv[0].
    _args: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl Exec {
    fn new(program: &Path, args: &[OsString], env: &[String], cwd: &Path) -> io::Result<Exec> {
        let prog = cstring(program.as_os_str())?;
        let dir = cstring(cwd.as_os_str())?;
        let args = args
            .iter()
            .map(|a| cstring(a))
            .collect::<io::Result<Vec<_>>>()?;
        let env = env
            .iter()
            .map(|e| cstring(OsStr::new(e)))
            .collect::<io::Result<Vec<_>>>()?;
        let envp = env
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        // A CString's bytes stay where they are when the CString moves.
        let argv = std::iter::once(prog.as_ptr())
            .chain(args.iter().map(|c| c.as_ptr()))
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(Exec {
            prog,
            dir,
            _env: env,
            _args: args,
            argv,
            envp,
        })
    }
}

/// Clones the child on this thread's child stack with every signal blocked meanwhile:
/// returns the child's pid, or -errno from clone3.
fn clone_on_thread_stack(args: &mut CloneArgs, child: &mut ChildArgs<'_>) -> io::Result<i64> {
    STACK.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(io::Error::other)?;
        if slot.is_none() {
            *slot = Some(ChildStack::new()?);
        }
        let Some(stack) = slot.as_ref() else {
            return Err(io::Error::other("no child stack"));
        };
        args.stack = stack.top() - STACK_SIZE as u64;
        args.stack_size = STACK_SIZE as u64;
        // SAFETY: blocks every signal of this thread (restored below), so no handler runs
        // in the child on the shared memory before it resets them.
        let old = unsafe { block_all_signals() };
        // SAFETY: see `clone_vfork`; `child` lives until the child has exec'd or exited
        // (CLONE_VFORK: this thread is suspended until then).
        let ret = unsafe { clone_vfork(args, std::ptr::from_mut(child).cast()) };
        // SAFETY: restores this thread's own mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        Ok(ret)
    })
}

/// Blocks every signal of the calling thread; returns the mask to restore.
///
/// # Safety
/// The caller restores the returned mask.
unsafe fn block_all_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; fills and applies masks of this thread only.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    }
}

/// `clone3` with `args` (which name a stack); the child calls [`child_entry`] with `arg` on
/// that stack and never returns here. Returns the child's pid, or -errno.
///
/// # Safety
/// `args.stack`/`stack_size` name a usable stack no one else uses until the child has
/// exec'd or exited; `arg` points to a live [`ChildArgs`]; with `CLONE_VM` the flags must
/// include `CLONE_VFORK` (the caller's stack frame is not touched by the child, but its
/// memory is shared).
unsafe fn clone_vfork(args: &mut CloneArgs, arg: *mut libc::c_void) -> i64 {
    let ret: i64;
    let entry: extern "C" fn(*mut libc::c_void) -> ! = child_entry;
    // SAFETY: the raw clone3 system call. In the parent it returns like any system call. In
    // the child (rax 0) the kernel has switched to the new stack (aligned, empty): the code
    // calls `entry(arg)` there, which never returns; nothing of the parent's stack frame is
    // used. rcx and r11 are clobbered by `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") std::ptr::from_mut(args),
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret
}

/// The child's first function, on its own stack.
extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` is the ChildArgs the parent passed to clone_vfork; the parent is
    // suspended and does not touch it until this child execs or exits.
    let a = unsafe { &mut *arg.cast::<ChildArgs<'_>>() };
    // SAFETY: called once, in the child, with the parent's prepared arguments.
    unsafe { child_main(a) }
}

/// The child between `clone3` and `execve`: system calls only (raw ones where glibc's
/// wrapper would act on the whole process, like setuid's broadcast to every thread: this
/// child shares the server's memory and thread list).
///
/// # Safety
/// Called once, in a freshly cloned child, with arguments the parent prepared.
unsafe fn child_main(a: &mut ChildArgs<'_>) -> ! {
    // SAFETY: in the child, as this function's contract says.
    let step = match unsafe { child_steps(a) } {
        Ok(never) => match never {},
        Err(step) => step,
    };
    a.failure = ChildFailure {
        step: step + 1,
        errno: io::Error::last_os_error().raw_os_error().unwrap_or(0),
    };
    // SAFETY: exits this child only (exit_group of its own thread group), running none of
    // the server's destructors or atexit handlers.
    unsafe { libc::_exit(127) }
}

/// Makes `fd` the child's descriptor `target`, open across `execve`: dup2 onto another number
/// clears close-on-exec; a descriptor that already is `target` keeps the flag, which fcntl
/// clears.
///
/// # Safety
/// Only in the child (it changes this process's descriptor table).
unsafe fn move_fd(fd: RawFd, target: RawFd) -> libc::c_long {
    // SAFETY: descriptor operations on this child's own table.
    unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0).into()
        } else {
            libc::dup2(fd, target).into()
        }
    }
}

/// Handlers the server installed (tokio's) go back to the default before signals are
/// unblocked; SIGPIPE too: the server ignores it (Rust's runtime does) and an ignored signal
/// would stay ignored across execve. Returns sigprocmask's result.
///
/// # Safety
/// Only in the child (it changes dispositions, which the child does not share: no
/// CLONE_SIGHAND).
unsafe fn reset_signals() -> libc::c_long {
    for sig in 1..libc::SIGRTMAX() {
        // SAFETY: sigaction is plain data; queries and resets this child's dispositions.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && (old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN
                    || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
    }
    // SAFETY: sigset_t is plain data; unblocks every signal of this child.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()).into()
    }
}

/// The child's steps; returns the index of the one that failed (errno says why).
///
/// # Safety
/// As [`child_main`].
unsafe fn child_steps(a: &ChildArgs<'_>) -> Result<std::convert::Infallible, u32> {
    let check = |r: libc::c_long, step: u32| if r < 0 { Err(step) } else { Ok(()) };
    for (target, &fd) in a.stdio.iter().flatten().enumerate() {
        // SAFETY: descriptor operations on this child's own table (see `move_fd`).
        check(unsafe { move_fd(fd, target as RawFd) }, 0)?;
    }
    for (i, &fd) in a.pass.iter().enumerate() {
        // SAFETY: as above; the sources are above 63, the targets from 3 up.
        check(unsafe { move_fd(fd, 3 + i as RawFd) }, 0)?;
    }
    // SAFETY: dir is a NUL-terminated path prepared by the parent.
    check(unsafe { libc::chdir(a.dir.as_ptr()) }.into(), 1)?;
    // SAFETY: makes this child the leader of a new process group.
    check(unsafe { libc::setpgid(0, 0) }.into(), 2)?;
    // SAFETY: in the child, before execve.
    check(unsafe { reset_signals() }, 3)?;
    for &(res, value) in &a.setup.limits {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: lim is a valid rlimit for this call.
        check(unsafe { libc::setrlimit(res, &lim) }.into(), 4)?;
    }
    if let Some((uid, gid)) = a.setup.creds {
        // Groups first, the uid last (after it, nothing else may be changed). Raw system
        // calls: they change this child alone.
        // SAFETY: credential changes of this child only; a null list of length 0 is valid.
        unsafe {
            check(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                5,
            )?;
            check(libc::syscall(libc::SYS_setgid, gid), 5)?;
            check(libc::syscall(libc::SYS_setuid, uid), 5)?;
        }
    }
    // Die with the server. Set after the uid change, which clears it; then check that the
    // server did not go away before it was set.
    // SAFETY: prctl with an integer argument.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    check(r.into(), 6)?;
    // In a new PID namespace the parent is outside it (getppid: 0); PDEATHSIG still
    // reaches the child.
    let new_pid_ns = a.setup.namespaces & libc::CLONE_NEWPID as u64 != 0;
    // SAFETY: getppid has no preconditions.
    if !new_pid_ns && unsafe { libc::getppid() } != a.parent {
        return Err(7);
    }
    if a.setup.no_new_privs {
        // SAFETY: prctl with integer arguments, on this child.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        check(r.into(), 8)?;
    }
    for p in &a.setup.seccomp {
        // Built on this stack: no allocation; the instructions are the parent's, alive until
        // execve (the parent waits).
        let prog = libc::sock_fprog {
            len: p.0.len() as libc::c_ushort,
            filter: p.0.as_ptr().cast_mut(),
        };
        // SAFETY: prctl reads `prog` and the instructions it points to for this call only.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        };
        check(r.into(), 10)?;
    }
    // SAFETY: prog, argv and envp are NUL-terminated and null-terminated, built by the parent.
    unsafe { libc::execve(a.prog.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr()) };
    Err(9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// A shell script in a fresh directory (the child's argv is its path alone).
    fn script(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handler");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, path)
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        std::fs::File::from(fd)
            .read_to_string(&mut s)
            .expect("read pipe");
        s
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn the_child_gets_its_environment_directory_and_pipes_and_its_exit_code_comes_back() {
        let (dir, prog) = script("echo \"$GREETING from $(pwd)\"; cat; echo oops >&2; exit 3");
        let env = ["GREETING=hello".to_string()];
        let rt = rt();
        let setup = ChildSetup::default();
        let code = rt.block_on(async {
            let mut c = spawn(&Command::new(&prog, &env, dir.path(), &setup)).expect("spawn");
            let p = c.stdio.take().expect("piped");
            let mut stdin = std::fs::File::from(p.stdin);
            stdin.write_all(b"the body\n").expect("write stdin");
            drop(stdin);
            let out = read_all(p.stdout);
            let err = read_all(p.stderr);
            let want = format!("hello from {}\nthe body\n", dir.path().display());
            assert_eq!(out, want);
            assert_eq!(err, "oops\n");
            c.pidfd.wait().await.expect("wait")
        });
        assert_eq!(code, 3);
    }

    #[test]
    fn a_failure_before_execve_names_the_step() {
        let (dir, _) = script("exit 0");
        let missing = dir.path().join("no-such-program");
        let setup = ChildSetup::default();
        match spawn(&Command::new(&missing, &[], dir.path(), &setup)) {
            Err(SpawnError::Child { step, source }) => {
                assert_eq!(step, "execve");
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an execve failure, got {other:?}"),
        }
        let (_d, prog) = script("exit 0");
        let gone = dir.path().join("gone");
        let e = spawn(&Command::new(&prog, &[], &gone, &setup))
            .expect_err("a missing working directory");
        assert!(
            e.to_string()
                .starts_with("changing to the working directory failed in the child"),
            "{e}"
        );
    }

    #[test]
    fn signals_the_server_ignores_or_handles_are_the_defaults_in_the_handler() {
        // Rust's runtime ignores SIGPIPE in this test process, as in the server; an ignored
        // signal survives execve unless the child resets it.
        let (dir, prog) = script("kill -PIPE $$; exit 0");
        let setup = ChildSetup::default();
        let code = rt().block_on(async {
            let mut c = spawn(&Command::new(&prog, &[], dir.path(), &setup)).expect("spawn");
            c.pidfd.wait().await.expect("wait")
        });
        assert_eq!(
            code,
            128 + libc::SIGPIPE,
            "SIGPIPE did not kill the handler"
        );
    }

    #[test]
    fn waiting_is_cancel_safe_and_a_dropped_child_is_killed_and_reaped() {
        let (dir, prog) = script("sleep 0.3; exit 7");
        let setup = ChildSetup::default();
        let rt = rt();
        let code = rt.block_on(async {
            let mut c = spawn(&Command::new(&prog, &[], dir.path(), &setup)).expect("spawn");
            let early = tokio::time::timeout(Duration::from_millis(20), c.pidfd.wait()).await;
            assert!(early.is_err(), "the child ended too soon: {early:?}");
            // The abandoned wait must not have lost the child.
            c.pidfd.wait().await.expect("wait after a cancelled wait")
        });
        assert_eq!(code, 7);

        let (dir, prog) = script("exec sleep 30");
        let setup = ChildSetup::default();
        let c = spawn(&Command::new(&prog, &[], dir.path(), &setup)).expect("spawn");
        let proc_dir = format!("/proc/{}", c.pid);
        drop(c);
        let t = std::time::Instant::now();
        while std::path::Path::new(&proc_dir).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{proc_dir} still there 5 s after its pidfd was dropped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn arguments_passed_descriptors_inherited_stdio_and_new_namespaces() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: no namespaces to make; nothing to check");
            return;
        }
        // $$ is 1 in a new PID namespace; fd 3 is the passed pipe; stdout is inherited, so
        // the answer goes through fd 3 only.
        let (dir, prog) = script("echo \"$$ $1 $(readlink /proc/self/ns/uts)\" >&3");
        let (r, w) = pipe().expect("pipe");
        let args = [OsString::from("second")];
        let setup = ChildSetup {
            namespaces: (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS) as u64,
            ..ChildSetup::default()
        };
        let passed = [w.as_fd()];
        let cmd = Command {
            args: &args,
            stdio: Stdio::Inherit,
            pass_fds: &passed,
            ..Command::new(&prog, &[], dir.path(), &setup)
        };
        let code = rt().block_on(async {
            let mut c = spawn(&cmd).expect("spawn");
            assert!(c.stdio.is_none());
            c.pidfd.wait().await.expect("wait")
        });
        drop(w);
        assert_eq!(code, 0);
        let out = read_all(r);
        let ours = std::fs::read_link("/proc/self/ns/uts").expect("our uts namespace");
        let mut words = out.split_whitespace();
        assert_eq!(
            words.next(),
            Some("1"),
            "not PID 1 of a new namespace: {out:?}"
        );
        assert_eq!(words.next(), Some("second"), "{out:?}");
        let theirs = words.next().expect("a uts namespace");
        assert_ne!(
            theirs,
            ours.to_string_lossy(),
            "the same UTS namespace as ours"
        );
    }
}
