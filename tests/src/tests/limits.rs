//! The documented limits of a group: 128 sockets (the sockarray) and as many generations;
//! one more is a clear `limit` error that changes nothing, and room made by a leaving socket
//! can be used again.

use std::{os::fd::AsFd as _, time::Duration};

use reuseport_agent::{client, protocol::ErrorKind};
use reuseport_common::MAX_SLOTS;

use crate::harness::{ServerKind, TestEnv, local, patience, tally, wait_until};

#[test]
fn a_group_holds_128_sockets_in_128_generations_and_refuses_one_more() {
    const PORT: u16 = 8701;
    let env = TestEnv::new("a_group_holds_128_sockets_in_128_generations_and_refuses_one_more");
    let last = MAX_SLOTS;
    // Generations 1 and 128 serve; the ones between only hold their place.
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let mut held: Vec<_> = (2..last)
        .map(|generation| {
            let listener = env.listen(PORT);
            let registration = env.register(&listener, PORT, generation, false);
            (listener, registration)
        })
        .collect();
    let g_last = env.serve(PORT, last, ServerKind::Tokio, false);

    let status = env.status(PORT);
    let limits = status.limits.expect("status should report the limits");
    assert_eq!(
        (limits.sockets_per_group, limits.generations_per_group),
        (MAX_SLOTS, MAX_SLOTS),
        "status should report 128 sockets and 128 generations per group"
    );
    assert_eq!(
        (
            status.generations.len(),
            status
                .generations
                .iter()
                .map(|g| g.sockets.len())
                .sum::<usize>()
        ),
        (MAX_SLOTS as usize, MAX_SLOTS as usize),
        "the group should hold 128 generations of one socket each"
    );

    let refused = |generation: u32| {
        let listener = env.listen(PORT);
        let opts = env.register_options(PORT, generation, false);
        let err = env
            .block_on(client::register(listener.as_fd(), &opts))
            .map(drop)
            .expect_err("one socket beyond the limit should be refused");
        println!("socket 129 as generation {generation}: {err}");
        assert_eq!(
            err.agent_kind(),
            Some(ErrorKind::Limit),
            "exceeding the socket limit should be a limit error: {err}"
        );
        assert!(
            err.to_string().contains("already holds 128 sockets"),
            "the message should name the limit: {err}"
        );
    };
    refused(last + 1);
    refused(1);
    assert_eq!(
        env.status(PORT).generations.len(),
        MAX_SLOTS as usize,
        "a refused registration should change nothing"
    );

    // The last generation takes over; every generation is still steered correctly.
    env.activate(PORT, last);
    let t = tally(local(PORT), 50);
    assert_eq!(
        (t.of(last), t.failed),
        (50, 0),
        "generation {last} should get every connection once active: {t}"
    );

    // A socket that leaves makes room for one more.
    drop(held.pop());
    wait_until(
        "the agent dropped the generation that left",
        patience(Duration::from_secs(10)),
        || env.status(PORT).generations.len() == MAX_SLOTS as usize - 1,
    );
    let listener = env.listen(PORT);
    let opts = env.register_options(PORT, last + 1, false);
    let registration = env
        .block_on(client::register(listener.as_fd(), &opts))
        .unwrap_or_else(|e| panic!("a socket should register once another one left: {e}"));
    assert_eq!(
        env.status(PORT).generations.len(),
        MAX_SLOTS as usize,
        "one generation left, one came"
    );
    drop((registration, listener, held, g1, g_last));
}
