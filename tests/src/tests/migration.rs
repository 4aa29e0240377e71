//! Closing a draining listener: its queued connections migrate to the active generation
//! (select-or-migrate, 5.14+) instead of being reset, and the active server accepts them
//! promptly even where the kernel does not wake it (the agent's wake-up connections).
//!
//! [`one_new_connection_gets_every_migrated_connection_accepted`] also measures, per kernel,
//! whether the kernel wakes an epoll server for migrated connections by itself and prints the
//! answer as a `FACT:` line, which the matrix shows.
//!
//! Every test here needs migration at close: in a select-only column they skip (the column
//! lists them as expected skips; the harness checks that the agent really runs select-only).

use std::{
    io,
    net::TcpListener,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use reuseport_client::Registration;
use socket2::{Domain, Socket, Type};

use crate::harness::{
    ClientConn, EdgeServer, ServerKind, TestEnv, accept_queue_len, expects_migration,
    generation_status, local, patience, request_once, skip, wait_until,
};

/// The reason every test here gives in a select-only column.
const NO_MIGRATION: &str = "select-only mode: queued connections are not migrated at close";

/// Generation 1 of `port`: registered first (so active), listening with room for every
/// queued connection, never accepting.
fn generation_1_that_never_accepts(env: &TestEnv, port: u16) -> (TcpListener, Registration) {
    let listener = listener_with_backlog(port, 1024);
    let registration = env.register(&listener, port, 1, false);
    (listener, registration)
}

/// `n` connections, each with its request sent, waiting in generation 1's accept queue.
fn queue_on(g1: &TcpListener, port: u16, n: u64) -> Vec<ClientConn> {
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
        patience(Duration::from_secs(5)),
        || accept_queue_len(g1) == n as u32,
    );
    clients
}

/// Reads the answer of every client, all within `deadline`: the generations that answered,
/// and what failed (resets, time-outs and anything else, by connection).
fn answers(clients: &mut [ClientConn], deadline: Instant) -> Answers {
    let mut a = Answers::default();
    for (i, c) in clients.iter_mut().enumerate() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        c.stream()
            .set_read_timeout(Some(left))
            .expect("set read timeout");
        match c.recv() {
            Ok(2) => a.by_gen2 += 1,
            Ok(g) => a
                .other
                .push(format!("connection {i} answered by generation {g}")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => a.resets += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                a.timeouts += 1
            }
            Err(e) => a.other.push(format!("connection {i}: {e}")),
        }
    }
    a
}

#[derive(Debug, Default)]
struct Answers {
    by_gen2: u64,
    resets: u64,
    timeouts: u64,
    other: Vec<String>,
}

/// Connections waiting in the draining listener's accept queue when it closes.
const QUEUED: u64 = 200;
/// How long the migrated connections may take to be answered, all together (a wait, not a
/// figure: stretched in VM guests).
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
    if !expects_migration() {
        return skip(name, NO_MIGRATION);
    }
    let env = TestEnv::new(name);
    let (g1_listener, g1_registration) = generation_1_that_never_accepts(&env, port);
    let g2 = env.serve(port, 2, kind, false);
    let mut clients = queue_on(&g1_listener, port, QUEUED);
    assert_eq!(
        g2.server.accepted(),
        0,
        "standby generation 2 should accept nothing before the flip"
    );

    env.activate(port, 2);
    let closed_at = Instant::now();
    drop(g1_listener);

    // NB: from here on the test makes NO new connection to the group before every queued one
    // is answered: on a kernel that does not wake an epoll listener for migrated connections,
    // only the agent's wake-up connections can get a tokio server to accept them.
    let a = answers(&mut clients, closed_at + patience(ANSWER_TIMEOUT));
    println!(
        "{name}: {}/{QUEUED} queued connections answered by generation 2 within {:?} of the \
         close; {} reset, {} timed out, other: {:?}; generation 2 accepted {} connections",
        a.by_gen2,
        closed_at.elapsed(),
        a.resets,
        a.timeouts,
        a.other,
        g2.server.accepted()
    );
    assert_eq!(
        a.resets, 0,
        "no queued connection should be reset when the draining listener closes"
    );
    assert_eq!(
        a.timeouts, 0,
        "every migrated connection should be accepted by generation 2 (a {kind:?} server is \
         not woken by every kernel for migrated connections)"
    );
    assert!(
        a.other.is_empty(),
        "every queued connection should be answered by generation 2: {:?}",
        a.other
    );
    assert_eq!(
        a.by_gen2, QUEUED,
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

/// Completed connections queued in the draining listener for the wake-up tests.
const WAKE_QUEUED: u64 = 50;
/// How long the kernel gets to wake the tokio server for migrated connections by itself.
const EPOLL_WAKE_WINDOW: Duration = Duration::from_secs(1);
/// How long the agent's wake-ups may take to get every migrated connection answered: its
/// slot scan runs every 50 ms and connects 5 ms and 200 ms after it saw the close. A wait
/// (stretched in VM guests); without wake-ups the connections are never answered.
const WAKE_BOUND: Duration = Duration::from_secs(2);

/// The agent's wake-up, on its own: generation 2 is an edge-triggered epoll server that is
/// deaf while generation 1's listener closes, so whatever the kernel did for the migrated
/// connections inside that `close` is thrown away. From then on only a new connection to the
/// group can get them accepted, and the test makes none: the agent's wake-up connections must.
#[test]
fn agent_wake_up_gets_a_deaf_epoll_server_to_accept_migrated_connections() {
    const NAME: &str = "agent_wake_up_gets_a_deaf_epoll_server_to_accept_migrated_connections";
    const PORT: u16 = 7404;
    const N: u64 = WAKE_QUEUED;
    if !expects_migration() {
        return skip(NAME, NO_MIGRATION);
    }
    let env = TestEnv::new(NAME);
    let (g1_listener, g1_registration) = generation_1_that_never_accepts(&env, PORT);
    let g2_listener = env.listen(PORT);
    let g2_registration = env.register(&g2_listener, PORT, 2, false);
    let g2 = EdgeServer::start(g2_listener, 2);
    let mut clients = queue_on(&g1_listener, PORT, N);

    g2.deafen();
    env.activate(PORT, 2);
    let closed_at = Instant::now();
    drop(g1_listener);
    g2.hear_only_new_events();
    let deaf_for = closed_at.elapsed();

    let bound = patience(WAKE_BOUND);
    let a = answers(&mut clients, closed_at + bound);
    println!(
        "{NAME}: deaf for {deaf_for:?} after the close; {}/{N} migrated connections answered \
         within {:?}; {} reset, {} not answered within {bound:?}, other {:?}",
        a.by_gen2,
        closed_at.elapsed(),
        a.resets,
        a.timeouts,
        a.other
    );
    assert_eq!(
        (a.by_gen2, a.resets, a.timeouts),
        (N, 0, 0),
        "the agent's wake-up connections should get the deaf epoll server to accept all {N} \
         migrated connections within {bound:?} of the close (other failures: {:?})",
        a.other
    );
    wait_until(
        "generation 2 accepted a connection beyond the migrated ones",
        bound,
        || g2.accepted() > N,
    );
    let silent = g2.accepted() - g2.served();
    println!(
        "{NAME}: generation 2 accepted {} connections, {silent} of them sent nothing",
        g2.accepted()
    );
    assert!(
        silent >= 1 && g2.served() == N,
        "the connections beyond the {N} migrated ones should be the agent's wake-ups, which \
         send nothing: accepted {}, served {}",
        g2.accepted(),
        g2.served()
    );
    let status = env.status(PORT);
    assert!(
        generation_status(&status, 2).counters.migrated >= N,
        "the program should count {N} connections migrated to generation 2: {status:?}"
    );
    drop((g2, g2_registration, g1_registration));
}

/// With the agent's wake-ups OFF, a tokio (epoll) server on the active generation gets the
/// connections migrated to it at close: either the kernel wakes it by itself (measured and
/// printed as a `FACT:` line, which the matrix shows per kernel), or ONE new connection, what
/// the agent's wake-up makes, gets every one of them accepted. None may be lost either way.
///
/// NB: upstream 3864c6ba1e04 ("tcp: call sk_data_ready() after listener migration", 2026,
/// `Cc: stable`) makes `inet_csk_listen_stop()` wake the target listener: kernels with it
/// answer "yes", kernels before it "no".
#[test]
fn one_new_connection_gets_every_migrated_connection_accepted() {
    const NAME: &str = "one_new_connection_gets_every_migrated_connection_accepted";
    const PORT: u16 = 7403;
    const N: u64 = WAKE_QUEUED;
    if !expects_migration() {
        return skip(NAME, NO_MIGRATION);
    }
    let env = TestEnv::with_agent(NAME, &["--no-wake-ups"], &[]);
    let (g1_listener, g1_registration) = generation_1_that_never_accepts(&env, PORT);
    let g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    let mut clients = queue_on(&g1_listener, PORT, N);

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
        "FACT: kernel wakes epoll for migrated connections: {} ({k}/{N} accepted within {:?}, \
         kernel {})",
        if k >= N { "yes" } else { "no" },
        EPOLL_WAKE_WINDOW,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    // The k accepted connections are served on their own tasks: let them read their request.
    wait_until(
        &format!("generation 2 has read the request of the connections it accepted ({k})"),
        patience(Duration::from_secs(10)),
        || g2.server.served() >= k.min(N),
    );
    assert_eq!(
        g2.server.served(),
        k,
        "every connection generation 2 accepted so far should be a migrated client with its \
         request: no wake-up connection from the agent (it runs with --no-wake-ups) and no \
         other traffic may have reached the group"
    );

    // One new connection: steered to generation 2, it wakes the accept loop, which then takes
    // every migrated connection still queued (what the agent's wake-up does).
    let g = request_once(local(PORT), 1_000_000)
        .expect("the waking connection should be answered by the active generation");
    assert_eq!(
        g, 2,
        "the waking connection should reach active generation 2"
    );

    let a = answers(&mut clients, Instant::now() + patience(ANSWER_TIMEOUT));
    assert_eq!(
        (a.by_gen2, a.resets, a.timeouts),
        (N, 0, 0),
        "after one new connection, all {N} migrated connections should be answered by \
         generation 2 (none lost, none reset): other failures {:?}",
        a.other
    );
    assert_eq!(
        (g2.server.accepted(), g2.server.served()),
        (N + 1, N + 1),
        "generation 2 should have accepted and served exactly the {N} migrated connections and \
         the waking one (the agent made none of its own)"
    );
    let status = env.status(PORT);
    assert!(
        generation_status(&status, 2).counters.migrated >= N,
        "the program should count {N} connections migrated to generation 2: {status:?}"
    );
    drop(g1_registration);
}

/// Half-open connections (the server's side still in SYN_RECV) of a closing listener are
/// migrated too (5.14+: when their handshake completes): generation 1 defers accepting until
/// data arrives (`TCP_DEFER_ACCEPT`), so its clients' connections stay half-open there until
/// they send their request, which they do only after its listener closed.
#[test]
fn closing_draining_listener_migrates_half_open_connections() {
    const NAME: &str = "closing_draining_listener_migrates_half_open_connections";
    const PORT: u16 = 7405;
    const N: u64 = 50;
    if !expects_migration() {
        return skip(NAME, NO_MIGRATION);
    }
    let env = TestEnv::new(NAME);
    let g1_listener = listener_with_backlog(PORT, 1024);
    set_defer_accept(&g1_listener, 60);
    let g1_registration = env.register(&g1_listener, PORT, 1, false);
    let g2 = env.serve(PORT, 2, ServerKind::Blocking, false);

    let mut clients: Vec<ClientConn> = (0..N)
        .map(|_| ClientConn::connect(local(PORT)).expect("connect while generation 1 is active"))
        .collect();
    wait_until(
        &format!("{N} connections are half-open (SYN_RECV) on port {PORT}"),
        patience(Duration::from_secs(5)),
        || syn_recv_on(PORT) == N,
    );
    assert_eq!(
        accept_queue_len(&g1_listener),
        0,
        "no connection should be complete on generation 1's side before it sent data"
    );

    env.activate(PORT, 2);
    drop(g1_listener);
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(i as u64)
            .expect("send the request after generation 1 closed");
    }
    let a = answers(&mut clients, Instant::now() + patience(ANSWER_TIMEOUT));
    println!(
        "{NAME}: {}/{N} half-open connections answered by generation 2; {} reset, {} timed \
         out, other {:?}",
        a.by_gen2, a.resets, a.timeouts, a.other
    );
    assert_eq!(
        (a.by_gen2, a.resets, a.timeouts),
        (N, 0, 0),
        "every half-open connection of the closed listener should be migrated to generation 2 \
         and answered (none reset): other failures {:?}",
        a.other
    );
    let status = env.status(PORT);
    assert!(
        generation_status(&status, 2).counters.migrated >= N,
        "the program should count {N} connections migrated to generation 2: {status:?}"
    );
    drop((g2, g1_registration));
}

/// `TCP_DEFER_ACCEPT`: the listener completes a connection only once data arrives (or after
/// `seconds`); until then the bare ACK of the handshake is dropped and the connection stays
/// half-open.
fn set_defer_accept(listener: &TcpListener, seconds: libc::c_int) {
    // SAFETY: setsockopt with an int we own.
    let res = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        res,
        0,
        "setsockopt(TCP_DEFER_ACCEPT): {}",
        io::Error::last_os_error()
    );
}

/// Server-side half-open connections (state SYN_RECV, 03) to local port `port` in the calling
/// thread's network namespace. NB: `/proc/thread-self`: the test's thread has its own.
fn syn_recv_on(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp")
        .expect("read /proc/thread-self/net/tcp");
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "03"
        })
        .count() as u64
}

/// A listening SO_REUSEPORT socket with an explicit backlog (the queue must hold them all).
fn listener_with_backlog(port: u16, backlog: i32) -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.set_reuse_port(true).expect("SO_REUSEPORT");
    s.bind(&local(port).into()).expect("bind");
    s.listen(backlog).expect("listen");
    s.into()
}
