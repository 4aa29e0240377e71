//! `reuseportctl supervise` replaces generations of an unmodified LISTEN_FDS server on
//! SIGHUP (or `reuseportctl restart`) under load without losing a request, and keeps the old
//! generation when a new one fails to start.
//!
//! NB: this holds in select-only mode too (`REUSEPORT_SELECT_ONLY=1`), so neither test
//! skips there: after the flip a draining listener gets nothing new, and the test server
//! empties its accept queue before it closes it, so there is nothing left to migrate. On
//! loopback no handshake is still half-open by then.
//!
//! The server is this test executable again (as for [`ChildServer`](crate::harness::ChildServer)):
//! the ignored test [`listen_fds_server`] takes fd 3 as systemd would hand it over.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Child, ExitStatus},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{SigHandler, Signal, kill, killpg, signal},
    unistd::Pid,
};

use reuseport_proto::RestartOutcome;

use crate::harness::{
    ServerKind, Tally, TestEnv, generation_status, helper_args, local, patience, request_once,
    wait_until,
};

/// Set (to anything) in the server processes the supervisor starts.
pub(crate) const SERVER_ENV: &str = "REUSEPORT_TEST_LISTEN_FDS_SERVER";
/// A generation whose server exits with status 1 at once (a broken release).
pub(crate) const FAIL_GENERATION_ENV: &str = "REUSEPORT_TEST_FAIL_GENERATION";
/// A directory where the server leaves `started-<gen>` when it starts, `ready-<gen>` just
/// before it reports ready, and `sigterm-<gen>` when it got SIGTERM.
pub(crate) const MARKER_DIR_ENV: &str = "REUSEPORT_TEST_MARKER_DIR";
/// `<generation>:<ms>`: the server of that generation takes that long before it accepts and
/// reports READY=1 (loading, warming up).
pub(crate) const READY_DELAY_ENV: &str = "REUSEPORT_TEST_READY_DELAY";
/// Exit status after SIGTERM (default 0).
pub(crate) const TERM_EXIT_ENV: &str = "REUSEPORT_TEST_TERM_EXIT";
/// A generation whose server answers its health endpoint (`GET /health`) with 503; every
/// other generation answers 200, until `unhealthy-<gen>` appears in its marker dir.
pub(crate) const UNHEALTHY_GENERATION_ENV: &str = "REUSEPORT_TEST_UNHEALTHY_GENERATION";
pub(crate) const SERVER_TEST: &str = "tests::supervise::listen_fds_server";

/// How long a restart may take: readiness delay, activation, the old generation's exit.
/// A wait, stretched in VM guests.
const RESTART_TIMEOUT: Duration = Duration::from_secs(15);

fn restart_timeout() -> Duration {
    patience(RESTART_TIMEOUT)
}

#[test]
fn supervise_restarts_under_load_without_failed_requests() {
    const NAME: &str = "supervise_restarts_under_load_without_failed_requests";
    const PORT: u16 = 7801;
    const RESTARTS: u32 = 5;
    let env = TestEnv::new(NAME);
    let mut sup = Supervisor::spawn(&env, PORT, &["--ready", "delay=300ms"], None);
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 4);
    load.wait_answered_by(1, &sup);

    for generation in 2..=RESTARTS + 1 {
        sup.signal(Signal::SIGHUP);
        sup.wait_active(&env, PORT, generation);
        load.wait_answered_by(generation, &sup);
    }
    let last = RESTARTS + 1;
    wait_until(
        "every old generation has exited and left the group",
        restart_timeout(),
        || {
            sup.assert_running();
            env.status(PORT)
                .generations
                .iter()
                .all(|g| g.generation == last)
        },
    );
    let t = load.stop();
    println!("{NAME}: {RESTARTS} restarts, {t}");
    assert_eq!(
        t.failed,
        0,
        "no request should fail while generations replace each other: {t}; log:\n{}",
        sup.log()
    );
    for generation in 1..=last {
        assert!(
            t.of(generation) > 0,
            "generation {generation} should have answered requests: {t}"
        );
    }
    let log = sup.log();
    for generation in 1..last {
        assert!(
            exited_after_draining(&log, generation),
            "generation {generation} should have exited after draining; log:\n{log}"
        );
    }

    let status = sup.stop(Signal::SIGTERM, restart_timeout());
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM should stop the supervisor with status 0; log:\n{}",
        sup.log()
    );
    assert!(
        env.try_status(PORT).is_none(),
        "no generation should be left in the group after the supervisor exited"
    );
}

#[test]
fn supervise_keeps_the_old_generation_when_the_new_one_fails() {
    const NAME: &str = "supervise_keeps_the_old_generation_when_the_new_one_fails";
    const PORT: u16 = 7802;
    let env = TestEnv::new(NAME);
    let mut sup = Supervisor::spawn(&env, PORT, &["--ready", "notify"], Some(2));
    sup.wait_active(&env, PORT, 1);

    sup.signal(Signal::SIGHUP);
    let line = "restart failed: generation 2 exited with status 1 before it was ready; \
                generation 1 stays active";
    wait_until(
        "the supervisor reports the failed restart",
        restart_timeout(),
        || {
            sup.assert_running();
            sup.log().contains(line)
        },
    );
    wait_until("status shows the failed restart", restart_timeout(), || {
        matches!(
            &env.status(PORT).last_restart,
            Some(RestartOutcome::Failed { error }) if error.contains("generation 2 exited")
        )
    });
    let shown = env.ctl(&["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("LAST RESTART FAILED: generation 2 exited with status 1"),
        "`reuseportctl status` should show the failure:\n{shown}"
    );
    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(1),
        "generation 1 should stay active after generation 2 failed: {status:?}"
    );
    let mut t = Tally::default();
    for n in 0..50 {
        t.record(request_once(local(PORT), n));
    }
    assert_eq!(
        (t.of(1), t.failed),
        (50, 0),
        "generation 1 should answer every request after the failed restart: {t}"
    );

    // The next release is fine: READY=1 on NOTIFY_SOCKET activates it.
    sup.signal(Signal::SIGHUP);
    sup.wait_active(&env, PORT, 3);
    wait_until("generation 1 has exited", restart_timeout(), || {
        exited_after_draining(&sup.log(), 1)
    });
    let mut t = Tally::default();
    for n in 0..50 {
        t.record(request_once(local(PORT), n));
    }
    assert_eq!(
        (t.of(3), t.failed),
        (50, 0),
        "generation 3 should answer every request once it is active: {t}"
    );
    let status = sup.stop(Signal::SIGTERM, restart_timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

/// A new generation whose server takes its time before it is ready (`--ready notify`, READY=1
/// sent late) stays standby until then: it gets no connection, the old generation answers
/// everything, and nothing waits in the new one's queue (a client would see a slow answer).
#[test]
fn supervise_keeps_a_new_generation_standby_until_it_is_ready() {
    const NAME: &str = "supervise_keeps_a_new_generation_standby_until_it_is_ready";
    const PORT: u16 = 7806;
    const DELAY: &str = "2:1500";
    let env = TestEnv::new(NAME);
    let markers = env.dir().join("markers");
    std::fs::create_dir_all(&markers).expect("create the marker dir");
    let marker_dir = markers.to_str().expect("a UTF-8 temp dir").to_owned();
    let mut sup = Supervisor::spawn_with(
        &env,
        PORT,
        &["--ready", "notify"],
        None,
        &[(MARKER_DIR_ENV, &marker_dir), (READY_DELAY_ENV, DELAY)],
    );
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 2);
    load.wait_answered_by(1, &sup);

    sup.signal(Signal::SIGHUP);
    wait_until(
        "generation 2's server has started (not ready yet)",
        restart_timeout(),
        || {
            sup.assert_running();
            markers.join("started-2").exists()
        },
    );
    let mut checks = 0;
    loop {
        // NB: status first, then the marker: a status read before `ready-2` exists was read
        // before READY=1 was sent, so it must show generation 2 standby.
        let status = env.status(PORT);
        if markers.join("ready-2").exists() {
            break;
        }
        checks += 1;
        assert_eq!(
            status.active,
            Some(1),
            "generation 1 should stay active while generation 2 is not ready: {status:?}"
        );
        if let Some(g2) = status.generations.iter().find(|g| g.generation == 2) {
            assert_eq!(
                (g2.state, g2.counters.selected + g2.counters.fallback),
                (reuseport_proto::GenState::Standby, 0),
                "generation 2 should be standby and get no connection before it is ready: \
                 {status:?}"
            );
        }
        sup.assert_running();
        std::thread::sleep(Duration::from_millis(20));
    }
    sup.wait_active(&env, PORT, 2);
    load.wait_answered_by(2, &sup);
    let status = env.status(PORT);
    let t = load.stop();
    println!("{NAME}: generation 2 checked standby {checks} times before READY=1; {t}");
    assert!(
        checks > 0,
        "the test should have seen generation 2 before it was ready"
    );
    assert_eq!(
        t.failed,
        0,
        "no request may fail or be slow while generation 2 gets ready: {t}; log:\n{}",
        sup.log()
    );
    assert!(
        generation_status(&status, 2).counters.selected > 0,
        "generation 2 should get connections once active: {status:?}"
    );
    let status = sup.stop(Signal::SIGTERM, restart_timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

#[test]
fn restart_command_deploys_under_load_without_failed_requests() {
    const NAME: &str = "restart_command_deploys_under_load_without_failed_requests";
    const PORT: u16 = 7803;
    const RESTARTS: u32 = 3;
    let env = TestEnv::new(NAME);
    let mut sup = Supervisor::spawn(&env, PORT, &["--ready", "delay=300ms"], None);
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 4);
    load.wait_answered_by(1, &sup);

    let group = local(PORT).to_string();
    for generation in 2..=RESTARTS + 1 {
        let out = env.ctl(&["restart", &group, "--timeout", "15s"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "reuseportctl restart should succeed: {}; log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            sup.log()
        );
        assert!(
            stdout.contains(&format!("generation {generation} is active")),
            "restart should name the generation it made active: {stdout}"
        );
        // NB: no wait: `restart` returns only once the new generation is active.
        let status = env.status(PORT);
        assert_eq!(
            status.active,
            Some(generation),
            "generation {generation} should be active when restart returns: {status:?}"
        );
        let active = status
            .generations
            .iter()
            .find(|g| g.generation == generation)
            .expect("the active generation is listed");
        for socket in &active.sockets {
            assert_eq!(
                parent_of(socket.pid),
                Some(sup.pid().as_raw()),
                "status should show the server's pid (a child of the supervisor), not the \
                 supervisor's {}: {status:?}",
                sup.pid()
            );
        }
        load.wait_answered_by(generation, &sup);
    }
    let t = load.stop();
    println!("{NAME}: {RESTARTS} restarts through the agent, {t}");
    assert_eq!(
        t.failed,
        0,
        "no request should fail while `restart` replaces generations: {t}; log:\n{}",
        sup.log()
    );
    let status = sup.stop(Signal::SIGTERM, restart_timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

#[test]
fn restart_command_reports_the_supervisors_failure() {
    const NAME: &str = "restart_command_reports_the_supervisors_failure";
    const PORT: u16 = 7804;
    let env = TestEnv::new(NAME);
    let mut sup = Supervisor::spawn(&env, PORT, &["--ready", "notify"], Some(2));
    sup.wait_active(&env, PORT, 1);

    let out = env.ctl(&["restart", &local(PORT).to_string(), "--timeout", "15s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "restart should fail when the new generation fails: {stderr}"
    );
    assert!(
        stderr.contains(
            "failed: generation 2 exited with status 1 before it was ready; generation 1 \
             stays active"
        ),
        "restart should relay the supervisor's reason: {stderr}"
    );
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "generation 1 should stay active after the failed restart"
    );
    sup.assert_running();
}

#[test]
fn restart_command_without_a_supervisor_says_what_to_do() {
    const NAME: &str = "restart_command_without_a_supervisor_says_what_to_do";
    const PORT: u16 = 7805;
    let env = TestEnv::new(NAME);
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);

    let out = env.ctl(&["restart", &local(PORT).to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(6),
        "restart of a group nobody supervises should be refused (exit 6): {stderr}"
    );
    assert!(
        stderr.contains("no `reuseportctl supervise` manages tcp://127.0.0.1:7805")
            && stderr.contains("restart its servers by hand or run them under supervise"),
        "the error should say that no supervisor manages the group and what to do: {stderr}"
    );
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "a refused restart should change nothing"
    );
}

/// PPid of a running process, from /proc.
fn parent_of(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

fn exited_after_draining(log: &str, generation: u32) -> bool {
    log.lines().any(|l| {
        l.contains(&format!("generation {generation} (pid ")) && l.contains("after draining")
    })
}

/// `reuseportctl supervise --listen 127.0.0.1:PORT … -- <this executable as a server>`, in
/// its own process group, logging to a file in the test's dir.
pub(crate) struct Supervisor {
    child: Option<Child>,
    log: PathBuf,
}

impl Supervisor {
    pub(crate) fn spawn(
        env: &TestEnv,
        port: u16,
        extra: &[&str],
        fail_generation: Option<u32>,
    ) -> Self {
        Self::spawn_with(env, port, extra, fail_generation, &[])
    }

    /// [`Supervisor::spawn`] with environment variables for the servers.
    pub(crate) fn spawn_with(
        env: &TestEnv,
        port: u16,
        extra: &[&str],
        fail_generation: Option<u32>,
        server_env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_server(env, port, extra, SERVER_TEST, (SERVER_ENV, "1"), |cmd| {
            cmd.envs(server_env.iter().copied());
            match fail_generation {
                Some(generation) => cmd.env(FAIL_GENERATION_ENV, generation.to_string()),
                None => cmd.env_remove(FAIL_GENERATION_ENV),
            };
        })
    }

    /// [`Supervisor::spawn`] with another server: the ignored test `server_test` of this
    /// executable, run with `server_env` set; `adjust` may add to the command.
    pub(crate) fn spawn_server(
        env: &TestEnv,
        port: u16,
        extra: &[&str],
        server_test: &str,
        server_env: (&str, &str),
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> Self {
        let log = env.dir().join("supervise.log");
        let file = File::create(&log).expect("supervise log");
        let mut cmd = env.ctl_command();
        cmd.args(["supervise", "--listen", &local(port).to_string()])
            .args(["--on-drain", "TERM"])
            .args(
                ["--drain-timeout", "10s"]
                    .iter()
                    .filter(|_| !extra.contains(&"--drain-timeout")),
            )
            .args(extra)
            .arg("--")
            .arg(std::env::current_exe().expect("current_exe"))
            .args(helper_args(server_test))
            .env(server_env.0, server_env.1)
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .process_group(0);
        adjust(&mut cmd);
        Self {
            child: Some(cmd.spawn().expect("spawn reuseportctl supervise")),
            log,
        }
    }

    pub(crate) fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("supervisor").id() as i32)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal the supervisor");
    }

    pub(crate) fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
        {
            panic!(
                "reuseportctl supervise exited early ({status}); log:\n{}",
                self.log()
            );
        }
    }

    pub(crate) fn wait_active(&mut self, env: &TestEnv, port: u16, generation: u32) {
        wait_until(
            &format!("generation {generation} is active"),
            restart_timeout(),
            || {
                self.assert_running();
                env.try_status(port)
                    .is_some_and(|s| s.active == Some(generation))
            },
        );
    }

    /// Sends `sig` and waits for the supervisor to exit.
    pub(crate) fn stop(&mut self, sig: Signal, timeout: Duration) -> ExitStatus {
        self.signal(sig);
        let child = self.child.as_mut().expect("supervisor");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the supervisor should exit within {timeout:?} of {sig}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // NB: the servers run in sessions of their own; they get SIGTERM through
            // PR_SET_PDEATHSIG when the supervisor dies, and exit.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- reuseportctl supervise ---\n{}", self.log());
        }
    }
}

/// Client threads, each making one connection per request until stopped.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(port: u16, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let result = request_once(local(port), n);
                        tally.lock().unwrap().record(result);
                        n += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            tally,
            threads,
        }
    }

    pub(crate) fn wait_answered_by(&self, generation: u32, sup: &Supervisor) {
        wait_until(
            &format!("generation {generation} answers requests"),
            restart_timeout(),
            || self.tally.lock().unwrap().of(generation) > 0,
        );
        let failed = self.tally.lock().unwrap().failed;
        assert_eq!(
            failed,
            0,
            "no request should fail: {}; log:\n{}",
            self.tally.lock().unwrap(),
            sup.log()
        );
    }

    /// What the clients have seen so far.
    pub(crate) fn snapshot(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    pub(crate) fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load thread");
        }
        self.tally.lock().unwrap().clone()
    }
}

/// Not a test: the server that `supervise` and `exec` start (see the module doc). It knows
/// nothing about reuseport: fd 3, LISTEN_FDS, LISTEN_PID, NOTIFY_SOCKET, and
/// REUSEPORT_GENERATION to say who answers (plus the test knobs above). On SIGTERM it closes
/// its listener, finishes the connections it accepted and exits.
#[test]
#[ignore = "helper: entry point of the LISTEN_FDS server processes that supervise and exec start"]
fn listen_fds_server() {
    if std::env::var_os(SERVER_ENV).is_none() {
        return;
    }
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let generation: u32 = var("REUSEPORT_GENERATION")
        .parse()
        .expect("REUSEPORT_GENERATION");
    let marker = |what: &str| {
        let dir = var(MARKER_DIR_ENV);
        if !dir.is_empty() {
            std::fs::write(format!("{dir}/{what}-{generation}"), "").expect("write a marker");
        }
    };
    marker("started");
    if var(FAIL_GENERATION_ENV) == generation.to_string() {
        eprintln!("server: generation {generation} fails on purpose");
        std::process::exit(1);
    }
    assert_eq!(var("LISTEN_FDS"), "1");
    assert_eq!(var("LISTEN_PID"), std::process::id().to_string());
    // SAFETY: LISTEN_FDS=1 for this pid: fd 3 is ours.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    // NB: systemd hands listeners over blocking (unless NonBlocking=true): servers rely on it.
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(
        flags & libc::O_NONBLOCK,
        0,
        "fd 3 is O_NONBLOCK; a LISTEN_FDS server expects a blocking listener"
    );
    assert!(
        socket2::SockRef::from(&listener)
            .is_listener()
            .expect("SO_ACCEPTCONN"),
        "fd 3 is not listening"
    );
    listener.set_nonblocking(true).expect("non-blocking");

    static TERM: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_term(_: libc::c_int) {
        TERM.store(true, Ordering::SeqCst);
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe { signal(Signal::SIGTERM, SigHandler::Handler(on_term)) }.expect("SIGTERM handler");

    // Not ready yet: a real server loads and warms up here, and accepts nothing meanwhile.
    // NB: SIGTERM (from the launcher, or PR_SET_PDEATHSIG when it dies) ends the warm-up
    // too: a test that gives up waiting must not leave a server behind for the whole delay.
    if let Some((delayed, ms)) = var(READY_DELAY_ENV).split_once(':')
        && delayed == generation.to_string()
    {
        let until = Instant::now() + Duration::from_millis(ms.parse().expect("milliseconds"));
        while Instant::now() < until {
            if TERM.load(Ordering::SeqCst) {
                std::process::exit(var(TERM_EXIT_ENV).parse().unwrap_or(0));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    marker("ready");
    let notify = var("NOTIFY_SOCKET");
    if let Some(name) = notify.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("NOTIFY_SOCKET address");
        let socket = std::os::unix::net::UnixDatagram::unbound().expect("datagram socket");
        socket
            .send_to_addr(b"READY=1\nSTATUS=serving\n", &addr)
            .expect("notify READY=1");
    }
    eprintln!("server: generation {generation} serving");

    let in_flight = Arc::new(AtomicUsize::new(0));
    while !TERM.load(Ordering::SeqCst) {
        let mut poll = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own. NB: accept() is tried after every wake-up or timeout,
        // not only on readiness: migrated connections arrive without a wake-up on some kernels.
        unsafe { libc::poll(&mut poll, 1, 20) };
        while let Ok((stream, _)) = listener.accept() {
            in_flight.fetch_add(1, Ordering::SeqCst);
            let in_flight = in_flight.clone();
            std::thread::spawn(move || {
                let _ = serve(stream, generation);
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
    marker("sigterm");
    // What is still queued migrates to the active generation when the listener closes.
    drop(listener);
    while in_flight.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("server: generation {generation} drained");
    std::process::exit(var(TERM_EXIT_ENV).parse().unwrap_or(0));
}

fn serve(stream: TcpStream, generation: u32) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut lines = BufReader::new(stream).lines();
    while let Some(line) = lines.next() {
        let line = line?;
        if line.starts_with("GET /health ") {
            // The rest of the request first: closing with unread data would reset it.
            for header in lines.by_ref() {
                if header?.is_empty() {
                    break;
                }
            }
            let marker = format!(
                "{}/unhealthy-{generation}",
                std::env::var(MARKER_DIR_ENV).unwrap_or_default()
            );
            let unhealthy = std::env::var(UNHEALTHY_GENERATION_ENV)
                .is_ok_and(|g| g == generation.to_string())
                || std::path::Path::new(&marker).exists();
            let status = if unhealthy {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            return writer.write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes());
        }
        let Some(n) = line
            .strip_prefix("req ")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return Ok(());
        };
        writer.write_all(format!("gen {generation} {}\n", n + 1).as_bytes())?;
    }
    Ok(())
}
