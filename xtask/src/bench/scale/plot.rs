//! The scale benchmark's plot: cost against size, three panels: the agent's memory and
//! descriptors against groups, `status` of all groups against groups, and flip latency and
//! program cost against sockets per group. Text is drawn with DejaVu Sans from the system
//! (Debian's `fonts-dejavu-core`).

use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;

use super::ScaleReport;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn draw(r: &ScaleReport, png: &Path) -> anyhow::Result<()> {
    let font = std::fs::read(FONT).with_context(|| {
        format!(
            "reading {FONT} for the plot's text (apt-get install fonts-dejavu-core, or --no-plot)"
        )
    })?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a font plotters can use"))?;
    let root = BitMapBackend::new(png, (1500, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            &format!(
                "reuseport: cost against size ({} CPUs, kernel {}, load {})",
                r.machine.cpus, r.machine.kernel, r.load_average[0]
            ),
            ("sans-serif", 22),
        )
        .map_err(err)?;
    let panels = root.split_evenly((1, 3));
    let groups: Vec<f64> = r.groups.iter().map(|g| g.groups as f64).collect();
    let gmax = groups.iter().copied().fold(2.0, f64::max);
    // Panel 1: the agent's RSS (MiB) and descriptors (thousands) against groups.
    let rss: Vec<(f64, f64)> = r
        .groups
        .iter()
        .map(|g| (g.groups as f64, g.agent_rss_bytes as f64 / 1048576.0))
        .collect();
    let fds: Vec<(f64, f64)> = r
        .groups
        .iter()
        .map(|g| (g.groups as f64, g.agent_fds as f64 / 1000.0))
        .collect();
    panel(
        &panels[0],
        "agent, against groups (2 generations each)",
        "groups",
        "MiB / thousands",
        gmax,
        &[
            ("RSS (MiB)", &rss, RED),
            ("descriptors (×1000)", &fds, BLUE),
        ],
        Some(64.0),
    )?;
    // Panel 2: status of all groups, p99, ms.
    let st: Vec<(f64, f64)> = r
        .groups
        .iter()
        .map(|g| (g.groups as f64, g.status_all_us.p99 / 1e3))
        .collect();
    let st_nl: Vec<(f64, f64)> = r
        .groups
        .iter()
        .map(|g| (g.groups as f64, g.status_all_no_live_us.p99 / 1e3))
        .collect();
    panel(
        &panels[1],
        "status of all groups, p99",
        "groups",
        "ms",
        gmax,
        &[
            ("as sent by default", &st, RED),
            ("\"live\": false", &st_nl, BLUE),
        ],
        Some(50.0),
    )?;
    // Panel 3: flip latency p99 (µs) and program ns per run against sockets in one group.
    let full: Vec<_> = r.sockets.iter().filter(|p| p.refused.is_none()).collect();
    let flip: Vec<(f64, f64)> = full
        .iter()
        .filter_map(|p| Some((p.sockets as f64, p.flip_latency_lower_us.as_ref()?.p99)))
        .collect();
    let ns: Vec<(f64, f64)> = full
        .iter()
        .filter_map(|p| Some((p.sockets as f64, p.program_ns_per_run?)))
        .collect();
    let smax = r
        .sockets
        .iter()
        .map(|p| p.sockets as f64)
        .fold(2.0, f64::max);
    panel(
        &panels[2],
        "one group, against sockets (2 generations)",
        "sockets",
        "µs / ns",
        smax,
        &[
            ("flip latency p99 (µs)", &flip, RED),
            ("program run (ns)", &ns, BLUE),
        ],
        None,
    )?;
    root.present().map_err(err)?;
    Ok(())
}

type Series<'a> = (&'a str, &'a [(f64, f64)], RGBColor);

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    x_max: f64,
    series: &[Series<'_>],
    target: Option<f64>,
) -> anyhow::Result<()> {
    // Log scales both ways: the figures span orders of magnitude.
    let ys = || {
        series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .chain(target)
            .filter(|y| *y > 0.0)
    };
    let y_max = ys().fold(1.0, f64::max) * 2.0;
    let y_min = ys().fold(y_max, f64::min) / 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((1.0..x_max * 1.3).log_scale(), (y_min..y_max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            if *v >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    for &(name, points, color) in series {
        chart
            .draw_series(LineSeries::new(
                points.iter().copied().filter(|p| p.1 > 0.0),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| p.1 > 0.0)
                    .map(|&p| Circle::new(p, 3, color.filled())),
            )
            .map_err(err)?;
    }
    if let Some(t) = target {
        chart
            .draw_series(LineSeries::new(
                [(1.0, t), (x_max * 1.3, t)],
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("target {t}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}
