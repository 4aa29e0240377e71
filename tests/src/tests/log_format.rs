//! `reuseport-agent --log-format json`: every line the agent writes is one JSON object, with
//! one line per registration, flip and refused request whose fields a log collector can
//! filter on (group, generation, op, kind) at the top level.

use serde_json::Value;

use crate::harness::{ServerKind, TestEnv};

#[test]
fn agent_json_logs_have_a_line_per_registration_flip_and_refusal() {
    const NAME: &str = "agent_json_logs_have_a_line_per_registration_flip_and_refusal";
    const PORT: u16 = 7951;
    let env = TestEnv::with_agent(NAME, &["--log-format", "json"], &[]);
    let group = format!("127.0.0.1:{PORT}");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, true);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    let out = env.ctl(&["activate", &group, "2"]);
    assert!(out.status.success(), "activate: {out:?}");
    let out = env.ctl(&["drain", &group, "2"]);
    assert!(
        !out.status.success(),
        "draining the active generation is refused"
    );

    let log = env.agent_log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("every log line should be JSON ({e}): {l}"))
        })
        .collect();
    let find = |what: &str, matches: &dyn Fn(&Value) -> bool| {
        lines
            .iter()
            .find(|l| l["message"] == what && matches(l))
            .unwrap_or_else(|| panic!("no {what:?} line as expected in:\n{log}"))
            .clone()
    };
    let in_group = |l: &Value| {
        l["group"]
            .as_str()
            .is_some_and(|g| g.contains(&format!(":{PORT}")))
    };
    for generation in [1, 2] {
        find("socket registered", &|l| {
            in_group(l) && l["generation"] == generation
        });
    }
    let flip = find("state changed", &|l| in_group(l) && l["op"] == "activate");
    assert_eq!(flip["active"], 2, "the flip's line: {flip}");
    let refused = find("request refused", &|l| l["op"] == "drain");
    assert_eq!(refused["kind"], "conflict", "the refusal's line: {refused}");
    for line in [&flip, &refused] {
        assert!(
            line["timestamp"].is_string() && line["level"] == "INFO",
            "each line has its time and level: {line}"
        );
    }
}
