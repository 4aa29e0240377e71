//! After an agent restart, clients register their sockets again on their own; a refusal the
//! agent calls temporary (a limit, a kernel failure) is retried, never taken as final.

use std::time::Duration;

use crate::harness::{ServerKind, TestEnv, local, tally, wait_until};

#[test]
fn reregistration_retries_a_temporary_refusal() {
    const PORT: u16 = 9401;
    let mut env = TestEnv::new("reregistration_retries_a_temporary_refusal");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    env.kill_agent();
    // The first re-registration fails in the kernel (attaching the program), as a transient
    // failure would.
    env.restart_agent(&[("REUSEPORT_FAULT_FAIL", "attach:1")]);
    wait_until(
        "the agent refused the first re-registration",
        Duration::from_secs(15),
        || env.agent_log().contains("fault injection: this step fails"),
    );
    env.wait_all_registered(Duration::from_secs(15));
    let s = env.status(PORT);
    assert_eq!(s.active, Some(1), "{s:?}");
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "generation 1 should still get every connection: {t}"
    );
}
