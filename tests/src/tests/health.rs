//! `supervise --health`: a new generation is health-checked through probe connections (the
//! real port, the real program) and activated only once it is up; one that goes down is
//! killed and the previous generation stays active. Under load, without a failed request.

use nix::sys::signal::Signal;
use reuseport_proto::RestartOutcome;

use super::supervise::{Load, Supervisor, UNHEALTHY_GENERATION_ENV};
use crate::harness::{TestEnv, patience, wait_until};

const HEALTH: &[&str] = &[
    "--ready",
    "delay=200ms",
    "--health",
    "http:///health",
    "--health-interval",
    "200ms",
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
