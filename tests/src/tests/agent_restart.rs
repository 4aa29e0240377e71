//! The agent dies (`kill -9`), comes back, or is upgraded, while servers keep serving: the
//! data path never notices, the restarted agent adopts the pinned groups, and registered
//! clients (launcher and client library) register their sockets again.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use std::os::fd::AsFd as _;

use reuseport_client::{self as client, ControlClient};
use reuseport_common::{ABI_VERSION, ADOPTABLE_ABI, ProgramNames};
use reuseport_proto::{DrainPhase, GenState, GroupStatus};

use super::supervise::{Load, Supervisor};
use crate::harness::{
    SELECT_ONLY, Server, ServerKind, TestEnv, bpf_prog, expected_mode, generation_status, group,
    load_size, local, patience, tally, wait_until,
};

/// How long clients may take to register again after the agent is back (their backoff is
/// at most one second): a wait, stretched in VM guests.
fn reregister_timeout() -> Duration {
    patience(Duration::from_secs(15))
}
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
        patience(Duration::from_secs(15)),
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
        patience(Duration::from_secs(60)),
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
    env.wait_all_registered(reregister_timeout());
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
            patience(Duration::from_secs(30)),
            || flips.lock().unwrap().done >= kill_after,
        );
        env.kill_agent();
        env.block_on(flipper).expect("flipper task");
        let f = *flips.lock().unwrap();
        env.restart_agent(&[]);
        env.wait_all_registered(reregister_timeout());

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

/// Activations of a stream, each killing the agent between the record write and the table
/// switch of the 5th publish: 3 registrations, then `activate 2`, then `activate 3` (NB: a
/// publish per registration and per activation, nothing else in this test publishes).
const FAULT_AT: &str = "between-record-and-table:5";

/// The agent dies exactly after pinning the record of an activation and before switching the
/// table to it: the kernel still steers by the old table, and the adopting agent completes
/// the flip from the record. The activation in flight wins, never a mix of the two.
#[test]
fn agent_killed_between_record_and_table_switch_completes_the_activation_in_flight() {
    const NAME: &str =
        "agent_killed_between_record_and_table_switch_completes_the_activation_in_flight";
    const PORT: u16 = 7906;
    let mut env = TestEnv::with_agent(NAME, &[], &[("REUSEPORT_FAULT_AT", FAULT_AT)]);
    // NB: clients that do not register again: what the kernel follows after the restart is
    // then what the adopting agent did on its own.
    let gens: Vec<_> = (1..=3)
        .map(|g| {
            let listener = env.listen(PORT);
            let opts = client::RegisterOptions {
                reconnect: false,
                ..env.register_options(PORT, g, false)
            };
            let registration = env
                .block_on(client::register(listener.as_fd(), &opts))
                .unwrap_or_else(|e| panic!("register generation {g}: {e}"));
            let server = Server::start(ServerKind::Tokio, listener, g, env.rt().handle());
            (server, registration)
        })
        .collect();
    env.activate(PORT, 2);
    let in_flight = env.try_activate_group(group(PORT), 3);
    assert!(
        in_flight.is_err(),
        "activate 3 should get no answer: the agent dies in the middle of it ({in_flight:?})"
    );
    env.wait_agent_killed_by_fault(patience(Duration::from_secs(10)));

    // The kill landed before the table switch: the kernel still follows `activate 2`.
    let t = tally(local(PORT), 100);
    assert_eq!(
        t.of(2),
        100,
        "with the agent dead between record and table switch, the kernel should still steer \
         by the last switched table (generation 2): {t}"
    );

    env.restart_agent(&[]);
    let status = env.status(PORT);
    let states: Vec<(u32, GenState)> = status
        .generations
        .iter()
        .map(|g| (g.generation, g.state))
        .collect();
    assert_eq!(
        states,
        [
            (1, GenState::Draining),
            (2, GenState::Draining),
            (3, GenState::Active)
        ],
        "the adopting agent should complete the activation in flight from the pinned record, \
         before any client registers again: {status:?}"
    );
    let t = tally(local(PORT), 100);
    assert_eq!(
        t.of(3),
        100,
        "the kernel should steer to generation 3, as status says: {t}"
    );
    drop(gens);
}

/// The pin of the group's program on `port` (the only group in the test's bpffs).
fn program_pin(env: &TestEnv, port: u16) -> std::path::PathBuf {
    let dir = std::fs::read_dir(env.bpffs_path())
        .expect("list the test's bpffs")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(&format!("_{port}_")))
        })
        .unwrap_or_else(|| panic!("no pin directory for port {port} in the test's bpffs"));
    let program = if expected_mode() == SELECT_ONLY {
        ProgramNames::SELECT
    } else {
        ProgramNames::SELECT_OR_MIGRATE
    };
    dir.join(program)
}

/// An upgrade to another build of the same ABI: the pinned program is not the new agent's
/// (a test knob makes the old agent record a foreign program id), so the new agent loads its
/// own on the same maps and the next registration into the group, its clients coming back,
/// swaps it in. Under load the whole time: nothing fails, nothing reaches the draining
/// generation, and the old program is gone afterwards (no group runs it, no pin holds it).
#[test]
fn upgrade_to_another_build_swaps_the_program_under_load() {
    const NAME: &str = "upgrade_to_another_build_swaps_the_program_under_load";
    const PORT: u16 = 7904;
    let mut env = TestEnv::with_agent(NAME, &[], &[("REUSEPORT_TEST_FOREIGN_PROGRAM", "1")]);
    let gens: Vec<_> = (1..=2)
        .map(|g| env.serve(PORT, g, ServerKind::Tokio, false))
        .collect();
    env.activate(PORT, 2);
    let old_program = bpf_prog::pinned_program_id(&program_pin(&env, PORT))
        .expect("read the id of the pinned program");
    let load = Load::start(PORT, 2);
    let before = env.status(PORT);
    let steered_to_draining = |env: &TestEnv| {
        let c = generation_status(&env.status(PORT), 1).counters;
        c.selected + c.fallback
    };
    let draining_before = steered_to_draining(&env);

    env.kill_agent();
    env.restart_agent(&[]);
    env.wait_all_registered(reregister_timeout());
    assert!(
        env.agent_log().contains("program=\"reloaded\""),
        "the new agent should load its own program for a group pinned by another build"
    );
    let new_program = bpf_prog::pinned_program_id(&program_pin(&env, PORT))
        .expect("read the id of the pinned program after the upgrade");
    assert_ne!(
        new_program, old_program,
        "the new agent should pin a program of its own"
    );
    // NB: the kernel frees a detached program after an RCU grace period.
    wait_until(
        &format!("the old program (id {old_program}) is freed: no group runs it any more"),
        patience(Duration::from_secs(5)),
        || !bpf_prog::program_exists(old_program),
    );
    let answered = load.snapshot().answered();
    wait_until(
        "the load completes connections on the new program",
        patience(Duration::from_secs(30)),
        || load.snapshot().answered() >= answered + 200,
    );
    let t = load.stop();
    println!(
        "{NAME}: program {old_program} replaced by {new_program}; load across the upgrade: {t}"
    );
    assert_eq!(t.failed, 0, "no request may fail across the upgrade: {t}");
    assert_eq!(
        steered_to_draining(&env),
        draining_before,
        "the program should steer nothing to the draining generation across the swap: {t}"
    );
    assert_eq!(
        comparable(vec![env.status(PORT)]),
        comparable(vec![before]),
        "the upgraded agent should manage the group as it was"
    );
    drop(gens);
}

/// Runs one agent that pins as ABI `old_abi` (1: no record at all, as agents of ABI 1 pinned),
/// kills it under load, and starts the current agent on its pins. Returns the environment,
/// the servers and the load.
fn upgrade_from(
    name: &'static str,
    port: u16,
    old_abi: u32,
) -> (TestEnv, Vec<crate::harness::Generation>, Load) {
    let abi = old_abi.to_string();
    let mut env = TestEnv::with_agent(name, &[], &[("REUSEPORT_TEST_PIN_ABI", &abi)]);
    let gens: Vec<_> = (1..=2)
        .map(|g| env.serve(port, g, ServerKind::Tokio, false))
        .collect();
    env.activate(port, 2);
    let load = Load::start(port, 2);
    let downtime = downtime_connections() / 4;
    env.kill_agent();
    let answered = load.snapshot().answered();
    wait_until(
        "the load completes connections while no agent runs",
        patience(Duration::from_secs(60)),
        || load.snapshot().answered() >= answered + downtime,
    );
    env.restart_agent(&[]);
    (env, gens, load)
}

#[test]
fn upgrade_over_abi_1_pins_without_a_record_leaves_them_alone_and_loses_no_connection() {
    unadoptable_pins_are_left_alone(
        "upgrade_over_abi_1_pins_without_a_record_leaves_them_alone_and_loses_no_connection",
        7905,
        reuseport_common::FIRST_ABI_WITH_RECORD - 1,
    );
}

/// Pins of the ABI just before the adoptable ones (a record, maps of another layout).
#[test]
fn upgrade_over_pins_of_an_older_abi_leaves_them_alone_and_loses_no_connection() {
    unadoptable_pins_are_left_alone(
        "upgrade_over_pins_of_an_older_abi_leaves_them_alone_and_loses_no_connection",
        7909,
        ADOPTABLE_ABI.start() - 1,
    );
}

#[test]
fn downgrade_over_pins_of_a_newer_abi_leaves_them_alone_and_loses_no_connection() {
    unadoptable_pins_are_left_alone(
        "downgrade_over_pins_of_a_newer_abi_leaves_them_alone_and_loses_no_connection",
        7907,
        ABI_VERSION + 1,
    );
}

fn unadoptable_pins_are_left_alone(name: &'static str, port: u16, old: u32) {
    println!(
        "{name}: pinned as ABI {old}; this agent: ABI {ABI_VERSION}, adopts {ADOPTABLE_ABI:?}"
    );
    let (env, mut gens, load) = upgrade_from(name, port, old);
    let record_pinned = std::fs::symlink_metadata(program_pin(&env, port).with_file_name("STATE"));
    assert_eq!(
        record_pinned.is_ok(),
        old >= reuseport_common::FIRST_ABI_WITH_RECORD,
        "agents of ABI 1 pinned no record (STATE map); later ones do"
    );

    // The clients' re-registration is refused with the reason and what to do.
    let err = env
        .block_on(async {
            tokio::time::timeout(reregister_timeout(), gens[1].registration.closed()).await
        })
        .expect("the re-registration should be answered")
        .expect_err("the agent should refuse to take the socket back");
    let msg = err.to_string();
    println!("{name}: {msg}");
    assert!(
        msg.contains(&format!("ABI version {old}")) && msg.contains("stop the group's servers"),
        "the refusal should name the version and say what to do: {msg}"
    );
    assert!(
        env.agent_log().contains(&format!("ABI version {old}")),
        "the agent should log why it left the group alone"
    );
    assert!(
        env.statuses().is_empty(),
        "the agent should not manage the group it left alone"
    );
    // Meanwhile the old program keeps steering: new connections reach generation 2 only.
    let t = tally(local(port), 500);
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
    let listener = env.listen(port);
    let opts = env.register_options(port, 7, false);
    let mut registration = None;
    wait_until(
        "the old servers' sockets closed and generation 7 could register",
        patience(Duration::from_secs(10)),
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
    let t = tally(local(port), 50);
    assert_eq!(
        t.of(7),
        50,
        "a new group should replace the stale pins: {t}"
    );
    drop((server, registration));
}
