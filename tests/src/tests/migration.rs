//! Closing a draining listener: its queued connections migrate to the active generation
//! (select-or-migrate, 5.14+) instead of being reset, and the active server accepts them
//! promptly even though the kernel does not wake it (the agent's wake-up connection).

use std::{
    io,
    net::TcpListener,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

use crate::harness::{
    ClientConn, ServerKind, TestEnv, generation_status, local, select_only_env, skip, wait_until,
};

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

    // Generation 1 (active, registered first) never accepts: everything stays queued.
    let g1_listener = listener_with_backlog(port, 1024);
    let g1_registration = env.register(&g1_listener, port, 1, false);
    let g2 = env.serve(port, 2, kind, false);
    let status = env.status(port);
    if status.mode != "select-or-migrate" {
        return skip(
            name,
            &format!(
                "the agent runs the group in {} mode: no migration control",
                status.mode
            ),
        );
    }

    let mut clients: Vec<ClientConn> = (0..QUEUED)
        .map(|n| {
            let mut c =
                ClientConn::connect(local(port)).expect("connect while generation 1 is active");
            c.send(n).expect("send the request while queued");
            c
        })
        .collect();
    wait_until(
        &format!("generation 1's accept queue holds {QUEUED} connections"),
        Duration::from_secs(5),
        || accept_queue_len(&g1_listener) == QUEUED as u32,
    );
    assert_eq!(
        g2.server.accepted(),
        0,
        "standby generation 2 should accept nothing before the flip"
    );

    env.activate(port, 2);
    let closed_at = Instant::now();
    drop(g1_listener);

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
