//! The status page's data, one model for its three forms: the page (see [`page`]), JSON
//! (`/status.json`: everything, the chart's series included) and CSV (`/status.csv`: one row
//! per generation, as the page's tables; `/history.csv`: one row per generation and sample,
//! as the page's charts).
//!
//! [`page`]: super::page

use std::fmt::Write as _;

use serde::Serialize;

use reuseport_proto::message::{DrainPhase, GenState, GroupStatus};

use super::{
    View,
    history::{GroupChart, unix_seconds},
};

#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    pub mode: &'static str,
    /// Unix time of the counters shown, seconds.
    pub sampled_at: f64,
    /// Age of the live figures, seconds (absent when none could be read).
    pub live_age_seconds: Option<f64>,
    pub groups: Vec<Group>,
}

#[derive(Serialize)]
pub struct Group {
    pub group: String,
    pub mode: String,
    pub active: Option<u32>,
    pub falling_back: bool,
    pub unsteered: u64,
    pub flips: u64,
    /// Connected sockets on the address (live figure).
    pub connections: Option<u64>,
    pub generations: Vec<Generation>,
    pub chart: GroupChart,
}

#[derive(Serialize)]
pub struct Generation {
    pub generation: u32,
    pub name: Option<String>,
    pub state: GenState,
    /// Where a draining generation's drain is (`serving 3`, `idle`, `signalled SIGTERM`,
    /// `killed`), as `reuseportctl status` says it.
    pub drain: Option<String>,
    pub sockets: usize,
    pub listening: usize,
    pub pids: Vec<i32>,
    /// Connections its processes hold, and waiting in its accept queues (live figures).
    pub connections: Option<u64>,
    pub queued: Option<u64>,
    pub selected: u64,
    pub fallback: u64,
    pub migrated: u64,
    /// New connections per second at the last sample (the chart's last point).
    pub new_per_second: Option<f64>,
    /// Its share of a weighted split, in percent (`activate --weight`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// `up`, `down` or `checking`, as its supervisor's health checks report it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

impl Status {
    pub fn of(view: &View, charts: Vec<GroupChart>) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            mode: view.mode,
            sampled_at: unix_seconds(view.sample.at),
            live_age_seconds: view.live_age.map(|a| a.as_secs_f64()),
            groups: view
                .sample
                .groups
                .iter()
                .zip(charts)
                .map(|(g, chart)| Group::of(&g.status, g.flips, chart))
                .collect(),
        }
    }

    pub fn csv(&self) -> String {
        let mut out = String::from(
            "group,generation,name,state,drain,sockets,listening,pids,connections,queued,\
             selected,fallback,migrated,new_per_second\n",
        );
        for g in &self.groups {
            for x in &g.generations {
                let pids: Vec<String> = x.pids.iter().map(i32::to_string).collect();
                let row = [
                    g.group.clone(),
                    x.generation.to_string(),
                    x.name.clone().unwrap_or_default(),
                    x.state.to_string(),
                    x.drain.clone().unwrap_or_default(),
                    x.sockets.to_string(),
                    x.listening.to_string(),
                    pids.join(" "),
                    optional(x.connections),
                    optional(x.queued),
                    x.selected.to_string(),
                    x.fallback.to_string(),
                    x.migrated.to_string(),
                    x.new_per_second.map(rate).unwrap_or_default(),
                ];
                csv_row(&mut out, &row);
            }
        }
        out
    }

    /// The charts' points: `unix_time,group,generation,new_per_second`, gaps left out.
    pub fn history_csv(&self) -> String {
        let mut out = String::from("unix_time,group,generation,new_per_second\n");
        for g in &self.groups {
            for s in &g.chart.series {
                for (t, r) in g.chart.times.iter().zip(&s.rates) {
                    if let Some(r) = r {
                        csv_row(
                            &mut out,
                            &[
                                format!("{t:.3}"),
                                g.group.clone(),
                                s.generation.to_string(),
                                rate(*r),
                            ],
                        );
                    }
                }
            }
        }
        out
    }
}

impl Group {
    fn of(status: &GroupStatus, flips: u64, chart: GroupChart) -> Self {
        let last_rate = |generation: u32| {
            chart
                .series
                .iter()
                .find(|s| s.generation == generation)
                .and_then(|s| s.rates.last().copied().flatten())
        };
        Self {
            group: status.group.to_string(),
            mode: status.mode.clone(),
            active: status.active,
            falling_back: status.falling_back,
            unsteered: status.unsteered,
            flips,
            connections: status.live.map(|l| l.connections),
            generations: status
                .generations
                .iter()
                .map(|x| {
                    let mut pids: Vec<i32> = x.sockets.iter().map(|s| s.pid).collect();
                    pids.sort_unstable();
                    pids.dedup();
                    Generation {
                        generation: x.generation,
                        name: x.name.clone(),
                        state: x.state,
                        drain: x.drain.as_ref().map(DrainPhase::to_string),
                        sockets: x.sockets.len(),
                        listening: x.sockets.iter().filter(|s| s.listening).count(),
                        pids,
                        connections: x.live.map(|l| l.connections),
                        queued: x.live.map(|l| l.queued),
                        selected: x.counters.selected,
                        fallback: x.counters.fallback,
                        migrated: x.counters.migrated,
                        new_per_second: last_rate(x.generation),
                        weight: x.weight,
                        health: x.health.as_ref().map(|h| h.state.to_string()),
                    }
                })
                .collect(),
            chart,
        }
    }
}

fn optional(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn rate(r: f64) -> String {
    format!("{r:.1}")
}

/// One CSV record (RFC 4180): a field with a comma, quote or line break is quoted. A
/// generation name may hold any printable character.
fn csv_row(out: &mut String, fields: &[String]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if f.contains([',', '"', '\n', '\r']) {
            let _ = write!(out, "\"{}\"", f.replace('"', "\"\""));
        } else {
            out.push_str(f);
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_they_must_be() {
        let mut out = String::new();
        csv_row(
            &mut out,
            &["a".into(), "b,c".into(), "say \"hi\"".into(), String::new()],
        );
        assert_eq!(out, "a,\"b,c\",\"say \"\"hi\"\"\",\n");
    }
}
