//! The documented limits: a group holds 1,024 sockets (the sockarray) and 128 generations
//! (what its pinned record holds), one more of either is a clear `limit` error that changes
//! nothing, and room made by a leaving socket or generation can be used again; a full group flips under load without a failed
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
use reuseport_common::{MAX_GENERATIONS, MAX_SLOTS};
use reuseport_proto::{ErrorKind, MAX_NAME_LEN};

use crate::harness::{
    ServerKind, Tally, TestEnv, group, load_size, local, patience, raise_nofile, request_once,
    tally, wait_until,
};

#[test]
fn a_group_holds_1024_sockets_and_128_generations_and_refuses_one_more_of_each() {
    const PORT: u16 = 8701;
    // Before the agent starts: it inherits the limit (a listener and a registration each).
    raise_nofile(8 * u64::from(MAX_SLOTS));
    let env =
        TestEnv::new("a_group_holds_1024_sockets_and_128_generations_and_refuses_one_more_of_each");
    let last = MAX_GENERATIONS;
    // Generations 1 and 128 serve; the ones between only hold their place, generation 2 with
    // the sockets beyond one per generation.
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let spare = (MAX_SLOTS - MAX_GENERATIONS) as usize;
    let mut held: Vec<_> = (2..last)
        .chain(std::iter::repeat_n(2, spare))
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
        (MAX_SLOTS, MAX_GENERATIONS),
        "status should report 1,024 sockets and 128 generations per group"
    );
    let sockets = |s: &reuseport_proto::GroupStatus| {
        s.generations.iter().map(|g| g.sockets.len()).sum::<usize>()
    };
    assert_eq!(
        (status.generations.len(), sockets(&status)),
        (MAX_GENERATIONS as usize, MAX_SLOTS as usize),
        "the group should hold 128 generations and 1,024 sockets"
    );

    let refused = |generation: u32, limit: &str| {
        let listener = env.listen(PORT);
        let opts = env.register_options(PORT, generation, false);
        let err = env
            .block_on(client::register(listener.as_fd(), &opts))
            .map(drop)
            .expect_err("one beyond the limit should be refused");
        println!("one more as generation {generation}: {err}");
        assert_eq!(
            err.agent_kind(),
            Some(ErrorKind::Limit),
            "exceeding a limit should be a limit error: {err}"
        );
        assert!(
            err.to_string().contains(limit),
            "the message should name the limit ({limit}): {err}"
        );
    };
    refused(
        last + 1,
        &format!("already holds {MAX_GENERATIONS} generations"),
    );
    refused(1, &format!("already holds {MAX_SLOTS} sockets"));
    let status = env.status(PORT);
    assert_eq!(
        (status.generations.len(), sockets(&status)),
        (MAX_GENERATIONS as usize, MAX_SLOTS as usize),
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

    // A socket that leaves makes room for one more, a generation that leaves for another.
    drop(held.pop());
    drop(held.remove(1));
    wait_until(
        "the agent dropped the socket and the generation that left",
        patience(Duration::from_secs(10)),
        || {
            let s = env.status(PORT);
            (s.generations.len(), sockets(&s))
                == (MAX_GENERATIONS as usize - 1, MAX_SLOTS as usize - 2)
        },
    );
    let again: Vec<_> = [1, last + 1]
        .into_iter()
        .map(|generation| {
            let listener = env.listen(PORT);
            let opts = env.register_options(PORT, generation, false);
            let registration = env
                .block_on(client::register(listener.as_fd(), &opts))
                .unwrap_or_else(|e| {
                    panic!("generation {generation} should register once room was made: {e}")
                });
            (listener, registration)
        })
        .collect();
    let status = env.status(PORT);
    assert_eq!(
        (status.generations.len(), sockets(&status)),
        (MAX_GENERATIONS as usize, MAX_SLOTS as usize),
        "what left was replaced"
    );
    drop((again, held, g1, g_last));
    agent_processed_every_close(&env);
}

/// Waits until the agent has taken every closed registration out of its groups.
/// NB: each close republishes the group's table and record (≈10 ms each on this 2-core
/// machine, grace periods included): a thousand take the agent seconds, and the agent's
/// runtime finishes that queued work before it exits on SIGTERM.
fn agent_processed_every_close(env: &TestEnv) {
    wait_until(
        "the agent processed every closed registration",
        patience(Duration::from_secs(60)),
        || env.statuses().is_empty(),
    );
}

#[test]
fn status_is_delivered_at_the_limits() {
    const PORT: u16 = 10001;
    const BIG: u16 = 10900;
    // NB: every group loads a program: 50 ms on the host, seconds in an emulated guest.
    let groups = load_size("groups (the agent's --max-groups)", 256, 8) as u16;
    raise_nofile(8 * (u64::from(MAX_SLOTS) + u64::from(groups)));
    let env = TestEnv::with_agent(
        "status_is_delivered_at_the_limits",
        &["--max-groups", &groups.to_string()],
        &[],
    );
    let generations = MAX_GENERATIONS;
    // One group with every generation, each with the longest name, and every socket (those
    // beyond one per generation in the last one).
    let mut kept = Vec::new();
    let extra = std::iter::repeat_n(generations, (MAX_SLOTS - generations) as usize);
    for generation in (1..=generations).chain(extra) {
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
    assert_eq!(big.generations.len(), generations as usize);
    assert_eq!(
        big.generations
            .iter()
            .map(|g| g.sockets.len())
            .sum::<usize>(),
        MAX_SLOTS as usize
    );
    let bytes = serde_json::to_vec(&all).expect("encode").len();
    println!(
        "status of {groups} groups ({generations} generations and {MAX_SLOTS} sockets in one): \
         {bytes} bytes of JSON"
    );
    let out = env.ctl(&["status"]);
    assert!(
        out.status.success(),
        "reuseportctl status should print every group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let changed = env.activate(BIG, generations);
    assert_eq!(changed.active, Some(generations));
    drop(kept);
    agent_processed_every_close(&env);
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
    // Before the agent starts: it inherits the limit (a listener, a registration and
    // connections in flight per socket).
    raise_nofile(16 * u64::from(MAX_SLOTS));
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
    // NB: n connections hashed over MAX_SLOTS sockets reach about MAX_SLOTS·(1 − e^(−n/MAX_SLOTS))
    // of them, well above a quarter of min(n, MAX_SLOTS).
    let accepted: u64 = servers.iter().map(|s| s.server.accepted()).sum();
    let reached = servers.iter().filter(|s| s.server.accepted() > 0).count();
    println!("{accepted} connections reached {reached} of {MAX_SLOTS} sockets");
    assert!(
        reached as u64 > accepted.min(u64::from(MAX_SLOTS)) / 4,
        "connections should spread over the sockets, not pile on a few: {accepted} reached \
         {reached}"
    );
    drop(servers);
    agent_processed_every_close(&env);
}
