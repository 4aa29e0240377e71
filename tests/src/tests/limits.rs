//! The documented limits: a group holds 128 sockets (the sockarray) and as many
//! generations, one more is a clear `limit` error that changes nothing, and room made by a
//! leaving socket can be used again; a full group flips under load without a failed
//! connection; every reply the agent can produce is delivered at its
//! configured limits (`status` of the most groups, one of them with the most generations and
//! the longest names).

use std::{
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reuseport_client as client;
use reuseport_common::MAX_SLOTS;
use reuseport_proto::{ErrorKind, MAX_NAME_LEN};

use crate::harness::{
    ServerKind, Tally, TestEnv, group, load_size, local, patience, request_once, tally, wait_until,
};

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

#[test]
fn status_is_delivered_at_the_limits() {
    const PORT: u16 = 10001;
    const BIG: u16 = 10900;
    // NB: every group loads a program: 50 ms on the host, seconds in an emulated guest.
    let groups = load_size("groups (the agent's --max-groups)", 256, 8) as u16;
    let env = TestEnv::with_agent(
        "status_is_delivered_at_the_limits",
        &["--max-groups", &groups.to_string()],
        &[],
    );
    let sockets = reuseport_common::MAX_SLOTS;
    // One group with every generation, each one socket and the longest name.
    let mut kept = Vec::new();
    for generation in 1..=sockets {
        let listener = env.listen(BIG);
        let mut opts = env.register_options(BIG, generation, false);
        opts.request.name = Some(format!("{generation:0>width$}", width = MAX_NAME_LEN));
        let registration = env
            .block_on(reuseport_client::register(
                std::os::fd::AsFd::as_fd(&listener),
                &opts,
            ))
            .unwrap_or_else(|e| panic!("generation {generation} of the big group: {e}"));
        kept.push((listener, registration));
    }
    // Every other group the agent may hold, one socket each.
    for i in 0..groups - 1 {
        let listener = env.listen(PORT + i);
        let registration = env.register(&listener, PORT + i, 1, false);
        kept.push((listener, registration));
    }
    let all = env.statuses();
    assert_eq!(
        all.len(),
        usize::from(groups),
        "status should list every group"
    );
    let big = all
        .iter()
        .find(|g| g.group.addr == group(BIG).addr)
        .expect("the big group");
    assert_eq!(big.generations.len(), sockets as usize);
    let bytes = serde_json::to_vec(&all).expect("encode").len();
    println!("status of {groups} groups ({sockets} generations in one): {bytes} bytes of JSON");
    let out = env.ctl(&["status"]);
    assert!(
        out.status.success(),
        "reuseportctl status should print every group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let changed = env.activate(BIG, sockets);
    assert_eq!(changed.active, Some(sockets));
}

#[test]
fn group_limit_is_a_clear_error() {
    const PORT: u16 = 8501;
    let env = TestEnv::with_agent("group_limit_is_a_clear_error", &["--max-groups", "1"], &[]);
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let listener = env.listen(PORT + 1);
    let Err(err) = env.block_on(reuseport_client::register(
        std::os::fd::AsFd::as_fd(&listener),
        &env.register_options(PORT + 1, 1, false),
    )) else {
        panic!("a second group beyond --max-groups 1 should be refused");
    };
    println!("second group: {err}");
    assert_eq!(
        err.agent_kind(),
        Some(ErrorKind::Limit),
        "exceeding the group limit should be a limit error: {err}"
    );
    assert!(
        err.to_string().contains("--max-groups"),
        "the message should say how to raise the limit: {err}"
    );
    let groups = env.statuses();
    assert_eq!(
        groups.len(),
        1,
        "no group should have been added: {groups:?}"
    );
    assert_eq!(
        groups[0].limits.map(|l| l.groups),
        Some(1),
        "status should report the group limit"
    );
    assert_eq!(
        env.status_of(group(PORT)).active,
        Some(1),
        "the existing group should be untouched"
    );
}

/// A group at its socket limit, half the sockets in each of two generations (the shape of a
/// host's workers during a deploy), flips both ways under load: every connection is
/// answered, after each flip only by the new active generation, and the program placed
/// every one (nothing handed back to the kernel's hash).
#[test]
fn a_full_group_of_two_generations_flips_under_load_without_a_failed_connection() {
    const PORT: u16 = 8711;
    const CLIENT_THREADS: usize = 2;
    let env = TestEnv::new(
        "a_full_group_of_two_generations_flips_under_load_without_a_failed_connection",
    );
    let half = MAX_SLOTS / 2;
    let servers: Vec<_> = (0..MAX_SLOTS)
        .map(|i| env.serve(PORT, 1 + i / half, ServerKind::Tokio, false))
        .collect();
    let status = env.status(PORT);
    assert_eq!(
        status
            .generations
            .iter()
            .map(|g| g.sockets.len() as u32)
            .collect::<Vec<_>>(),
        vec![half, half],
        "the group should hold {MAX_SLOTS} sockets, half in each generation: {status:?}"
    );

    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let (mut t, mut n) = (Tally::default(), 0);
                while !done.load(Ordering::Relaxed) {
                    t.record(request_once(local(PORT), n));
                    n += 1;
                }
                t
            })
        })
        .collect();
    for (flip, target) in [2, 1, 2].into_iter().enumerate() {
        env.activate(PORT, target);
        let after = tally(local(PORT), 100);
        assert_eq!(
            (after.of(target), after.failed),
            (100, 0),
            "flip {flip}: every new connection should reach generation {target}: {after}"
        );
    }
    done.store(true, Ordering::Relaxed);
    let mut t = Tally::default();
    for c in clients {
        t.merge(&c.join().expect("client thread"));
    }
    println!("{MAX_SLOTS} sockets, 3 flips under load: {t}");
    assert!(
        t.answered() > 0,
        "the clients should have made connections during the flips: {t}"
    );
    assert_eq!(
        (t.failed, t.answered()),
        (0, t.of(1) + t.of(2)),
        "no connection should fail through the flips; each is answered by generation 1 or 2: {t}"
    );
    let status = env.status(PORT);
    assert_eq!(
        status.unsteered, 0,
        "the program should place every connection itself: {status:?}"
    );
    assert!(
        servers.iter().filter(|s| s.server.accepted() > 0).count() > MAX_SLOTS as usize / 4,
        "connections should spread over the sockets, not pile on a few"
    );
}
