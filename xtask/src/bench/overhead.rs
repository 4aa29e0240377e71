//! `cargo xtask bench overhead`: what steering costs against plain SO_REUSEPORT, what one
//! program run costs, and how fast a flip takes effect.
//!
//! The program cost comes from the kernel's run statistics, which time every run with two
//! clock reads: that floor is large next to a short program, so two reference programs
//! (see [`super::reference_prog`]) run under the same statistics on groups of their own,
//! and the report puts ours next to them.
//!
//! Throughput rounds run the four groups in a new random order each round (a fixed order
//! favours whichever runs on a warmer cache or a quieter moment); the report gives the mean
//! and a 95% confidence interval over rounds.
//!
//! Flip latency is bracketed, not guessed: after `activate` was sent, a connection that
//! still reached the old generation started before the switch (a lower bound: its start),
//! and one that reached the new generation was established after it (an upper bound: its
//! connect completion). A flip with no old-generation connection after `activate` gives no
//! lower bound and is counted apart, not as 0. Every other flip goes back with `rollback`
//! instead of `activate` (generation 1 still listens while it drains), bracketed the same
//! way, so that the two are measured side by side.

use std::{
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    Machine, Percentiles, Spread,
    reference_prog::{Loaded, Reference},
};
use crate::{
    load::{Load, Record},
    stack::{Control, Stack, control_request, wait_for},
};

#[derive(clap::Args, Debug)]
pub struct OverheadOpts {
    /// Seconds of load per measurement round.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Rounds; each runs the four groups once, in a random order.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Concurrent clients (a new connection per request).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Flips for the latency measurement (the README's target is stated over 1,000).
    #[arg(long, default_value_t = 1000)]
    pub flips: u32,
}

#[derive(Serialize)]
struct OverheadReport {
    kernel: String,
    cpus: usize,
    clients: usize,
    seconds_per_round: u64,
    plain_conn_per_s: Vec<f64>,
    steered_conn_per_s: Vec<f64>,
    /// steered / plain of each round.
    throughput_ratios: Vec<f64>,
    throughput_ratio: Spread,
    program_runs: u64,
    program_ns_per_run: f64,
    /// The same statistics for a program that returns SK_PASS and nothing else.
    empty_program_ns_per_run: f64,
    /// ... and for one that only calls bpf_sk_select_reuseport once.
    one_select_program_ns_per_run: f64,
    empty_program_conn_per_s: Vec<f64>,
    one_select_program_conn_per_s: Vec<f64>,
    flips: usize,
    /// Flips with a connection that reached the old generation after `activate` was sent.
    flips_observed: usize,
    /// `activate` sent → start of the last connection that still reached the old generation
    /// (the switch came later), over the observed flips.
    flip_latency_lower_us: Percentiles,
    /// `activate` sent → earliest establishment of a connection that reached the new
    /// generation (the switch came earlier), over the flips that had one.
    flip_latency_upper_us: Percentiles,
    flips_with_upper_bound: usize,
    /// The same brackets for the flips back made with `rollback`.
    rollback_latency_lower_us: Percentiles,
    rollback_latency_upper_us: Percentiles,
    rollbacks_observed: usize,
    activate_rtt_us: Percentiles,
    /// New connections per second while the flips ran.
    flip_load_conn_per_s: f64,
    failures: u64,
}

const PLAIN: &str = "127.0.0.1:9001";
const STEERED: &str = "127.0.0.1:9002";
const EMPTY_PROG: &str = "127.0.0.1:9003";
const ONE_SELECT_PROG: &str = "127.0.0.1:9004";

pub fn overhead(stack: &Stack, o: &OverheadOpts) -> anyhow::Result<()> {
    let plain: SocketAddr = PLAIN.parse().expect("valid");
    let steered: SocketAddr = STEERED.parse().expect("valid");
    let empty: SocketAddr = EMPTY_PROG.parse().expect("valid");
    let one_select: SocketAddr = ONE_SELECT_PROG.parse().expect("valid");
    stack.start_plain(plain, 1)?;
    stack.start_generation(steered, 1, false)?;
    // Reference programs: what a run costs without anything of ours in it.
    let empty_prog = Loaded::load(Reference::Empty)?;
    let one_select_prog = Loaded::load(Reference::OneSelect)?;
    stack.start_plain_with(empty, 1, |fd| empty_prog.attach(fd))?;
    stack.start_plain_with(one_select, 1, |fd| one_select_prog.attach(fd))?;
    for addr in [plain, empty, one_select] {
        wait_for(
            Duration::from_secs(10),
            &format!("the server on {addr}"),
            || std::net::TcpStream::connect(addr).is_ok(),
        )?;
    }

    let stats = BpfStats::enable()?;
    let prog = stack.pinned_program(steered)?;
    let before = prog_stats(&prog)?;
    let (empty_before, one_select_before) = (empty_prog.stats()?, one_select_prog.stats()?);
    let (mut plain_rates, mut steered_rates, mut failures) = (Vec::new(), Vec::new(), 0);
    let (mut empty_rates, mut one_select_rates) = (Vec::new(), Vec::new());
    for round in 1..=o.rounds {
        let mut order = [
            ("plain", plain, &mut plain_rates),
            ("steered", steered, &mut steered_rates),
            ("empty-prog", empty, &mut empty_rates),
            ("one-select", one_select, &mut one_select_rates),
        ];
        fastrand::shuffle(&mut order);
        for (name, addr, rates) in order {
            let t = Instant::now();
            let load = Load::start(addr, o.clients, false);
            // The measurement window itself, not a readiness wait.
            thread::sleep(Duration::from_secs(o.seconds));
            let (tally, _) = load.stop();
            let rate = tally.requests() as f64 / t.elapsed().as_secs_f64();
            failures += tally.failures();
            println!(
                "bench: round {round} {name:<10} {rate:>8.0} conn/s  {}",
                tally.failure_line()
            );
            rates.push(rate);
        }
    }
    let after = prog_stats(&prog)?;
    let (empty_after, one_select_after) = (empty_prog.stats()?, one_select_prog.stats()?);
    drop(stats);
    let runs = after.1 - before.1;
    let ours_ns = ns_per_run("ours", before, after)?;
    let empty_ns = ns_per_run("empty", empty_before, empty_after)?;
    let one_select_ns = ns_per_run("one-select", one_select_before, one_select_after)?;

    let flips = flip_latency(stack, steered, o)?;
    failures += flips.failures;
    let ratios: Vec<f64> = steered_rates
        .iter()
        .zip(&plain_rates)
        .map(|(s, p)| s / p)
        .collect();
    let machine = Machine::this();
    let report = OverheadReport {
        kernel: machine.kernel,
        cpus: machine.cpus,
        clients: o.clients,
        seconds_per_round: o.seconds,
        throughput_ratio: Spread::of(&ratios),
        throughput_ratios: ratios,
        plain_conn_per_s: plain_rates,
        steered_conn_per_s: steered_rates,
        program_runs: runs,
        program_ns_per_run: ours_ns,
        empty_program_ns_per_run: empty_ns,
        one_select_program_ns_per_run: one_select_ns,
        empty_program_conn_per_s: empty_rates,
        one_select_program_conn_per_s: one_select_rates,
        flips: flips.flips,
        flips_observed: flips.lower.len(),
        flips_with_upper_bound: flips.upper.len(),
        flip_latency_lower_us: Percentiles::of(flips.lower),
        flip_latency_upper_us: Percentiles::of(flips.upper),
        rollbacks_observed: flips.rollback_lower.len(),
        rollback_latency_lower_us: Percentiles::of(flips.rollback_lower),
        rollback_latency_upper_us: Percentiles::of(flips.rollback_upper),
        activate_rtt_us: Percentiles::of(flips.rtts),
        flip_load_conn_per_s: flips.load_conn_per_s,
        failures,
    };
    print_report(&report);
    let path = super::write_json("overhead", &report)?;
    println!("\nbench: JSON written to {}", path.display());
    Ok(())
}

fn print_report(r: &OverheadReport) {
    let conn = |v: &[f64]| {
        let s = Spread::of(v);
        format!("{:.0} ± {:.0} conn/s", s.mean, s.ci95)
    };
    println!("\n| figure | value |");
    println!("|---|---|");
    println!("| machine | {} CPUs, kernel {} |", r.cpus, r.kernel);
    println!(
        "| load | {} clients, a new connection per request, {} rounds of {} s, groups in a \
         random order each round; mean ± 95% confidence interval over rounds |",
        r.clients,
        r.plain_conn_per_s.len(),
        r.seconds_per_round
    );
    println!("| plain SO_REUSEPORT | {} |", conn(&r.plain_conn_per_s));
    println!("| steered (reuseport) | {} |", conn(&r.steered_conn_per_s));
    println!(
        "| throughput ratio steered/plain (per round) | {:.3} ± {:.3} (rounds {:.2}–{:.2}) |",
        r.throughput_ratio.mean,
        r.throughput_ratio.ci95,
        r.throughput_ratio.min,
        r.throughput_ratio.max
    );
    println!(
        "| program cost (bpf_stats run_time_ns / run_cnt) | ours {:.1} ns per run ({} runs); \
         one-select program {:.1} ns; empty program {:.1} ns |",
        r.program_ns_per_run,
        r.program_runs,
        r.one_select_program_ns_per_run,
        r.empty_program_ns_per_run
    );
    println!(
        "| reference groups (plain server + program) | empty program {}, one-select program {} |",
        conn(&r.empty_program_conn_per_s),
        conn(&r.one_select_program_conn_per_s)
    );
    let p = |p: &Percentiles| {
        format!(
            "p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            p.p50, p.p99, p.max
        )
    };
    println!(
        "| flip latency, lower bound (`activate` sent → start of the last connection that still \
         reached the old generation) | {} over the {} of {} `activate` flips where one did |",
        p(&r.flip_latency_lower_us),
        r.flips_observed,
        r.flips.div_ceil(2)
    );
    println!(
        "| flip latency, upper bound (`activate` sent → first connection established on the new \
         generation) | {} over {} flips |",
        p(&r.flip_latency_upper_us),
        r.flips_with_upper_bound
    );
    println!(
        "| rollback latency, lower / upper bound (the same brackets for every other flip, made \
         with `rollback` instead of `activate`) | lower {} over the {} of {} rollbacks where one \
         did; upper {} |",
        p(&r.rollback_latency_lower_us),
        r.rollbacks_observed,
        r.flips / 2,
        p(&r.rollback_latency_upper_us)
    );
    println!(
        "| activate round trip | p50 {:.0} µs, p99 {:.0} µs |",
        r.activate_rtt_us.p50, r.activate_rtt_us.p99
    );
    println!(
        "| load during the flips | {:.0} new connections/s |",
        r.flip_load_conn_per_s
    );
    println!(
        "| failed requests (any kind, slower than {} ms included) | {} |",
        crate::load::SLOW.as_millis(),
        r.failures
    );
}

/// What [`flip_latency`] measured.
struct Flips {
    flips: usize,
    /// Per observed `activate` flip, µs (see the module doc).
    lower: Vec<f64>,
    upper: Vec<f64>,
    /// Per observed `rollback`, µs.
    rollback_lower: Vec<f64>,
    rollback_upper: Vec<f64>,
    rtts: Vec<f64>,
    load_conn_per_s: f64,
    failures: u64,
}

/// Flips between generations 1 and 2 under recorded load (see the module doc).
fn flip_latency(stack: &Stack, addr: SocketAddr, o: &OverheadOpts) -> anyhow::Result<Flips> {
    stack.start_generation(addr, 2, false)?;
    let mut control = Control::connect(&stack.control).context("connecting to the agent")?;
    let load = Load::start(addr, o.clients, true);
    let started = Instant::now();
    let mut flips: Vec<(Instant, u32)> = Vec::new();
    let mut rtts = Vec::new();
    for k in 0..o.flips {
        let t0 = Instant::now();
        // Forth with `activate`, back with `rollback`: generation 1 drains, still listening.
        let target = if k % 2 == 0 {
            activate(&mut control, addr, 2)?;
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
            2
        } else {
            rollback(&mut control, addr)?;
            1
        };
        flips.push((t0, target));
        // Spacing between flips, so each one's tail can be told apart.
        thread::sleep(Duration::from_millis(10));
    }
    let (tally, records) = load.stop();
    let load_conn_per_s = tally.requests() as f64 / started.elapsed().as_secs_f64();
    println!(
        "bench: flips under load: {} requests ({load_conn_per_s:.0}/s), {}",
        tally.requests(),
        tally.failure_line()
    );
    let (lower, upper) = bounds(&flips, &records);
    let forth = |v: &[Option<f64>]| v.iter().step_by(2).flatten().copied().collect::<Vec<_>>();
    let back = |v: &[Option<f64>]| v.iter().skip(1).step_by(2).flatten().copied().collect();
    Ok(Flips {
        flips: flips.len(),
        lower: forth(&lower),
        upper: forth(&upper),
        rollback_lower: back(&lower),
        rollback_upper: back(&upper),
        rtts,
        load_conn_per_s,
        failures: tally.failures(),
    })
}

/// Per flip (until the next one): the lower bound, if a connection that started after
/// `activate` still reached the old generation, and the upper bound, if one reached the new
/// generation; µs after `activate` was sent, `None` where no connection gave one.
pub(super) fn bounds(
    flips: &[(Instant, u32)],
    records: &[Record],
) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (mut lower, mut upper) = (Vec::new(), Vec::new());
    for (k, (t0, target)) in flips.iter().enumerate() {
        let end = flips.get(k + 1).map(|f| f.0);
        let in_window = records
            .iter()
            .filter(|r| r.start >= *t0 && end.is_none_or(|e| r.start < e));
        let (mut last_old, mut first_new): (Option<Duration>, Option<Duration>) = (None, None);
        for r in in_window {
            if r.generation == *target {
                let at = r.connected - *t0;
                first_new = Some(first_new.map_or(at, |f| f.min(at)));
            } else {
                let at = r.start - *t0;
                last_old = Some(last_old.map_or(at, |l| l.max(at)));
            }
        }
        lower.push(last_old.map(us));
        upper.push(first_new.map(us));
    }
    (lower, upper)
}

/// One `activate` over an open control connection (the protocol in docs/protocol.md).
pub(super) fn activate(
    control: &mut Control,
    addr: SocketAddr,
    generation: u32,
) -> anyhow::Result<()> {
    let v = control_request(
        control,
        &serde_json::json!({
            "v": 1, "op": "activate", "group": format!("tcp://{addr}"), "generation": generation
        }),
    )?;
    if v["type"] != "changed" {
        bail!("activate {generation}: {}", v["message"]);
    }
    Ok(())
}

/// One `rollback` over an open control connection: the newest draining generation that still
/// listens becomes active again.
fn rollback(control: &mut Control, addr: SocketAddr) -> anyhow::Result<()> {
    let v = control_request(
        control,
        &serde_json::json!({"v": 1, "op": "rollback", "group": format!("tcp://{addr}")}),
    )?;
    if v["type"] != "changed" {
        bail!("rollback: {}", v["message"]);
    }
    Ok(())
}

/// `kernel.bpf_stats_enabled` on for the measurement, restored on drop.
pub(super) struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn enable() -> anyhow::Result<Self> {
        let old =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("enabling {BPF_STATS}"))?;
        Ok(Self(old.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

/// Mean ns per run of program `what` between two (run_time_ns, run_cnt) readings; an error
/// if it did not run (a figure of 0 ns would look like a result).
pub(super) fn ns_per_run(what: &str, before: (u64, u64), after: (u64, u64)) -> anyhow::Result<f64> {
    let runs = after.1 - before.1;
    if runs == 0 {
        bail!("the {what} program did not run during the measurement (run_cnt unchanged)");
    }
    Ok((after.0 - before.0) as f64 / runs as f64)
}

/// (run_time_ns, run_cnt) of a pinned program, from its fdinfo.
pub(super) fn prog_stats(pin: &Path) -> anyhow::Result<(u64, u64)> {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET; the kernel copies the path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        bail!(
            "opening the pinned program {}: {}",
            pin.display(),
            std::io::Error::last_os_error()
        );
    }
    let stats = fd_stats(fd as i32);
    // SAFETY: the descriptor was just returned to us.
    unsafe { libc::close(fd as i32) };
    stats
}

/// (run_time_ns, run_cnt) of the program behind `fd`, from its fdinfo; an error when the
/// kernel does not report them (no run statistics: nothing to measure).
pub fn fd_stats(fd: std::os::fd::RawFd) -> anyhow::Result<(u64, u64)> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let value = info
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| {
                format!("the kernel reports no {name} for BPF programs (fdinfo): no run statistics")
            })?;
        Ok(value.trim().parse()?)
    };
    Ok((field("run_time_ns")?, field("run_cnt")?))
}
