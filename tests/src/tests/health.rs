//! `supervise --health`: a new generation is health-checked through probe connections (the
//! real port, the real program) and activated only once it is up; one that goes down is
//! killed and the previous generation stays active. Under load, without a failed request.

use nix::sys::signal::Signal;
use reuseport_proto::{GenState, HealthState, RestartOutcome};

use super::supervise::{Load, MARKER_DIR_ENV, Supervisor, UNHEALTHY_GENERATION_ENV};
use crate::harness::{TestEnv, generation_status, local, patience, tally, wait_until};

const HEALTH: &[&str] = &[
    "--ready",
    "delay=200ms",
    "--health",
    "http:///health",
    "--health-interval",
    "200ms",
    "--health-timeout",
    "5s",
    "--rise",
    "3",
    "--fall",
    "2",
];

fn timeout() -> std::time::Duration {
    patience(std::time::Duration::from_secs(20))
}

#[test]
fn supervise_activates_a_new_generation_once_its_health_checks_pass() {
    const NAME: &str = "supervise_activates_a_new_generation_once_its_health_checks_pass";
    const PORT: u16 = 6401;
    let env = TestEnv::new(NAME);
    let mut sup = Supervisor::spawn(&env, PORT, HEALTH, None);
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 2);
    load.wait_answered_by(1, &sup);

    sup.signal(Signal::SIGHUP);
    sup.wait_active(&env, PORT, 2);
    load.wait_answered_by(2, &sup);
    // NB: the supervisor logs the activation after the agent's answer, which `status` may
    // show first.
    wait_until("the supervisor logs the activation", timeout(), || {
        sup.log().contains("generation 2 is ready and active")
    });
    let t = load.stop();
    let log = sup.log();
    println!("{NAME}: {t}");
    assert_eq!(
        t.failed, 0,
        "no request should fail during the deploy: {t}; log:\n{log}"
    );
    let (checking, up, active) = (
        log.find("generation 2 is ready; health-checking it"),
        log.find("generation 2 is up: 3 health checks passed in a row"),
        log.find("generation 2 is ready and active"),
    );
    assert!(
        checking.is_some() && checking < up && up < active,
        "generation 2 should be checked, then up, then activated; log:\n{log}"
    );
    let status = sup.stop(Signal::SIGTERM, timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

/// Generation 2 answers its health endpoint with 503 while generation 1 answers 200: the
/// checks fail only because they reach the standby generation 2, not the active one.
#[test]
fn supervise_keeps_the_old_generation_when_the_new_one_fails_its_health_checks() {
    const NAME: &str =
        "supervise_keeps_the_old_generation_when_the_new_one_fails_its_health_checks";
    const PORT: u16 = 6411;
    let env = TestEnv::new(NAME);
    let mut sup =
        Supervisor::spawn_with(&env, PORT, HEALTH, None, &[(UNHEALTHY_GENERATION_ENV, "2")]);
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 2);
    load.wait_answered_by(1, &sup);

    sup.signal(Signal::SIGHUP);
    let line = format!(
        "restart failed: generation 2 is down: 2 health checks failed in a row (last: http \
         127.0.0.1:{PORT}/health: answered 503); generation 1 stays active"
    );
    wait_until(
        "the supervisor reports generation 2 down",
        timeout(),
        || {
            sup.assert_running();
            sup.log().contains(&line)
        },
    );
    wait_until("status shows the failed restart", timeout(), || {
        matches!(
            &env.status(PORT).last_restart,
            Some(RestartOutcome::Failed { error }) if error.contains("generation 2 is down")
        )
    });
    wait_until("generation 2 has left the group", timeout(), || {
        env.status(PORT)
            .generations
            .iter()
            .all(|g| g.generation == 1)
    });
    let t = load.stop();
    println!("{NAME}: {t}");
    assert_eq!(
        t.failed,
        0,
        "no request should fail: {t}; log:\n{}",
        sup.log()
    );
    assert_eq!(
        t.of(2),
        0,
        "no client should have reached generation 2: {t}"
    );
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "generation 1 stays active"
    );
    let status = sup.stop(Signal::SIGTERM, timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

/// A canary that goes down (its health endpoint starts answering 503) while it has its share
/// of the traffic is rolled back: generation 1 gets every new connection again, generation 2
/// drains and is stopped, and `status` and the supervisor say why.
#[test]
fn supervise_rolls_back_a_canary_whose_health_fails() {
    const NAME: &str = "supervise_rolls_back_a_canary_whose_health_fails";
    const PORT: u16 = 6421;
    let env = TestEnv::new(NAME);
    let markers = env.dir().join("markers");
    std::fs::create_dir_all(&markers).expect("create the marker dir");
    let marker_dir = markers.to_str().expect("a UTF-8 temp dir").to_owned();
    let mut args = HEALTH.to_vec();
    args.extend(["--canary", "10:10m"]);
    let mut sup = Supervisor::spawn_with(&env, PORT, &args, None, &[(MARKER_DIR_ENV, &marker_dir)]);
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 2);
    load.wait_answered_by(1, &sup);

    sup.signal(Signal::SIGHUP);
    wait_until("generation 2 is a canary at 10 %", timeout(), || {
        sup.assert_running();
        env.try_status(PORT).is_some_and(|s| {
            s.generations
                .iter()
                .any(|g| g.generation == 2 && g.weight == Some(10))
        })
    });
    load.wait_answered_by(2, &sup);
    wait_until("status shows generation 2 up", timeout(), || {
        env.status(PORT).generations.iter().any(|g| {
            g.generation == 2
                && g.health
                    .as_ref()
                    .is_some_and(|h| h.state == HealthState::Up)
        })
    });
    let text = String::from_utf8_lossy(&env.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains("active 1 (90 %) + 2 (10 %)") && text.contains("generation 2 health: up ("),
        "status should show the canary's weight and health:\n{text}"
    );

    std::fs::write(markers.join("unhealthy-2"), "").expect("make generation 2 unhealthy");
    let line = "restart failed: generation 2 went down during its canary (2 health checks \
                failed in a row, last: http";
    wait_until("the supervisor rolls generation 2 back", timeout(), || {
        sup.assert_running();
        sup.log().contains(line)
    });
    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(1),
        "generation 1 is active again: {status:?}"
    );
    assert!(
        status.generations.iter().all(|g| g.weight.is_none()),
        "the split is over: {status:?}"
    );
    wait_until(
        "status says why generation 2 was rolled back",
        timeout(),
        || {
            matches!(&env.status(PORT).last_restart, Some(RestartOutcome::Failed { error })
            if error.contains("went down during its canary"))
        },
    );
    let before = load.snapshot();
    wait_until("generation 2 drained and left the group", timeout(), || {
        env.status(PORT)
            .generations
            .iter()
            .all(|g| g.generation == 1)
    });
    let after = load.stop();
    println!("{NAME}: {after}");
    assert_eq!(
        after.failed,
        0,
        "no request should fail: {after}; log:\n{}",
        sup.log()
    );
    assert!(
        after.of(1) > before.of(1),
        "generation 1 should answer after the rollback: {after}"
    );
    assert!(
        sup.log().contains("generation 2 (pid"),
        "the supervisor should report generation 2's exit; log:\n{}",
        sup.log()
    );
    let status = sup.stop(Signal::SIGTERM, timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

#[test]
fn supervise_promotes_a_canary_that_stays_up() {
    const NAME: &str = "supervise_promotes_a_canary_that_stays_up";
    const PORT: u16 = 6431;
    let env = TestEnv::new(NAME);
    let mut args = HEALTH.to_vec();
    args.extend(["--canary", "10:1s"]);
    let mut sup = Supervisor::spawn(&env, PORT, &args, None);
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 2);
    load.wait_answered_by(1, &sup);

    sup.signal(Signal::SIGHUP);
    wait_until("generation 2 is promoted", timeout(), || {
        sup.assert_running();
        sup.log()
            .contains("generation 2 stayed up through its canary: promoting it to 100 %")
    });
    wait_until("generation 1 drained and left the group", timeout(), || {
        env.status(PORT)
            .generations
            .iter()
            .all(|g| g.generation == 2)
    });
    let status = env.status(PORT);
    assert_eq!(
        (status.active, status.generations[0].weight),
        (Some(2), None),
        "generation 2 gets every new connection: {status:?}"
    );
    let t = load.stop();
    println!("{NAME}: {t}");
    assert_eq!(
        t.failed,
        0,
        "no request should fail: {t}; log:\n{}",
        sup.log()
    );
    assert!(t.of(2) > 0, "generation 2 should have answered: {t}");
    let status = sup.stop(Signal::SIGTERM, timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

/// `--rollback-window`: the generation replaced by a deploy keeps its listener and is not
/// signalled for that long, so `reuseportctl rollback` brings it back in one flip, under
/// load, without a failed request.
#[test]
fn supervise_keeps_the_previous_generation_for_its_rollback_window() {
    const NAME: &str = "supervise_keeps_the_previous_generation_for_its_rollback_window";
    const PORT: u16 = 6441;
    let env = TestEnv::new(NAME);
    let args = ["--ready", "delay=200ms", "--rollback-window", "10m"];
    let mut sup = Supervisor::spawn(&env, PORT, &args, None);
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 2);
    load.wait_answered_by(1, &sup);

    sup.signal(Signal::SIGHUP);
    sup.wait_active(&env, PORT, 2);
    load.wait_answered_by(2, &sup);
    wait_until(
        "generation 1 is held for the rollback window",
        timeout(),
        || {
            sup.log()
                .contains("generation 1 drains; it keeps its listener and is not signalled")
        },
    );
    let status = env.status(PORT);
    let one = generation_status(&status, 1);
    assert!(
        one.state == GenState::Draining && one.sockets.iter().all(|s| s.listening),
        "generation 1 drains with its listener open: {status:?}"
    );

    let out = env.ctl(&["rollback", &local(PORT).to_string()]);
    assert!(out.status.success(), "rollback: {out:?}");
    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(1),
        "rollback brings generation 1 back: {status:?}"
    );
    let t = tally(local(PORT), 100);
    assert_eq!(
        (t.of(1), t.failed),
        (100, 0),
        "after the rollback every new connection reaches generation 1: {t}"
    );
    let t = load.stop();
    println!("{NAME}: {t}");
    assert_eq!(
        t.failed,
        0,
        "no request should fail: {t}; log:\n{}",
        sup.log()
    );
    let log = sup.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("generation 1 of") && l.contains("sending SIGTERM")),
        "generation 1 should never have been signalled; log:\n{log}"
    );
    let status = sup.stop(Signal::SIGTERM, timeout());
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}
