//! A server with several listeners (an HTTP port and an admin port) under `reuseportctl
//! supervise --listen … --listen …`: every generation gets both sockets (fds 3 and 4, with
//! the activation variables naming both), is deployed as one unit in both groups (by SIGHUP
//! or by `restart` naming either group), and is signalled only once it is idle in both;
//! deploys under load on both ports lose nothing.
//!
//!
//! Such a generation spans both groups in the agent: one `activate` switches it in both, or,
//! when one group refuses (an injected kernel failure), in neither.
//!
//! The server is this test executable again ([`two_port_server`]): the drain tests' server
//! (no SIGTERM handler, 50 ms per request, our line protocol and HTTP), on two listeners.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    os::{fd::FromRawFd, unix::process::CommandExt as _},
    process::{Child, Command, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use reuseport_proto::ErrorKind;

use super::{
    drain::serve_slowly,
    supervise::{Load, MARKER_DIR_ENV, Supervisor},
};
use crate::harness::{
    ApacheBench, TestEnv, load_size, local, patience, skip, tool_missing, wait_until,
};

/// Set (to anything) in the server processes this test starts.
const SERVER_ENV: &str = "REUSEPORT_TEST_TWO_PORT_SERVER";
const SERVER_TEST: &str = "tests::multi_listener::two_port_server";
/// A deploy: readiness, activation in both groups, the old generation's drain and exit.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests of our client each generation answers on each port before the next deploy.
const ANSWERS_PER_GENERATION: u64 = 10;

#[test]
fn supervise_deploys_a_two_port_server_under_load_on_both_ports() {
    const NAME: &str = "supervise_deploys_a_two_port_server_under_load_on_both_ports";
    const HTTP: u16 = 7841;
    const ADMIN: u16 = 7842;
    if let Some(reason) = tool_missing("ab") {
        return skip(NAME, &reason);
    }
    let env = TestEnv::new(NAME);
    let deploys = load_size("deploys", 10, 3) as u32;
    let admin = format!("admin={}", local(ADMIN));
    // The first listener is named by --name, the second by its own NAME=.
    let extra = ["--ready", "notify", "--name", "http", "--listen", &admin];
    let mut sup =
        Supervisor::spawn_server(&env, HTTP, &extra, SERVER_TEST, (SERVER_ENV, "1"), |_| {});
    let active_everywhere = |sup: &mut Supervisor, generation: u32| {
        wait_until(
            &format!("generation {generation} is active on both ports"),
            DEPLOY_TIMEOUT,
            || {
                sup.assert_running();
                [HTTP, ADMIN].iter().all(|port| {
                    env.try_status(*port)
                        .is_some_and(|s| s.active == Some(generation))
                })
            },
        );
    };
    active_everywhere(&mut sup, 1);
    let http = Load::start(HTTP, 2);
    let admin = Load::start(ADMIN, 2);
    let ab_http = ApacheBench::start(local(HTTP), 4);
    let ab_admin = ApacheBench::start(local(ADMIN), 4);
    let answered = |generation: u32| {
        wait_until(
            &format!(
                "generation {generation} answers {ANSWERS_PER_GENERATION} requests on each port"
            ),
            DEPLOY_TIMEOUT,
            || {
                http.snapshot().of(generation) >= ANSWERS_PER_GENERATION
                    && admin.snapshot().of(generation) >= ANSWERS_PER_GENERATION
            },
        );
    };
    answered(1);
    for generation in 2..=deploys + 1 {
        // Every other deploy is a `restart` named by the second listener's group: the
        // supervisor takes restarts for each of its groups.
        if generation % 2 == 0 {
            sup.signal(Signal::SIGHUP);
        } else {
            let out = env.ctl(&["restart", &local(ADMIN).to_string(), "--timeout", "20s"]);
            assert!(
                out.status.success(),
                "reuseportctl restart of the admin port should deploy generation {generation}: \
                 {}; log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                sup.log()
            );
        }
        active_everywhere(&mut sup, generation);
        answered(generation);
    }
    let last = deploys + 1;
    wait_until(
        "every old generation has left both groups",
        DEPLOY_TIMEOUT,
        || {
            sup.assert_running();
            [HTTP, ADMIN].iter().all(|port| {
                env.status(*port)
                    .generations
                    .iter()
                    .all(|g| g.generation == last)
            })
        },
    );
    let (ab_http, ab_admin) = (ab_http.stop(), ab_admin.stop());
    let (http, admin) = (http.stop(), admin.stop());
    let log = sup.log();
    let _ = sup.stop(Signal::SIGTERM, DEPLOY_TIMEOUT);
    println!(
        "{NAME}: {deploys} deploys; our client: HTTP port {http}, admin port {admin}; \
         HTTP port {ab_http}; admin port {ab_admin}"
    );
    for (port, tally) in [("HTTP", &http), ("admin", &admin)] {
        assert_eq!(
            tally.failed, 0,
            "our client on the {port} port: no request may fail: {tally}; log:\n{log}"
        );
    }
    for (port, ab) in [("HTTP", &ab_http), ("admin", &ab_admin)] {
        assert!(
            ab.complete > 0 && ab.failures() == 0,
            "ApacheBench on the {port} port: no request may fail: {ab}; log:\n{log}"
        );
    }
    for generation in 1..=deploys {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("generation {generation} of "))
                    && l.contains(" and ")
                    && l.contains(" is idle after ")),
            "generation {generation} should have been signalled once idle in both groups; \
             log:\n{log}"
        );
    }
}

/// `reuseportctl exec --listen http=127.0.0.1:HTTP --listen admin=127.0.0.1:ADMIN -g N
/// [--activate] -- <two_port_server>`, once its server accepts on both; killed with its server
/// when dropped.
struct TwoPortExec(Child);

impl TwoPortExec {
    fn command(env: &TestEnv, ports: [u16; 2], generation: u32, activate: bool) -> Command {
        let mut cmd = env.ctl_command();
        cmd.arg("exec")
            .args(["--listen", &format!("http={}", local(ports[0]))])
            .args(["--listen", &format!("admin={}", local(ports[1]))])
            .args(["-g", &generation.to_string()])
            .args(activate.then_some("--activate"))
            .arg("--")
            .arg(std::env::current_exe().expect("current_exe"))
            .args(["--exact", SERVER_TEST, "--ignored", "--test-threads=1"])
            .env(SERVER_ENV, "1")
            .env("REUSEPORT_GENERATION", generation.to_string())
            .env(MARKER_DIR_ENV, env.dir())
            .stdout(Stdio::null())
            .process_group(0);
        cmd
    }

    fn spawn(env: &TestEnv, ports: [u16; 2], generation: u32, activate: bool) -> Self {
        let child = Self::command(env, ports, generation, activate)
            .spawn()
            .expect("spawn reuseportctl exec");
        let exec = Self(child);
        // NB: registered comes before served: exec registers the listeners, then lets the
        // server start, which takes a while in a VM guest.
        let ready = env.dir().join(format!("ready-{generation}"));
        wait_until(
            &format!("generation {generation} is registered and served on both ports"),
            patience(DEPLOY_TIMEOUT),
            || {
                ready.exists()
                    && ports.iter().all(|port| {
                        env.try_status(*port).is_some_and(|s| {
                            s.generations.iter().any(|g| g.generation == generation)
                        })
                    })
            },
        );
        exec
    }
}

impl Drop for TwoPortExec {
    fn drop(&mut self) {
        // The server goes with it (PR_SET_PDEATHSIG), and its own session with killpg.
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Asserts that every one of `n` new connections on `port` is answered by `generation`.
///
/// NB: which generation answers is what counts here, not how fast: the harness's tally
/// would count an answer slowed down by a loaded machine as a failure.
fn assert_all_answered_by(port: u16, generation: u32, n: u64, why: &str) {
    let answers: Vec<String> = (0..n)
        .map(|i| {
            let mut stream = TcpStream::connect(local(port)).expect("connect");
            stream
                .set_read_timeout(Some(patience(DEPLOY_TIMEOUT)))
                .expect("read timeout");
            writeln!(stream, "req {i}").expect("send a request");
            let mut line = String::new();
            let _ = BufReader::new(stream).read_line(&mut line);
            line.trim_end().to_string()
        })
        .collect();
    let want = format!("gen {generation} ");
    assert!(
        answers.iter().all(|a| a.starts_with(&want)),
        "{why} (port {port}): {answers:?}"
    );
}

#[test]
fn one_activate_switches_a_generation_in_every_group_it_spans() {
    const NAME: &str = "one_activate_switches_a_generation_in_every_group_it_spans";
    const PORTS: [u16; 2] = [7843, 7844];
    let env = TestEnv::new(NAME);
    let _v1 = TwoPortExec::spawn(&env, PORTS, 1, true);
    let _v2 = TwoPortExec::spawn(&env, PORTS, 2, false);
    let status = env.status(PORTS[0]);
    let g2 = status
        .generations
        .iter()
        .find(|g| g.generation == 2)
        .unwrap();
    assert_eq!(
        g2.also_in.iter().map(|g| g.addr).collect::<Vec<_>>(),
        [local(PORTS[1])],
        "status should name the admin group as the other group generation 2 spans: {g2:?}"
    );

    let out = env.ctl(&["activate", &local(PORTS[0]).to_string(), "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "activate: {out:?}");
    assert_eq!(
        stdout.lines().count(),
        2,
        "activate should print a line for each group it switched: {stdout}"
    );
    for port in PORTS {
        assert_eq!(
            env.status(port).active,
            Some(2),
            "one activate on the HTTP port should make generation 2 active on port {port} too"
        );
        assert_all_answered_by(port, 2, 10, "generation 2 should get every new connection");
    }
    let table = env.ctl(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("generation 2 spans") && table.contains("generation 1 spans"),
        "status should show each generation's other group: {table}"
    );

    // drain acts on both groups too: generation 1 is already draining in both, and
    // generation 2, active, cannot be drained in either.
    let out = env.ctl(&["drain", &local(PORTS[1]).to_string(), "2"]);
    assert!(
        !out.status.success(),
        "draining the active generation should be refused"
    );
    for port in PORTS {
        assert_eq!(
            env.status(port).active,
            Some(2),
            "a refused drain changes nothing"
        );
    }

    // rollback, naming the admin port, brings generation 1 back on both ports in one
    // request, as activate would.
    let out = env.ctl(&["rollback", &local(PORTS[1]).to_string()]);
    assert!(out.status.success(), "rollback: {out:?}");
    for port in PORTS {
        assert_eq!(
            env.status(port).active,
            Some(1),
            "one rollback on the admin port should make generation 1 active on port {port} too"
        );
        assert_all_answered_by(port, 1, 10, "generation 1 should get every new connection");
    }
}

#[test]
fn a_switch_refused_in_one_group_switches_no_group() {
    const NAME: &str = "a_switch_refused_in_one_group_switches_no_group";
    const PORTS: [u16; 2] = [7845, 7846];
    // Generation 1's activation switches the tables twice; the second switch of generation
    // 2's fails: the first group is switched by then and must be switched back.
    // (Registrations publish without this point.)
    let env = TestEnv::with_agent(NAME, &[], &[("REUSEPORT_FAULT_FAIL", "switch.table:4")]);
    let _v1 = TwoPortExec::spawn(&env, PORTS, 1, true);
    let _v2 = TwoPortExec::spawn(&env, PORTS, 2, false);

    let err = env
        .try_activate_group(crate::harness::group(PORTS[0]), 2)
        .expect_err("activate should fail when one group's switch fails");
    println!("{NAME}: {err}");
    assert_eq!(err.agent_kind(), Some(ErrorKind::Kernel), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&local(PORTS[1]).to_string()) && message.contains("unchanged in all 2"),
        "the error should name the group that refused and say nothing changed: {message}"
    );
    for port in PORTS {
        assert_eq!(
            env.status(port).active,
            Some(1),
            "after the refused activate generation 1 should still be active on port {port}"
        );
        assert_all_answered_by(port, 1, 10, "the kernel should still steer to generation 1");
    }

    // Nothing is left half done: the same request succeeds once nothing fails.
    env.activate_group(crate::harness::group(PORTS[0]), 2);
    for port in PORTS {
        assert_eq!(env.status(port).active, Some(2), "port {port}");
        assert_all_answered_by(port, 2, 10, "a later activate should take effect");
    }
}

/// `exec --activate` with two listeners makes its generation active in both groups at once
/// or in neither: when the second group's switch fails, the server never runs, the first
/// group is switched back, and the error names the group that refused.
#[test]
fn exec_activates_all_its_listeners_or_none() {
    const NAME: &str = "exec_activates_all_its_listeners_or_none";
    const PORTS: [u16; 2] = [7847, 7848];
    let env = TestEnv::with_agent(NAME, &[], &[("REUSEPORT_FAULT_FAIL", "switch.table:2")]);
    let out = TwoPortExec::command(&env, PORTS, 1, true)
        .stderr(Stdio::piped())
        .output()
        .expect("run reuseportctl exec");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{NAME}: {stderr}");
    assert!(!out.status.success(), "exec should fail: {stderr}");
    assert!(
        stderr.contains(&local(PORTS[1]).to_string()) && stderr.contains("unchanged in all 2"),
        "the error should name the group that refused and say nothing changed: {stderr}"
    );
    assert!(
        !env.dir().join("ready-1").exists(),
        "the server should never have run"
    );
    for port in PORTS {
        assert!(
            env.try_status(port)
                .is_none_or(|s| s.generations.is_empty()),
            "no listener of the failed exec may stay registered on port {port}: {:?}",
            env.try_status(port)
        );
    }

    // The same command succeeds once nothing fails, active in both groups.
    let _v1 = TwoPortExec::spawn(&env, PORTS, 1, true);
    for port in PORTS {
        assert_eq!(env.status(port).active, Some(1), "port {port}");
        assert_all_answered_by(port, 1, 10, "generation 1 should get every connection");
    }
}

/// Not a test: the server [`supervise_deploys_a_two_port_server_under_load_on_both_ports`]
/// starts. It checks what it was handed (two listeners, both variables naming both), reports
/// READY=1 and serves both; SIGTERM kills it (no handler).
#[test]
#[ignore = "helper: entry point of the two-listener server processes"]
fn two_port_server() {
    if std::env::var_os(SERVER_ENV).is_none() {
        return;
    }
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let generation: u32 = var("REUSEPORT_GENERATION")
        .parse()
        .expect("REUSEPORT_GENERATION");
    assert_eq!(var("LISTEN_PID"), std::process::id().to_string());
    assert_eq!(var("LISTEN_FDS"), "2", "two --listen, two listeners");
    assert_eq!(var("LISTEN_FDNAMES"), "http:admin", "one name per listener");
    // SAFETY: LISTEN_FDS=2 for this pid: fds 3 and 4 are ours.
    let listeners = [3, 4].map(|fd| unsafe { TcpListener::from_raw_fd(fd) });
    let ports: Vec<String> = listeners
        .iter()
        .zip(3..)
        .map(|(l, fd)| format!("{}={fd}", l.local_addr().expect("bound")))
        .collect();
    assert_eq!(
        var("SERVER_STARTER_PORT"),
        ports.join(";"),
        "Server::Starter's multi-port form, in --listen order"
    );
    for listener in listeners {
        std::thread::spawn(move || {
            loop {
                let Ok((stream, _)) = listener.accept() else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = serve_slowly(stream, generation);
                });
            }
        });
    }
    // Accepting from here on (what comes before the threads run waits in the queues).
    let markers = var(MARKER_DIR_ENV);
    if !markers.is_empty() {
        std::fs::write(format!("{markers}/ready-{generation}"), "").expect("write a marker");
    }
    if let Some(name) = var("NOTIFY_SOCKET").strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("NOTIFY_SOCKET address");
        std::os::unix::net::UnixDatagram::unbound()
            .expect("datagram socket")
            .send_to_addr(b"READY=1\n", &addr)
            .expect("notify READY=1");
    }
    loop {
        std::thread::park();
    }
}
