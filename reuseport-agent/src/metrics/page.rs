//! The status page (`/`): every group with its generations, their states and live figures,
//! and a chart of new connections per second per generation over the history's window. Plain
//! HTML with inline SVG and CSS, no script and no external asset; it reloads itself every
//! [`REFRESH_SECONDS`].
//!
//! The markup carries what a machine needs to read it back (the tests load it in Chromium):
//! each group is a `section.group[data-group]`, each generation a `tr.generation` with
//! `data-generation` and `data-state`, and each series of the chart a `g.series` with
//! `data-generation` and `data-last` (its last rate).

use std::fmt::Write as _;

use super::{
    SAMPLE_INTERVAL,
    export::{Group, Status},
    history::WINDOW,
};

pub const REFRESH_SECONDS: u32 = 2;

/// Line colours by generation (Okabe and Ito's palette, without its yellow).
const COLOURS: [&str; 7] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000",
];

fn colour(generation: u32) -> &'static str {
    COLOURS[generation as usize % COLOURS.len()]
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:0 0 .3em;font-family:monospace}\
header p,.meta{color:#555;margin:.2em 0 .8em}\
section.group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1em;margin:0 0 1.2em}\
table{border-collapse:collapse;margin:.5em 0 1em}\
th,td{padding:.25em .7em;text-align:right;border-bottom:1px solid #eee}\
th{font-weight:600;color:#444;background:#f3f3f3}td.l,th.l{text-align:left}\
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.4em}\
.state{font-weight:600}.active .state{color:#007a3d}.draining .state{color:#a15c00}\
.standby .state{color:#666}.warn{color:#b00020;font-weight:600}\
svg text{font:11px system-ui,sans-serif;fill:#555}";

pub fn render(status: &Status) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>reuseport: {} group(s)</title><style>{STYLE}</style></head><body>\n",
        status.groups.len()
    );
    let live = match status.live_age_seconds {
        Some(age) => format!("live figures {age:.1} s old"),
        None => "no live figures".into(),
    };
    let _ = writeln!(
        h,
        "<header><h1>reuseport agent</h1><p>version {} · {} · {} group(s) · counters at {} UTC \
         · {live} · refreshes every {REFRESH_SECONDS} s · \
         <a href=\"/status.json\">status.json</a> <a href=\"/status.csv\">status.csv</a> \
         <a href=\"/history.csv\">history.csv</a> <a href=\"/metrics\">metrics</a></p></header>",
        status.version,
        status.mode,
        status.groups.len(),
        clock(status.sampled_at),
    );
    if status.groups.is_empty() {
        h.push_str("<p>The agent manages no group yet: none of its sockets registered.</p>\n");
    }
    for g in &status.groups {
        group(&mut h, g);
    }
    h.push_str("</body></html>\n");
    h
}

fn group(h: &mut String, g: &Group) {
    let _ = write!(
        h,
        "<section class=\"group\" data-group=\"{0}\"><h2>{0}</h2><p class=\"meta\">",
        escape(&g.group)
    );
    match g.active {
        Some(a) => {
            let _ = write!(h, "active generation <b>{a}</b>");
        }
        None => h.push_str("<span class=\"warn\">no active generation</span>"),
    }
    if g.falling_back {
        h.push_str(" · <span class=\"warn\">FALLING BACK: no active socket listens</span>");
    }
    let _ = writeln!(
        h,
        " · {} · connections {} · unsteered {} · flips {}</p>",
        escape(&g.mode),
        g.connections.map_or("-".into(), |c| c.to_string()),
        g.unsteered,
        g.flips
    );
    h.push_str(
        "<table><thead><tr><th class=\"l\">generation</th><th class=\"l\">name</th>\
         <th class=\"l\">state</th><th>sockets</th><th class=\"l\">pids</th>\
         <th>connections</th><th>queued</th><th>new/s</th><th>selected</th>\
         <th>fallback</th><th>migrated</th></tr></thead><tbody>\n",
    );
    for x in &g.generations {
        let mut state = match &x.drain {
            Some(d) => format!("{} ({})", x.state, escape(d)),
            None => x.state.to_string(),
        };
        if let Some(w) = x.weight {
            state.push_str(&format!(" {w} %"));
        }
        if let Some(h) = &x.health {
            state.push_str(&format!(", health {}", escape(h)));
        }
        let pids: Vec<String> = x.pids.iter().map(i32::to_string).collect();
        let sockets = if x.listening == x.sockets {
            x.sockets.to_string()
        } else {
            format!("{} ({} closed)", x.sockets, x.sockets - x.listening)
        };
        let _ = writeln!(
            h,
            "<tr class=\"generation {st}\" data-generation=\"{n}\" data-state=\"{st}\">\
             <td class=\"l\"><span class=\"swatch\" style=\"background:{c}\"></span>{n}</td>\
             <td class=\"l\">{name}</td><td class=\"l state\">{state}</td><td>{sockets}</td>\
             <td class=\"l\">{pids}</td><td>{conns}</td><td>{queued}</td><td>{rate}</td>\
             <td>{sel}</td><td>{fb}</td><td>{mig}</td></tr>",
            st = x.state,
            n = x.generation,
            c = colour(x.generation),
            name = escape(x.name.as_deref().unwrap_or("-")),
            pids = pids.join(" "),
            conns = x.connections.map_or("-".into(), |c| c.to_string()),
            queued = x.queued.map_or("-".into(), |c| c.to_string()),
            rate = x.new_per_second.map_or("-".into(), |r| format!("{r:.0}")),
            sel = x.selected,
            fb = x.fallback,
            mig = x.migrated,
        );
    }
    h.push_str("</tbody></table>\n");
    chart(h, g);
    h.push_str("</section>\n");
}

/// Plot area and margins of the chart, in SVG user units.
const W: f64 = 760.0;
const H: f64 = 220.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 26.0;

fn chart(h: &mut String, g: &Group) {
    let chart = &g.chart;
    let span = WINDOW as f64 * SAMPLE_INTERVAL.as_secs_f64();
    let end = chart.times.last().copied().unwrap_or(0.0);
    let start = end - span;
    let top = chart
        .series
        .iter()
        .flat_map(|s| s.rates.iter().flatten())
        .fold(0.0_f64, |a, b| a.max(*b));
    let ymax = nice_ceiling(top);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |t: f64| LEFT + (t - start) / span * pw;
    let y = |r: f64| TOP + ph - r / ymax * ph;
    let _ = write!(
        h,
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" \
         role=\"img\" aria-label=\"new connections per second per generation, last {} minutes\">\
         <text x=\"{LEFT}\" y=\"14\">new connections per second, per generation (last {} min)</text>",
        span / 60.0,
        span / 60.0
    );
    for i in 0..=4 {
        let r = ymax * f64::from(i) / 4.0;
        let _ = write!(
            h,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y(r) + 4.0,
            short(r),
            yy = y(r),
        );
    }
    let minutes = (span / 60.0).round() as i64;
    for m in 0..=minutes {
        let t = end - (m * 60) as f64;
        let label = if m == 0 {
            "now".into()
        } else {
            format!("−{m} min")
        };
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            x(t),
            H - 8.0
        );
    }
    let mut legend = LEFT + 330.0;
    for s in &chart.series {
        let last = s.rates.iter().rev().flatten().next().copied();
        let _ = write!(
            h,
            "<g class=\"series\" data-generation=\"{}\" data-last=\"{}\" stroke=\"{c}\" \
             fill=\"{c}\">",
            s.generation,
            last.map_or("".into(), |r| format!("{r:.1}")),
            c = colour(s.generation),
        );
        let mut run: Vec<(f64, f64)> = Vec::new();
        let points = chart.times.iter().zip(&s.rates);
        for (t, r) in points.map(|(t, r)| (*t, *r)).chain([(f64::NAN, None)]) {
            match r {
                Some(r) => run.push((x(t), y(r))),
                None => {
                    line(h, &run);
                    run.clear();
                }
            }
        }
        let _ = write!(
            h,
            "<rect x=\"{legend:.1}\" y=\"6\" width=\"10\" height=\"10\" stroke=\"none\"/>\
             <text x=\"{:.1}\" y=\"15\" stroke=\"none\">gen {}</text></g>",
            legend + 14.0,
            s.generation
        );
        legend += 62.0;
    }
    h.push_str("</svg>\n");
}

fn line(h: &mut String, run: &[(f64, f64)]) {
    match run {
        [] => {}
        [(x, y)] => {
            let _ = write!(h, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2\"/>");
        }
        _ => {
            h.push_str("<polyline fill=\"none\" stroke-width=\"2\" points=\"");
            for (x, y) in run {
                let _ = write!(h, "{x:.1},{y:.1} ");
            }
            h.push_str("\"/>");
        }
    }
}

/// The smallest of 1, 2, 5 × 10^k at or above `v` (at least 1).
fn nice_ceiling(v: f64) -> f64 {
    let mut step = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if v <= m * step {
                return m * step;
            }
        }
        step *= 10.0;
    }
}

/// An axis label: `1500` as `1.5k`.
fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", v / 1000.0)
    } else {
        format!("{v}")
    }
}

/// `HH:MM:SS` of a unix time.
fn clock(unix: f64) -> String {
    let s = unix as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Text for HTML, in an element or a quoted attribute.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1.5), 2.0);
        assert_eq!(nice_ceiling(4999.0), 5000.0);
        assert_eq!(nice_ceiling(5001.0), 10000.0);
        assert_eq!(short(2500.0), "2.5k");
        assert_eq!(clock(3661.0), "01:01:01");
    }

    #[test]
    fn names_cannot_break_out_of_the_markup() {
        assert_eq!(
            escape("<script>\"x\"&'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;"
        );
    }
}
