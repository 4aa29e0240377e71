//! `/metrics`: a [`View`] in the Prometheus text exposition format (version 0.0.4), encoded by
//! the Prometheus project's Rust client. Every metric, its type, labels and meaning are listed
//! in `docs/metrics.md`; a test below keeps the two in step.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use reuseport_proto::message::{GenState, GroupStatus, HealthState};

use super::View;

/// The `Content-Type` of an answer to `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

pub fn render(view: Arc<View>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Collect(view)));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

struct Collect(Arc<View>);

impl fmt::Debug for Collect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("reuseport metrics")
    }
}

/// One metric family: its descriptor, then one series per `(labels, value)`.
fn family<V>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (Labels, V)>,
    encode: impl Fn(V, prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in series {
        encode(value, m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64, m: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
    ConstCounter::new(v).encode(m)
}

fn gauge(v: f64, m: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
    ConstGauge::new(v).encode(m)
}

fn info(_: (), mut m: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
    m.encode_info(&Labels::new())
}

fn group_label(g: &GroupStatus) -> Labels {
    vec![("group", g.group.to_string())]
}

/// `group`, `generation` and `name` (empty for an unnamed generation).
fn generation_labels(g: &GroupStatus, generation: &reuseport_proto::GenerationStatus) -> Labels {
    let mut l = group_label(g);
    l.push(("generation", generation.generation.to_string()));
    l.push(("name", generation.name.clone().unwrap_or_default()));
    l
}

impl Collector for Collect {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let view = &*self.0;
        let groups: Vec<&GroupStatus> = view.sample.groups.iter().map(|g| &g.status).collect();
        let generations = || {
            groups
                .iter()
                .flat_map(|g| g.generations.iter().map(move |x| (*g, x)))
        };
        let sockets = || generations().flat_map(|(g, x)| x.sockets.iter().map(move |s| (g, x, s)));

        family(
            &mut enc,
            "reuseport_build",
            "Always 1: the agent's version, and the ABI version of the maps and program it pins.",
            MetricType::Info,
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("abi", reuseport_common::ABI_VERSION.to_string()),
                ],
                (),
            )],
            info,
        )?;
        family(
            &mut enc,
            "reuseport_connections",
            "Connections the program sent to a generation: kind=selected (it was active), \
             fallback (no active socket was listening), migrated (moved from a closing listener).",
            MetricType::Counter,
            generations().flat_map(|(g, x)| {
                [
                    ("selected", x.counters.selected),
                    ("fallback", x.counters.fallback),
                    ("migrated", x.counters.migrated),
                ]
                .map(|(kind, n)| {
                    let mut l = generation_labels(g, x);
                    l.push(("kind", kind.to_string()));
                    (l, n)
                })
            }),
            counter,
        )?;
        family(
            &mut enc,
            "reuseport_unsteered",
            "Connections the program handed back to the kernel's hash: no registered socket \
             was listening in the group.",
            MetricType::Counter,
            groups.iter().map(|g| (group_label(g), g.unsteered)),
            counter,
        )?;
        family(
            &mut enc,
            "reuseport_generation",
            "A generation of a group and its state (active, draining, standby); always 1.",
            MetricType::Info,
            generations().map(|(g, x)| {
                let mut l = generation_labels(g, x);
                l.push(("state", x.state.to_string()));
                (l, ())
            }),
            info,
        )?;
        family(
            &mut enc,
            "reuseport_generation_weight",
            "Percent of the group's new connections an active generation is set to get: 100, \
             or its share of a weighted split (activate --weight).",
            MetricType::Gauge,
            generations()
                .filter(|(_, x)| x.state == GenState::Active)
                .map(|(g, x)| (generation_labels(g, x), f64::from(x.weight.unwrap_or(100)))),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_generation_healthy",
            "1 while the generation's supervisor reports it up (supervise --health), 0 while it \
             is being checked or down.",
            MetricType::Gauge,
            generations().filter_map(|(g, x)| {
                let up = x.health.as_ref()?.state == HealthState::Up;
                Some((generation_labels(g, x), f64::from(u8::from(up))))
            }),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_group_falling_back",
            "1 while no socket of the group's active generation is listening (new connections \
             go to the fallback generations), else 0.",
            MetricType::Gauge,
            groups
                .iter()
                .map(|g| (group_label(g), f64::from(u8::from(g.falling_back)))),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_flips",
            "Times a generation of the group became the active one since the agent started.",
            MetricType::Counter,
            view.sample
                .groups
                .iter()
                .map(|g| (group_label(&g.status), g.flips)),
            counter,
        )?;
        family(
            &mut enc,
            "reuseport_group_connections",
            "Connected TCP sockets on the group's address (live figure).",
            MetricType::Gauge,
            groups
                .iter()
                .filter_map(|g| g.live.map(|l| (group_label(g), l.connections as f64))),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_generation_connections",
            "Connections the generation's processes hold on the group's address (live figure).",
            MetricType::Gauge,
            generations().filter_map(|(g, x)| {
                x.live
                    .map(|l| (generation_labels(g, x), l.connections as f64))
            }),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_generation_queued_connections",
            "Connections waiting in the accept queues of the generation's listeners (live \
             figure).",
            MetricType::Gauge,
            generations()
                .filter_map(|(g, x)| x.live.map(|l| (generation_labels(g, x), l.queued as f64))),
            gauge,
        )?;
        let listener = |g: &GroupStatus, x: &reuseport_proto::GenerationStatus, slot: u32| {
            let mut l = generation_labels(g, x);
            l.push(("slot", slot.to_string()));
            l
        };
        family(
            &mut enc,
            "reuseport_listener_queued_connections",
            "Connections waiting in one registered listener's accept queue (live figure).",
            MetricType::Gauge,
            sockets().filter_map(|(g, x, s)| {
                s.live
                    .map(|l| (listener(g, x, s.slot), f64::from(l.queued)))
            }),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_listener_backlog_connections",
            "The accept queue's capacity of one registered listener (its listen() backlog; \
             live figure).",
            MetricType::Gauge,
            sockets().filter_map(|(g, x, s)| {
                s.live
                    .map(|l| (listener(g, x, s.slot), f64::from(l.backlog)))
            }),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_listener_dropped_connections",
            "Connection attempts one registered listener dropped since it registered: its \
             accept queue was full (live figure).",
            MetricType::Counter,
            sockets().filter_map(|(g, x, s)| {
                s.live.map(|l| (listener(g, x, s.slot), u64::from(l.drops)))
            }),
            counter,
        )?;
        family(
            &mut enc,
            "reuseport_listener_listening",
            "1 while the registered socket in this slot listens, 0 once its process closed it.",
            MetricType::Gauge,
            sockets().map(|(g, x, s)| (listener(g, x, s.slot), f64::from(u8::from(s.listening)))),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_group_slots",
            "Slots of the group's socket array that registered sockets hold.",
            MetricType::Gauge,
            groups.iter().map(|g| {
                let used: usize = g.generations.iter().map(|x| x.sockets.len()).sum();
                (group_label(g), used as f64)
            }),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_groups",
            "Groups the agent manages.",
            MetricType::Gauge,
            [(Labels::new(), groups.len() as f64)],
            gauge,
        )?;
        let limits = &view.limits;
        for (name, help, value) in [
            (
                "reuseport_group_slots_max",
                "Slots in a group's socket array: sockets a group holds at most.",
                limits.sockets_per_group,
            ),
            (
                "reuseport_group_generations_max",
                "Generations a group holds at most.",
                limits.generations_per_group,
            ),
            (
                "reuseport_groups_max",
                "Groups the agent manages at most (--max-groups).",
                limits.groups,
            ),
            (
                "reuseport_control_connections_max",
                "Control connections the agent holds open at most (--max-connections, lowered \
                 to what RLIMIT_NOFILE allows).",
                limits.control_connections,
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                MetricType::Gauge,
                [(Labels::new(), f64::from(value))],
                gauge,
            )?;
        }
        family(
            &mut enc,
            "reuseport_refused_requests",
            "Error answers the agent sent, by kind (the protocol's error kinds; `limit` also \
             counts connections turned away at the connection limit).",
            MetricType::Counter,
            view.refusals
                .iter()
                .map(|(kind, n)| (vec![("kind", kind.as_str().to_string())], *n)),
            counter,
        )?;
        family(
            &mut enc,
            "reuseport_sample_duration_seconds",
            "What the agent's last read of every group's counters took (once a second).",
            MetricType::Gauge,
            [(Labels::new(), view.sample_cost.as_secs_f64())],
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_live_figures_duration_seconds",
            "What the last read of the live figures of every group took (sock_diag and the \
             process walk).",
            MetricType::Gauge,
            view.live_cost.map(|c| (Labels::new(), c.as_secs_f64())),
            gauge,
        )?;
        family(
            &mut enc,
            "reuseport_live_figures_age_seconds",
            "How old the live figures in this answer are (they are read again when older than \
             a second and ten times what they cost).",
            MetricType::Gauge,
            view.live_age.map(|a| (Labels::new(), a.as_secs_f64())),
            gauge,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use reuseport_proto::message::Limits;

    use super::*;
    use crate::metrics::sample::Sample;

    const DOC: &str = include_str!("../../../docs/metrics.md");

    fn empty_view() -> View {
        View {
            sample: Sample::empty(),
            live_age: Some(Duration::ZERO),
            live_cost: Some(Duration::ZERO),
            sample_cost: Duration::ZERO,
            refusals: Vec::new(),
            limits: Limits {
                groups: 1,
                sockets_per_group: 1,
                generations_per_group: 1,
                control_connections: 1,
                groups_per_uid: None,
                control_connections_per_uid: None,
                groups_reserved_for_root: None,
                control_connections_reserved_for_root: None,
            },
            mode: "select-or-migrate",
        }
    }

    /// Every family `/metrics` declares is a row of `docs/metrics.md` with the same type,
    /// and every row there is a family here: `| `name` | type | labels | meaning |`.
    #[test]
    fn docs_list_every_metric_with_its_type() {
        let exposition = render(Arc::new(empty_view()));
        let declared: BTreeSet<(String, String)> = exposition
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect();
        let documented: BTreeSet<(String, String)> = DOC
            .lines()
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                let kind = cells.next()?;
                name.starts_with("reuseport_")
                    .then(|| (name.to_string(), kind.to_string()))
            })
            .collect();
        assert_eq!(declared, documented, "docs/metrics.md and /metrics differ");
    }

    /// Counters end in `_total`, durations are in seconds: the Prometheus naming conventions.
    #[test]
    fn names_follow_the_conventions() {
        let exposition = render(Arc::new(empty_view()));
        for l in exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = l.split_once(' ').expect("name and type");
            assert!(name.starts_with("reuseport_"), "{name}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} ({kind})"
            );
            assert!(
                !name.contains("_ms") && !name.contains("millis"),
                "{name}: base units"
            );
        }
    }
}
