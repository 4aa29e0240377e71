//! `cargo xtask bench metrics`: what a scrape of `--metrics-listen` costs. Two cases, one
//! after the other on one agent: one group with a full socket array (128 listeners over 4
//! generations, each served by its own demo server under `reuseportctl exec`, connections
//! held in every generation), then the same plus single-socket groups up to the agent's
//! group limit (256). `GET /metrics` and `GET /` are timed, one connection each, alternating.
//!
//! NB: answers come from the once-a-second sample; the live figures are read again only when
//! older than a second and ten times their cost, so most timed requests reuse them. What one
//! read of them costs is reported apart, as the agent measures it
//! (`reuseport_live_figures_duration_seconds`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Machine, Percentiles};
use crate::stack::{Control, Stack, wait_for};

#[derive(clap::Args, Debug)]
pub struct MetricsOpts {
    /// Listening sockets of the first group (its socket array holds 128).
    #[arg(long, default_value_t = 128)]
    pub sockets: u32,
    /// Groups in the second case, the first one included (the agent's default --max-groups).
    #[arg(long, default_value_t = 256)]
    pub groups: u32,
    /// Requests timed per path and case.
    #[arg(long, default_value_t = 500)]
    pub requests: u32,
}

/// The agent's metrics listener, in the bench's namespace.
pub const LISTEN: &str = "127.0.0.1:9464";
const GROUP: ([u8; 4], u16) = ([127, 0, 0, 1], 9300);
const GENERATIONS: u32 = 4;
const HELD_PER_GENERATION: u32 = 16;
/// First port of the single-socket groups.
const FIRST_PORT: u16 = 10_000;

#[derive(Serialize)]
struct Case {
    groups: u32,
    sockets: u32,
    /// `GET /metrics`, µs per request.
    metrics_us: Percentiles,
    metrics_bytes: usize,
    /// `GET /` (the status page), µs per request.
    page_us: Percentiles,
    page_bytes: usize,
    /// The agent's own figures, from the last answer: one read of every group's counters
    /// (once a second, off the requests) and one read of the live figures.
    sample_ms: f64,
    live_figures_ms: f64,
}

#[derive(Serialize)]
struct MetricsReport {
    machine: Machine,
    requests: u32,
    cases: Vec<Case>,
}

pub fn metrics(stack: &Stack, o: &MetricsOpts) -> anyhow::Result<()> {
    if o.groups == 0 || o.sockets < GENERATIONS {
        bail!("--sockets must be at least {GENERATIONS} and --groups at least 1");
    }
    let listen: SocketAddr = LISTEN.parse().expect("valid");
    let machine = Machine::this();
    println!(
        "bench metrics: {} sockets in one group, then {} groups; {} requests per path; {} CPUs, \
         kernel {}",
        o.sockets, o.groups, o.requests, machine.cpus, machine.kernel
    );
    wait_for(Duration::from_secs(30), "the metrics listener", || {
        get(listen, "/metrics").is_ok()
    })?;

    let addr = SocketAddr::from(GROUP);
    let group = format!("tcp://{addr}");
    let mut held: Vec<TcpStream> = Vec::new();
    for generation in 1..=GENERATIONS {
        let share = o.sockets / GENERATIONS + u32::from(generation <= o.sockets % GENERATIONS);
        for _ in 0..share {
            stack.start_generation(addr, generation, false)?;
        }
        if generation > 1 {
            stack.ctl_ok(&["activate", &group, &generation.to_string()])?;
        }
        for _ in 0..HELD_PER_GENERATION {
            held.push(TcpStream::connect(addr).context("connecting to the group")?);
        }
    }
    let mut cases = vec![measure(listen, o, 1, o.sockets)?];

    let mut registrations = Vec::new();
    for i in 1..o.groups {
        let port = FIRST_PORT + u16::try_from(i).context("--groups too large")?;
        registrations.push(register_one(
            stack,
            SocketAddr::from(([127, 0, 0, 1], port)),
        )?);
    }
    cases.push(measure(listen, o, o.groups, o.sockets + o.groups - 1)?);

    println!(
        "\n| scrape ({} requests each) | groups | sockets | p50 | p99 | max | answer | agent: counters read | agent: live figures read |",
        o.requests
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for c in &cases {
        for (path, p, bytes) in [
            ("`/metrics`", &c.metrics_us, c.metrics_bytes),
            ("`/` (page)", &c.page_us, c.page_bytes),
        ] {
            println!(
                "| {path} | {} | {} | {:.2} ms | {:.2} ms | {:.1} ms | {} kB | {:.2} ms | {:.1} ms |",
                c.groups,
                c.sockets,
                p.p50 / 1e3,
                p.p99 / 1e3,
                p.max / 1e3,
                bytes / 1024,
                c.sample_ms,
                c.live_figures_ms
            );
        }
    }
    let report = MetricsReport {
        machine,
        requests: o.requests,
        cases,
    };
    let path = super::write_json("metrics", &report)?;
    println!("\nbench: JSON written to {}", path.display());
    drop(registrations);
    drop(held);
    Ok(())
}

fn measure(listen: SocketAddr, o: &MetricsOpts, groups: u32, sockets: u32) -> anyhow::Result<Case> {
    // NB: answers come from the sampler's latest sample: wait until it has every group.
    wait_for(
        Duration::from_secs(60),
        &format!("the agent's sample to hold {groups} groups"),
        || {
            get(listen, "/metrics").is_ok_and(|m| {
                value(&m, "reuseport_groups") == Some(f64::from(groups))
                    && value(&m, "reuseport_live_figures_duration_seconds").is_some()
            })
        },
    )?;
    let (mut metrics_us, mut page_us) = (Vec::new(), Vec::new());
    let (mut metrics_body, mut page_body) = (String::new(), String::new());
    for _ in 0..o.requests {
        for (path, times, body) in [
            ("/metrics", &mut metrics_us, &mut metrics_body),
            ("/", &mut page_us, &mut page_body),
        ] {
            let t0 = Instant::now();
            *body = get(listen, path)?;
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let seconds = |name| value(&metrics_body, name).unwrap_or(f64::NAN) * 1e3;
    let case = Case {
        groups,
        sockets,
        metrics_us: Percentiles::of(metrics_us),
        metrics_bytes: metrics_body.len(),
        page_us: Percentiles::of(page_us),
        page_bytes: page_body.len(),
        sample_ms: seconds("reuseport_sample_duration_seconds"),
        live_figures_ms: seconds("reuseport_live_figures_duration_seconds"),
    };
    println!(
        "bench metrics: {groups} groups, {sockets} sockets: /metrics p50 {:.2} ms, / p50 {:.2} ms",
        case.metrics_us.p50 / 1e3,
        case.page_us.p50 / 1e3
    );
    Ok(case)
}

/// A listener of its own in `addr`'s group, registered (and activated) over a control
/// connection of its own; the group lives as long as the returned pair.
fn register_one(
    stack: &Stack,
    addr: SocketAddr,
) -> anyhow::Result<(tokio::net::TcpSocket, Control)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), 128) } < 0 {
        bail!("listen {addr}: {}", std::io::Error::last_os_error());
    }
    let mut control = Control::connect(&stack.control).context("connecting to the agent")?;
    let request = serde_json::json!({
        "v": 1, "op": "register", "group": format!("tcp://{addr}"), "generation": 1,
        "activate": true,
    });
    let answer: serde_json::Value = control
        .round_trip(&request, Some(socket.as_fd()))?
        .context("the agent closed the control connection without answering")?;
    if answer["type"] == "error" {
        bail!("registering {addr}: {answer}");
    }
    Ok((socket, control))
}

/// `GET path`, one connection; the body.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}

/// The value of an unlabelled series in an exposition.
fn value(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}
