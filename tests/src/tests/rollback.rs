//! `reuseportctl rollback`: the newest draining generation that still listens becomes active
//! again in one flip; refused, changing nothing, when none does.

use std::{
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reuseport_client::{Registration, blocking::ControlClient};
use reuseport_proto::{GenState, GroupStatus};

use crate::harness::{
    Generation, ServerKind, Tally, TestEnv, generation_status, group, local, one_line_error,
    request_once, tally, wait_until,
};

const CLIENT_THREADS: usize = 2;
/// The exit status of a request the agent refused (see `reuseportctl --help`).
const REFUSED: i32 = 6;

/// `reuseportctl rollback --json GROUP`, which must succeed: the group after the change.
fn rollback(env: &TestEnv, port: u16) -> GroupStatus {
    let out = env.ctl(&["rollback", "--json", &format!("127.0.0.1:{port}")]);
    assert!(
        out.status.success(),
        "rollback should succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "rollback --json should print the group: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A refused `reuseportctl rollback GROUP`: its one error line.
fn refused(env: &TestEnv, port: u16, what: &str) -> String {
    let out: Output = env.ctl(&["rollback", &format!("127.0.0.1:{port}")]);
    let err = one_line_error(what, &out);
    assert_eq!(
        out.status.code(),
        Some(REFUSED),
        "{what} should exit with {REFUSED}: {err}"
    );
    assert!(
        err.contains("nothing to roll back to"),
        "{what} should say why: {err}"
    );
    err
}

/// Closes a generation's listener and keeps its registration (a server that stopped
/// accepting but has not exited), once the agent sees it closed.
fn close_listener(env: &TestEnv, port: u16, g: Generation) -> Registration {
    let Generation {
        generation,
        server,
        registration,
    } = g;
    server.stop();
    wait_until(
        "the agent sees the listener closed",
        Duration::from_secs(10),
        || {
            generation_status(&env.status(port), generation)
                .sockets
                .iter()
                .all(|s| !s.listening)
        },
    );
    registration
}

#[test]
fn rollback_under_load_brings_back_the_previous_generation() {
    const PORT: u16 = 6101;
    let env = TestEnv::new("rollback_under_load_brings_back_the_previous_generation");
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    env.activate(PORT, 2);

    // Each client keeps two tallies: connections started before it saw the rollback's
    // answer, and connections started after.
    let rolled_back = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            let (rolled_back, done) = (rolled_back.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut before, mut after, mut n) = (Tally::default(), Tally::default(), 0);
                while !done.load(Ordering::SeqCst) {
                    let after_reply = rolled_back.load(Ordering::SeqCst);
                    let result = request_once(local(PORT), n);
                    if after_reply { &mut after } else { &mut before }.record(result);
                    n += 1;
                }
                (before, after)
            })
        })
        .collect();
    wait_until(
        "the load reaches generation 2",
        Duration::from_secs(30),
        || g2.server.served() >= 20,
    );

    let changed = rollback(&env, PORT);
    rolled_back.store(true, Ordering::SeqCst);
    assert_eq!(
        changed.active,
        Some(1),
        "rollback should make generation 1 active again: {changed:?}"
    );
    assert_eq!(
        generation_status(&changed, 2).state,
        GenState::Draining,
        "rollback should drain generation 2: {changed:?}"
    );
    let served_by_1 = g1.server.served();
    wait_until(
        "the load reaches generation 1 again",
        Duration::from_secs(30),
        || g1.server.served() >= served_by_1 + 50,
    );
    done.store(true, Ordering::SeqCst);

    let (mut before, mut after) = (Tally::default(), Tally::default());
    for c in clients {
        let (b, a) = c.join().expect("client thread");
        before.merge(&b);
        after.merge(&a);
    }
    println!("before the rollback's answer: {before}; after: {after}");
    assert_eq!(
        before.failed + after.failed,
        0,
        "no connection should fail: {before}; {after}"
    );
    assert!(
        before.of(2) > 0,
        "the load should have reached generation 2 first: {before}"
    );
    assert_eq!(
        after.of(2),
        0,
        "after the rollback's answer every new connection should reach generation 1: {after}"
    );
    assert!(
        after.of(1) > 0,
        "generation 1 should answer after the rollback: {after}"
    );
}

#[test]
fn rollback_picks_the_newest_draining_generation_that_still_listens() {
    const PORT: u16 = 6111;
    let env = TestEnv::new("rollback_picks_the_newest_draining_generation_that_still_listens");
    let g1 = env.serve(PORT, 1, ServerKind::Blocking, false);
    let err = refused(&env, PORT, "rollback with nothing draining");
    assert!(err.contains("no generation is draining"), "{err}");

    let g2 = env.serve(PORT, 2, ServerKind::Blocking, false);
    let _g3 = env.serve(PORT, 3, ServerKind::Blocking, false);
    env.activate(PORT, 2);
    env.activate(PORT, 3);
    let changed = rollback(&env, PORT);
    assert_eq!(
        changed.active,
        Some(2),
        "generation 2 is the newest draining one: {changed:?}"
    );
    let t = tally(local(PORT), 100);
    assert_eq!(
        (t.of(2), t.failed),
        (100, 0),
        "generation 2 should answer every connection: {t}"
    );

    env.activate(PORT, 3);
    let _g2 = close_listener(&env, PORT, g2);
    let changed = rollback(&env, PORT);
    assert_eq!(
        changed.active,
        Some(1),
        "generation 2 closed its listener, so generation 1 comes back: {changed:?}"
    );
    let t = tally(local(PORT), 100);
    assert_eq!(
        (t.of(1), t.failed),
        (100, 0),
        "generation 1 should answer every connection: {t}"
    );

    env.activate(PORT, 3);
    let _g1 = close_listener(&env, PORT, g1);
    let err = refused(
        &env,
        PORT,
        "rollback when every draining generation closed its listener",
    );
    assert!(err.contains("closed their listeners"), "{err}");
    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(3),
        "a refused rollback should change nothing: {status:?}"
    );

    // The client library without an async runtime splits, promotes and rolls back the same.
    let _g4 = env.serve(PORT, 4, ServerKind::Blocking, false);
    let mut c = ControlClient::connect(env.control_path()).expect("connect to the agent");
    let split = c.split(group(PORT), 4, 50).expect("split");
    let weights: Vec<_> = split[0]
        .generations
        .iter()
        .filter(|g| g.state == GenState::Active)
        .map(|g| (g.generation, g.weight))
        .collect();
    assert_eq!(
        weights,
        [(3, Some(50)), (4, Some(50))],
        "a 50 % split should show both generations active with their weights: {split:?}"
    );
    c.activate(group(PORT), 4).expect("promote generation 4");
    let back = c.rollback(group(PORT)).expect("rollback");
    assert_eq!(
        back[0].active,
        Some(3),
        "rollback should bring generation 3 back: {back:?}"
    );
}
