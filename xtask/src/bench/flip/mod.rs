//! `cargo xtask bench flip`: N hot deploys under continuous load, done two ways side by side
//! with the same server (`xtask demo-server`):
//!
//! - **baseline**: the usual plain SO_REUSEPORT deploy, `start_server`'s KILL_OLD_DELAY
//!   method: the new server starts on its own listener in the same reuseport group (no
//!   agent); `--kill-old-delay` later the old one gets SIGTERM and closes its listener. In
//!   between the kernel hashes new connections over both, and whatever is still queued in the
//!   closing listener is reset.
//! - **reuseport**: `reuseportctl supervise --ready delay=<kill-old-delay> --on-drain TERM` and
//!   one SIGHUP per deploy; the next deploy waits until the agent reports the new generation
//!   active.
//! - **abrupt**: the same deploys with a server that takes [`ABRUPT_DELAY_MS`] per request and
//!   has no SIGTERM handler (it dies on the drain signal with whatever it holds): what
//!   `supervise`'s drain until idle is for.
//!
//! Each mode runs under two clients: ours (`load.rs`: a new connection per request, failures
//! by exact kind, a connect or answer slower than 500 ms among them) and wrk (HTTP with `Connection: close`, so also a new connection per request; its
//! socket-error and non-2xx counts). The baseline's failures are the point; any failure of
//! reuseport makes the command fail.

mod report;
mod wrk;

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::{
    report::{FlipReport, HttpRow, LoadRow},
    wrk::{Wrk, WrkResult, wait_output},
};
use super::Machine;
use crate::{
    deploy::{Deployer, Mode},
    load::Load,
    stack::Stack,
};

#[derive(clap::Args, Debug)]
pub struct FlipOpts {
    /// Deploys per mode (and per client).
    #[arg(long, default_value_t = 20)]
    pub flips: u32,
    /// Concurrent clients (our client's threads; wrk's connections).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Load time before each deploy, and after the last one.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Baseline: time from starting the new server to SIGTERM for the old one (start_server's
    /// KILL_OLD_DELAY). Reuseport: the same time as `--ready delay=`. `1s`, `300ms`.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub kill_old_delay: Duration,
    /// Only our client: skip the wrk runs.
    #[arg(long)]
    pub no_wrk: bool,
}

/// Ports of the four runs: a fresh group for each (no TIME_WAIT or leftover listener of one
/// run can touch the next).
const PORT_BASE: u16 = 9100;

pub fn flip(stack: &Stack, o: &FlipOpts) -> anyhow::Result<()> {
    let wrk = if o.no_wrk {
        None
    } else {
        Some(Wrk::ensure(stack.tmp())?)
    };
    let machine = Machine::this();
    println!(
        "bench flip: {} deploys per mode, {} clients, {} ms of load before each deploy, kill-old-delay / ready delay {} ms; {} CPUs, kernel {}",
        o.flips,
        o.clients,
        o.interval_ms,
        o.kill_old_delay.as_millis(),
        machine.cpus,
        machine.kernel
    );
    let mut load = Vec::new();
    let mut http = Vec::new();
    let mut port = PORT_BASE;
    for mode in [Mode::Baseline, Mode::Reuseport, Mode::Abrupt] {
        port += 1;
        load.push(with_load(stack, mode, addr(port), o, true)?);
    }
    if let Some(wrk) = &wrk {
        for mode in [Mode::Baseline, Mode::Reuseport, Mode::Abrupt] {
            port += 1;
            http.push(with_wrk(stack, mode, addr(port), o, wrk)?);
        }
    }
    let report = FlipReport {
        machine,
        flips: o.flips,
        clients: o.clients,
        interval_ms: o.interval_ms,
        kill_old_delay_ms: o.kill_old_delay.as_millis() as u64,
        wrk: wrk.map(|w| w.version),
        load,
        http,
    };
    report.print();
    let path = super::write_json("flip", &report)?;
    println!("\nbench: JSON written to {}", path.display());
    let failed: u64 = report
        .load
        .iter()
        .filter(|r| r.mode.supervised())
        .map(|r| r.tally.failures())
        .chain(
            report
                .http
                .iter()
                .filter(|r| r.mode.supervised())
                .map(HttpRow::errors),
        )
        .sum();
    if failed > 0 {
        bail!("reuseport modes: {failed} requests failed during their deploys (must be 0)");
    }
    Ok(())
}

/// For `cargo xtask test`: 50 quick deploys through `reuseportctl supervise` under our
/// client's load, in a private network namespace with its own agent; fails unless every
/// request was answered. Builds the release binaries (through [`Stack::start`]) and runs on a
/// thread of its own, so the caller's thread stays in its network namespace.
pub fn short_flip_check(bin: &std::path::Path) -> anyhow::Result<()> {
    let bin = bin.to_owned();
    thread::spawn(move || {
        let stack = Stack::start_in("flip-check", &bin)?;
        let o = FlipOpts {
            flips: 50,
            clients: 4,
            interval_ms: 50,
            kill_old_delay: Duration::from_millis(50),
            no_wrk: true,
        };
        let res = with_load(&stack, Mode::Reuseport, addr(PORT_BASE), &o, false);
        stack.stop();
        let row = res?;
        println!(
            "flip check: {} deploys through reuseportctl supervise under load in {:.1}s: {} requests, {} generations answered, {}",
            row.flips,
            row.duration_s,
            row.tally.requests(),
            row.tally.by_generation.len(),
            row.tally.failure_line()
        );
        if row.flips != o.flips {
            bail!("only {} of {} deploys were done", row.flips, o.flips);
        }
        if row.tally.failures() > 0 {
            bail!(
                "requests failed while supervise replaced generations: {}",
                row.tally.failure_line()
            );
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| bail!("the flip check panicked"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn with_load(
    stack: &Stack,
    mode: Mode,
    addr: SocketAddr,
    o: &FlipOpts,
    verbose: bool,
) -> anyhow::Result<LoadRow> {
    let mut d = Deployer::start(stack, mode, addr, false, o.kill_old_delay)?;
    let started = Instant::now();
    let load = Load::start(addr, o.clients, false);
    let res = deploys(
        &mut d,
        o,
        || false,
        |k| {
            if verbose && (k % 5 == 0 || k == o.flips) {
                println!(
                    "bench: {mode:<9} our client  deploy {k:>3}/{}  {}",
                    o.flips,
                    load.tally().failure_line()
                );
            }
        },
    );
    let (tally, _) = load.stop();
    let duration = started.elapsed().as_secs_f64();
    let deploy = d.finish().into();
    let flips = res?;
    Ok(LoadRow {
        mode,
        flips,
        duration_s: duration,
        requests: tally.requests(),
        failures: tally.failures(),
        conn_per_s: tally.requests() as f64 / duration,
        tally,
        deploy,
    })
}

fn with_wrk(
    stack: &Stack,
    mode: Mode,
    addr: SocketAddr,
    o: &FlipOpts,
    wrk: &Wrk,
) -> anyhow::Result<HttpRow> {
    let mut d = Deployer::start(stack, mode, addr, true, o.kill_old_delay)?;
    // wrk runs for a fixed time: enough for every deploy (with room for slow ones) and the
    // load after the last. A deploy not done when wrk ends is not started.
    let per_deploy = Duration::from_millis(o.interval_ms + 100) + o.kill_old_delay;
    let window = (per_deploy * o.flips + Duration::from_millis(o.interval_ms)).as_secs_f64();
    let seconds = (window * 1.2 + 2.0).ceil() as u64;
    let mut child = wrk.start(addr, o.clients, seconds)?;
    let res = deploys(
        &mut d,
        o,
        || child.try_wait().ok().flatten().is_some(),
        |k| {
            if k % 5 == 0 || k == o.flips {
                println!("bench: {mode:<9} wrk         deploy {k:>3}/{}", o.flips);
            }
        },
    );
    let out = wait_output(child, Duration::from_secs(seconds + 30));
    let deploy = d.finish().into();
    let flips = res?;
    let (status, text) = out?;
    if !status.success() {
        bail!("wrk exited with {status}:\n{text}");
    }
    let wrk = WrkResult::parse(&text).with_context(|| format!("reading wrk's output:\n{text}"))?;
    println!(
        "bench: {mode:<9} wrk         {} requests, errors: connect {}, read {}, write {}, timeout {}, non-2xx {}, wrong body {}",
        wrk.requests, wrk.connect, wrk.read, wrk.write, wrk.timeout, wrk.non_2xx, wrk.wrong_body
    );
    Ok(HttpRow {
        mode,
        flips,
        wrk,
        deploy,
    })
}

/// Load time, a deploy, … `o.flips` times (fewer if `stop` says so), then the load time
/// after the last one: it covers the last old generation's drain. Returns the deploys done.
fn deploys(
    d: &mut Deployer<'_>,
    o: &FlipOpts,
    mut stop: impl FnMut() -> bool,
    mut progress: impl FnMut(u32),
) -> anyhow::Result<u32> {
    let interval = Duration::from_millis(o.interval_ms);
    let mut done = 0;
    for _ in 0..o.flips {
        // Pacing the load between deploys, not waiting for readiness.
        thread::sleep(interval);
        if stop() {
            break;
        }
        d.deploy()?;
        done += 1;
        progress(done);
    }
    thread::sleep(interval);
    Ok(done)
}
