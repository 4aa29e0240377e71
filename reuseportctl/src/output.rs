//! Human-readable output: the `status` table and the one-line summary of a change.
//!
//! NB: names and error texts come from other users' requests: they are printed through
//! [`escape`], so that no escape sequence or bidirectional override reaches the terminal.

use std::{fmt::Write as _, io::Write as _};

use reuseport_client::proto::{
    GenState, GenerationHealth, GenerationStatus, GroupStatus, HealthState, Limits, RestartOutcome,
    text::escape,
};

/// Writes `text` to stdout. A closed pipe (`reuseportctl status | head -1`) is not an
/// error: the reader has what it wanted.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

/// Writes `value` as pretty JSON, for `--json` (JSON escapes what a terminal would
/// interpret, so no [`escape`] here).
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value)
        .map_err(|e| anyhow::anyhow!("cannot encode JSON: {e}"))?;
    print(&format!("{json}\n"))
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
struct Table {
    headers: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    fn render(&self, indent: &str, out: &mut String) {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let headers = self
            .headers
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:w$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let s = items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if s.is_empty() { "-".into() } else { s }
}

fn generation_row(generation: &GenerationStatus) -> Vec<String> {
    let mut pids: Vec<i32> = generation.sockets.iter().map(|s| s.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    let mut slots: Vec<u32> = generation.sockets.iter().map(|s| s.slot).collect();
    slots.sort_unstable();
    let closed = generation.sockets.iter().filter(|s| !s.listening).count();
    let waiting = generation.sockets.iter().filter(|s| !s.registered).count();
    let mut sockets = generation.sockets.len().to_string();
    if closed > 0 {
        let _ = write!(sockets, " ({closed} closed)");
    }
    if waiting > 0 {
        let _ = write!(sockets, " ({waiting} not re-registered)");
    }
    let state = match (&generation.drain, generation.weight) {
        (Some(phase), _) => format!("{} ({phase})", generation.state),
        (None, Some(weight)) => format!("{} ({weight} %)", generation.state),
        (None, None) => generation.state.to_string(),
    };
    vec![
        generation.generation.to_string(),
        generation
            .name
            .as_deref()
            .map_or_else(|| "-".into(), |n| escape(n).into_owned()),
        state,
        sockets,
        join(pids),
        join(slots),
        live_cell(generation),
        generation.counters.selected.to_string(),
        generation.counters.fallback.to_string(),
        generation.counters.migrated.to_string(),
    ]
}

/// `3 conns, queue 0/4096`, and the drops of its listeners since they registered, if any;
/// `-` without live figures.
fn live_cell(generation: &GenerationStatus) -> String {
    let Some(live) = generation.live else {
        return "-".into();
    };
    let listeners = generation.sockets.iter().filter_map(|s| s.live);
    let (backlog, drops) = listeners.fold((0u64, 0u64), |(b, d), l| {
        (b + u64::from(l.backlog), d + u64::from(l.drops))
    });
    let mut cell = format!(
        "{} conns, queue {}/{backlog}",
        live.connections, live.queued
    );
    if drops > 0 {
        let _ = write!(cell, ", {drops} dropped");
    }
    cell
}

/// The `status` table: a header line per group, then a row per generation.
pub fn status_table(groups: &[GroupStatus]) -> String {
    if groups.is_empty() {
        return "no groups\n".into();
    }
    let mut out = String::new();
    for (i, group) in groups.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        // NB: during a split both active generations are named, with their weights.
        let split: Vec<String> = group
            .generations
            .iter()
            .filter_map(|g| Some(format!("{} ({} %)", g.generation, g.weight?)))
            .collect();
        let active = if split.is_empty() {
            group
                .active
                .map_or_else(|| "none".into(), |g| g.to_string())
        } else {
            split.join(" + ")
        };
        let _ = write!(
            out,
            "{}  mode {}  active {}  unsteered {}",
            group.group, group.mode, active, group.unsteered
        );
        if let Some(live) = group.live {
            let _ = write!(out, "  connections {}", live.connections);
        }
        if group.falling_back {
            out.push_str("  FALLING BACK (no active socket left)");
        }
        match &group.last_restart {
            Some(RestartOutcome::Failed { error }) => {
                let _ = write!(out, "\n  LAST RESTART FAILED: {}", escape(error));
            }
            Some(RestartOutcome::Active { generation }) => {
                let _ = write!(out, "  last restart: generation {generation} active");
            }
            None => {}
        }
        out.push('\n');
        let mut generations: Vec<&GenerationStatus> = group.generations.iter().collect();
        generations.sort_by_key(|g| g.generation);
        Table {
            headers: &[
                "GEN", "NAME", "STATE", "SOCKETS", "PIDS", "SLOTS", "LIVE", "SELECTED", "FALLBACK",
                "MIGRATED",
            ],
            rows: generations.iter().map(|g| generation_row(g)).collect(),
        }
        .render("  ", &mut out);
        for g in &generations {
            if let Some(h) = &g.health {
                let _ = writeln!(
                    out,
                    "  generation {} health: {}",
                    g.generation,
                    health_line(h)
                );
            }
        }
        for g in generations.iter().filter(|g| !g.also_in.is_empty()) {
            let _ = writeln!(
                out,
                "  generation {} spans {} too (they switch together)",
                g.generation,
                join(&g.also_in)
            );
        }
    }
    if let Some(limits) = groups.iter().find_map(|g| g.limits) {
        let _ = writeln!(
            out,
            "\nlimits: {} groups; {} sockets and {} generations per group; {} control \
             connections",
            limits.groups,
            limits.sockets_per_group,
            limits.generations_per_group,
            limits.control_connections
        );
        if let Some(quotas) = quotas_line(&limits) {
            let _ = writeln!(out, "{quotas}");
        }
    }
    out
}

/// `up (5 passed in a row; rise 3), last check 0.4s ago`, `down (2 failed in a row; fall 2;
/// last failure: …), …`.
fn health_line(h: &GenerationHealth) -> String {
    let mut line = match h.state {
        HealthState::Down => format!("down ({} failed in a row; fall {}", h.failures, h.fall),
        HealthState::Up => format!("up ({} passed in a row; rise {}", h.successes, h.rise),
        HealthState::Checking => {
            format!("checking ({} of {} passed in a row", h.successes, h.rise)
        }
    };
    if let Some(e) = h.last_error.as_deref().filter(|_| h.failures > 0) {
        let _ = write!(line, "; last failure: {}", escape(e));
    }
    line.push(')');
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let ago = now.saturating_sub(h.last_check_ms);
    let _ = write!(line, ", last check {:.1}s ago", ago as f64 / 1000.0);
    line
}

/// `per non-root uid: … ; kept for root: …`, when the agent reports its quotas.
fn quotas_line(limits: &Limits) -> Option<String> {
    Some(format!(
        "per non-root uid: {} groups, {} control connections; kept for root: {} groups, {} \
         control connections",
        limits.groups_per_uid?,
        limits.control_connections_per_uid?,
        limits.groups_reserved_for_root?,
        limits.control_connections_reserved_for_root?
    ))
}

/// What `activate` and `drain` print: a line per group the generation changed in (a server
/// with several listeners spans several groups); with `json`, the group named, as one object.
pub fn print_changes(groups: &[GroupStatus], generation: u32, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&groups[0]);
    }
    let lines: String = groups
        .iter()
        .map(|g| format!("{}\n", change_summary(g, generation)))
        .collect();
    print(&lines)
}

/// One line after `activate` or `drain`, e.g.
/// `tcp://127.0.0.1:8080: generation 2 active (1 draining)`.
pub fn change_summary(group: &GroupStatus, generation: u32) -> String {
    let mut line = format!("{}: generation {generation}", group.group);
    if let Some(g) = group
        .generations
        .iter()
        .find(|g| g.generation == generation)
    {
        let _ = write!(line, " {}", g.state);
        if let Some(weight) = g.weight {
            let _ = write!(line, " at {weight} %");
        }
    }
    let mut others = Vec::new();
    for state in [GenState::Active, GenState::Draining, GenState::Standby] {
        let mut gens: Vec<u32> = group
            .generations
            .iter()
            .filter(|g| g.generation != generation && g.state == state && g.weight.is_none())
            .map(|g| g.generation)
            .collect();
        gens.sort_unstable();
        if !gens.is_empty() {
            let gens = gens
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            others.push(format!("{gens} {state}"));
        }
        for g in &group.generations {
            if let Some(weight) = g
                .weight
                .filter(|_| g.generation != generation && g.state == state)
            {
                others.push(format!("{} {state} at {weight} %", g.generation));
            }
        }
    }
    if !others.is_empty() {
        let _ = write!(line, " ({})", others.join("; "));
    }
    if group.falling_back {
        line.push_str("; FALLING BACK: no active socket left");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use reuseport_client::proto::{
        Counters, DrainPhase, GenerationLive, GroupLive, ListenerLive, SocketStatus,
    };

    fn generation(n: u32, state: GenState, pids: &[i32]) -> GenerationStatus {
        GenerationStatus {
            generation: n,
            name: (n == 2).then(|| "v2".into()),
            state,
            sockets: pids
                .iter()
                .enumerate()
                .map(|(i, &pid)| SocketStatus {
                    slot: i as u32 + n * 10,
                    pid,
                    uid: 0,
                    cookie: 1,
                    listening: pid != 0,
                    registered: true,
                    live: None,
                })
                .collect(),
            counters: Counters {
                selected: 1000 * u64::from(n),
                fallback: 0,
                migrated: 3,
            },
            live: None,
            drain: None,
            also_in: Vec::new(),
            weight: None,
            health: None,
        }
    }

    fn group() -> GroupStatus {
        GroupStatus {
            group: "tcp://127.0.0.1:8080".parse().unwrap(),
            mode: "select-or-migrate".into(),
            active: Some(2),
            falling_back: false,
            generations: vec![
                generation(2, GenState::Active, &[200, 200]),
                generation(1, GenState::Draining, &[100, 0]),
                generation(3, GenState::Standby, &[]),
            ],
            unsteered: 0,
            limits: None,
            last_restart: None,
            live: None,
        }
    }

    #[test]
    fn a_split_shows_both_active_generations_with_their_weights() {
        let mut g = group();
        g.generations[1].state = GenState::Active;
        g.generations[0].weight = Some(10);
        g.generations[1].weight = Some(90);
        assert_eq!(
            change_summary(&g, 2),
            "tcp://127.0.0.1:8080: generation 2 active at 10 % (1 active at 90 %; 3 standby)"
        );
        let table = status_table(std::slice::from_ref(&g));
        assert!(table.contains("active 2 (10 %) + 1 (90 %)"), "{table}");
        assert!(
            table.contains("active (10 %)") && table.contains("active (90 %)"),
            "{table}"
        );
    }

    #[test]
    fn summary_names_the_other_generations() {
        let g = group();
        assert_eq!(
            change_summary(&g, 2),
            "tcp://127.0.0.1:8080: generation 2 active (1 draining; 3 standby)"
        );
        assert_eq!(
            change_summary(&g, 1),
            "tcp://127.0.0.1:8080: generation 1 draining (2 active; 3 standby)"
        );
    }

    #[test]
    fn table_has_a_row_per_generation_in_order() {
        let mut g = group();
        g.falling_back = true;
        let out = status_table(&[g]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("tcp://127.0.0.1:8080  mode select-or-migrate  active 2"));
        assert!(lines[0].contains("FALLING BACK"), "{out}");
        assert!(lines[1].trim_start().starts_with("GEN"), "{out}");
        let gens: Vec<&str> = lines[2..]
            .iter()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(gens, ["1", "2", "3"], "{out}");
        assert!(
            lines[2].contains("2 (1 closed)"),
            "closed listeners are shown: {out}"
        );
        assert!(lines[3].contains(" 200 "), "pids are deduplicated: {out}");
        assert!(lines[3].contains("20,21"), "slots are listed: {out}");
        assert_eq!(status_table(&[]), "no groups\n");
        assert!(
            !out.contains("limits"),
            "an agent that reports no limits: {out}"
        );
    }

    /// With live figures: the LIVE column sums a generation's listeners, and a draining
    /// generation's state says where its drain is.
    #[test]
    fn table_shows_live_figures_and_drains() {
        let mut g = group();
        g.live = Some(GroupLive { connections: 9 });
        for generation in &mut g.generations {
            generation.live = Some(GenerationLive {
                connections: 4,
                queued: 2,
            });
            let draining = generation.state == GenState::Draining;
            for s in &mut generation.sockets {
                s.live = Some(ListenerLive {
                    queued: 1,
                    backlog: 128,
                    drops: u32::from(draining),
                });
            }
        }
        g.generations[1].drain = Some(DrainPhase::Serving { connections: 6 });
        let out = status_table(&[g]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("connections 9"), "{out}");
        assert!(lines[1].contains(" LIVE "), "{out}");
        assert!(
            lines[2].contains("draining (serving 6)")
                && lines[2].contains("4 conns, queue 2/256, 2 dropped"),
            "{out}"
        );
        assert!(lines[3].contains("4 conns, queue 2/256 "), "{out}");
    }

    #[test]
    fn table_ends_with_the_limits() {
        let mut g = group();
        g.limits = Some(Limits {
            groups: 256,
            sockets_per_group: 128,
            generations_per_group: 128,
            control_connections: 4096,
            ..Limits::default()
        });
        let out = status_table(std::slice::from_ref(&g));
        assert_eq!(
            out.lines().last(),
            Some(
                "limits: 256 groups; 128 sockets and 128 generations per group; 4096 \
                 control connections"
            ),
            "{out}"
        );
        g.limits = Some(Limits {
            groups_per_uid: Some(64),
            control_connections_per_uid: Some(1024),
            groups_reserved_for_root: Some(16),
            control_connections_reserved_for_root: Some(256),
            ..g.limits.expect("set above")
        });
        let out = status_table(&[g]);
        assert_eq!(
            out.lines().last(),
            Some(
                "per non-root uid: 64 groups, 1024 control connections; kept for root: 16 \
                 groups, 256 control connections"
            ),
            "{out}"
        );
    }
}
