//! The flip benchmark's report: one row per mode and client, printed as a table and written
//! as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use super::wrk::WrkResult;
use crate::{
    bench::{Machine, Percentiles},
    deploy::{ABRUPT_DELAY_MS, Deployed, Mode},
    load::Tally,
};

#[derive(Serialize)]
pub(super) struct FlipReport {
    pub(super) machine: Machine,
    pub(super) flips: u32,
    pub(super) clients: usize,
    pub(super) interval_ms: u64,
    pub(super) kill_old_delay_ms: u64,
    pub(super) wrk: Option<String>,
    pub(super) load: Vec<LoadRow>,
    pub(super) http: Vec<HttpRow>,
}

/// One mode under our client.
#[derive(Serialize)]
pub(super) struct LoadRow {
    pub(super) mode: Mode,
    pub(super) flips: u32,
    pub(super) duration_s: f64,
    pub(super) requests: u64,
    pub(super) failures: u64,
    pub(super) conn_per_s: f64,
    #[serde(flatten)]
    pub(super) tally: Tally,
    pub(super) deploy: Deploys,
}

/// One mode under wrk.
#[derive(Serialize)]
pub(super) struct HttpRow {
    pub(super) mode: Mode,
    pub(super) flips: u32,
    #[serde(flatten)]
    pub(super) wrk: WrkResult,
    pub(super) deploy: Deploys,
}

impl HttpRow {
    pub(super) fn errors(&self) -> u64 {
        let w = &self.wrk;
        w.connect + w.read + w.write + w.timeout + w.non_2xx + w.wrong_body
    }
}

/// What the deploys themselves took (reuseport: SIGHUP → new generation active) and what the
/// agent counted.
#[derive(Serialize)]
pub(super) struct Deploys {
    pub(super) deploy_ms: Option<Percentiles>,
    pub(super) migrated: Option<u64>,
}

impl From<Option<Deployed>> for Deploys {
    fn from(d: Option<Deployed>) -> Self {
        Self {
            deploy_ms: d.as_ref().map(|d| Percentiles::of(d.deploy_ms.clone())),
            migrated: d.map(|d| d.migrated),
        }
    }
}

impl FlipReport {
    pub(super) fn print(&self) {
        let m = &self.machine;
        let machine = format!("{} CPUs, kernel {}", m.cpus, m.kernel);
        let delay = self.kill_old_delay_ms;
        println!(
            "\n| our client: {} threads, a new connection per request | baseline: plain SO_REUSEPORT, old one killed {delay} ms after the new one starts | reuseport: `reuseportctl supervise --ready delay={delay}ms`, SIGHUP | reuseport, a server that exits at once on SIGTERM and takes {ABRUPT_DELAY_MS} ms per request |",
            self.clients
        );
        println!("|---|---|---|---|");
        let row = |name: &str, f: &dyn Fn(&LoadRow) -> String| {
            let cells: Vec<String> = self.load.iter().map(f).collect();
            println!("| {name} | {} |", cells.join(" | "));
        };
        row("machine", &|_| machine.clone());
        row("deploys done", &|r| r.flips.to_string());
        row("requests", &|r| r.requests.to_string());
        row("**failed**", &|r| format!("**{}**", r.failures));
        row(
            "refused / reset / closed unanswered / timeout / slower than 500 ms / wrong answer / other",
            &|r| {
                let t = &r.tally;
                format!(
                    "{} / {} / {} / {} / {} / {} / {}",
                    t.refused, t.reset, t.closed, t.timeout, t.slow, t.wrong, t.other
                )
            },
        );
        row("requests per generation", &|r| {
            per_generation(&r.tally.by_generation)
        });
        row("duration", &|r| format!("{:.1} s", r.duration_s));
        row("conn/s", &|r| format!("{:.0}", r.conn_per_s));
        row("deploy (SIGHUP → new generation active)", &|r| {
            deploy_cell(&r.deploy)
        });
        row("queued connections migrated at close", &|r| {
            r.deploy.migrated.map_or("—".into(), |n| n.to_string())
        });
        if self.http.is_empty() {
            return;
        }
        println!(
            "\n| {}: -c {}, `Connection: close` | baseline | reuseport | reuseport, exits on SIGTERM, {ABRUPT_DELAY_MS} ms per request |",
            self.wrk.as_deref().unwrap_or("wrk"),
            self.clients
        );
        println!("|---|---|---|---|");
        let row = |name: &str, f: &dyn Fn(&HttpRow) -> String| {
            let cells: Vec<String> = self.http.iter().map(f).collect();
            println!("| {name} | {} |", cells.join(" | "));
        };
        row("machine", &|_| machine.clone());
        row("deploys done during the run", &|r| r.flips.to_string());
        row("requests", &|r| r.wrk.requests.to_string());
        row("**errors**", &|r| format!("**{}**", r.errors()));
        row("socket errors connect / read / write / timeout", &|r| {
            let w = &r.wrk;
            format!("{} / {} / {} / {}", w.connect, w.read, w.write, w.timeout)
        });
        row("non-2xx / 200 without a generation", &|r| {
            format!("{} / {}", r.wrk.non_2xx, r.wrk.wrong_body)
        });
        row("requests per generation", &|r| {
            per_generation(&r.wrk.by_generation)
        });
        row("duration", &|r| format!("{:.1} s", r.wrk.duration_s));
        row("requests/s", &|r| format!("{:.0}", r.wrk.requests_per_s));
        row("deploy (SIGHUP → new generation active)", &|r| {
            deploy_cell(&r.deploy)
        });
        row("queued connections migrated at close", &|r| {
            r.deploy.migrated.map_or("—".into(), |n| n.to_string())
        });
    }
}

fn deploy_cell(d: &Deploys) -> String {
    d.deploy_ms.as_ref().map_or("—".into(), |p| {
        format!("p50 {:.0} ms, max {:.0} ms", p.p50, p.max)
    })
}

/// `21 generations: min 812, median 1010, max 1302`.
fn per_generation(by: &BTreeMap<u32, u64>) -> String {
    let mut n: Vec<u64> = by.values().copied().collect();
    n.sort_unstable();
    match (n.first(), n.last()) {
        (Some(min), Some(max)) => format!(
            "{} generations: min {min}, median {}, max {max}",
            n.len(),
            n[n.len() / 2]
        ),
        _ => "none".into(),
    }
}
