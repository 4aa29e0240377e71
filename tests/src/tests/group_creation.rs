//! An agent that dies while it creates a group (its first socket is in the socket array, the
//! table and record not published yet) leaves nothing that blocks the group afterwards.

use std::os::fd::AsFd as _;

use reuseport_client as client;

use crate::harness::{Server, ServerKind, TestEnv, local, tally, wait_until};

#[test]
fn crash_before_the_first_publish_does_not_wedge_the_group() {
    const PORT: u16 = 9301;
    let mut env = TestEnv::with_agent(
        "crash_before_the_first_publish_does_not_wedge_the_group",
        &[],
        &[("REUSEPORT_FAULT_AT", "register.slot-set")],
    );
    let listener = env.listen(PORT);
    let opts = env.register_options(PORT, 1, false);
    let err = env
        .block_on(client::register(listener.as_fd(), &opts))
        .expect_err("the agent dies in the middle of this registration");
    println!("registration cut short by the agent's death: {err}");
    wait_until(
        "the agent has died at the fault point",
        std::time::Duration::from_secs(10),
        || env.agent_log().contains("fault injection"),
    );
    env.kill_agent();
    env.restart_agent(&[]);

    let registration = env
        .block_on(client::register(listener.as_fd(), &opts))
        .unwrap_or_else(|e| {
            panic!("the socket should register into the group after the restart: {e}")
        });
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "the group should have generation 1 active"
    );
    let server = Server::start(ServerKind::Tokio, listener, 1, env.rt().handle());
    let t = tally(local(PORT), 20);
    assert_eq!(t.of(1), 20, "generation 1 should get every connection: {t}");
    drop(server);
    drop(registration);
}
