//! A change whose publishing fails (record write, table write, attach) changes nothing: the
//! requester gets the error, and `status`, the pinned record and the kernel all keep showing
//! the state before it. The failures are injected in the agent at exactly one write
//! (`REUSEPORT_FAULT_FAIL`, a test-build feature).

use std::{os::fd::AsFd as _, time::Duration};

use reuseport_client as client;
use reuseport_proto::{ErrorKind, GenState};

use crate::harness::{ServerKind, TestEnv, generation_status, group, local, tally};

const FAIL_ENV: &str = "REUSEPORT_FAULT_FAIL";

#[test]
fn activate_whose_table_write_fails_changes_nothing() {
    const PORT: u16 = 9201;
    // Table writes: generation 1's registration, generation 2's, then the activation.
    let mut env = TestEnv::with_agent(
        "activate_whose_table_write_fails_changes_nothing",
        &[],
        &[(FAIL_ENV, "publish.table:3")],
    );
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);

    let err = env
        .try_activate_group(group(PORT), 2)
        .expect_err("activate should fail when its table write fails");
    println!("activate with a failing table write: {err}");
    assert_eq!(
        err.agent_kind(),
        Some(ErrorKind::Kernel),
        "the requester should get the kernel error: {err}"
    );
    let s = env.status(PORT);
    assert_eq!(
        s.active,
        Some(1),
        "status should still show generation 1 active after the failed activate: {s:?}"
    );
    assert_eq!(generation_status(&s, 2).state, GenState::Standby);
    let t = tally(local(PORT), 50);
    assert_eq!(
        t.of(1),
        50,
        "the kernel should still steer to generation 1: {t}"
    );

    // The pinned record says the same: an agent adopting the group keeps generation 1.
    env.kill_agent();
    env.restart_agent(&[]);
    env.wait_all_registered(Duration::from_secs(15));
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "the adopted record should not hold the failed activation"
    );
    let t = tally(local(PORT), 50);
    assert_eq!(
        t.of(1),
        50,
        "after adoption generation 1 should still get everything: {t}"
    );

    // And the change still works once nothing fails.
    env.activate(PORT, 2);
    let t = tally(local(PORT), 50);
    assert_eq!(t.of(2), 50, "a later activate should take effect: {t}");
}

#[test]
fn registration_whose_attach_fails_leaves_the_group_as_it_was() {
    const PORT: u16 = 9211;
    // Attaches: generation 1's registration, then generation 2's (with --activate).
    let env = TestEnv::with_agent(
        "registration_whose_attach_fails_leaves_the_group_as_it_was",
        &[],
        &[(FAIL_ENV, "attach:2")],
    );
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let listener = env.listen(PORT);
    let err = env
        .block_on(client::register(
            listener.as_fd(),
            &env.register_options(PORT, 2, true),
        ))
        .expect_err("registering should fail when attaching the program fails");
    println!("register --activate with a failing attach: {err}");
    assert_eq!(err.agent_kind(), Some(ErrorKind::Kernel), "{err}");
    let s = env.status(PORT);
    assert_eq!(
        s.active,
        Some(1),
        "generation 1 should still be active, not left draining by the refused activation: {s:?}"
    );
    assert_eq!(
        s.generations.len(),
        1,
        "the refused generation should not be listed: {s:?}"
    );
    assert!(!s.falling_back, "the group should not fall back: {s:?}");
    let t = tally(local(PORT), 50);
    assert_eq!(t.of(1), 50, "generation 1 should get every connection: {t}");
    drop(listener);
}

#[test]
fn a_panic_in_the_agent_ends_it_and_a_restart_adopts_its_groups() {
    const PORT: u16 = 9221;
    // Status requests: the one below is the first to take the state lock.
    let mut env = TestEnv::with_agent(
        "a_panic_in_the_agent_ends_it",
        &[],
        &[("REUSEPORT_FAULT_PANIC", "status.locked")],
    );
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let answer = env.block_on(async {
        let mut c = reuseport_client::ControlClient::connect(env.control_path()).await?;
        c.status(None).await
    });
    println!("status while the agent panics: {answer:?}");
    assert!(answer.is_err(), "the panicking request gets no answer");
    let pid = env.agent_pid();
    crate::harness::wait_until(
        "the agent process has ended (not lingering with a poisoned lock)",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.contains(") Z "))
        },
    );
    env.kill_agent();
    env.restart_agent(&[]);
    env.wait_all_registered(Duration::from_secs(15));
    assert_eq!(env.status(PORT).active, Some(1));
    let t = tally(local(PORT), 20);
    assert_eq!(t.of(1), 20, "{t}");
}
