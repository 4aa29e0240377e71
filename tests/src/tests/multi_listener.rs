//! A server with several listeners (an HTTP port and an admin port) under `reuseportctl
//! supervise --listen … --listen …`: every generation gets both sockets (fds 3 and 4, with
//! the activation variables naming both), is deployed as one unit in both groups, and is
//! signalled only once it is idle in both; deploys under load on both ports lose nothing.
//!
//! The server is this test executable again ([`two_port_server`]): the drain tests' server
//! (no SIGTERM handler, 50 ms per request, our line protocol and HTTP), on two listeners.

use std::{net::TcpListener, os::fd::FromRawFd, time::Duration};

use nix::sys::signal::Signal;

use super::{
    drain::serve_slowly,
    supervise::{Load, Supervisor},
};
use crate::harness::{ApacheBench, TestEnv, load_size, local, skip, tool_missing, wait_until};

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
        sup.signal(Signal::SIGHUP);
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
