//! `cargo xtask bench overhead`: what steering costs against plain SO_REUSEPORT, what one
//! program run costs, and how fast a flip takes effect.
//!
//! The program cost comes from the kernel's run statistics, which time every run with two
//! clock reads: that floor is large next to a short program, so two reference programs
//! (see [`super::reference_prog`]) run under the same statistics on groups of their own,
//! and the report puts ours next to them.

use std::{
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    Machine, Percentiles, control_request,
    reference_prog::{Loaded, Reference},
};
use crate::{
    load::{Load, Record},
    stack::{Stack, wait_for},
};

#[derive(clap::Args, Debug)]
pub struct OverheadOpts {
    /// Seconds of load per measurement round.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Rounds, alternating plain and steered.
    #[arg(long, default_value_t = 3)]
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
    throughput_ratio: f64,
    program_runs: u64,
    program_ns_per_run: f64,
    /// The same statistics for a program that returns SK_PASS and nothing else.
    empty_program_ns_per_run: f64,
    /// ... and for one that only calls bpf_sk_select_reuseport once.
    one_select_program_ns_per_run: f64,
    empty_program_conn_per_s: Vec<f64>,
    one_select_program_conn_per_s: Vec<f64>,
    flips: usize,
    flip_latency_us: Percentiles,
    activate_rtt_us: Percentiles,
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
        for (name, addr, rates) in [
            ("plain", plain, &mut plain_rates),
            ("steered", steered, &mut steered_rates),
            ("empty-prog", empty, &mut empty_rates),
            ("one-select", one_select, &mut one_select_rates),
        ] {
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
    let ours_ns = ns_per_run(before, after);

    let (latencies, rtts, flip_failures) = flip_latency(stack, steered, o)?;
    failures += flip_failures;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let machine = Machine::this();
    let report = OverheadReport {
        kernel: machine.kernel,
        cpus: machine.cpus,
        clients: o.clients,
        seconds_per_round: o.seconds,
        throughput_ratio: mean(&steered_rates) / mean(&plain_rates),
        plain_conn_per_s: plain_rates,
        steered_conn_per_s: steered_rates,
        program_runs: runs,
        program_ns_per_run: ours_ns,
        empty_program_ns_per_run: ns_per_run(empty_before, empty_after),
        one_select_program_ns_per_run: ns_per_run(one_select_before, one_select_after),
        empty_program_conn_per_s: empty_rates,
        one_select_program_conn_per_s: one_select_rates,
        flips: latencies.len(),
        flip_latency_us: Percentiles::of(latencies),
        activate_rtt_us: Percentiles::of(rtts),
        failures,
    };
    print_report(&report);
    let path = super::write_json("overhead", &report)?;
    println!("\nbench: JSON written to {}", path.display());
    Ok(())
}

fn print_report(r: &OverheadReport) {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!("\n| figure | value |");
    println!("|---|---|");
    println!("| machine | {} CPUs, kernel {} |", r.cpus, r.kernel);
    println!(
        "| load | {} clients, a new connection per request, {} s rounds |",
        r.clients, r.seconds_per_round
    );
    println!(
        "| plain SO_REUSEPORT | {:.0} conn/s |",
        mean(&r.plain_conn_per_s)
    );
    println!(
        "| steered (reuseport) | {:.0} conn/s |",
        mean(&r.steered_conn_per_s)
    );
    println!(
        "| throughput ratio steered/plain | {:.3} |",
        r.throughput_ratio
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
        "| reference groups (plain server + program) | empty program {:.0} conn/s, \
         one-select program {:.0} conn/s |",
        mean(&r.empty_program_conn_per_s),
        mean(&r.one_select_program_conn_per_s)
    );
    println!(
        "| flip latency (activate sent → last new connection reaching the old generation) | p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs over {} flips |",
        r.flip_latency_us.p50, r.flip_latency_us.p99, r.flip_latency_us.max, r.flips
    );
    println!(
        "| activate round trip | p50 {:.0} µs, p99 {:.0} µs |",
        r.activate_rtt_us.p50, r.activate_rtt_us.p99
    );
    println!("| failed requests | {} |", r.failures);
}

/// Flips between generations 1 and 2 under recorded load. Per flip: the time from sending
/// `activate` to the start of the last connection that still reached the old generation
/// (0 if none did), and the request's round trip.
fn flip_latency(
    stack: &Stack,
    addr: SocketAddr,
    o: &OverheadOpts,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, u64)> {
    stack.start_generation(addr, 2, false)?;
    let mut control = UnixStream::connect(&stack.control).context("connecting to the agent")?;
    let load = Load::start(addr, o.clients, true);
    let mut flips: Vec<(Instant, u32)> = Vec::new();
    let mut rtts = Vec::new();
    for k in 0..o.flips {
        let target = if k % 2 == 0 { 2 } else { 1 };
        let t0 = Instant::now();
        activate(&mut control, addr, target)?;
        rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        flips.push((t0, target));
        // Spacing between flips, so each one's tail can be told apart.
        thread::sleep(Duration::from_millis(10));
    }
    let (tally, records) = load.stop();
    println!(
        "bench: flips under load: {} requests, {}",
        tally.requests(),
        tally.failure_line()
    );
    Ok((latencies(&flips, &records), rtts, tally.failures()))
}

fn latencies(flips: &[(Instant, u32)], records: &[Record]) -> Vec<f64> {
    flips
        .iter()
        .enumerate()
        .map(|(k, (t0, target))| {
            let end = flips.get(k + 1).map(|f| f.0);
            records
                .iter()
                .filter(|r| {
                    r.generation != *target && r.start >= *t0 && end.is_none_or(|e| r.start < e)
                })
                .map(|r| (r.start - *t0).as_secs_f64() * 1e6)
                .fold(0.0, f64::max)
        })
        .collect()
}

/// One `activate` over an open control connection (the protocol in docs/protocol.md).
fn activate(control: &mut UnixStream, addr: SocketAddr, generation: u32) -> anyhow::Result<()> {
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

/// `kernel.bpf_stats_enabled` on for the measurement, restored on drop.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
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

/// Mean ns per run between two (run_time_ns, run_cnt) readings.
fn ns_per_run(before: (u64, u64), after: (u64, u64)) -> f64 {
    let runs = after.1 - before.1;
    if runs == 0 {
        0.0
    } else {
        (after.0 - before.0) as f64 / runs as f64
    }
}

/// (run_time_ns, run_cnt) of a pinned program, from its fdinfo.
fn prog_stats(pin: &Path) -> anyhow::Result<(u64, u64)> {
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

/// (run_time_ns, run_cnt) of the program behind `fd`, from its fdinfo.
pub fn fd_stats(fd: std::os::fd::RawFd) -> anyhow::Result<(u64, u64)> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .map(|v| v.trim_start_matches(':').trim().parse::<u64>())
            })
            .unwrap_or(Ok(0))
    };
    Ok((field("run_time_ns")?, field("run_cnt")?))
}
