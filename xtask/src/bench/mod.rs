//! `cargo xtask bench …`: figures, printed and written as JSON under `target/bench/`; never
//! asserted by tests.
//!
//! - `overhead`: what steering costs against plain SO_REUSEPORT, what one program run costs
//!   (next to an empty and a one-select reference program), and how fast a flip takes effect
//!   (bracketed between a lower and an upper bound).
//! - `flip`: hot deploys under load, plain SO_REUSEPORT (start the new server, kill the old
//!   one after a delay) against `reuseportctl supervise` (with our demo server, and with a slow
//!   one that exits at once on SIGTERM), with our client and with `wrk`.
//! - `live`: what the live figures (sock_diag, process walk) add to a `status` answer.
//! - `scale`: what the agent costs as groups and sockets per group grow (memory, descriptors,
//!   registrations, `status`, adoption, flips), plotted to `docs/scale.png`.
//! - `metrics`: what a scrape of `--metrics-listen` costs, at a full group and at the group
//!   limit.

mod flip;
mod live;
mod metrics;
mod overhead;
mod reference_prog;
mod scale;

use std::path::PathBuf;

use serde::Serialize;

pub use flip::short_flip_check;

use crate::stack::Stack;

#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// Steered vs plain SO_REUSEPORT throughput, program cost per run, flip latency.
    Overhead(overhead::OverheadOpts),
    /// Hot deploys under load: plain SO_REUSEPORT (kill the old server after a delay) vs
    /// `reuseportctl supervise` + SIGHUP; failed requests of each, with our client and wrk.
    Flip(flip::FlipOpts),
    /// What the live figures cost `status`: a group of 128 listeners with held connections,
    /// status timed with and without them.
    Live(live::LiveOpts),
    /// Cost against size: groups per agent (RSS, descriptors, registrations/s, `status` of
    /// all groups, kernel memory, adoption) and sockets per group (flips, program cost).
    Scale(scale::ScaleOpts),
    /// What a scrape costs: `GET /metrics` and `GET /` timed at a group of 128 listeners and
    /// at 256 groups.
    Metrics(metrics::MetricsOpts),
    /// The short correctness check `cargo xtask test` runs: 50 quick deploys through
    /// `reuseportctl supervise` under load, failing on any failed request.
    FlipCheck,
}

pub fn bench(b: &Bench) -> anyhow::Result<()> {
    match b {
        Bench::Overhead(o) => with_stack(|stack| overhead::overhead(stack, o)),
        Bench::Flip(o) => with_stack(|stack| flip::flip(stack, o)),
        Bench::Live(o) => with_stack(|stack| live::live(stack, o)),
        Bench::Scale(o) => scale::scale(o),
        Bench::Metrics(o) => {
            let bin = crate::stack::build_release("bench")?;
            let stack = Stack::start_with("bench", &bin, &["--metrics-listen", metrics::LISTEN])?;
            let res = metrics::metrics(&stack, o);
            stack.stop();
            res
        }
        Bench::FlipCheck => short_flip_check(&crate::stack::build_release("flip-check")?),
    }
}

fn with_stack(f: impl FnOnce(&Stack) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let stack = Stack::start("bench")?;
    let res = f(&stack);
    stack.stop();
    res
}

/// What the figures were measured on.
#[derive(Serialize, Clone)]
struct Machine {
    cpus: usize,
    kernel: String,
}

impl Machine {
    fn this() -> Self {
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
        }
    }
}

#[derive(Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Self {
            p50: at(0.5),
            p99: at(0.99),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// Mean of a few measurements (rounds) with a 95% confidence interval (Student's t), and
/// their range.
#[derive(Serialize, Clone, Copy, Debug, Default)]
struct Spread {
    mean: f64,
    /// Half-width of the 95% confidence interval of the mean.
    ci95: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Self {
        let n = v.len();
        if n == 0 {
            return Self::default();
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let ci95 = if n < 2 {
            f64::NAN
        } else {
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            // Two-sided 95% quantiles of Student's t for 1..=10 degrees of freedom.
            const T95: [f64; 10] = [
                12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
            ];
            let t = T95.get(n - 2).copied().unwrap_or(1.96);
            t * (var / n as f64).sqrt()
        };
        Self {
            mean,
            ci95,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// Writes `target/bench/NAME.json` and returns its path.
fn write_json(name: &str, report: &impl Serialize) -> anyhow::Result<PathBuf> {
    let dir = crate::workspace().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(report)?)?;
    Ok(path)
}
