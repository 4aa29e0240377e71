//! `cargo xtask bench live`: what the live figures cost a `status` answer. One group holds a
//! full socket array (128 listeners by default, spread over generations, each served by its
//! own demo server under `reuseportctl exec`) and connections held open in every generation;
//! `status` for that group is timed with the live figures (a sock_diag dump of the group's
//! address plus the walk of its processes' descriptors) and without (`"live": false`),
//! alternating, over one control connection.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Machine, Percentiles};
use crate::stack::{Control, Stack, control_request, wait_for};

#[derive(clap::Args, Debug)]
pub struct LiveOpts {
    /// Listening sockets in the group (its socket array holds 128).
    #[arg(long, default_value_t = 128)]
    pub sockets: u32,
    /// Generations the sockets are spread over.
    #[arg(long, default_value_t = 4)]
    pub generations: u32,
    /// Connections each generation holds open while status is timed.
    #[arg(long, default_value_t = 64)]
    pub connections: u32,
    /// `status` requests timed per variant.
    #[arg(long, default_value_t = 1000)]
    pub requests: u32,
}

#[derive(Serialize)]
struct LiveReport {
    machine: Machine,
    sockets: u32,
    generations: u32,
    connections: u64,
    requests: u32,
    /// Round trips of `status GROUP` with the live figures, in µs.
    with_live_us: Percentiles,
    /// … and with `"live": false`.
    without_live_us: Percentiles,
    /// What the live figures add, p50 against p50.
    live_cost_p50_us: f64,
    /// Size of one answer with live figures.
    answer_bytes: usize,
}

const ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 9300);

pub fn live(stack: &Stack, o: &LiveOpts) -> anyhow::Result<()> {
    if o.generations == 0 || o.sockets < o.generations {
        bail!("--sockets must be at least --generations (and that at least 1)");
    }
    let addr = SocketAddr::from(ADDR);
    let group = format!("tcp://{addr}");
    let machine = Machine::this();
    println!(
        "bench live: {} sockets over {} generations, {} held connections each, {} status requests per variant; {} CPUs, kernel {}",
        o.sockets, o.generations, o.connections, o.requests, machine.cpus, machine.kernel
    );
    let mut control = Control::connect(&stack.control).context("connecting to the agent")?;
    let mut held: Vec<TcpStream> = Vec::new();
    let mut started = 0;
    for generation in 1..=o.generations {
        let share = o.sockets / o.generations + u32::from(generation <= o.sockets % o.generations);
        for _ in 0..share {
            stack.start_generation(addr, generation, false)?;
            started += 1;
        }
        wait_for(Duration::from_secs(60), "the sockets to register", || {
            sockets(&mut control, &group).is_ok_and(|n| n == started)
        })?;
        if generation > 1 {
            stack.ctl_ok(&["activate", &group, &generation.to_string()])?;
        }
        for _ in 0..o.connections {
            held.push(TcpStream::connect(addr).context("connecting to the group")?);
        }
        println!(
            "bench live: generation {generation}: {share} sockets, {} connections held",
            o.connections
        );
    }
    let expected = held.len() as u64;
    wait_for(
        Duration::from_secs(30),
        "every connection to be accepted",
        || held_connections(&mut control, &group).is_ok_and(|n| n == expected),
    )?;

    let with = serde_json::json!({"v": 1, "op": "status", "group": group});
    let without = serde_json::json!({"v": 1, "op": "status", "group": group, "live": false});
    let answer_bytes = serde_json::to_vec(&control_request(&mut control, &with)?)?.len();
    let (mut with_us, mut without_us) = (Vec::new(), Vec::new());
    for _ in 0..o.requests {
        for (request, times) in [(&with, &mut with_us), (&without, &mut without_us)] {
            let t0 = Instant::now();
            control_request(&mut control, request)?;
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let report = LiveReport {
        machine,
        sockets: o.sockets,
        generations: o.generations,
        connections: expected,
        requests: o.requests,
        live_cost_p50_us: 0.0,
        with_live_us: Percentiles::of(with_us),
        without_live_us: Percentiles::of(without_us),
        answer_bytes,
    };
    let report = LiveReport {
        live_cost_p50_us: report.with_live_us.p50 - report.without_live_us.p50,
        ..report
    };
    println!(
        "\n| `status GROUP`, {} listeners, {} held connections, {} requests each | p50 | p99 | max |",
        report.sockets, report.connections, report.requests
    );
    println!("|---|---|---|---|");
    for (name, p) in [
        (
            "with live figures (sock_diag + process walk)",
            &report.with_live_us,
        ),
        ("without (`\"live\": false`)", &report.without_live_us),
    ] {
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} µs |",
            p.p50, p.p99, p.max
        );
    }
    println!(
        "\nlive figures add {:.0} µs per status (p50); one answer is {} bytes",
        report.live_cost_p50_us, report.answer_bytes
    );
    let path = super::write_json("live", &report)?;
    println!("\nbench: JSON written to {}", path.display());
    Ok(())
}

/// The group's first answer in a `status` reply.
fn the_group(control: &mut Control, group: &str) -> anyhow::Result<serde_json::Value> {
    let v = control_request(
        control,
        &serde_json::json!({"v": 1, "op": "status", "group": group}),
    )?;
    v["groups"]
        .as_array()
        .and_then(|g| g.first())
        .cloned()
        .with_context(|| format!("no group in {v}"))
}

/// Sockets registered in the group.
fn sockets(control: &mut Control, group: &str) -> anyhow::Result<u32> {
    let g = the_group(control, group)?;
    Ok(g["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["sockets"].as_array().map_or(0, Vec::len) as u32)
        .sum())
}

/// Connections the group's generations hold, per the live figures.
fn held_connections(control: &mut Control, group: &str) -> anyhow::Result<u64> {
    let g = the_group(control, group)?;
    Ok(g["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["live"]["connections"].as_u64())
        .sum())
}
