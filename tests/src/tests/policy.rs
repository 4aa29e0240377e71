//! The steering policy's rarer rules (README, "Steering policy"): the fallback order when the
//! active generation is gone, a generation with several sockets losing one, and handing
//! connections back to the kernel when no registered socket is left.

use std::time::Duration;

use crate::harness::{
    ChildServer, Server, ServerKind, TestEnv, generation_status, local, patience, tally, wait_until,
};

/// Connections per measurement.
const N: u64 = 200;

/// Rule 2: with no active socket left, new connections go to the newest draining generation,
/// then to older draining ones, then to standby generations.
#[test]
fn fallback_goes_to_the_newest_draining_generation_then_older_ones_then_standby() {
    const PORT: u16 = 8601;
    let env = TestEnv::new(
        "fallback_goes_to_the_newest_draining_generation_then_older_ones_then_standby",
    );
    // NB: blocking servers: their listener is closed when dropping them returns (a tokio
    // server's closes a moment later, and in select-only mode a connection queued on it in
    // that moment is reset).
    let g1 = env.serve(PORT, 1, ServerKind::Blocking, false);
    let g2 = env.serve(PORT, 2, ServerKind::Blocking, false);
    env.activate(PORT, 2);
    let mut g3 = ChildServer::spawn(&env, PORT, 3, true);
    let g4 = env.serve(PORT, 4, ServerKind::Blocking, false);
    let status = env.status(PORT);
    assert_eq!(
        status
            .generations
            .iter()
            .map(|g| (g.generation, g.state.to_string()))
            .collect::<Vec<_>>(),
        [
            (1, "draining".to_owned()),
            (2, "draining".to_owned()),
            (3, "active".to_owned()),
            (4, "standby".to_owned())
        ],
        "setup: 1 and 2 draining, 3 active, 4 standby: {status:?}"
    );

    g3.kill();
    let t = tally(local(PORT), N);
    assert_eq!(
        (t.of(2), t.failed),
        (N, 0),
        "with the active generation dead, the newest draining generation (2) should get every \
         new connection: {t}"
    );
    drop(g2);
    let t = tally(local(PORT), N);
    assert_eq!(
        (t.of(1), t.failed),
        (N, 0),
        "with generation 2 gone too, the older draining generation (1) should get them: {t}"
    );
    drop(g1);
    let t = tally(local(PORT), N);
    assert_eq!(
        (t.of(4), t.failed),
        (N, 0),
        "with no draining generation left, the standby generation (4) should get them: {t}"
    );
    wait_until(
        "the agent dropped the generations that left",
        patience(Duration::from_secs(10)),
        || env.status(PORT).generations.len() == 1,
    );
    let status = env.status(PORT);
    assert!(
        status.falling_back && generation_status(&status, 4).counters.fallback >= N,
        "status should show the fallback, and the program count {N} fallbacks to the standby \
         generation: {status:?}"
    );
    drop(g4);
}

/// Rule 1: a generation with several sockets whose hash-picked socket has closed (its
/// registration still open) sends the connection to the next active socket in order.
#[test]
fn closed_socket_of_the_active_generation_passes_its_share_to_the_next_one_in_order() {
    const PORT: u16 = 8602;
    const N: u64 = 300;
    let env = TestEnv::new(
        "closed_socket_of_the_active_generation_passes_its_share_to_the_next_one_in_order",
    );
    let mut sockets: Vec<(u32, Option<Server>, _)> = (0..3)
        .map(|_| {
            let listener = env.listen(PORT);
            let registration = env.register(&listener, PORT, 1, false);
            let server = Server::start(ServerKind::Blocking, listener, 1, env.rt().handle());
            (registration.slot(), Some(server), registration)
        })
        .collect();
    sockets.sort_by_key(|(slot, _, _)| *slot);
    let served = |s: &[(u32, Option<Server>, _)]| -> Vec<u64> {
        s.iter()
            .map(|(_, server, _)| server.as_ref().map_or(0, Server::served))
            .collect()
    };

    let t = tally(local(PORT), N);
    let spread = served(&sockets);
    println!("{N} connections over the three sockets of generation 1: {spread:?}");
    assert_eq!((t.of(1), t.failed), (N, 0), "{t}");
    assert!(
        spread.iter().all(|&n| n > 0),
        "the hash should spread connections over all three sockets: {spread:?}"
    );

    // The first socket in slot order closes; its registration stays open, so the table
    // still names its slot, which is now empty.
    sockets[0].1.take().expect("server").stop();
    let t = tally(local(PORT), N);
    // NB: the closed socket's server is gone: 0 new for it by construction.
    let after: Vec<u64> = served(&sockets)
        .iter()
        .zip(&spread)
        .map(|(now, before)| now.saturating_sub(*before))
        .collect();
    println!("{N} connections after the first socket closed: {after:?}");
    assert_eq!(
        (t.of(1), t.failed),
        (N, 0),
        "every connection should still reach generation 1: {t}"
    );
    assert!(
        after[1] > after[2] && after[2] > 0,
        "the closed socket's share should go to the next socket in order (slot {}), on top of \
         its own: new connections per socket {after:?}",
        sockets[1].0
    );
    let status = env.status(PORT);
    assert!(
        !status.falling_back,
        "two active sockets still listen: no fallback: {status:?}"
    );
}

/// Rule 3: when no registered socket listens, the program hands the connection back to the
/// kernel's hash over whatever sockets remain in the kernel's group, and counts it as
/// `unsteered`.
#[test]
fn connections_are_unsteered_when_no_registered_socket_listens() {
    const PORT: u16 = 8603;
    const UNREGISTERED: u32 = 99;
    let env = TestEnv::new("connections_are_unsteered_when_no_registered_socket_listens");
    // NB: blocking: its listener is closed once stopping it returns (see the fallback test).
    let g1 = env.serve(PORT, 1, ServerKind::Blocking, false);
    // Same address and owner: the kernel puts it in the same group, the agent never saw it.
    let other = Server::start(
        ServerKind::Blocking,
        env.listen(PORT),
        UNREGISTERED,
        env.rt().handle(),
    );
    let t = tally(local(PORT), N);
    assert_eq!(
        (t.of(1), other.served()),
        (N, 0),
        "while generation 1 listens, the unregistered socket should get nothing: {t}"
    );
    assert_eq!(env.status(PORT).unsteered, 0, "nothing unsteered yet");

    // Generation 1's listener closes; its registration stays open, so the group stays.
    let crate::harness::Generation {
        server,
        registration,
        ..
    } = g1;
    server.stop();
    let t = tally(local(PORT), N);
    assert_eq!(
        (t.of(UNREGISTERED), t.failed),
        (N, 0),
        "with no registered socket listening, the kernel's hash should pick the remaining \
         unregistered socket: {t}"
    );
    let status = env.status(PORT);
    assert_eq!(
        status.unsteered, N,
        "status should count the {N} connections as unsteered: {status:?}"
    );
    assert!(
        status.falling_back,
        "nothing registered listens: {status:?}"
    );
    drop((registration, other));
}
