//! An agent plus demo servers, run from xtask in private network and mount namespaces (see
//! [`namespaces`](crate::namespaces)): what the demo and the benchmarks stand on.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{namespaces, setup};

pub struct Stack {
    bin: PathBuf,
    pub control: PathBuf,
    pub bpffs: PathBuf,
    /// The control socket, the agent's log and the benchmarks' files; removed with the
    /// stack.
    tmp: tempfile::TempDir,
    agent_args: Vec<String>,
    agent: Mutex<Option<Child>>,
    servers: Mutex<Vec<Child>>,
}

impl Stack {
    /// Builds the release binaries, moves the calling thread into private namespaces and
    /// starts the agent.
    pub fn start(tag: &str) -> anyhow::Result<Self> {
        Self::start_in(tag, &build_release(tag)?)
    }

    /// Like [`Stack::start`], with binaries already built in `bin`.
    pub fn start_in(tag: &str, bin: &std::path::Path) -> anyhow::Result<Self> {
        Self::start_with(tag, bin, &[] as &[&str])
    }

    /// Like [`Stack::start_in`], with `agent_args` added to the agent's command line.
    pub fn start_with(
        tag: &str,
        bin: &std::path::Path,
        agent_args: &[impl AsRef<str>],
    ) -> anyhow::Result<Self> {
        namespaces::enter_private().context("entering private network and mount namespaces")?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("reuseport-{tag}-"))
            .tempdir()
            .context("creating the stack's temp dir")?;
        let stack = Self {
            bin: bin.to_owned(),
            control: tmp.path().join("agent.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf/reuseport"),
            tmp,
            agent_args: agent_args.iter().map(|a| a.as_ref().to_owned()).collect(),
            agent: Mutex::new(None),
            servers: Mutex::new(Vec::new()),
        };
        stack.spawn_agent()?;
        wait_for(
            Duration::from_secs(30),
            "the agent's control socket",
            || std::os::unix::net::UnixStream::connect(&stack.control).is_ok(),
        )?;
        Ok(stack)
    }

    fn spawn_agent(&self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())?;
        let agent =
            namespaces::die_with_parent(&mut Command::new(self.bin.join("reuseport-agent")))
                .arg("--control")
                .arg(&self.control)
                .arg("--bpffs")
                .arg(&self.bpffs)
                .args(&self.agent_args)
                .stderr(log)
                .spawn()
                .context("starting reuseport-agent")?;
        *self.agent.lock().expect("lock") = Some(agent);
        Ok(())
    }

    /// Stops the agent (SIGTERM: its pins stay) and starts a new one, which adopts the pinned
    /// groups before it answers. Returns when the new agent's control socket accepts.
    pub fn restart_agent(&self) -> anyhow::Result<()> {
        if let Some(mut a) = self.agent.lock().expect("lock").take() {
            terminate(&mut a);
        }
        // NB: the old agent removes its socket file on SIGTERM; a stale one would make the
        // wait below return at once.
        let _ = std::fs::remove_file(&self.control);
        self.spawn_agent()?;
        let until = Instant::now() + Duration::from_secs(600);
        while std::os::unix::net::UnixStream::connect(&self.control).is_err() {
            if Instant::now() > until {
                bail!("timed out waiting for the restarted agent's control socket");
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// The agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.lock().expect("lock").as_ref().map(Child::id)
    }

    pub fn ctl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("reuseportctl"));
        cmd.arg("--control").arg(&self.control);
        cmd
    }

    /// Runs `reuseportctl ARGS` and returns its stdout; fails with its stderr.
    pub fn ctl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctl().args(args).output()?;
        if !out.status.success() {
            bail!(
                "reuseportctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the demo server as `generation` of `addr` through `reuseportctl exec` and
    /// waits until the agent lists it. With `exit_on_drain`, the server gets SIGTERM when
    /// its generation drains (and exits); without, it keeps serving what it is given.
    pub fn start_generation(
        &self,
        addr: SocketAddr,
        generation: u32,
        exit_on_drain: bool,
    ) -> anyhow::Result<()> {
        let g = generation.to_string();
        let mut cmd = self.ctl();
        cmd.args(["exec", "--listen", &addr.to_string(), "--generation", &g])
            .args(["--name", &format!("demo-v{generation}")]);
        if exit_on_drain {
            cmd.args(["--on-drain", "TERM"]);
        }
        let child = cmd
            .arg("--")
            .arg(std::env::current_exe()?)
            .args(["demo-server", "--generation", &g])
            .stdout(Stdio::null())
            .spawn()
            .context("starting reuseportctl exec")?;
        self.servers.lock().expect("lock").push(child);
        wait_for(
            Duration::from_secs(30),
            &format!("generation {generation} to register"),
            || self.has_generation(addr, generation),
        )
    }

    /// Starts the demo server on a plain SO_REUSEPORT listener the agent knows nothing
    /// about: the baseline of the benchmarks.
    pub fn start_plain(&self, addr: SocketAddr, generation: u32) -> anyhow::Result<()> {
        self.start_plain_with(addr, generation, |_| Ok(()))
    }

    /// Like [`Stack::start_plain`]; `prepare` gets the listener (bound and listening)
    /// before the server starts, e.g. to attach a program to its group.
    pub fn start_plain_with(
        &self,
        addr: SocketAddr,
        generation: u32,
        prepare: impl FnOnce(RawFd) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let child = spawn_plain_with(addr, generation, false, prepare)?;
        self.servers.lock().expect("lock").push(child);
        Ok(())
    }

    pub fn has_generation(&self, addr: SocketAddr, generation: u32) -> bool {
        self.status().is_some_and(|v| {
            v.as_array().into_iter().flatten().any(|g| {
                g["group"].as_str() == Some(&format!("tcp://{addr}"))
                    && g["generations"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|x| x["generation"] == generation)
            })
        })
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.ctl().args(["status", "--json"]).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The pinned program of the group on `addr` (for its run statistics).
    pub fn pinned_program(&self, addr: SocketAddr) -> anyhow::Result<PathBuf> {
        let port = format!("_{}_", addr.port());
        for e in std::fs::read_dir(&self.bpffs)? {
            let dir = e?.path();
            if dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(&port))
            {
                for p in std::fs::read_dir(&dir)? {
                    let p = p?.path();
                    if p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("select"))
                    {
                        return Ok(p);
                    }
                }
            }
        }
        bail!(
            "no pinned program for {addr} under {}",
            self.bpffs.display()
        )
    }

    /// The stack's temp dir (removed with the stack).
    pub fn tmp(&self) -> &std::path::Path {
        self.tmp.path()
    }

    pub fn agent_log(&self) -> PathBuf {
        self.tmp().join("agent.log")
    }

    pub fn stop(&self) {
        for mut s in self.servers.lock().expect("lock").drain(..) {
            terminate(&mut s);
        }
        if let Some(mut a) = self.agent.lock().expect("lock").take() {
            terminate(&mut a);
        }
        // NB: the bpffs goes with the mount namespace, the temp dir with the stack.
    }
}

/// Checks for root, sets up, builds the release agent and CLI; returns their directory.
pub fn build_release(tag: &str) -> anyhow::Result<PathBuf> {
    if !crate::is_root() {
        bail!("cargo xtask {tag} needs root (it loads BPF programs): run it in a root shell");
    }
    setup::setup()?;
    let root = crate::workspace();
    println!("{tag}: building reuseport-agent and reuseportctl (release)…");
    setup::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release"])
            .args(crate::BINARY_PACKAGES),
    )?;
    Ok(root.join("target/release"))
}

/// The demo server on a new plain SO_REUSEPORT listener of its own in `addr`'s group; the
/// listener exists (and is in the group) before the server runs.
pub fn spawn_plain(addr: SocketAddr, generation: u32, http: bool) -> anyhow::Result<Child> {
    spawn_plain_with(addr, generation, http, |_| Ok(()))
}

/// [`spawn_plain`], with `prepare` called on the listening socket before the server starts.
pub fn spawn_plain_with(
    addr: SocketAddr,
    generation: u32,
    http: bool,
    prepare: impl FnOnce(RawFd) -> anyhow::Result<()>,
) -> anyhow::Result<Child> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    let fd = socket.as_raw_fd();
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd, 4096) } < 0 {
        bail!("listen {addr}: {}", std::io::Error::last_os_error());
    }
    prepare(fd)?;
    let mut cmd = Command::new("/bin/sh");
    // NB: LISTEN_PID must be the server's own pid: `exec` keeps the shell's.
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(std::env::current_exe()?)
        .args(["demo-server", "--generation", &generation.to_string()])
        .env("LISTEN_FDS", "1")
        .stdout(Stdio::null());
    if http {
        cmd.arg("--http");
    }
    // SAFETY: dup2 and fcntl are async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // NB: dup2(3, 3) would keep FD_CLOEXEC: the listener may well be fd 3 already.
            let res = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if res < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // NB: our copy of the listener closes when `socket` drops: from then on only the
    // server holds it, and its close resets what is queued in it.
    cmd.spawn().context("starting the plain server")
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

pub fn wait_for(
    limit: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    while !ready() {
        if Instant::now() > until {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A control connection to the agent, on the protocol crate's blocking framing.
pub type Control = reuseport_proto::frame::blocking::Conn;

/// One request over an open control connection and its answer.
pub fn control_request(
    control: &mut Control,
    request: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    control
        .round_trip(request, None)?
        .context("the agent closed the control connection without answering")
}
