//! `--metrics-listen`: `/metrics` as a real Prometheus server scrapes it during a flip, the
//! status page as headless Chromium renders it during a flip, and the listener's other forms
//! (`/status.json`, `/status.csv`) as plain HTTP reads them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::supervise::Load;
use crate::harness::{
    Chromium, Prometheus, SCRAPE_INTERVAL, ServerKind, TestEnv, generation_status, http_get, local,
    patience, skip, target_dir, tool_missing, wait_until, wait_until_every,
};

/// The agent's metrics listener, in the test's network namespace.
const METRICS_PORT: u16 = 9464;
const TIMEOUT: Duration = Duration::from_secs(30);

fn env_with_metrics(name: &'static str) -> TestEnv {
    let listen = local(METRICS_PORT).to_string();
    let env = TestEnv::with_agent(name, &["--metrics-listen", &listen], &[]);
    // NB: the listener is bound after the control socket the harness waits for.
    wait_until(
        "the agent's metrics listener answers",
        patience(TIMEOUT),
        || http_get(local(METRICS_PORT), "/metrics").is_ok_and(|a| a.status == 200),
    );
    env
}

fn get(path: &str) -> String {
    let answer = http_get(local(METRICS_PORT), path)
        .unwrap_or_else(|e| panic!("GET {path} from the agent: {e}"));
    assert_eq!(answer.status, 200, "GET {path} should succeed: {answer:?}");
    answer.body
}

/// The value of the exposition's line for `series` (name and labels as written).
fn series_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// Prometheus scrapes the agent every 500 ms while generation 1 serves, then 2 takes over.
/// Through its query API: generation 1's `selected` counter rose before the flip and has not
/// moved in any scrape since the first one that saw the flip, while generation 2's rose in
/// at least three scrapes; the generations' states, the flip and the build are there too.
#[test]
fn prometheus_sees_the_new_generations_counter_rise_and_the_old_ones_stop() {
    const NAME: &str = "prometheus_sees_the_new_generations_counter_rise_and_the_old_ones_stop";
    const PORT: u16 = 7871;
    if let Some(reason) = tool_missing("prometheus") {
        return skip(NAME, &reason);
    }
    let env = env_with_metrics(NAME);
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, true);
    let load = Load::start(PORT, 2);
    let prom = Prometheus::start(env.dir(), local(METRICS_PORT));
    let selected =
        |g: u32| format!("reuseport_connections_total{{generation=\"{g}\",kind=\"selected\"}}");

    wait_until_every(
        "Prometheus saw generation 1's selected counter rise",
        patience(TIMEOUT),
        SCRAPE_INTERVAL / 5,
        || {
            prom.value(&format!("changes({}[10s])", selected(1)))
                .is_some_and(|c| c >= 2.0)
        },
    );
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    env.activate(PORT, 2);
    // NB: read after the flip: no connection is selected for a draining generation, so this
    // is the counter's final value.
    let final1 = generation_status(&env.status(PORT), 1).counters.selected;

    let mut first_after_flip = None;
    wait_until_every(
        "Prometheus scraped generation 1's final selected count",
        patience(TIMEOUT),
        SCRAPE_INTERVAL / 5,
        || {
            first_after_flip = prom
                .query(&selected(1))
                .first()
                .filter(|s| s.value == final1 as f64)
                .map(|s| s.at);
            first_after_flip.is_some()
        },
    );
    let since = first_after_flip.expect("seen");
    // Range queries over the scrapes since then: `changes(x[W])` at `since + W`.
    // NB: at least 1 ms: Prometheus refuses an empty range.
    let window = || format!("{}ms", (((unix_now() - since) * 1000.0) as u64).max(1));
    wait_until_every(
        "Prometheus saw generation 2's selected counter rise in three scrapes after the flip",
        patience(TIMEOUT),
        SCRAPE_INTERVAL / 5,
        || {
            prom.value(&format!("changes({}[{}])", selected(2), window()))
                .is_some_and(|c| c >= 3.0)
        },
    );
    let w = window();
    let old_changes = prom.value(&format!("changes({}[{w}])", selected(1)));
    let old_samples = prom.value(&format!("count_over_time({}[{w}])", selected(1)));
    let tally = load.stop();
    println!(
        "generation 1 final selected {final1}; since the first scrape after the flip ({w}): \
         {old_samples:?} samples of it, {old_changes:?} changes; clients: {tally}"
    );
    assert!(
        old_samples.is_some_and(|n| n >= 3.0),
        "Prometheus should keep scraping generation 1's counter after the flip: {old_samples:?}"
    );
    assert_eq!(
        old_changes,
        Some(0.0),
        "generation 1's selected counter should not move after the flip"
    );
    assert_eq!(tally.failed, 0, "no client connection should fail: {tally}");

    let up = prom.value("up{job=\"reuseport\"}");
    assert_eq!(
        up,
        Some(1.0),
        "Prometheus should scrape the agent without error"
    );
    for (g, state) in [(1, "draining"), (2, "active")] {
        let info = prom.query(&format!(
            "reuseport_generation_info{{generation=\"{g}\",state=\"{state}\"}}"
        ));
        assert_eq!(
            info.len(),
            1,
            "generation {g} should be listed as {state}: {info:?}"
        );
        assert_eq!(info[0].labels["group"], format!("tcp://{}", local(PORT)));
    }
    let flips = prom.value("reuseport_flips_total");
    assert!(
        flips.is_some_and(|f| f >= 1.0),
        "the flip should be counted: {flips:?}"
    );
    let build = prom.query("reuseport_build_info");
    assert!(
        build.len() == 1
            && build[0].labels.contains_key("version")
            && build[0].labels.contains_key("abi"),
        "reuseport_build_info should carry version and abi: {build:?}"
    );
}

/// Headless Chromium loads the page while generation 2 takes over from 1 under load: the DOM
/// after load lists generation 1 draining and 2 active, and the chart draws a series of each,
/// 2's last rate above zero. A screenshot is kept under `target/screenshots/`.
#[test]
fn chromium_renders_the_status_page_with_both_generations_during_a_flip() {
    const NAME: &str = "chromium_renders_the_status_page_with_both_generations_during_a_flip";
    const PORT: u16 = 7872;
    if let Some(reason) = tool_missing("chromium") {
        return skip(NAME, &reason);
    }
    let env = env_with_metrics(NAME);
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, true);
    let load = Load::start(PORT, 2);
    let rate_of = |g: u32| -> Option<f64> {
        let status: serde_json::Value =
            serde_json::from_str(&get("/status.json")).expect("status.json is JSON");
        status["groups"][0]["generations"]
            .as_array()?
            .iter()
            .find(|x| x["generation"] == g)?["new_per_second"]
            .as_f64()
    };
    wait_until_every(
        "the page's chart has a rate for generation 1",
        patience(TIMEOUT),
        Duration::from_millis(100),
        || rate_of(1).is_some_and(|r| r > 0.0),
    );
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    env.activate(PORT, 2);
    wait_until_every(
        "the page's chart has a rate above zero for generation 2",
        patience(TIMEOUT),
        Duration::from_millis(100),
        || rate_of(2).is_some_and(|r| r > 0.0),
    );

    let profile = env.dir().join("chromium");
    let chromium = Chromium::new(&profile);
    let url = format!("http://{}/", local(METRICS_PORT));
    let dom = chromium.dom(&url);
    let png = target_dir().join("screenshots/status-page-during-a-flip.png");
    std::fs::create_dir_all(png.parent().expect("a directory")).expect("create screenshots/");
    chromium.screenshot(&url, &png, (1100, 700));
    let tally = load.stop();
    println!(
        "DOM: {} bytes; screenshot {}; clients: {tally}",
        dom.len(),
        png.display()
    );

    assert!(
        dom.contains(&format!("data-group=\"tcp://{}\"", local(PORT))),
        "the page should show the group: {dom}"
    );
    for (g, state) in [(1, "draining"), (2, "active")] {
        assert!(
            dom.contains(&format!("data-generation=\"{g}\" data-state=\"{state}\"")),
            "the page should list generation {g} as {state}: {dom}"
        );
        assert!(
            dom.contains(&format!("class=\"series\" data-generation=\"{g}\"")),
            "the chart should draw a series for generation {g}: {dom}"
        );
    }
    let last2 = dom
        .split("class=\"series\" data-generation=\"2\" data-last=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        last2.is_some_and(|r| r > 0.0),
        "generation 2's series should end above zero: {last2:?}"
    );
    let image = std::fs::read(&png).expect("the screenshot was written");
    assert!(
        image.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot should be a PNG"
    );
    assert_eq!(tally.failed, 0, "no client connection should fail: {tally}");
}

/// `/metrics` in the text exposition format with the names of `docs/metrics.md`, and the
/// status data as JSON and CSV, one row per generation; an unknown path is a 404 that names
/// the ones served.
#[test]
fn metrics_listener_serves_the_exposition_json_and_csv() {
    const PORT: u16 = 7873;
    let env = env_with_metrics("metrics_listener_serves_the_exposition_json_and_csv");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, true);
    let group = format!("tcp://{}", local(PORT));
    // NB: answers come from the latest once-a-second sample.
    wait_until(
        "the agent's sample shows the group",
        patience(TIMEOUT),
        || series_value(&get("/metrics"), "reuseport_groups") == Some(1.0),
    );

    let metrics = http_get(local(METRICS_PORT), "/metrics").expect("GET /metrics");
    assert!(
        metrics.content_type.starts_with("text/plain")
            || metrics
                .content_type
                .starts_with("application/openmetrics-text"),
        "/metrics should carry the exposition's content type: {:?}",
        metrics.content_type
    );
    let body = &metrics.body;
    assert!(
        body.lines()
            .any(|l| l == "# TYPE reuseport_connections_total counter"),
        "/metrics should declare the connection counters:\n{body}"
    );
    let labels = |g: u32| format!("group=\"{group}\",generation=\"{g}\",name=\"gen{g}\"");
    for (series, expected) in [
        (
            format!(
                "reuseport_generation_info{{{},state=\"draining\"}}",
                labels(1)
            ),
            Some(1.0),
        ),
        (
            format!(
                "reuseport_generation_info{{{},state=\"active\"}}",
                labels(2)
            ),
            Some(1.0),
        ),
        (
            format!("reuseport_unsteered_total{{group=\"{group}\"}}"),
            Some(0.0),
        ),
        ("reuseport_groups".to_string(), Some(1.0)),
        (
            format!("reuseport_group_slots{{group=\"{group}\"}}"),
            Some(2.0),
        ),
    ] {
        assert_eq!(
            series_value(body, &series),
            expected,
            "{series} in:\n{body}"
        );
    }
    assert!(
        series_value(
            body,
            &format!(
                "reuseport_connections_total{{{},kind=\"selected\"}}",
                labels(2)
            )
        )
        .is_some(),
        "/metrics should count generation 2's selected connections:\n{body}"
    );

    let csv = get("/status.csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("group,generation,name,state,"), "{csv}");
    assert_eq!(rows.len(), 3, "a header and one row per generation: {csv}");
    assert!(
        rows[1].starts_with(&format!("{group},1,gen1,draining,")),
        "{csv}"
    );
    assert!(
        rows[2].starts_with(&format!("{group},2,gen2,active,")),
        "{csv}"
    );

    let json: serde_json::Value = serde_json::from_str(&get("/status.json")).expect("JSON");
    assert_eq!(json["groups"][0]["group"], group.as_str());
    assert_eq!(json["groups"][0]["active"], 2, "{json}");

    let missing = http_get(local(METRICS_PORT), "/nothing").expect("GET /nothing");
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("/metrics"), "{missing:?}");
}
