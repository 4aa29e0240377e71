//! The agent dies (`kill -9`), comes back, or is upgraded, while servers keep serving: the
//! data path never notices, the restarted agent adopts the pinned groups, and registered
//! clients (launcher and client library) register their sockets again.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use std::os::fd::AsFd as _;

use reuseport_agent::{
    client::{self, ControlClient},
    protocol::{DrainPhase, GenState, GroupStatus},
};
use reuseport_common::{ABI_VERSION, ADOPTABLE_ABI};

use super::supervise::{Load, Supervisor};
use crate::harness::{
    Server, ServerKind, TestEnv, generation_status, group, load_size, local, tally, wait_until,
};

/// How long clients may take to register again after the agent is back (their backoff is
/// at most one second).
const REREGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// New connections the load must complete while the agent is down (host, VM guest).
const DOWNTIME_CONNECTIONS: (u64, u64) = (2_000, 300);
/// Client threads on the client-library group of the kill test.
const LIB_THREADS: usize = 2;

fn downtime_connections() -> u64 {
    load_size(
        "connections while the agent is down",
        DOWNTIME_CONNECTIONS.0,
        DOWNTIME_CONNECTIONS.1,
    )
}

/// Status with the counters and the live figures (connections at this moment, and the
/// drain phases read from them) left out: what must survive a restart unchanged.
fn comparable(mut groups: Vec<GroupStatus>) -> Vec<GroupStatus> {
    groups.sort_by_key(|g| g.group.addr);
    for g in &mut groups {
        g.unsteered = 0;
        g.live = None;
        for generation in &mut g.generations {
            generation.counters = Default::default();
            generation.live = None;
            if matches!(
                generation.drain,
                Some(DrainPhase::Serving { .. } | DrainPhase::Idle)
            ) {
                generation.drain = None;
            }
            for socket in &mut generation.sockets {
                socket.live = None;
            }
        }
    }
    groups
}

#[test]
fn agent_killed_under_load_is_adopted_and_clients_register_again() {
    const NAME: &str = "agent_killed_under_load_is_adopted_and_clients_register_again";
    const SUP_PORT: u16 = 7901;
    const LIB_PORT: u16 = 7902;
    let mut env = TestEnv::new(NAME);
    // A launcher (supervise) group and a client-library group.
    let mut sup = Supervisor::spawn(&env, SUP_PORT, &["--ready", "delay=100ms"], None);
    sup.wait_active(&env, SUP_PORT, 1);
    let lib1 = env.serve(LIB_PORT, 1, ServerKind::Tokio, false);
    let lib2 = env.serve(LIB_PORT, 2, ServerKind::Tokio, false);
    let sup_load = Load::start(SUP_PORT, 2);
    let lib_load = Load::start(LIB_PORT, LIB_THREADS);
    sup_load.wait_answered_by(1, &sup);

    // Flips just before the crash: generation 1 of the library group keeps listening
    // while it drains, so anything steered to it during the downtime would show.
    sup.signal(nix::sys::signal::Signal::SIGHUP);
    sup.wait_active(&env, SUP_PORT, 2);
    wait_until(
        "the supervisor's generation 1 has exited",
        Duration::from_secs(15),
        || env.status(SUP_PORT).generations.len() == 1,
    );
    env.activate(LIB_PORT, 2);
    // NB: what the kernel program counted for generation 1 is the exact measure of new
    // connections steered to it (counted at SYN time, kept in a pinned map across the
    // restart); client tallies and accept counts also see connections made before the flip
    // and finished after it.
    let steered_to_draining = |env: &TestEnv| {
        let c = generation_status(&env.status(LIB_PORT), 1).counters;
        c.selected + c.fallback
    };
    let draining_before = steered_to_draining(&env);
    let before = comparable(env.statuses());
    let lib_before = lib_load.snapshot();

    let downtime = downtime_connections();
    let down = std::time::Instant::now();
    env.kill_agent();
    wait_until(
        "the load completes connections while the agent is down",
        Duration::from_secs(60),
        || lib_load.snapshot().answered() >= lib_before.answered() + downtime,
    );
    let lib_down = lib_load.snapshot();
    let rate = (lib_down.answered() - lib_before.answered()) as f64 / down.elapsed().as_secs_f64();
    println!(
        "{NAME}: agent down for {:.0} ms; library group clients made {rate:.0} connections/s",
        down.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        lib_down.failed, 0,
        "no connection may fail while the agent is down: {lib_down}"
    );
    // A detached program would let the kernel's hash send about half of them to generation
    // 1; only requests already in flight at the flip (one per client thread) may show.
    assert!(
        lib_down.of(1) - lib_before.of(1) <= LIB_THREADS as u64,
        "the draining generation should answer nothing new while the agent is down: {lib_down}"
    );

    env.restart_agent(&[]);
    env.wait_all_registered(REREGISTER_TIMEOUT);
    assert_eq!(
        steered_to_draining(&env),
        draining_before,
        "the program should steer no new connection to the draining generation while the \
         agent is down (or since): clients saw {lib_down}"
    );
    let after = comparable(env.statuses());
    assert_eq!(
        after, before,
        "after the restart, status (counters aside) should equal the one before the kill"
    );
    assert!(
        env.agent_log().contains("adopted pinned group")
            && env.agent_log().contains("program=\"reused\""),
        "the agent should log the adoption, reusing the pinned program of its own build"
    );

    // The adopted groups are managed as before: flips work in both.
    sup.signal(nix::sys::signal::Signal::SIGHUP);
    sup.wait_active(&env, SUP_PORT, 3);
    sup_load.wait_answered_by(3, &sup);
    env.activate(LIB_PORT, 1);
    let t = tally(local(LIB_PORT), 200);
    assert_eq!(
        t.of(1),
        200,
        "after the restart a flip should steer everything again: {t}"
    );

    let (sup_t, lib_t) = (sup_load.stop(), lib_load.stop());
    println!("{NAME}: launcher group {sup_t}; library group {lib_t}");
    assert_eq!(
        (sup_t.failed, lib_t.failed),
        (0, 0),
        "no request may fail across the crash, the restart and the flips: {sup_t}; {lib_t}; \
         supervise log:\n{}",
        sup.log()
    );
    drop((lib1, lib2));
}

/// Flips generations in a loop until a request fails; remembers the last acknowledged
/// activation and the one in flight.
#[derive(Default, Debug, Clone, Copy)]
struct Flips {
    acknowledged: Option<u32>,
    in_flight: Option<u32>,
    done: u64,
}

#[test]
fn agent_killed_during_activations_leaves_a_state_some_request_produced() {
    const NAME: &str = "agent_killed_during_activations_leaves_a_state_some_request_produced";
    const PORT: u16 = 7903;
    const ROUNDS: u64 = 6;
    let mut env = TestEnv::new(NAME);
    let gens: Vec<_> = (1..=3)
        .map(|g| env.serve(PORT, g, ServerKind::Tokio, g == 1))
        .collect();
    for round in 0..ROUNDS {
        let flips = Arc::new(Mutex::new(Flips::default()));
        let flipper = {
            let flips = flips.clone();
            let control = env.control_path().to_path_buf();
            env.rt().spawn(async move {
                let Ok(mut c) = ControlClient::connect(&control).await else {
                    return;
                };
                for i in 0u32.. {
                    let target = 1 + (i + round as u32) % 3;
                    flips.lock().unwrap().in_flight = Some(target);
                    if c.activate(group(PORT), target).await.is_err() {
                        return;
                    }
                    let mut f = flips.lock().unwrap();
                    f.acknowledged = Some(target);
                    f.done += 1;
                }
            })
        };
        // Kill after a different number of flips each round, to land at different points.
        let kill_after = 5 + round * 13;
        wait_until(
            "the flipper made its flips",
            Duration::from_secs(30),
            || flips.lock().unwrap().done >= kill_after,
        );
        env.kill_agent();
        env.block_on(flipper).expect("flipper task");
        let f = *flips.lock().unwrap();
        env.restart_agent(&[]);
        env.wait_all_registered(REREGISTER_TIMEOUT);

        let status = env.status(PORT);
        let allowed = [f.acknowledged, f.in_flight];
        assert!(
            allowed.contains(&status.active),
            "round {round}: the active generation should be the last acknowledged ({:?}) or the \
             one in flight ({:?}): {status:?}",
            f.acknowledged,
            f.in_flight
        );
        let states: Vec<GenState> = status.generations.iter().map(|g| g.state).collect();
        assert_eq!(
            states.iter().filter(|s| **s == GenState::Active).count(),
            1,
            "round {round}: exactly one generation should be active: {status:?}"
        );
        assert_eq!(
            states.iter().filter(|s| **s == GenState::Draining).count(),
            2,
            "round {round}: the two others should drain, as every activation left them: {status:?}"
        );
        let active = status.active.expect("checked above");
        let t = tally(local(PORT), 100);
        assert_eq!(
            t.of(active),
            100,
            "round {round}: the kernel should steer to the generation status calls active \
             ({active}): {t}"
        );
        println!(
            "round {round}: killed after {} flips (in flight: {:?}); adopted state: {active} active",
            f.done, f.in_flight
        );
    }
    drop(gens);
}

/// Runs one agent writing pinned records of `old_abi`, kills it under load, and starts the
/// current agent on its pins. Returns the environment, the servers and the load.
fn upgrade_from(
    name: &'static str,
    port: u16,
    old_abi: u32,
) -> (TestEnv, Vec<crate::harness::Generation>, Load, GroupStatus) {
    let abi = old_abi.to_string();
    let mut env = TestEnv::with_agent(name, &[], &[("REUSEPORT_TEST_PIN_ABI", &abi)]);
    let gens: Vec<_> = (1..=2)
        .map(|g| env.serve(port, g, ServerKind::Tokio, false))
        .collect();
    env.activate(port, 2);
    let load = Load::start(port, 2);
    let before = env.status(port);
    let downtime = downtime_connections() / 4;
    env.kill_agent();
    let answered = load.snapshot().answered();
    wait_until(
        "the load completes connections while no agent runs",
        Duration::from_secs(60),
        || load.snapshot().answered() >= answered + downtime,
    );
    env.restart_agent(&[]);
    (env, gens, load, before)
}

#[test]
fn upgrade_adopts_pinned_state_of_an_adoptable_abi() {
    const NAME: &str = "upgrade_adopts_pinned_state_of_an_adoptable_abi";
    const PORT: u16 = 7904;
    let oldest = *ADOPTABLE_ABI.start();
    println!(
        "{NAME}: pinned by ABI {oldest}, adopted by ABI {ABI_VERSION} (adoptable: {ADOPTABLE_ABI:?})"
    );
    let (env, gens, load, before) = upgrade_from(NAME, PORT, oldest);
    env.wait_all_registered(REREGISTER_TIMEOUT);
    assert_eq!(
        comparable(vec![env.status(PORT)]),
        comparable(vec![before]),
        "the upgraded agent should adopt the group as it was"
    );
    let t = load.stop();
    assert_eq!(
        t.failed, 0,
        "no connection may fail across the upgrade: {t}"
    );
    assert_eq!(
        t.of(1),
        0,
        "the draining generation should get nothing: {t}"
    );
    drop(gens);
}

#[test]
fn upgrade_refuses_an_unadoptable_abi_and_loses_no_connection() {
    const NAME: &str = "upgrade_refuses_an_unadoptable_abi_and_loses_no_connection";
    const PORT: u16 = 7905;
    let old = ADOPTABLE_ABI.start() - 1;
    let (env, mut gens, load, _) = upgrade_from(NAME, PORT, old);

    // The clients' re-registration is refused with the reason and what to do.
    let err = env
        .block_on(async {
            tokio::time::timeout(REREGISTER_TIMEOUT, gens[1].registration.closed()).await
        })
        .expect("the re-registration should be answered")
        .expect_err("the agent should refuse to take the socket back");
    let msg = err.to_string();
    println!("{NAME}: {msg}");
    assert!(
        msg.contains(&format!("ABI version {old}")) && msg.contains("stop the group's servers"),
        "the refusal should name the version and say what to do: {msg}"
    );
    assert!(
        env.agent_log().contains(&format!("ABI version {old}")),
        "the agent should log why it left the group alone"
    );
    // Meanwhile the old program keeps steering: new connections reach generation 2 only.
    let t = tally(local(PORT), 500);
    assert_eq!(
        t.of(2),
        500,
        "the unadopted group should keep steering: {t}"
    );
    let t = load.stop();
    assert_eq!(
        (t.failed, t.of(1)),
        (0, 0),
        "no connection may fail or reach the draining generation: {t}"
    );

    // What the message says works: once the old servers are gone, the port is usable.
    drop(gens);
    // NB: a tokio server's listener closes when its aborted task is dropped, a moment later.
    let listener = env.listen(PORT);
    let opts = env.register_options(PORT, 7, false);
    let mut registration = None;
    wait_until(
        "the old servers' sockets closed and generation 7 could register",
        Duration::from_secs(10),
        || match env.block_on(client::register(listener.as_fd(), &opts)) {
            Ok(r) => {
                registration = Some(r);
                true
            }
            Err(e) => {
                assert!(
                    e.to_string().contains(&format!("ABI version {old}")),
                    "only the old pins may refuse it: {e}"
                );
                false
            }
        },
    );
    let server = Server::start(ServerKind::Tokio, listener, 7, env.rt().handle());
    let t = tally(local(PORT), 50);
    assert_eq!(
        t.of(7),
        50,
        "a new group should replace the stale pins: {t}"
    );
    drop((server, registration));
}
