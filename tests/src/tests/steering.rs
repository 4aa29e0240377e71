//! Steering of new connections: only the active generation receives them.

use std::time::Duration;

use reuseport_proto::GenState;

use crate::harness::{ClientConn, ServerKind, TestEnv, generation_status, load_size, local, tally};

/// How long a pushed state change may take to reach a registration.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn only_active_generation_receives_new_connections() {
    const PORT: u16 = 7101;
    let env = TestEnv::new("only_active_generation_receives_new_connections");
    let g1 = env.serve(PORT, 1, ServerKind::Blocking, false);
    let g2 = env.serve(PORT, 2, ServerKind::Blocking, false);

    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(1),
        "the first generation registered should be active: {status:?}"
    );

    let t = tally(local(PORT), 1000);
    println!("1,000 connections: {t}");
    assert_eq!(t.failed, 0, "every connection should be answered: {t}");
    assert_eq!(
        t.of(1),
        1000,
        "the active generation 1 should answer all 1,000 connections: {t}"
    );
    assert_eq!(
        t.of(2),
        0,
        "standby generation 2 should receive no connection: {t}"
    );
    assert_eq!(
        g1.server.served(),
        1000,
        "generation 1's server should have served 1,000 connections"
    );
    assert_eq!(
        g2.server.served(),
        0,
        "generation 2's server should have served nothing"
    );
    assert_eq!(
        g2.server.accepted(),
        0,
        "generation 2's listener should have accepted nothing"
    );

    let status = env.status(PORT);
    let generation = |g: u32| generation_status(&status, g);
    assert_eq!(
        generation(1).state,
        GenState::Active,
        "generation 1 should be active: {status:?}"
    );
    assert_eq!(
        generation(2).state,
        GenState::Standby,
        "generation 2 should be standby: {status:?}"
    );
    assert_eq!(
        generation(1).counters.selected,
        1000,
        "the program should count 1,000 selections for generation 1: {status:?}"
    );
    assert_eq!(
        generation(2).counters.selected + generation(2).counters.fallback,
        0,
        "the program should count nothing for standby generation 2: {status:?}"
    );
    assert!(
        !status.falling_back,
        "an active generation is listening, so no fallback: {status:?}"
    );
    assert_eq!(
        status.unsteered, 0,
        "every connection should have been steered: {status:?}"
    );
}

#[test]
fn activation_flip_moves_new_connections_and_keeps_established_ones() {
    const PORT: u16 = 7201;
    let env = TestEnv::new("activation_flip_moves_new_connections_and_keeps_established_ones");
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let g2 = env.serve(PORT, 2, ServerKind::Tokio, false);

    // Established connections to generation 1, each already answered once.
    let mut established: Vec<ClientConn> = (0..20)
        .map(|i| {
            let mut c = ClientConn::connect(local(PORT)).expect("connect before the flip");
            let g = c
                .request()
                .unwrap_or_else(|e| panic!("request {i} before the flip: {e}"));
            assert_eq!(g, 1, "before the flip, generation 1 should answer");
            c
        })
        .collect();

    let mut g1_state = g1.registration.state();
    let mut g2_state = g2.registration.state();
    assert_eq!(
        *g1_state.borrow(),
        GenState::Active,
        "generation 1 should start active"
    );
    assert_eq!(
        *g2_state.borrow(),
        GenState::Standby,
        "generation 2 should start standby"
    );

    let changed = env.activate(PORT, 2);
    assert_eq!(
        changed.active,
        Some(2),
        "activate should answer with generation 2 active: {changed:?}"
    );

    env.block_on(async {
        tokio::time::timeout(
            PUSH_TIMEOUT,
            g1_state.wait_for(|s| *s == GenState::Draining),
        )
        .await
        .expect("generation 1's registration should be told it is draining")
        .expect("generation 1's registration should still be open");
        tokio::time::timeout(PUSH_TIMEOUT, g2_state.wait_for(|s| *s == GenState::Active))
            .await
            .expect("generation 2's registration should be told it is active")
            .expect("generation 2's registration should still be open");
    });

    let t = tally(local(PORT), 1000);
    println!("1,000 connections after activate 2: {t}");
    assert_eq!(
        t.failed, 0,
        "every new connection should be answered after the flip: {t}"
    );
    assert_eq!(
        t.of(1),
        0,
        "generation 1 should receive no new connection after activate 2: {t}"
    );
    assert_eq!(
        t.of(2),
        1000,
        "generation 2 should receive all 1,000 new connections: {t}"
    );

    for (i, c) in established.iter_mut().enumerate() {
        for _ in 0..3 {
            let g = c.request().unwrap_or_else(|e| {
                panic!("established connection {i} should still work after the flip: {e}")
            });
            assert_eq!(
                g, 1,
                "established connection {i} should still be served by generation 1"
            );
        }
    }
    assert_eq!(
        g1.server.requests(),
        20 * 4,
        "generation 1 should have answered every request of its connections"
    );

    let status = env.status(PORT);
    let state = |g: u32| {
        status
            .generations
            .iter()
            .find(|s| s.generation == g)
            .map(|s| s.state)
    };
    assert_eq!(
        status.active,
        Some(2),
        "status should show generation 2 active: {status:?}"
    );
    assert_eq!(
        state(1),
        Some(GenState::Draining),
        "status should show generation 1 draining: {status:?}"
    );
    assert_eq!(
        state(2),
        Some(GenState::Active),
        "status should show generation 2 active: {status:?}"
    );
}

#[test]
fn draining_listener_stays_open_and_receives_nothing() {
    const PORT: u16 = 7301;
    let env = TestEnv::new("draining_listener_stays_open_and_receives_nothing");
    // 10,000 on the host; in a VM guest they took ~35 s under emulation.
    let n = load_size("connections", 10_000, 1_000);
    let g1 = env.serve(PORT, 1, ServerKind::Blocking, false);
    let g2 = env.serve(PORT, 2, ServerKind::Blocking, false);
    env.activate(PORT, 2);

    let t = tally(local(PORT), n);
    println!("{n} connections with generation 1 draining: {t}");
    assert_eq!(t.failed, 0, "every connection should be answered: {t}");
    assert_eq!(
        t.of(1),
        0,
        "draining generation 1 should receive none of {n} new connections: {t}"
    );
    assert_eq!(
        t.of(2),
        n,
        "active generation 2 should receive all {n} connections: {t}"
    );
    assert_eq!(
        g1.server.accepted(),
        0,
        "draining generation 1 should accept nothing"
    );
    assert!(
        g1.server.is_accepting(),
        "generation 1's accept loop should still be running while draining"
    );
    assert!(
        g1.server.is_listening(),
        "generation 1's socket should still be listening while draining"
    );
    assert_eq!(
        g2.server.served(),
        n,
        "generation 2's server should have served {n} connections"
    );

    let status = env.status(PORT);
    let g1_status = generation_status(&status, 1);
    assert_eq!(
        g1_status.state,
        GenState::Draining,
        "generation 1 should be draining: {status:?}"
    );
    assert!(
        !g1_status.sockets.is_empty() && g1_status.sockets.iter().all(|s| s.listening),
        "generation 1's socket should still be listening: {status:?}"
    );
    assert_eq!(
        g1_status.counters.selected + g1_status.counters.fallback,
        0,
        "the program should have placed nothing on generation 1: {status:?}"
    );
}
