//! `reuseportctl register --pid`: adopting a running server that binds its own SO_REUSEPORT
//! sockets (nginx with `listen … reuseport`, a Go server in a `--net=host` container). It
//! takes the process's listening sockets with `pidfd_getfd`, registers each for that process
//! (`server_pid`), closes its own copies at once (the sockets stay the server's: when it
//! closes them, they really close), and holds the registrations until the process exits,
//! watched through a pidfd. Without `--wait` a detached copy of itself does the holding and
//! the command returns once everything is registered.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::PathBuf,
    process::{ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use clap::Args;
use nix::sys::socket::{SockType, getsockopt, sockopt};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use super::{GlobalOpts, args::parse_name, launch::note, listeners::Registrations};
use reuseport_client::{
    self as client, RegisterOptions,
    proto::{GroupAddr, Register},
};

/// Adopt a running server's listening SO_REUSEPORT sockets into a generation.
#[derive(Debug, Args)]
#[command(
    long_about = "Adopt a running server's listening SO_REUSEPORT sockets into a \
        generation, for servers that bind their own sockets (nginx with `listen … \
        reuseport`, a server in a container on the host's network).\n\n\
        The sockets are taken from process PID with pidfd_getfd (Linux 5.6+; root or PID's \
        owner, as for ptrace), registered as generation GEN with PID as their server (one \
        registration per socket, each in the group of its address), and the copies taken \
        are closed at once. The registrations last while PID runs: a detached `reuseportctl \
        register … --wait` holds them and ends when PID exits; with --wait this command \
        holds them itself, in the foreground, and SIGTERM or SIGINT ends them.\n\n\
        nginx with reuseport opens one socket per worker and address: register each worker \
        (its pid from `ps --ppid MASTER`) with --all-listeners.",
    after_long_help = "Example, nginx v2 started next to v1 on the same port (both with \
        `listen 80 reuseport`):\n\
        \x20 for w in $(pgrep -P $(cat /run/nginx-v1.pid)); do reuseportctl register --pid $w --all-listeners -g 1 --activate; done\n\
        \x20 for w in $(pgrep -P $(cat /run/nginx-v2.pid)); do reuseportctl register --pid $w --all-listeners -g 2; done\n\
        \x20 reuseportctl activate 0.0.0.0:80 2\n\
        \x20 nginx -c /etc/nginx/v1.conf -s quit"
)]
pub struct RegisterArgs {
    /// The process whose sockets to register.
    #[arg(long, value_name = "PID")]
    pub pid: i32,
    /// The socket's descriptor number in PID.
    #[arg(long, value_name = "N", required_unless_present = "all_listeners")]
    pub fd: Option<RawFd>,
    /// Every listening TCP socket of PID that has SO_REUSEPORT set; if PID watches some of
    /// them with epoll, only those (an nginx worker holds every worker's socket and watches
    /// its own).
    #[arg(long, conflicts_with = "fd")]
    pub all_listeners: bool,
    /// The generation the sockets join.
    #[arg(long, short = 'g', value_name = "N")]
    pub generation: u32,
    /// Make the generation active once its sockets are registered (the active one drains).
    #[arg(long)]
    pub activate: bool,
    /// Name of the generation, shown by `status`.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// Hold the registrations in the foreground until PID exits (or SIGTERM/SIGINT).
    #[arg(long)]
    pub wait: bool,
    /// Print each registered group as a JSON object on a line of its own
    /// (`{"group", "generation", "state", "pid"}`) instead of a sentence.
    #[arg(long)]
    pub json: bool,
    /// The detached holder: --wait, with stdout and stderr closed once registered.
    #[arg(long, hide = true, requires = "wait")]
    pub detached: bool,
}

pub async fn run(global: &GlobalOpts, args: RegisterArgs) -> anyhow::Result<ExitCode> {
    if !args.wait {
        return detach();
    }
    let target = Target::open(args.pid)?;
    let sockets = target.listeners(args.fd)?;
    let mut regs = Vec::with_capacity(sockets.len());
    for s in &sockets {
        let opts = RegisterOptions {
            control: global.control.clone(),
            request: Register {
                name: args.name.clone(),
                activate: args.activate,
                server_pid: Some(args.pid),
                ..Register::new(
                    GroupAddr {
                        addr: s.addr,
                        netns: Some(target.netns),
                    },
                    args.generation,
                )
            },
            reconnect: true,
        };
        let reg = client::register(s.socket.as_fd(), &opts)
            .await
            .with_context(|| {
                format!(
                    "cannot register fd {} of pid {} ({}) as generation {}",
                    s.fd, args.pid, s.addr, args.generation
                )
            })?;
        // After an agent restart, the socket is fetched from the server again.
        reg.follow_child(args.pid, s.fd);
        regs.push(reg);
    }
    let mut regs = Registrations::new(regs);
    // The server's sockets are its own again: no copy stays here.
    drop(sockets);
    let state = *regs.state().borrow();
    for group in regs.groups() {
        if args.json {
            let line = serde_json::json!({
                "group": group,
                "generation": args.generation,
                "state": state,
                "pid": args.pid,
            });
            println!("{line}");
        } else {
            println!(
                "{group}: generation {} ({state}) registered for pid {}",
                args.generation, args.pid
            );
        }
    }
    if args.detached {
        // The parent reads our stdout to its end, then returns.
        close_stdio()?;
    }
    hold(&target, &mut regs).await
}

/// Holds the registrations until the server exits, a signal ends this, or they all end.
async fn hold(target: &Target, regs: &mut Registrations) -> anyhow::Result<ExitCode> {
    let pidfd = target.pidfd.try_clone().context("cannot copy the pidfd")?;
    // SAFETY: the AsyncFd owns its copy of the pidfd, which stays open until it is dropped.
    let exited = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .context("cannot watch the pidfd")?;
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let pid = target.pid;
    loop {
        tokio::select! {
            // A pidfd turns readable when its process exits.
            _ = exited.readable() => return Ok(ExitCode::SUCCESS),
            _ = term.recv() => return Ok(ExitCode::SUCCESS),
            _ = int.recv() => return Ok(ExitCode::SUCCESS),
            (group, closed) = regs.closed() => {
                let why = closed.err().map(|e| format!(" ({e})")).unwrap_or_default();
                note(format_args!(
                    "warning: the registration of pid {pid}'s socket in {group} ended{why}"
                ));
            }
        }
    }
}

/// Starts this command again with `--wait --detached` in a session of its own, copies what
/// it prints until it has registered everything, and returns its failure if it failed.
fn detach() -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find reuseportctl's own executable")?;
    let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    argv.extend(["--wait".into(), "--detached".into()]);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&argv).stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .context("cannot start the detached holder of the registrations")?;
    let stdout = child.stdout.take().expect("piped");
    let mut out = std::io::stdout().lock();
    let mut registered = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the holder's output")?;
        let _ = writeln!(out, "{line}");
        registered = true;
    }
    if registered {
        // It printed what it registered and holds it now.
        return Ok(ExitCode::SUCCESS);
    }
    // It failed before registering anything; its error is on our stderr already.
    let status = child.wait().context("waiting for the holder")?;
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .filter(|c| *c != 0)
            .unwrap_or(1),
    ))
}

/// Points stdout and stderr at /dev/null.
fn close_stdio() -> anyhow::Result<()> {
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    for fd in [1, 2] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("redirecting stdio");
        }
    }
    Ok(())
}

/// The process whose sockets are adopted.
struct Target {
    pid: i32,
    pidfd: OwnedFd,
    /// Its network namespace (inode): the groups' namespace.
    netns: u64,
}

/// A listening socket taken from the target.
struct Taken {
    fd: RawFd,
    addr: SocketAddr,
    socket: OwnedFd,
}

impl Target {
    fn open(pid: i32) -> anyhow::Result<Self> {
        // SAFETY: pidfd_open with no flags; the descriptor is owned below.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            bail!("cannot open pid {pid}: {e} (is it running?)");
        }
        // SAFETY: pidfd_open returned a descriptor nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let owner = std::fs::metadata(&proc_dir)
            .with_context(|| format!("cannot read {}", proc_dir.display()))?
            .uid();
        let me = nix::unistd::geteuid().as_raw();
        if me != 0 && me != owner {
            bail!(
                "permission denied: taking the sockets of pid {pid} needs root or its owner \
                 (uid {owner}); you are uid {me}"
            );
        }
        let netns = std::fs::metadata(proc_dir.join("ns/net"))
            .with_context(|| format!("cannot read the network namespace of pid {pid}"))?
            .ino();
        Ok(Self { pid, pidfd, netns })
    }

    /// The socket at `fd`, or every listening SO_REUSEPORT TCP socket (each once, at its
    /// lowest descriptor) that the process serves: if it watches some of them with epoll,
    /// only those. NB: nginx workers inherit every worker's `reuseport` socket and each
    /// watches (and accepts on) only its own; the others belong to the other workers.
    fn listeners(&self, fd: Option<RawFd>) -> anyhow::Result<Vec<Taken>> {
        let pid = self.pid;
        if let Some(fd) = fd {
            let socket = self.take(fd)?;
            let addr = check_listener(&socket)
                .with_context(|| format!("fd {fd} of pid {pid} cannot be registered"))?;
            return Ok(vec![Taken { fd, addr, socket }]);
        }
        let dir = format!("/proc/{pid}/fd");
        let mut fds: Vec<RawFd> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list {dir}"))?
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        let mut seen = std::collections::HashSet::new();
        let mut taken = Vec::new();
        let mut candidates = Vec::new();
        for fd in fds {
            // Closed meanwhile: not a listener any more.
            let Ok(socket) = self.take(fd) else { continue };
            let Ok(addr) = check_listener(&socket) else {
                continue;
            };
            candidates.push(Taken { fd, addr, socket });
        }
        let watched = watched_fds(pid);
        if candidates.iter().any(|c| watched.contains(&c.fd)) {
            candidates.retain(|c| watched.contains(&c.fd));
        }
        for c in candidates {
            let ino = nix::sys::stat::fstat(c.socket.as_fd())
                .context("fstat of a taken socket")?
                .st_ino;
            if seen.insert(ino) {
                taken.push(c);
            }
        }
        if taken.is_empty() {
            bail!(
                "pid {pid} has no listening TCP socket with SO_REUSEPORT (nginx: `listen … \
                 reuseport`)"
            );
        }
        Ok(taken)
    }

    /// A copy of the target's descriptor `fd` (`pidfd_getfd`).
    fn take(&self, fd: RawFd) -> anyhow::Result<OwnedFd> {
        let pid = self.pid;
        // SAFETY: pidfd_getfd on a pidfd we own; the result is owned below.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), fd, 0) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                bail!(
                    "permission denied: pidfd_getfd of pid {pid}: run as root or as its owner \
                     (a ptrace restriction, kernel.yama.ptrace_scope, may forbid it too)"
                );
            }
            bail!("cannot take fd {fd} of pid {pid}: {e}");
        }
        // SAFETY: pidfd_getfd returned a new descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
    }
}

/// The descriptors `pid` watches with epoll: the `tfd:` lines of its epoll instances in
/// `/proc/PID/fdinfo`.
fn watched_fds(pid: i32) -> std::collections::HashSet<RawFd> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Default::default();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| {
                    l.strip_prefix("tfd:")?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .collect::<Vec<RawFd>>()
        })
        .collect()
}

/// The address of a listening TCP socket with SO_REUSEPORT, or what it lacks.
fn check_listener(socket: &OwnedFd) -> anyhow::Result<SocketAddr> {
    let kind = getsockopt(socket, sockopt::SockType).context("not a socket")?;
    anyhow::ensure!(kind == SockType::Stream, "not a TCP socket");
    anyhow::ensure!(
        getsockopt(socket, sockopt::AcceptConn).context("SO_ACCEPTCONN")?,
        "not listening"
    );
    let copy = socket.try_clone().context("dup of the socket")?;
    let addr = std::net::TcpListener::from(copy)
        .local_addr()
        .context("not a TCP/IP socket")?;
    anyhow::ensure!(
        getsockopt(socket, sockopt::ReusePort).context("SO_REUSEPORT")?,
        "{addr} has no SO_REUSEPORT (nginx: `listen … reuseport`)"
    );
    Ok(addr)
}
