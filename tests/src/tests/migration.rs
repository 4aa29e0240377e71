//! Closing a draining listener: its queued connections migrate to the active generation
//! (select-or-migrate, 5.14+) instead of being reset, and the active server accepts them
//! promptly even where the kernel does not wake it (the agent's wake-up connections).
//!
//! [`epoll_wakeup_for_migrated_connections`] measures, per kernel, whether the kernel wakes
//! an epoll server for migrated connections by itself (the agent's wake-ups turned off) and
//! prints the answer as a `FACT:` line.

use std::{
    io,
    net::TcpListener,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use crate::harness::{
    ClientConn, ServerKind, TestEnv, generation_status, local, request_once, select_only_env, skip,
    wait_until,
};

/// Generation 1 holding `n` queued connections (requests sent, never accepted) while
/// generation 2 stands by with a server of `kind`: the state both migration tests close
/// generation 1's listener in.
struct Queued {
    g1_listener: TcpListener,
    g1_registration: reuseport_agent::client::Registration,
    g2: crate::harness::Generation,
    clients: Vec<ClientConn>,
}

/// Sets up [`Queued`]; `None` (after a SKIP line) when the group runs without migration.
fn queue_on_generation_1(
    env: &TestEnv,
    name: &str,
    port: u16,
    kind: ServerKind,
    n: u64,
) -> Option<Queued> {
    // Generation 1 (active, registered first) never accepts: everything stays queued.
    let g1_listener = listener_with_backlog(port, 1024);
    let g1_registration = env.register(&g1_listener, port, 1, false);
    let g2 = env.serve(port, 2, kind, false);
    let status = env.status(port);
    if status.mode != "select-or-migrate" {
        skip(
            name,
            &format!(
                "the agent runs the group in {} mode: no migration at close",
                status.mode
            ),
        );
        return None;
    }
    let clients: Vec<ClientConn> = (0..n)
        .map(|i| {
            let mut c =
                ClientConn::connect(local(port)).expect("connect while generation 1 is active");
            c.send(i).expect("send the request while queued");
            c
        })
        .collect();
    wait_until(
        &format!("generation 1's accept queue holds {n} connections"),
        Duration::from_secs(5),
        || accept_queue_len(&g1_listener) == n as u32,
    );
    assert_eq!(
        g2.server.accepted(),
        0,
        "standby generation 2 should accept nothing before the flip"
    );
    Some(Queued {
        g1_listener,
        g1_registration,
        g2,
        clients,
    })
}

/// Connections waiting in the draining listener's accept queue when it closes.
const QUEUED: u64 = 200;
/// How long the migrated connections may take to be answered, all together.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn closing_draining_listener_migrates_queue_to_blocking_server() {
    closing_draining_listener_migrates_queue(
        "closing_draining_listener_migrates_queue_to_blocking_server",
        7401,
        ServerKind::Blocking,
    );
}

#[test]
fn closing_draining_listener_migrates_queue_to_tokio_server() {
    closing_draining_listener_migrates_queue(
        "closing_draining_listener_migrates_queue_to_tokio_server",
        7402,
        ServerKind::Tokio,
    );
}

fn closing_draining_listener_migrates_queue(name: &'static str, port: u16, kind: ServerKind) {
    if select_only_env() {
        return skip(name, "select-only mode: migration is left to the kernel");
    }
    let env = TestEnv::new(name);

    let Some(Queued {
        g1_listener,
        g1_registration,
        g2,
        mut clients,
    }) = queue_on_generation_1(&env, name, port, kind, QUEUED)
    else {
        return;
    };

    env.activate(port, 2);
    let closed_at = Instant::now();
    drop(g1_listener);

    // NB: from here on the test makes NO new connection to the group before every queued one
    // is answered: on a kernel that does not wake an epoll listener for migrated connections,
    // only the agent's wake-up connections can get a tokio server to accept them.
    let deadline = closed_at + ANSWER_TIMEOUT;
    let (mut by_gen2, mut resets, mut timeouts, mut other) = (0u64, 0u64, 0u64, Vec::new());
    for (i, c) in clients.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        c.stream()
            .set_read_timeout(Some(left))
            .expect("set read timeout");
        match c.recv() {
            Ok(2) => by_gen2 += 1,
            Ok(g) => other.push(format!("connection {i} answered by generation {g}")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => resets += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                timeouts += 1
            }
            Err(e) => other.push(format!("connection {i}: {e}")),
        }
    }
    let elapsed = closed_at.elapsed();
    println!(
        "{name}: {by_gen2}/{QUEUED} queued connections answered by generation 2 within {elapsed:?} \
         of the close; {resets} reset, {timeouts} timed out, other: {other:?}; \
         generation 2 accepted {} connections",
        g2.server.accepted()
    );
    assert_eq!(
        resets, 0,
        "no queued connection should be reset when the draining listener closes"
    );
    assert_eq!(
        timeouts, 0,
        "every migrated connection should be accepted by generation 2 within {ANSWER_TIMEOUT:?} \
         (a {kind:?} server is not woken by the kernel for migrated connections)"
    );
    assert!(
        other.is_empty(),
        "every queued connection should be answered by generation 2: {other:?}"
    );
    assert_eq!(
        by_gen2, QUEUED,
        "all {QUEUED} queued connections should reach generation 2 with their request intact"
    );
    assert_eq!(
        g2.server.served(),
        QUEUED,
        "generation 2 should have served exactly the {QUEUED} migrated connections"
    );

    let status = env.status(port);
    let g2_status = generation_status(&status, 2);
    assert!(
        g2_status.counters.migrated >= QUEUED,
        "the program should count at least {QUEUED} connections migrated to generation 2: {status:?}"
    );
    drop(g1_registration);
}

/// Completed connections queued in the draining listener for the epoll question.
const EPOLL_QUEUED: u64 = 50;
/// How long the kernel gets to wake the tokio server for migrated connections by itself.
const EPOLL_WAKE_WINDOW: Duration = Duration::from_secs(1);

/// The epoll question, answered per kernel: with the agent's wake-ups OFF, does a tokio
/// (epoll) server on the active generation accept connections migrated to it at close, with no
/// other traffic? Either answer passes; what must hold on every kernel is that no migrated
/// connection is lost and that ONE new connection (what the agent's wake-up does) gets all of
/// them accepted and answered.
///
/// NB: upstream 3864c6ba1e04 ("tcp: call sk_data_ready() after listener migration", 2026,
/// `Cc: stable`) makes `inet_csk_listen_stop()` wake the target listener: kernels with it
/// answer "yes", kernels before it "no". Measured "yes" on 6.18.44 (host), Debian
/// 6.1.0-56 and 6.12.117 (VM guests).
#[test]
fn epoll_wakeup_for_migrated_connections() {
    const NAME: &str = "epoll_wakeup_for_migrated_connections";
    const PORT: u16 = 7403;
    const N: u64 = EPOLL_QUEUED;
    if select_only_env() {
        return skip(
            NAME,
            "select-only mode: queued connections are not migrated at close, nothing to wake for",
        );
    }
    let env = TestEnv::with_agent(NAME, &["--no-wake-ups"], &[]);

    let Some(Queued {
        g1_listener,
        g1_registration,
        g2,
        mut clients,
    }) = queue_on_generation_1(&env, NAME, PORT, ServerKind::Tokio, N)
    else {
        return;
    };

    env.activate(PORT, 2);
    drop(g1_listener);

    // Nothing else touches the group now: whatever generation 2 accepts in this window, the
    // kernel woke it for. NB: the whole window, even once all N are in: a wake-up connection
    // from the agent (there must be none) would show up here as accepted-but-not-served.
    let window_end = Instant::now() + EPOLL_WAKE_WINDOW;
    while Instant::now() < window_end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let k = g2.server.accepted();
    println!(
        "FACT: epoll wakes for migrated connections: {} ({k}/{N} accepted within 1s)",
        if k >= N { "yes" } else { "no" }
    );
    println!(
        "{NAME}: kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    // The k accepted connections are served on their own tasks: let them read their request.
    wait_until(
        &format!("generation 2 has read the request of the connections it accepted ({k})"),
        Duration::from_secs(10),
        || g2.server.served() >= k.min(N),
    );
    assert_eq!(
        g2.server.served(),
        k,
        "every connection generation 2 accepted so far should be a migrated client with its \
         request: no wake-up connection from the agent (it runs with --no-wake-ups) and no \
         other traffic may have reached the group"
    );
    assert_eq!(
        g2.server.accepted(),
        k,
        "without any new connection, generation 2 should accept nothing beyond the {k} the \
         kernel woke it for"
    );

    // One new connection: steered to generation 2, it wakes the accept loop, which then takes
    // every migrated connection still queued (the product's wake-up mechanism).
    let g = request_once(local(PORT), 1_000_000)
        .expect("the wake-up connection should be answered by the active generation");
    assert_eq!(
        g, 2,
        "the wake-up connection should reach active generation 2"
    );

    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut failures = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        c.stream()
            .set_read_timeout(Some(left))
            .expect("set read timeout");
        match c.recv() {
            Ok(2) => {}
            Ok(g) => failures.push(format!("connection {i} answered by generation {g}")),
            Err(e) => failures.push(format!("connection {i}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "after one new connection, all {N} migrated connections should be answered by \
         generation 2 (none lost, none reset): {} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        g2.server.served(),
        N + 1,
        "generation 2 should have served the {N} migrated connections and the wake-up one"
    );
    assert_eq!(
        g2.server.accepted(),
        N + 1,
        "generation 2 should have accepted exactly the {N} migrated connections and the \
         wake-up one (the agent made none of its own)"
    );
    let status = env.status(PORT);
    assert!(
        generation_status(&status, 2).counters.migrated >= N,
        "the program should count {N} connections migrated to generation 2: {status:?}"
    );
    drop(g1_registration);
}

/// A listening SO_REUSEPORT socket with an explicit backlog (the queue must hold them all).
fn listener_with_backlog(port: u16, backlog: i32) -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.set_reuse_port(true).expect("SO_REUSEPORT");
    s.bind(&local(port).into()).expect("bind");
    s.listen(backlog).expect("listen");
    s.into()
}

/// Connections waiting in a listener's accept queue: for a listening socket TCP_INFO reports
/// `sk_ack_backlog` in `tcpi_unacked`.
fn accept_queue_len(listener: &TcpListener) -> u32 {
    // SAFETY: getsockopt fills the zeroed tcp_info we own, up to `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let res = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(
        res,
        0,
        "getsockopt(TCP_INFO): {}",
        io::Error::last_os_error()
    );
    info.tcpi_unacked
}
