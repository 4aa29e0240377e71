//! Clients that never read what the agent pushes, and supervisors that never answer: the
//! agent keeps what waits for them bounded, and says what happened.

use std::time::Duration;

use reuseport_client::ControlClient;
use reuseport_proto::{ErrorKind, GenState, Reply, RestartOutcome};

use crate::harness::{
    ServerKind, TestEnv, control::register_supervised, group, load_size, one_line_error,
};

/// How long a test waits for an answer the agent owes it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn a_registration_that_never_reads_gets_the_latest_state_not_a_backlog() {
    const PORT: u16 = 9701;
    let env = TestEnv::new("a_registration_that_never_reads_gets_the_latest_state");
    let listener = env.listen(PORT);
    let mut deaf = register_supervised(&env, &listener, group(PORT));
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    // Every flip pushes a state change to generation 1's registration, which reads nothing:
    // its socket buffer fills after a few hundred, and the rest must not pile up in the agent.
    let flips = load_size("flips while a registration reads nothing", 5000, 2000);
    let mut ops = env.control();
    for i in 0..flips {
        let generation = if i.is_multiple_of(2) { 2 } else { 1 };
        env.block_on(ops.activate(group(PORT), generation))
            .unwrap_or_else(|e| panic!("flip {i} to generation {generation}: {e}"));
    }
    let last = if flips.is_multiple_of(2) {
        GenState::Active
    } else {
        GenState::Draining
    };
    // A restart request is queued behind the state: once it arrives, everything pushed
    // before it has been read.
    env.block_on(ops.restart(group(PORT)))
        .expect("the restart should go to the deaf supervisor");
    let (states, latest) = env.block_on(async {
        let mut states = 0u64;
        let mut latest = None;
        loop {
            let pushed = tokio::time::timeout(ANSWER_TIMEOUT, deaf.recv_msg::<Reply>())
                .await
                .expect("the pushes should arrive once the registration reads")
                .expect("a readable push")
                .expect("a push before the close");
            match pushed.0 {
                Reply::State { state, .. } => {
                    states += 1;
                    latest = Some(state);
                }
                Reply::Restart { .. } => return (states, latest),
                other => panic!("unexpected push {other:?}"),
            }
        }
    });
    println!("{flips} flips: the registration read {states} state pushes, the last {latest:?}");
    assert_eq!(
        latest,
        Some(last),
        "the last push should be the generation's current state"
    );
    assert!(
        states <= flips / 2,
        "a registration that fell behind should get the latest state, not a backlog: {states} \
         of {flips} state pushes were kept for it"
    );
}

#[test]
fn a_restart_its_supervisor_never_answers_fails_in_time_and_status_says_so() {
    const PORT: u16 = 9711;
    let env = TestEnv::with_agent(
        "a_restart_its_supervisor_never_answers_fails_in_time",
        &[],
        &[("REUSEPORT_RESTART_TIMEOUT", "1s")],
    );
    let listener = env.listen(PORT);
    let _silent = register_supervised(&env, &listener, group(PORT));
    let out = env.ctl(&["restart", &format!("127.0.0.1:{PORT}"), "--timeout", "30s"]);
    let err = one_line_error("restart with a supervisor that never answers", &out);
    assert!(
        err.contains("reported no outcome within 1s") && err.contains("--restart-timeout"),
        "the requester should get the agent's time-out, saying what to look at: {err}"
    );
    let status = env.status(PORT);
    match &status.last_restart {
        Some(RestartOutcome::Failed { error }) => assert!(
            error.contains("reported no outcome within 1s"),
            "status should say the restart timed out: {error}"
        ),
        other => panic!("status should show the timed-out restart, got {other:?}"),
    }
    // The supervisor answers late: nobody waits any more, but status shows the outcome.
    let late = env.block_on(async {
        let mut c = ControlClient::connect(env.control_path()).await?;
        c.report_restart(group(PORT), 1, RestartOutcome::Active { generation: 1 })
            .await
    });
    late.expect("a late result from the group's supervisor should be accepted");
    assert_eq!(
        env.status(PORT).last_restart,
        Some(RestartOutcome::Active { generation: 1 }),
        "status should show the late outcome"
    );
}

#[test]
fn restarts_waiting_for_a_silent_supervisor_are_bounded() {
    const PORT: u16 = 9721;
    let env = TestEnv::new("restarts_waiting_for_a_silent_supervisor_are_bounded");
    let listener = env.listen(PORT);
    let _silent = register_supervised(&env, &listener, group(PORT));
    let mut waiting = 0;
    let refusal = loop {
        let mut c = env.control();
        match env.block_on(c.restart(group(PORT))) {
            Ok(_) => waiting += 1,
            Err(e) => break e,
        }
        assert!(
            waiting <= 64,
            "restarts nobody answers should not pile up without bound"
        );
    };
    println!("after {waiting} waiting restarts: {refusal}");
    assert_eq!(refusal.agent_kind(), Some(ErrorKind::Limit), "{refusal}");
    assert!(
        refusal
            .to_string()
            .contains("already wait for their supervisor"),
        "the refusal should say what waits: {refusal}"
    );
}
