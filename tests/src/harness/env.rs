//! [`TestEnv`]: one network namespace, one mount namespace with its own bpffs, one temp dir
//! and one agent per test.

use std::{
    future::Future,
    io,
    net::TcpListener,
    os::fd::AsFd,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use reuseport_client::{self as client, ClientError, ControlClient, RegisterOptions, Registration};
use reuseport_proto::{ErrorKind, GroupAddr, GroupStatus, Register};

use super::{Server, ServerKind, group, local, namespaces::enter_private_namespaces};

/// Where each test's agent pins its groups: the agent's default directory, in the test's own
/// bpffs (see [`enter_private_namespaces`]).
const AGENT_BPFFS_DIR: &str = "/sys/fs/bpf/reuseport";

/// How long the agent may take to accept connections on its control socket (stretched in a
/// VM guest, where loading one program took 9 s on 6.1 under TCG: an agent that restarts
/// reloads the program of every group whose pinned program is not its own).
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the agent may take to exit after SIGTERM before it gets SIGKILL.
const AGENT_EXIT_TIMEOUT: Duration = Duration::from_secs(3);

/// Lines of the agent's log printed when a test fails.
const LOG_TAIL_LINES: usize = 200;

/// Held by every live [`TestEnv`]: tests run one at a time even if someone forgets
/// `--test-threads=1` (see the crate doc for why they must).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Held by tests that run without a [`TestEnv`] (it takes it itself), so that they too run
/// one at a time.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A test that panicked poisons the lock; its Drop has cleaned up all the same.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's mode for groups with migration at close (Linux 5.14+).
pub const SELECT_OR_MIGRATE: &str = "select-or-migrate";
/// The agent's mode for groups without it (4.19–5.13, or forced).
pub const SELECT_ONLY: &str = "select-only";

/// True when the agent is asked to run in select-only mode (`REUSEPORT_SELECT_ONLY=1`, which
/// the agent reads itself: the variable is inherited).
pub fn select_only_env() -> bool {
    std::env::var("REUSEPORT_SELECT_ONLY").is_ok_and(|v| v == "1")
}

/// The mode every group must run in here: `REUSEPORT_EXPECT_MODE` (`cargo xtask test` sets it
/// for every column of the matrix from the kernel version and the column's options), else
/// select-only when forced with `REUSEPORT_SELECT_ONLY=1`, else select-or-migrate. Every
/// status the harness reads is checked against it, so an agent that quietly fell back to
/// select-only fails the run instead of turning the migration tests into skips.
pub fn expected_mode() -> &'static str {
    match std::env::var("REUSEPORT_EXPECT_MODE").as_deref() {
        Ok(SELECT_ONLY) => SELECT_ONLY,
        Ok(SELECT_OR_MIGRATE) => SELECT_OR_MIGRATE,
        Ok(other) => {
            panic!("REUSEPORT_EXPECT_MODE={other:?}: expected {SELECT_OR_MIGRATE} or {SELECT_ONLY}")
        }
        Err(_) if select_only_env() => SELECT_ONLY,
        Err(_) => SELECT_OR_MIGRATE,
    }
}

/// True when this column expects migration of queued connections at close.
pub fn expects_migration() -> bool {
    expected_mode() == SELECT_OR_MIGRATE
}

/// How much slower than the host everything runs in a VM guest (TCG, one vCPU): what the
/// agent's start-up measured (a program load took 9 s on 6.1 against 50 ms here, but most
/// waits are dominated by scheduling, not verification).
const VM_SLOWDOWN: u32 = 6;

/// A bound that holds on the host, stretched for the VM guests (see [`VM_SLOWDOWN`]).
/// NB: for waits only (how long something may take before the test gives up); never for
/// bounds that classify a request as failed.
pub fn patience(host: Duration) -> Duration {
    if in_vm() { host * VM_SLOWDOWN } else { host }
}

/// True inside the VM runner's QEMU guests (`REUSEPORT_VM=1`, set by the guest's init):
/// everything there is emulated (TCG, one vCPU), 5-10x slower than on the host, so tests
/// scale their load down with [`load_size`](super::load_size).
pub fn in_vm() -> bool {
    std::env::var("REUSEPORT_VM").is_ok_and(|v| v == "1")
}

/// Path of a binary under test: `$REUSEPORT_BIN_DIR/NAME`, or `target/<profile>/NAME` found
/// from the test executable (`target/<profile>/deps/reuseport_tests-…`).
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("REUSEPORT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe
                .parent()
                .expect("test executable has a parent directory");
            deps.parent().unwrap_or(deps).to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: build them first: cargo build -p reuseport-agent \
         (or set REUSEPORT_BIN_DIR to the directory holding reuseport-agent and reuseportctl)",
        path.display()
    );
    path
}

/// An isolated world for one test: fresh network and mount namespaces (entered by the calling
/// thread; threads, runtimes and processes created afterwards inherit them, see
/// [`enter_private_namespaces`]) with `lo` up and a bpffs of their own at `/sys/fs/bpf`, a temp
/// dir holding the control socket and the agent's log, and a running agent.
///
/// Create it first in every test, so that it is dropped last. On drop the agent is stopped,
/// its log is printed if the test is failing, and the temp dir is removed; the bpffs goes
/// with the mount namespace when its last process exits.
pub struct TestEnv {
    name: &'static str,
    dir: tempfile::TempDir,
    control: PathBuf,
    bpffs: PathBuf,
    log: PathBuf,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    agent: Option<Child>,
    rt: tokio::runtime::Runtime,
    // NB: last, so it is released after everything else was dropped.
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl TestEnv {
    pub fn new(name: &'static str) -> Self {
        Self::with_agent(name, &[], &[])
    }

    /// Like [`new`](Self::new), with extra command-line arguments and environment variables
    /// for the agent (e.g. the hidden `--no-wake-ups`).
    pub fn with_agent(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "{name}: the integration tests need root (network namespaces, bpffs, BPF programs)"
        );
        let one_at_a_time = one_at_a_time();
        enter_private_namespaces()
            .unwrap_or_else(|e| panic!("{name}: entering private namespaces: {e}"));

        // NB: the control socket's path must fit in sun_path (108 bytes): the name is cut.
        let short: String = name.chars().take(40).collect();
        // NB: 0755 as a directory made by hand would be: the tests of non-root users reach the
        // control socket and the binaries copied here (tempfile's default is 0700).
        let dir = tempfile::Builder::new()
            .prefix(&format!("reuseport-test-{short}-"))
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir()
            .expect("create the test's temp dir");
        let control = dir.path().join("agent.sock");
        let log = dir.path().join("agent.log");
        let bpffs = PathBuf::from(AGENT_BPFFS_DIR);

        // NB: created after unshare, so its worker threads live in the test's namespace.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");

        let mut env = Self {
            name,
            dir,
            control,
            bpffs,
            log,
            agent_args: args.iter().map(|a| a.to_string()).collect(),
            agent_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent: None,
            rt,
            _one_at_a_time: one_at_a_time,
        };
        env.start_agent();
        env
    }

    fn start_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the agent log");
        let mut agent = Command::new(bin_path("reuseport-agent"));
        // NB: a test process that is killed must not leave its agent running: SIGKILL when
        // the test's thread (the one that spawns it) exits.
        // SAFETY: prctl is async-signal-safe; runs in the child between fork and exec.
        unsafe {
            agent.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
            });
        }
        let agent = agent
            .arg("--control")
            .arg(&self.control)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(&self.agent_args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup agent log"))
            .stderr(log)
            .spawn()
            .expect("spawn reuseport-agent");
        self.agent = Some(agent);

        let ready_timeout = patience(AGENT_READY_TIMEOUT);
        let deadline = Instant::now() + ready_timeout;
        loop {
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                panic!(
                    "{}: reuseport-agent exited before it was ready ({status})",
                    self.name
                );
            }
            match std::os::unix::net::UnixStream::connect(&self.control) {
                // NB: the socket accepts as soon as it is bound, at mode 0600; its final
                // mode (0660, and the control group) follows. A test that changes the mode
                // before that would see the agent's chmod undo its own.
                Ok(_) if final_mode(&self.control) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => panic!(
                    "{}: connecting to {}: {e}",
                    self.name,
                    self.control.display()
                ),
            }
            assert!(
                Instant::now() < deadline,
                "{}: reuseport-agent did not accept on {} within {ready_timeout:?}",
                self.name,
                self.control.display(),
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The test's temp dir (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn control_path(&self) -> &Path {
        &self.control
    }

    pub fn bpffs_path(&self) -> &Path {
        &self.bpffs
    }

    pub fn rt(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Everything the agent wrote so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no agent log: {e})"))
    }

    /// `kill -9` of the agent, and waits until it is gone. Its pins, programs and control
    /// socket file stay behind, as after a crash.
    pub fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("agent running");
        agent.kill().expect("SIGKILL the agent");
        agent.wait().expect("reap the agent");
    }

    /// Waits until the agent killed itself at a fault-injection point (`REUSEPORT_FAULT_AT`),
    /// and reaps it; panics if it exits any other way or is still running after `timeout`.
    pub fn wait_agent_killed_by_fault(&mut self, timeout: Duration) {
        use std::os::unix::process::ExitStatusExt as _;
        let agent = self.agent.as_mut().expect("agent running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = agent.try_wait().expect("wait for the agent") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the agent should have killed itself at its fault-injection point within \
                 {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        self.agent = None;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{}: the agent should die of SIGKILL at its fault-injection point, got {status}",
            self.name
        );
        assert!(
            self.agent_log()
                .contains("fault injection: the agent kills itself here"),
            "{}: the agent should log the fault it injects (a build without the \
             fault-injection feature refuses REUSEPORT_FAULT_AT)",
            self.name
        );
    }

    /// Starts the agent again on the same control socket and bpffs dir (after
    /// [`kill_agent`](Self::kill_agent)), with `env` replacing the extra environment.
    pub fn restart_agent(&mut self, env: &[(&str, &str)]) {
        assert!(
            self.agent.is_none(),
            "{}: the agent is still running",
            self.name
        );
        self.agent_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // NB: appends: the log of the killed agent stays readable above.
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("agent log");
        use std::io::Write as _;
        let _ = writeln!(log, "--- {}: agent restarted ---", self.name);
        self.start_agent();
    }

    /// Waits until the agent knows sockets again and every one of them has its registration
    /// back (after a [`restart_agent`](Self::restart_agent), clients reconnect on their own).
    /// NB: at least one socket: an agent that adopted nothing must not pass for one whose
    /// clients all came back.
    pub fn wait_all_registered(&self, timeout: Duration) {
        super::wait_until(
            "the agent adopted sockets and every one is registered again",
            timeout,
            || {
                let statuses = self.statuses();
                let mut sockets = statuses
                    .iter()
                    .flat_map(|g| &g.generations)
                    .flat_map(|g| &g.sockets)
                    .peekable();
                sockets.peek().is_some() && sockets.all(|s| s.registered)
            },
        );
    }

    /// PID of the agent process.
    pub fn agent_pid(&self) -> Pid {
        Pid::from_raw(self.agent.as_ref().expect("agent running").id() as i32)
    }

    /// A new control connection.
    pub fn control(&self) -> ControlClient {
        self.block_on(ControlClient::connect(&self.control))
            .expect("connect to the agent")
    }

    /// Status of every group the agent manages.
    pub fn statuses(&self) -> Vec<GroupStatus> {
        self.block_on(async {
            let mut c = ControlClient::connect(&self.control)
                .await
                .expect("connect to the agent");
            c.status(None).await
        })
        .unwrap_or_else(|e| panic!("{}: status of all groups failed: {e}", self.name))
        .into_iter()
        .map(|g| self.checked(g))
        .collect()
    }

    /// `status` after checking that the group runs in the mode this column expects (see
    /// [`expected_mode`]).
    pub fn checked(&self, status: GroupStatus) -> GroupStatus {
        assert_eq!(
            status.mode,
            expected_mode(),
            "{}: the agent runs {} in {} mode, but this kernel and column expect {} \
             (REUSEPORT_EXPECT_MODE, REUSEPORT_SELECT_ONLY): {status:?}",
            self.name,
            status.group,
            status.mode,
            expected_mode()
        );
        status
    }

    /// Status of the group `group` (any address family; `@NETNS` when ambiguous).
    pub fn status_of(&self, group: GroupAddr) -> GroupStatus {
        let groups = self
            .block_on(async {
                let mut c = ControlClient::connect(&self.control)
                    .await
                    .expect("connect to the agent");
                c.status(Some(group)).await
            })
            .unwrap_or_else(|e| panic!("{}: status of {group} failed: {e}", self.name));
        let status = groups
            .into_iter()
            .find(|g| g.group.addr == group.addr)
            .unwrap_or_else(|| panic!("{}: agent reports no group {group}", self.name));
        self.checked(status)
    }

    /// `activate GROUP gen` through the client library; the agent's refusal as an error.
    pub fn try_activate_group(
        &self,
        group: GroupAddr,
        generation: u32,
    ) -> Result<GroupStatus, ClientError> {
        self.block_on(async {
            let mut c = ControlClient::connect(&self.control)
                .await
                .expect("connect to the agent");
            c.activate(group, generation).await
        })
        .map(|g| self.checked(g))
    }

    /// `activate GROUP gen` through the client library.
    pub fn activate_group(&self, group: GroupAddr, generation: u32) -> GroupStatus {
        self.try_activate_group(group, generation)
            .unwrap_or_else(|e| panic!("{}: activate {group} {generation}: {e}", self.name))
    }

    /// Status of the group on `127.0.0.1:port`.
    pub fn status(&self, port: u16) -> GroupStatus {
        self.try_status(port)
            .unwrap_or_else(|| panic!("{}: agent reports no group on 127.0.0.1:{port}", self.name))
    }

    /// Status of the group on `127.0.0.1:port`, if the agent knows it.
    pub fn try_status(&self, port: u16) -> Option<GroupStatus> {
        let groups = self.block_on(async {
            let mut c = ControlClient::connect(&self.control)
                .await
                .expect("connect to the agent");
            c.status(Some(group(port))).await
        });
        match groups {
            Ok(groups) => groups
                .into_iter()
                .find(|g| g.group.addr == local(port))
                .map(|g| self.checked(g)),
            Err(e) if e.agent_kind() == Some(ErrorKind::UnknownGroup) => None,
            Err(e) => panic!("{}: status of 127.0.0.1:{port} failed: {e}", self.name),
        }
    }

    /// `activate port gen` through the client library.
    pub fn activate(&self, port: u16, generation: u32) -> GroupStatus {
        self.activate_group(group(port), generation)
    }

    pub fn register_options(&self, port: u16, generation: u32, activate: bool) -> RegisterOptions {
        self.register_options_for(group(port), generation, activate)
    }

    pub fn register_options_for(
        &self,
        group: GroupAddr,
        generation: u32,
        activate: bool,
    ) -> RegisterOptions {
        RegisterOptions {
            control: self.control.clone(),
            request: Register {
                name: Some(format!("gen{generation}")),
                activate,
                ..Register::new(group, generation)
            },
            reconnect: true,
        }
    }

    /// Registers `listener` (bound to `127.0.0.1:port`) as `generation`.
    pub fn register(
        &self,
        listener: &TcpListener,
        port: u16,
        generation: u32,
        activate: bool,
    ) -> Registration {
        let opts = self.register_options(port, generation, activate);
        self.block_on(client::register(listener.as_fd(), &opts))
            .unwrap_or_else(|e| {
                panic!(
                    "{}: register generation {generation} on port {port}: {e}",
                    self.name
                )
            })
    }

    /// Registers `listener` (bound to `group`'s address, in any namespace) as `generation`.
    pub fn register_to(
        &self,
        listener: &TcpListener,
        group: GroupAddr,
        generation: u32,
        activate: bool,
    ) -> Registration {
        let opts = self.register_options_for(group, generation, activate);
        self.block_on(client::register(listener.as_fd(), &opts))
            .unwrap_or_else(|e| {
                panic!(
                    "{}: register generation {generation} in {group}: {e}",
                    self.name
                )
            })
    }

    /// Registers `listener` as `generation` of `group` and serves it with a server of `kind`.
    pub fn serve_listener(
        &self,
        listener: TcpListener,
        group: GroupAddr,
        generation: u32,
        kind: ServerKind,
        activate: bool,
    ) -> Generation {
        let registration = self.register_to(&listener, group, generation, activate);
        let server = Server::start(kind, listener, generation, self.rt.handle());
        Generation {
            generation,
            server,
            registration,
        }
    }

    /// A listening SO_REUSEPORT socket on `127.0.0.1:port` from the client library (non-blocking).
    pub fn listen(&self, port: u16) -> TcpListener {
        client::reuseport_listener(local(port))
            .unwrap_or_else(|e| panic!("{}: listen on 127.0.0.1:{port}: {e}", self.name))
    }

    /// A registered generation with a running server of `kind`.
    pub fn serve(
        &self,
        port: u16,
        generation: u32,
        kind: ServerKind,
        activate: bool,
    ) -> Generation {
        self.serve_listener(self.listen(port), group(port), generation, kind, activate)
    }

    /// Runs `reuseportctl --control <this agent> ARGS…`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.ctl_command();
        cmd.args(args);
        cmd.output().expect("run reuseportctl")
    }

    /// `reuseportctl --control <this agent>`, ready for more arguments.
    pub fn ctl_command(&self) -> Command {
        let mut cmd = Command::new(bin_path("reuseportctl"));
        cmd.arg("--control").arg(&self.control).stdin(Stdio::null());
        cmd
    }
}

impl TestEnv {
    /// Stops the agent with SIGTERM (SIGKILL after [`AGENT_EXIT_TIMEOUT`]); what went wrong
    /// with it during the test, if anything: it died before, ignored SIGTERM, exited with a
    /// failure, or panicked on a thread (which a daemon may survive).
    fn stop_agent(&mut self) -> Option<String> {
        let mut problems = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            if let Ok(Some(status)) = agent.try_wait() {
                problems.push(format!("the agent died during the test ({status})"));
            } else {
                let _ = kill(Pid::from_raw(agent.id() as i32), Signal::SIGTERM);
                let timeout = patience(AGENT_EXIT_TIMEOUT);
                let deadline = Instant::now() + timeout;
                loop {
                    match agent.try_wait() {
                        Ok(Some(status)) if status.success() => break,
                        Ok(Some(status)) => {
                            problems.push(format!("the agent exited with {status} on SIGTERM"));
                            break;
                        }
                        Err(e) => {
                            problems.push(format!("waiting for the agent: {e}"));
                            break;
                        }
                        Ok(None) if Instant::now() >= deadline => {
                            problems.push(format!("the agent ignored SIGTERM for {timeout:?}"));
                            let _ = agent.kill();
                            let _ = agent.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }
        }
        // NB: only the last agent's part of the log: a test may make an agent panic on
        // purpose (fault injection), and then restart it.
        let log = self.agent_log();
        let restart = format!("--- {}: agent restarted ---", self.name);
        let last_run = log
            .rsplit_once(&restart)
            .map_or(log.as_str(), |(_, last)| last);
        if last_run.contains(" panicked at ") {
            problems.push("the agent panicked (see its log)".into());
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let problem = self.stop_agent();
        let failing = std::thread::panicking();
        if failing || problem.is_some() {
            // NB: the agent's own log (a verifier log can be huge): only its end.
            eprintln!(
                "--- {}: agent log ---\n{}",
                self.name,
                tail(&self.agent_log(), LOG_TAIL_LINES)
            );
        }
        // NB: now, before a panic below: the agent is gone, nothing writes here any more.
        let _ = std::fs::remove_dir_all(self.dir.path());
        if let Some(problem) = problem
            && !failing
        {
            panic!("{}: {problem}", self.name);
        }
    }
}

/// One registered generation: its server and its registration. Dropping it closes the
/// listener first, then the registration (the order of the fields).
pub struct Generation {
    pub generation: u32,
    pub server: Server,
    pub registration: Registration,
}

/// The last `n` lines of `text`, saying how many were left out.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= n {
        return text.to_string();
    }
    format!(
        "({} earlier lines left out)\n{}",
        lines.len() - n,
        lines[lines.len() - n..].join("\n")
    )
}

/// True once the control socket file has the mode the agent gives it after binding.
fn final_mode(control: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(control).is_ok_and(|m| m.permissions().mode() & 0o777 == 0o660)
}
