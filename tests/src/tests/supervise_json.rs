//! `reuseportctl supervise --json`: every step of its deploys as one JSON event per line on
//! stdout, in order, with the generation numbers, under load (no request may fail): a deploy
//! on SIGHUP, a failed one and a good one through `reuseportctl restart`, then the stop.

use std::{fs::File, path::Path, time::Duration};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::supervise::{FAIL_GENERATION_ENV, Load, Supervisor};
use crate::harness::{
    TestEnv, assert_event_sequence, has_event, launcher_events, local, patience, wait_until,
};

/// A deploy: readiness, activation, the old generation's drain and exit.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn supervise_json_reports_each_step_of_its_deploys_under_load() {
    const NAME: &str = "supervise_json_reports_each_step_of_its_deploys_under_load";
    const PORT: u16 = 7807;
    let env = TestEnv::new(NAME);
    let events_path = env.dir().join("events.jsonl");
    let events = File::create(&events_path).expect("create the events file");
    let mut sup = Supervisor::spawn_server(
        &env,
        PORT,
        &["--json", "--ready", "notify"],
        super::supervise::SERVER_TEST,
        (super::supervise::SERVER_ENV, "1"),
        |cmd| {
            // Generation 3 is a broken release: it exits at once.
            cmd.env(FAIL_GENERATION_ENV, "3").stdout(events);
        },
    );
    sup.wait_active(&env, PORT, 1);
    let load = Load::start(PORT, 4);
    load.wait_answered_by(1, &sup);

    sup.signal(Signal::SIGHUP);
    sup.wait_active(&env, PORT, 2);
    load.wait_answered_by(2, &sup);
    wait_for_event(&events_path, json!({"event": "exited", "generation": 1}));

    let group = local(PORT).to_string();
    let out = env.ctl(&["restart", &group, "--timeout", "15s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the restart to broken generation 3 should fail: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.ctl(&["restart", &group, "--timeout", "15s"]);
    assert!(
        out.status.success(),
        "the restart to generation 4 should succeed: {}; log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sup.log()
    );
    load.wait_answered_by(4, &sup);
    wait_for_event(&events_path, json!({"event": "exited", "generation": 2}));
    let t = load.stop();
    println!("{NAME}: {t}");
    assert_eq!(t.failed, 0, "no request may fail through the deploys: {t}");

    let status = sup.stop(Signal::SIGTERM, patience(STEP_TIMEOUT));
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
    let all = launcher_events(&events_path);
    let deploy = |to: u32, from: u32, via: &str| {
        [
            json!({"event": "reload", "via": via}),
            json!({"event": "started", "generation": to, "state": "standby"}),
            json!({"event": "ready", "generation": to}),
            json!({"event": "activated", "generation": to, "previous": from}),
            json!({"event": "state", "generation": from, "state": "draining"}),
            json!({"event": "signalled", "generation": from, "signal": "SIGTERM", "reason": "idle"}),
            json!({"event": "exited", "generation": from, "phase": "draining", "status": 0}),
        ]
    };
    let mut expected = vec![json!({"event": "started", "generation": 1, "state": "active"})];
    expected.extend(deploy(2, 1, "sighup"));
    expected.extend([
        json!({"event": "reload", "via": "agent"}),
        json!({"event": "started", "generation": 3, "state": "standby"}),
        json!({"event": "exited", "generation": 3, "phase": "starting", "status": 1, "code": 1}),
        json!({"event": "deploy_failed", "generation": 3, "active": 2}),
    ]);
    expected.extend(deploy(4, 2, "agent"));
    expected.extend([
        json!({"event": "stopping", "signal": "SIGTERM", "generations": [4]}),
        json!({"event": "exited", "generation": 4, "phase": "stopping"}),
    ]);
    assert_event_sequence(&all, &expected);
    assert!(
        !all.iter()
            .any(|e| e["event"] == "activated" && e["generation"] == 3),
        "broken generation 3 should never be activated"
    );
    for reload in all.iter().filter(|e| e["event"] == "reload") {
        let named = reload["group"].as_str().unwrap_or_default();
        assert!(
            match reload["via"].as_str() {
                Some("agent") => named.starts_with(&format!("tcp://{}", local(PORT))),
                _ => reload["group"].is_null(),
            },
            "a reload through the agent should name the group restarted, a SIGHUP none: \
             {reload}"
        );
    }
    let failed = all
        .iter()
        .find(|e| e["event"] == "deploy_failed")
        .expect("checked above");
    assert_eq!(
        failed["error"], "generation 3 exited with status 1 before it was ready",
        "deploy_failed should say why, without the text's suffix: {failed}"
    );
}

fn wait_for_event(path: &Path, pattern: Value) {
    wait_until(
        &format!("the supervisor reports {pattern}"),
        patience(STEP_TIMEOUT),
        || has_event(path, &pattern),
    );
}
