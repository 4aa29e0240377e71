//! `activate GROUP GEN --weight P`: P % of new connections to GEN, the rest to the active
//! generation, within the binomial bound of the table's exact share; `--weight 100` then
//! flips as a plain activate does.

use std::time::Duration;

use reuseport_common::MAX_SLOTS;
use reuseport_proto::{GenState, GroupStatus};

use super::supervise::Load;
use crate::harness::{ServerKind, TestEnv, generation_status, load_size, local, tally, wait_until};

/// Connections counted at the split, on the host and in a VM guest (TCG is slow).
const COUNTED: u64 = 10_000;
const COUNTED_IN_VM: u64 = 2_000;
const WEIGHT: u8 = 10;
/// How many standard deviations of the binomial count the split may be off by.
const SIGMAS: f64 = 4.0;

/// `reuseportctl activate --json ARGS…`, which must succeed: the group after the change.
fn activate(env: &TestEnv, args: &[&str]) -> GroupStatus {
    let mut all = vec!["activate", "--json"];
    all.extend_from_slice(args);
    let out = env.ctl(&all);
    assert!(
        out.status.success(),
        "activate {args:?} should succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "activate --json should print the group: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn a_ten_percent_split_lands_within_the_binomial_bound_and_weight_100_flips() {
    const PORT: u16 = 6201;
    let mut env =
        TestEnv::new("a_ten_percent_split_lands_within_the_binomial_bound_and_weight_100_flips");
    let counted = load_size("connections counted at the split", COUNTED, COUNTED_IN_VM);
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    let group = format!("127.0.0.1:{PORT}");
    let load = Load::start(PORT, 1);
    wait_until(
        "the load reaches generation 1",
        Duration::from_secs(30),
        || g1.server.served() >= 20,
    );

    let changed = activate(&env, &[&group, "2", "--weight", &WEIGHT.to_string()]);
    let (one, two) = (
        generation_status(&changed, 1),
        generation_status(&changed, 2),
    );
    assert_eq!(
        (one.state, one.weight, two.state, two.weight),
        (
            GenState::Active,
            Some(100 - WEIGHT),
            GenState::Active,
            Some(WEIGHT)
        ),
        "both generations should be active with their weights: {changed:?}"
    );
    assert_eq!(
        changed.active,
        Some(2),
        "the weighted generation is named active: {changed:?}"
    );
    let text = String::from_utf8_lossy(&env.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains("active 1 (90 %) + 2 (10 %)"),
        "status should show both active generations with their weights: {text}"
    );

    // The exact share: the weight rounded to whole entries of the table (README).
    let len = u64::from(MAX_SLOTS);
    let entries = ((u64::from(WEIGHT) * len + 50) / 100).clamp(1, len - 1);
    let p = entries as f64 / len as f64;
    let (mean, sigma) = (counted as f64 * p, (counted as f64 * p * (1.0 - p)).sqrt());
    let t = tally(local(PORT), counted);
    let off = (t.of(2) as f64 - mean).abs();
    println!(
        "{counted} connections at {WEIGHT} % ({entries}/{len} entries, p = {p:.4}): {t}; \
         expected {mean:.0} ± {sigma:.1} for generation 2, off by {off:.0} ({:.2} σ)",
        off / sigma
    );
    assert_eq!(
        t.failed, 0,
        "no connection should fail during the split: {t}"
    );
    assert_eq!(
        t.of(1) + t.of(2),
        counted,
        "every connection should reach generation 1 or 2: {t}"
    );
    assert!(
        off <= SIGMAS * sigma,
        "generation 2 should get {mean:.0} ± {:.0} ({SIGMAS} σ) of {counted} connections: {t}",
        SIGMAS * sigma
    );

    // The split is in the pinned record: an agent killed and restarted steers by it still.
    env.kill_agent();
    env.restart_agent(&[]);
    env.wait_all_registered(Duration::from_secs(30));
    let adopted = env.status(PORT);
    assert_eq!(
        (
            generation_status(&adopted, 1).weight,
            generation_status(&adopted, 2).weight
        ),
        (Some(100 - WEIGHT), Some(WEIGHT)),
        "a restarted agent should adopt the split: {adopted:?}"
    );
    let t = tally(local(PORT), 500);
    assert!(
        t.failed == 0 && t.of(1) > t.of(2) && t.of(2) > 0,
        "after the agent's restart both generations should still share, 1 the most: {t}"
    );

    let changed = activate(&env, &[&group, "2", "--weight", "100"]);
    let (one, two) = (
        generation_status(&changed, 1),
        generation_status(&changed, 2),
    );
    assert_eq!(
        (one.state, one.weight, two.state, two.weight),
        (GenState::Draining, None, GenState::Active, None),
        "--weight 100 should flip as activate does: {changed:?}"
    );
    let after = tally(local(PORT), 200);
    assert_eq!(
        (after.of(2), after.failed),
        (200, 0),
        "after --weight 100 every new connection should reach generation 2: {after}"
    );
    let load = load.stop();
    println!("background load: {load}");
    assert_eq!(
        load.failed, 0,
        "no background connection should fail: {load}"
    );
    assert!(
        load.of(2) > 0,
        "the background load should have reached generation 2: {load}"
    );
}
