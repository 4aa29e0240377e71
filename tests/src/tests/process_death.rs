//! The active generation's process dies: new connections fall back to the draining
//! generation instead of being refused.

use std::time::Duration;

use crate::harness::{
    ChildServer, ServerKind, TestEnv, generation_status, local, patience, tally, wait_until,
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

    // NB: the agent learns of the death when the child's registration connection closes.
    wait_until(
        "status no longer lists the dead active generation",
        patience(Duration::from_secs(10)),
        || env.status(PORT).generations.len() == 1,
    );
    let status = env.status(PORT);
    println!("status after the agent noticed: {status:?}");
    assert!(
        status.falling_back && status.active.is_none(),
        "status should say the group falls back, with no active generation: {status:?}"
    );
    let out = env.ctl(&["status"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && shown.contains("FALLING BACK"),
        "`reuseportctl status` should show FALLING BACK:\n{shown}"
    );
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

#[test]
fn killed_standby_generation_changes_nothing_for_traffic() {
    const PORT: u16 = 7502;
    let env = TestEnv::new("killed_standby_generation_changes_nothing_for_traffic");
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let mut g2 = ChildServer::spawn(&env, PORT, 2, false);
    let t = tally(local(PORT), 200);
    assert_eq!(t.of(1), 200, "standby generation 2 should get nothing: {t}");

    g2.kill();
    let t = tally(local(PORT), 1000);
    assert_eq!(
        (t.of(1), t.failed),
        (1000, 0),
        "a standby generation dying before activation should change nothing: {t}"
    );
    wait_until(
        "status no longer lists the dead standby generation",
        patience(Duration::from_secs(10)),
        || {
            env.status(PORT)
                .generations
                .iter()
                .all(|g| g.generation != 2)
        },
    );
    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(1),
        "generation 1 stays active: {status:?}"
    );
    assert!(!status.falling_back, "nothing falls back: {status:?}");
    drop(g1);
}

#[test]
fn server_that_dies_while_the_agent_is_down_is_dropped_at_adoption() {
    const PORT: u16 = 7503;
    let mut env = TestEnv::new("server_that_dies_while_the_agent_is_down_is_dropped_at_adoption");
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let mut g2 = ChildServer::spawn(&env, PORT, 2, true);
    let g2_slot = g2.slot;
    env.kill_agent();
    g2.kill();
    // The active generation died while nobody managed the group: the program falls back.
    let t = tally(local(PORT), 200);
    assert_eq!(
        (t.of(1), t.failed),
        (200, 0),
        "with the agent down, the program alone should fall back to generation 1: {t}"
    );
    env.restart_agent(&[]);
    env.wait_all_registered(patience(Duration::from_secs(15)));
    let status = env.status(PORT);
    assert!(
        status
            .generations
            .iter()
            .all(|g| g.generation == 1 && g.sockets.iter().all(|s| s.slot != g2_slot)),
        "the dead server's socket (slot {g2_slot}) should be dropped at adoption: {status:?}"
    );
    assert!(
        env.agent_log().contains("dropped=1"),
        "the agent should say it dropped one socket"
    );
    drop(g1);
}
