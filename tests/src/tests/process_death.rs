//! The active generation's process dies: new connections fall back to the draining
//! generation instead of being refused.

use std::time::Duration;

use crate::harness::{
    ChildServer, ServerKind, TestEnv, generation_status, local, tally, wait_until,
};

#[test]
fn killed_active_generation_falls_back_to_draining_one() {
    const PORT: u16 = 7501;
    let env = TestEnv::new("killed_active_generation_falls_back_to_draining_one");
    let g1 = env.serve(PORT, 1, ServerKind::Blocking, false);
    let mut g2 = ChildServer::spawn(&env, PORT, 2, true);

    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(2),
        "generation 2 registered with activate should be active: {status:?}"
    );
    let t = tally(local(PORT), 100);
    assert_eq!(
        t.of(2),
        100,
        "the child process (generation 2) should answer while alive: {t}"
    );

    g2.kill();
    let t = tally(local(PORT), 1000);
    println!("1,000 connections right after SIGKILL of generation 2: {t}");
    assert_eq!(
        t.failed, 0,
        "no connection should be refused or fail after the active process died: {t}"
    );
    assert_eq!(
        t.of(1),
        1000,
        "draining generation 1 should receive every new connection: {t}"
    );
    assert_eq!(
        g1.server.served(),
        1000,
        "generation 1's server should have served 1,000 connections"
    );

    wait_until(
        "status shows the group falling back (no active generation left)",
        Duration::from_secs(10),
        || {
            let s = env.status(PORT);
            s.falling_back || s.active.is_none()
        },
    );
    let status = env.status(PORT);
    println!("status after the agent noticed: {status:?}");
    let g1_status = generation_status(&status, 1);
    assert!(
        g1_status.counters.fallback >= 1000,
        "the program should count the 1,000 connections as fallbacks to generation 1: {status:?}"
    );

    let t = tally(local(PORT), 100);
    assert_eq!(
        t.of(1),
        100,
        "generation 1 should keep receiving connections once the agent noticed: {t}"
    );
}
