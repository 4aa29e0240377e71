//! Starting the server of `reuseportctl exec`: fork, wait at a gate until the launcher
//! has registered the listeners with the child's pid, then `execve` with the listeners as
//! fds 3, 4, … and the socket-activation variables of systemd and Server::Starter.
//!
//! NB: `std::process::Command` cannot do this. `LISTEN_PID` must be the child's pid, known
//! only after `fork`, and between `fork` and `exec` only async-signal-safe calls are allowed
//! (no allocation: another thread may have held the allocator lock at `fork`), so
//! `setenv` in `pre_exec` is out. Here everything is allocated before `fork`; the child
//! only formats its pid into a stack buffer and points a reserved `envp` slot at it.

use std::{
    ffi::{CString, OsStr, OsString},
    io::{self, Read as _},
    net::SocketAddr,
    os::{
        fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::{OsStrExt, OsStringExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{FcntlArg, OFlag, fcntl},
    sys::{
        signal::{SigSet, SigmaskHow, Signal, pthread_sigmask},
        wait::waitpid,
    },
    unistd::{AccessFlags, Pid, access, getpid, pipe2},
};

/// Where the child finds the first listener (`SD_LISTEN_FDS_START`); the others follow.
pub const LISTEN_FD: RawFd = 3;

/// Signals the launcher forwards to the child.
pub const FORWARDED_SIGNALS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Variables the launcher sets; inherited values are dropped, since they describe
/// descriptors of some other process.
const ACTIVATION_VARS: [&str; 4] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "SERVER_STARTER_PORT",
];

/// PATH when the launcher's environment has none (as `execvp` does).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command not found: {command} ({hint})")]
    NotFound { command: String, hint: &'static str },
    #[error("cannot execute {command}")]
    CannotExecute {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {command}: {step}")]
    Start {
        command: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SpawnError {
    /// Exit status of the launcher, as shells and `env` report these failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotFound { .. } => 127,
            Self::CannotExecute { .. } => 126,
            Self::Start { .. } => 1,
        }
    }
}

/// Finds `command` in `path` (a PATH value) the way `execvp` does; a command with a `/` is
/// used as it is. Done before anything is bound, so a typo fails fast.
pub fn resolve_program(command: &OsStr, path: Option<&OsStr>) -> Result<PathBuf, SpawnError> {
    let display = command.to_string_lossy().into_owned();
    if command.is_empty() {
        return Err(SpawnError::NotFound {
            command: display,
            hint: "empty command",
        });
    }
    if command.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(command));
    }
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    for dir in std::env::split_paths(path) {
        // An empty PATH entry means the current directory.
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(command);
        if candidate.is_file() && access(&candidate, AccessFlags::X_OK).is_ok() {
            return Ok(candidate);
        }
    }
    Err(SpawnError::NotFound {
        command: display,
        hint: "no executable file of that name in PATH",
    })
}

/// The child's environment: `inherited` without stale activation variables, plus
/// `LISTEN_FDS`, `LISTEN_FDNAMES` and `SERVER_STARTER_PORT` for `listeners` (address and
/// fd name each, on fds 3, 4, … in this order). `LISTEN_PID` is added by the child itself.
///
/// `SERVER_STARTER_PORT` has the form `start_server` gives it: `127.0.0.1:8080=3`, and
/// `[::1]:8080=3` for IPv6 (brackets, as `start_server` writes `[host]:port`), joined with
/// `;` for several (`127.0.0.1:80=3;127.0.0.1:8081=4`, as `start_server --port 80 --port
/// 8081` gives it). The port-only form (`8080=3`) that `start_server --port 8080` produces
/// is never used: the group always names its address. `LISTEN_FDNAMES` joins the names with
/// `:` (systemd's form).
pub fn child_env(
    inherited: impl IntoIterator<Item = (OsString, OsString)>,
    listeners: &[(SocketAddr, &str)],
) -> Vec<CString> {
    let mut env: Vec<CString> = inherited
        .into_iter()
        .filter(|(key, _)| !ACTIVATION_VARS.iter().any(|v| key == v))
        .filter_map(|(key, value)| {
            let mut entry = key.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            CString::new(entry).ok()
        })
        .collect();
    let names: Vec<&str> = listeners.iter().map(|(_, name)| *name).collect();
    let ports: Vec<String> = (LISTEN_FD..)
        .zip(listeners)
        .map(|(fd, (addr, _))| format!("{addr}={fd}"))
        .collect();
    for entry in [
        format!("LISTEN_FDS={}", listeners.len()),
        format!("LISTEN_FDNAMES={}", names.join(":")),
        format!("SERVER_STARTER_PORT={}", ports.join(";")),
    ] {
        env.push(CString::new(entry).expect("no NUL in activation variables"));
    }
    env
}

/// Everything `execve` needs, allocated before `fork`.
pub struct Plan {
    command: String,
    path: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The `envp` entry the child points at its `LISTEN_PID=…` buffer.
    pid_slot: usize,
    // NB: the pointers above point into these; moving a Vec does not move its buffer.
    _args: Vec<CString>,
    _env: Vec<CString>,
}

impl Plan {
    /// `program` as resolved by [`resolve_program`]; `args[0]` is the name the child sees.
    pub fn new(program: &Path, args: &[OsString], env: Vec<CString>) -> io::Result<Self> {
        let nul = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
        let path = CString::new(program.as_os_str().as_bytes()).map_err(nul)?;
        let args = args
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(nul)?;
        let mut argv: Vec<_> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<_> = env.iter().map(|e| e.as_ptr()).collect();
        let pid_slot = envp.len();
        envp.push(std::ptr::null());
        envp.push(std::ptr::null());
        Ok(Self {
            command: args
                .first()
                .map_or_else(String::new, |a| a.to_string_lossy().into_owned()),
            path,
            argv,
            envp,
            pid_slot,
            _args: args,
            _env: env,
        })
    }
}

/// Writes `LISTEN_PID=<pid>\0` into `buf` without allocating (the child calls it between
/// `fork` and `exec`).
fn format_listen_pid(pid: libc::pid_t, buf: &mut [u8; 32]) {
    const PREFIX: &[u8] = b"LISTEN_PID=";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = pid.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
}

/// What failed in the child before `exec`, as reported over the error pipe.
#[repr(u32)]
#[derive(Clone, Copy)]
enum Step {
    Setsid = 1,
    Pdeathsig = 2,
    ListenFds = 3,
    Exec = 4,
    /// The launcher closed the gate instead of releasing the child.
    Gate = 5,
}

impl Step {
    fn from_u32(n: u32) -> Option<Self> {
        [
            Self::Setsid,
            Self::Pdeathsig,
            Self::ListenFds,
            Self::Exec,
            Self::Gate,
        ]
        .into_iter()
        .find(|s| *s as u32 == n)
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Setsid => "setsid",
            Self::Pdeathsig => "prctl(PR_SET_PDEATHSIG)",
            Self::ListenFds => "placing the listeners on fds 3, 4, …",
            Self::Exec => "execve",
            Self::Gate => "waiting for the launcher",
        }
    }
}

/// A forked child that waits, before anything it does with the listener, until
/// [`Gated::release`] lets it execute the program: its pid is known before the program
/// runs (the launcher registers the listener with it). Dropped unreleased, the child exits
/// without running anything and is reaped.
pub struct Gated {
    pid: Pid,
    command: String,
    /// Writing one byte lets the child go on; closing it makes the child exit.
    gate: Option<OwnedFd>,
    /// The child's exec status: EOF once it executed the program, else errno and step.
    report: Option<OwnedFd>,
}

/// Forks the server's process, held at a gate: [`Gated::release`] executes `plan` with
/// `listeners` as fds 3, 4, … and returns once the child has executed the program (or
/// failed to).
///
/// The child:
/// - runs in its own session, so a terminal's Ctrl-C reaches only the launcher, which
///   forwards it once, instead of reaching both (the server would see it twice);
/// - gets SIGTERM if the launcher dies (`PR_SET_PDEATHSIG`): with the launcher gone its
///   socket is unregistered, and a server left behind would take connections nobody
///   steers;
/// - starts with default dispositions for the forwarded signals, SIGCHLD and SIGPIPE (Rust
///   ignores SIGPIPE, and an ignored signal stays ignored across `exec`) and an empty
///   signal mask.
///
/// NB: `PR_SET_PDEATHSIG` fires when the *thread* that forked exits: call this from the
/// thread that lives as long as the launcher.
pub fn spawn_gated(plan: &mut Plan, listeners: &[BorrowedFd<'_>]) -> Result<Gated, SpawnError> {
    let command = plan.command.clone();
    let start_error = |step, source| SpawnError::Start {
        command: command.clone(),
        step,
        source,
    };
    let (report_read, report_write) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| start_error("pipe", e.into()))?;
    let (gate_read, gate_write) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| start_error("pipe", e.into()))?;
    // The child overwrites fds 3.. with the listeners: everything it reads from, the
    // listeners' own copies included, must lie above them, so that no `dup2` clobbers a
    // descriptor a later one needs.
    let first_free = LISTEN_FD + RawFd::try_from(listeners.len()).expect("a few listeners");
    let above_listen_fds = |fd: BorrowedFd<'_>| {
        let dup = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(first_free))
            .map_err(|e| start_error("fcntl(F_DUPFD_CLOEXEC)", e.into()))?;
        // SAFETY: F_DUPFD_CLOEXEC just created this descriptor; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(dup) })
    };
    // The pipes' first descriptors close here: only the copies above the listeners remain.
    let lift = |fd: OwnedFd| above_listen_fds(fd.as_fd());
    let report_write = lift(report_write)?;
    let gate_read = lift(gate_read)?;
    let sources = listeners
        .iter()
        .map(|l| above_listen_fds(*l))
        .collect::<Result<Vec<OwnedFd>, _>>()?;
    let source_fds: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    let parent = getpid().as_raw();

    // Blocked across fork so that no handler of the launcher runs in the child; the child
    // resets dispositions before it unblocks.
    let mut old_mask = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )
    .map_err(|e| start_error("pthread_sigmask", e.into()))?;
    // SAFETY: the child branch calls only async-signal-safe functions and never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child; `plan` was fully built before fork.
        unsafe {
            exec_child(
                plan,
                &source_fds,
                report_write.as_raw_fd(),
                [gate_read.as_raw_fd(), gate_write.as_raw_fd()],
                parent,
            )
        }
    }
    let fork_error = io::Error::last_os_error();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None)
        .map_err(|e| start_error("pthread_sigmask", e.into()))?;
    if pid < 0 {
        return Err(start_error("fork", fork_error));
    }
    let pid = Pid::from_raw(pid);
    drop(report_write);
    drop(gate_read);
    drop(sources);
    Ok(Gated {
        pid,
        command,
        gate: Some(gate_write),
        report: Some(report_read),
    })
}

impl Gated {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Lets the child go on; returns once it has executed the program (or failed to).
    pub fn release(mut self) -> Result<Pid, SpawnError> {
        let gate = self.gate.take().expect("released once");
        let report_read = self.report.take().expect("released once");
        // If this fails, the child reads EOF once `gate` closes and reports Step::Gate.
        let _ = nix::unistd::write(&gate, &[1]);
        drop(gate);
        exec_status(self.pid, &self.command, report_read)
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            // Closed unreleased: the child exits without running anything.
            drop(gate);
            let _ = waitpid(self.pid, None);
        }
    }
}

/// Reads the exec status the child reports (EOF: it executed the program).
fn exec_status(pid: Pid, command: &str, report_read: OwnedFd) -> Result<Pid, SpawnError> {
    let command = command.to_owned();
    let start_error = |step, source| SpawnError::Start {
        command: command.clone(),
        step,
        source,
    };
    // EOF: the exec succeeded (the pipe is close-on-exec). 8 bytes: errno and step.
    // NB: blocks the runtime until the child has called execve: a few milliseconds.
    let mut report = Vec::new();
    let read = std::fs::File::from(report_read).read_to_end(&mut report);
    if read.is_ok() && report.is_empty() {
        return Ok(pid);
    }
    // The child exits at once after reporting; reap it so it does not linger as a zombie.
    let _ = waitpid(pid, None);
    if let Err(e) = read {
        return Err(start_error("reading the exec status", e));
    }
    let (Ok(errno), Ok(step)) = (
        report
            .get(..4)
            .unwrap_or_default()
            .try_into()
            .map(i32::from_ne_bytes),
        report
            .get(4..8)
            .unwrap_or_default()
            .try_into()
            .map(u32::from_ne_bytes),
    ) else {
        return Err(start_error(
            "reading the exec status",
            io::ErrorKind::InvalidData.into(),
        ));
    };
    let source = io::Error::from_raw_os_error(errno);
    Err(match Step::from_u32(step) {
        Some(Step::Exec) if errno == libc::ENOENT => SpawnError::NotFound {
            command: command.clone(),
            hint: "no such file, or its #! interpreter is missing",
        },
        Some(Step::Exec) => SpawnError::CannotExecute {
            command: command.clone(),
            source,
        },
        Some(step) => start_error(step.describe(), source),
        None => start_error("unknown step", source),
    })
}

/// The forked child. Only async-signal-safe calls: no allocation, no locks, no panics.
unsafe fn exec_child(
    plan: &mut Plan,
    listeners: &[RawFd],
    report: RawFd,
    [gate, gate_write]: [RawFd; 2],
    parent: libc::pid_t,
) -> ! {
    unsafe fn fail(report: RawFd, step: Step) -> ! {
        // SAFETY: plain syscalls on an owned descriptor and a stack buffer.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&errno.to_ne_bytes());
            msg[4..].copy_from_slice(&(step as u32).to_ne_bytes());
            libc::write(report, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    }

    // SAFETY: async-signal-safe syscalls on descriptors and memory this process owns.
    unsafe {
        if libc::setsid() < 0 {
            fail(report, Step::Setsid);
        }
        for sig in FORWARDED_SIGNALS
            .iter()
            .chain(&[Signal::SIGCHLD, Signal::SIGPIPE])
        {
            libc::signal(*sig as libc::c_int, libc::SIG_DFL);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) < 0 {
            fail(report, Step::Pdeathsig);
        }
        // The launcher died before prctl took effect: do what the signal would have done.
        if libc::getppid() != parent {
            libc::_exit(128 + libc::SIGTERM);
        }
        // Held until the launcher says go (see `Gated`). NB: our copy of the write end must
        // go first, or the launcher closing its own would never read as EOF here.
        libc::close(gate_write);
        let mut go = 0u8;
        loop {
            let n = libc::read(gate, (&raw mut go).cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            fail(report, Step::Gate);
        }
        libc::close(gate);
        // Every source lies above the targets (see `spawn_gated`); dup2 clears close-on-exec
        // on the copy.
        for (target, &listener) in (LISTEN_FD..).zip(listeners) {
            if libc::dup2(listener, target) < 0 {
                fail(report, Step::ListenFds);
            }
        }
        let mut pid_entry = [0u8; 32];
        format_listen_pid(libc::getpid(), &mut pid_entry);
        // SAFETY (of the unchecked index): Plan::new reserved `pid_slot` inside `envp`.
        *plan.envp.get_unchecked_mut(plan.pid_slot) = pid_entry.as_ptr().cast();
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(report, Step::Exec)
    }
}

#[cfg(test)]
mod tests {
    use std::{ffi::CStr, os::fd::AsFd as _};

    use super::*;

    /// A gated child runs nothing until released, and nothing at all if dropped.
    #[test]
    fn gated_child_runs_only_once_released() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plan_for = |marker: &Path| {
            let script = format!("echo $$ > {}", marker.display());
            let args = ["sh", "-c", &script].map(OsString::from);
            Plan::new(Path::new("/bin/sh"), &args, Vec::new()).unwrap()
        };

        let dropped = dir.join("dropped");
        let mut plan = plan_for(&dropped);
        let gated = spawn_gated(&mut plan, &[listener.as_fd()]).expect("fork");
        drop(gated);
        assert!(
            !dropped.exists(),
            "a child whose gate was dropped must not run the program"
        );

        let released = dir.join("released");
        let mut plan = plan_for(&released);
        let gated = spawn_gated(&mut plan, &[listener.as_fd()]).expect("fork");
        let pid = gated.pid();
        assert_eq!(gated.release().expect("exec"), pid);
        let status = waitpid(pid, None).expect("wait");
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{status:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&released).unwrap().trim(),
            pid.to_string(),
            "the released child should run the program as the pid known before release"
        );
    }

    #[test]
    fn listen_pid_is_formatted_in_place() {
        for (pid, want) in [
            (1, "LISTEN_PID=1"),
            (4194304, "LISTEN_PID=4194304"),
            (0, "LISTEN_PID=0"),
        ] {
            let mut buf = [0xffu8; 32];
            format_listen_pid(pid, &mut buf);
            let got = CStr::from_bytes_until_nul(&buf).unwrap().to_str().unwrap();
            assert_eq!(got, want);
        }
        let mut buf = [0u8; 32];
        format_listen_pid(i32::MAX, &mut buf);
        assert_eq!(
            CStr::from_bytes_until_nul(&buf).unwrap().to_bytes(),
            b"LISTEN_PID=2147483647"
        );
    }

    #[test]
    fn env_replaces_stale_activation_variables() {
        let inherited = [
            ("PATH", "/bin"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDS", "9"),
            ("SERVER_STARTER_PORT", "x"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(inherited, &[("[::1]:8080".parse().unwrap(), "web")]);
        let env: Vec<&str> = env.iter().map(|e| e.to_str().unwrap()).collect();
        assert_eq!(
            env,
            [
                "PATH=/bin",
                "LISTEN_FDS=1",
                "LISTEN_FDNAMES=web",
                "SERVER_STARTER_PORT=[::1]:8080=3"
            ]
        );
        let env = child_env([], &[("127.0.0.1:80".parse().unwrap(), "reuseport")]);
        assert_eq!(
            env.last().unwrap().to_str().unwrap(),
            "SERVER_STARTER_PORT=127.0.0.1:80=3"
        );
        let two = [
            ("127.0.0.1:80".parse().unwrap(), "http"),
            ("[::1]:8081".parse().unwrap(), "admin"),
        ];
        let env = child_env([], &two);
        let env: Vec<&str> = env.iter().map(|e| e.to_str().unwrap()).collect();
        assert_eq!(
            env,
            [
                "LISTEN_FDS=2",
                "LISTEN_FDNAMES=http:admin",
                "SERVER_STARTER_PORT=127.0.0.1:80=3;[::1]:8081=4"
            ],
            "Server::Starter's multi-port form and systemd's name list"
        );
    }

    #[test]
    fn programs_are_found_like_execvp() {
        let sh = resolve_program(OsStr::new("sh"), Some(OsStr::new("/nonexistent:/bin"))).unwrap();
        assert_eq!(sh, PathBuf::from("/bin/sh"));
        assert_eq!(
            resolve_program(OsStr::new("./x"), Some(OsStr::new(""))).unwrap(),
            PathBuf::from("./x")
        );
        let err = resolve_program(OsStr::new("no-such-command-here"), Some(OsStr::new("/bin")))
            .unwrap_err();
        assert_eq!(err.exit_code(), 127);
        assert!(
            err.to_string().contains("not found: no-such-command-here"),
            "{err}"
        );
    }
}
