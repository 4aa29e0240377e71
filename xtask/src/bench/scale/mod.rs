//! `cargo xtask bench scale`: what the agent costs as groups and sockets grow.
//!
//! - Groups: the agent grows to each `--groups` size (two generations per group, one socket
//!   each); at every size the first registration of each new group (program load and
//!   verifier) is timed, then the registrations into existing groups (generation 2, from
//!   `--threads` threads); then the agent's RSS and descriptors, `status` of all groups (as
//!   sent by default, and with `"live": false`) and the kernel memory of one group, from its
//!   pinned maps and programs. At the largest size the agent is restarted under load and its
//!   adoption of every pinned group is timed.
//! - Sockets: one group per `--sockets` size, half in each of two generations, then flips
//!   between them under load (flip latency as in `bench overhead`: the lower bound) and the
//!   program's cost per run at that size, next to the one-select reference program.
//!
//! Every listener lives in this process (see [`fleet`]); the agent is started with limits
//! raised to the largest sizes asked for, so the figures show what the design costs, not
//! where its defaults stop. Printed as a table against the targets, written to
//! `target/bench/scale.json`, and plotted to `docs/scale.png` (see [`plot`]).

mod fleet;
mod kmem;
mod plot;
mod report;

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    Machine, Percentiles,
    overhead::{BpfStats, activate, bounds, ns_per_run, prog_stats},
    reference_prog::{Loaded, Reference},
};
use crate::{
    load::Load,
    stack::{Control, Stack, control_request},
};
use fleet::{Member, Server};

#[derive(clap::Args, Debug)]
pub struct ScaleOpts {
    /// Groups the agent grows to, in steps (each with two generations of one socket).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256,1024,4096")]
    pub groups: Vec<usize>,
    /// Sockets in one group (half per generation), one group per size.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2,16,64,128,256,512,1024"
    )]
    pub sockets: Vec<usize>,
    /// Threads registering into existing groups at once.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// `status` of all groups: calls timed per variant (at most `--status-seconds` each).
    #[arg(long, default_value_t = 100)]
    pub status_calls: usize,
    #[arg(long, default_value_t = 30)]
    pub status_seconds: u64,
    /// Flips per socket size (under load; latency as in `bench overhead`).
    #[arg(long, default_value_t = 200)]
    pub flips: u32,
    /// Load clients during flips, adoption and the reference program's run.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Skip the restart and adoption at the largest group size.
    #[arg(long)]
    pub no_adoption: bool,
    /// Do not write docs/scale.png.
    #[arg(long)]
    pub no_plot: bool,
    /// Run the agent and CLI found in DIR instead of building them (to compare builds).
    #[arg(long, value_name = "DIR")]
    pub bin: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
pub struct GroupsPoint {
    pub groups: usize,
    pub sockets: usize,
    /// The refusal that stopped the growth short of the size asked for.
    pub stopped: Option<String>,
    /// First registration of a new group (program load, verifier, pins), ms.
    pub new_group_registration_ms: Percentiles,
    /// Registrations into existing groups per second (generation 2 of every new group).
    pub registrations_per_s: f64,
    /// Right after the registrations.
    pub agent_rss_bytes: u64,
    /// After the `status` calls (what answering them left allocated).
    pub agent_rss_after_status_bytes: u64,
    pub agent_fds: usize,
    /// `status` of all groups as sent by default, µs.
    pub status_all_us: Percentiles,
    pub status_all_calls: usize,
    pub status_all_bytes: usize,
    /// `status` of all groups with `"live": false`, µs.
    pub status_all_no_live_us: Percentiles,
    pub status_all_no_live_calls: usize,
    /// One group's kernel objects.
    pub kernel_per_group: kmem::GroupMemory,
}

#[derive(Serialize)]
pub struct SocketsPoint {
    pub sockets: usize,
    /// Sockets the group took before the agent refused one (all of them if none was).
    pub registered: usize,
    pub refused: Option<String>,
    pub registrations_per_s: f64,
    pub flips: usize,
    pub flips_observed: usize,
    /// `activate` sent → start of the last connection that still reached the old generation.
    pub flip_latency_lower_us: Option<Percentiles>,
    pub load_requests: u64,
    pub failures: u64,
    pub program_ns_per_run: Option<f64>,
}

#[derive(Serialize)]
pub struct Adoption {
    pub groups: usize,
    /// Old agent stopped → `status` of the new one lists every group.
    pub seconds: f64,
    pub load_requests: u64,
    pub failures: u64,
    /// The failures by kind (slower than `load::SLOW` included).
    pub failure_kinds: String,
}

#[derive(Serialize)]
pub struct ScaleReport {
    pub machine: Machine,
    /// /proc/loadavg at the start and at the end.
    pub load_average: [String; 2],
    /// Threads registering into existing groups at once.
    pub registration_threads: usize,
    /// RLIMIT_NOFILE of this process and the agent (the hard limit, if lower than asked).
    pub nofile_limit: u64,
    pub groups: Vec<GroupsPoint>,
    pub sockets: Vec<SocketsPoint>,
    pub one_select_program_ns_per_run: Option<f64>,
    pub adoption: Option<Adoption>,
}

const GROUP_PORTS: u16 = 20000;
const SOCKET_PORTS: u16 = 30000;
const REFERENCE: &str = "127.0.0.1:30999";

pub fn scale(o: &ScaleOpts) -> anyhow::Result<()> {
    let max_groups = o.groups.iter().copied().max().unwrap_or(1);
    let max_sockets = o.sockets.iter().copied().max().unwrap_or(2);
    // Listeners and their registrations (two descriptors each), load, with room to spare;
    // the agent raises its own limit.
    let nofile = fleet::raise_nofile(((max_groups * 2 + max_sockets) * 2 + 1024) as u64)?;
    let bin = match &o.bin {
        Some(dir) => dir.clone(),
        None => crate::stack::build_release("bench scale")?,
    };
    let limits = [
        "--max-groups".to_owned(),
        (max_groups + 2 + o.sockets.len()).to_string(),
        "--max-connections".to_owned(),
        (2 * max_groups + max_sockets + 1024).to_string(),
    ];
    let stack = Stack::start_with("bench-scale", &bin, &limits)?;
    let res = run(&stack, o, nofile);
    stack.stop();
    let report = res?;
    report::print(&report);
    let path = super::write_json("scale", &report)?;
    println!("\nbench: JSON written to {}", path.display());
    if !o.no_plot {
        let png = crate::workspace().join("docs/scale.png");
        plot::draw(&report, &png)?;
        println!("bench: plot written to {}", png.display());
    }
    Ok(())
}

fn run(stack: &Stack, o: &ScaleOpts, nofile: u64) -> anyhow::Result<ScaleReport> {
    let load_start = load_average();
    let machine = Machine::this();
    println!(
        "bench scale: {} CPUs, kernel {}, load average {load_start}",
        machine.cpus, machine.kernel
    );
    let server = Server::start()?;
    let (sockets, one_select) = sockets_sweep(stack, &server, o)?;
    let mut fleet = Fleet::default();
    let mut groups: Vec<GroupsPoint> = Vec::new();
    let mut sizes = o.groups.clone();
    sizes.sort_unstable();
    sizes.dedup();
    for &n in &sizes {
        let point = grow(stack, &server, o, &mut fleet, n)?;
        let stopped = point.stopped.is_some();
        groups.push(point);
        if stopped {
            break;
        }
    }
    let adoption = match (o.no_adoption, fleet.groups) {
        (false, n) if n > 0 => Some(adopt(stack, o, n)?),
        _ => None,
    };
    drop(fleet);
    Ok(ScaleReport {
        machine,
        load_average: [load_start, load_average()],
        registration_threads: o.threads,
        nofile_limit: nofile,
        groups,
        sockets,
        one_select_program_ns_per_run: one_select,
        adoption,
    })
}

fn group_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], GROUP_PORTS + i as u16))
}

fn group_name(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

/// The fleet of the groups sweep: every member, and how many groups they make.
#[derive(Default)]
struct Fleet {
    members: Vec<Member>,
    groups: usize,
}

/// Grows the fleet to `n` groups and measures the agent at that size. A refused
/// registration ends the growth there: the point is measured at the size reached, with the
/// refusal.
fn grow(
    stack: &Stack,
    server: &Server,
    o: &ScaleOpts,
    fleet: &mut Fleet,
    n: usize,
) -> anyhow::Result<GroupsPoint> {
    let have = fleet.groups;
    let mut new_ms = Vec::new();
    let mut stopped = None;
    for i in have..n {
        let addr = group_addr(i);
        let l = fleet::listen(addr)?;
        let t0 = Instant::now();
        match fleet::register(&stack.control, &l, &group_name(addr), 1) {
            Ok(reg) => {
                new_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                fleet.members.push(Member::new(server.serve(l, 1)?, reg));
                fleet.groups += 1;
            }
            Err(e) => {
                stopped = Some(format!("group {}: {e:#}", i + 1));
                break;
            }
        }
    }
    let t0 = Instant::now();
    let (added, refused) = register_parallel(
        stack,
        o.threads,
        (have..fleet.groups).map(|i| (group_addr(i), 2)),
    );
    let rate = added.len() as f64 / t0.elapsed().as_secs_f64();
    stopped = stopped.or(refused);
    for (l, reg, generation) in added {
        fleet
            .members
            .push(Member::new(server.serve(l, generation)?, reg));
    }
    let pid = stack.agent_pid().context("the agent is not running")?;
    let (agent_rss_bytes, agent_fds) = (kmem::rss(pid)?, kmem::open_fds(pid)?);
    let mut control = Control::connect(&stack.control).context("connecting to the agent")?;
    let all = serde_json::json!({"v": 1, "op": "status"});
    let no_live = serde_json::json!({"v": 1, "op": "status", "live": false});
    let status_all_bytes = serde_json::to_vec(&control_request(&mut control, &all)?)?.len();
    let budget = Duration::from_secs(o.status_seconds);
    let status = time_calls(&mut control, &all, o.status_calls, budget)?;
    let status_no_live = time_calls(&mut control, &no_live, o.status_calls, budget)?;
    let point = GroupsPoint {
        groups: fleet.groups,
        sockets: fleet.members.len(),
        stopped,
        new_group_registration_ms: Percentiles::of(new_ms),
        registrations_per_s: rate,
        agent_rss_bytes,
        agent_rss_after_status_bytes: kmem::rss(pid)?,
        agent_fds,
        status_all_calls: status.len(),
        status_all_us: Percentiles::of(status),
        status_all_bytes,
        status_all_no_live_calls: status_no_live.len(),
        status_all_no_live_us: Percentiles::of(status_no_live),
        kernel_per_group: kmem::group_memory(&kmem::group_dir(&stack.bpffs, GROUP_PORTS)?)?,
    };
    println!(
        "bench scale: {} groups: RSS {:.1} MiB ({:.1} MiB after status), {} descriptors, {:.0} registrations/s, new group p50 {:.1} ms, status all p99 {:.1} ms ({} calls), without live figures p99 {:.1} ms; load {}{}",
        point.groups,
        point.agent_rss_bytes as f64 / 1048576.0,
        point.agent_rss_after_status_bytes as f64 / 1048576.0,
        point.agent_fds,
        point.registrations_per_s,
        point.new_group_registration_ms.p50,
        point.status_all_us.p99 / 1e3,
        point.status_all_calls,
        point.status_all_no_live_us.p99 / 1e3,
        load_average(),
        point
            .stopped
            .as_deref()
            .map(|e| format!("; stopped: {e}"))
            .unwrap_or_default()
    );
    Ok(point)
}

/// Round trips of `request`, µs: `calls` of them, or fewer if `budget` runs out first.
fn time_calls(
    control: &mut Control,
    request: &serde_json::Value,
    calls: usize,
    budget: Duration,
) -> anyhow::Result<Vec<f64>> {
    let start = Instant::now();
    let mut us = Vec::new();
    while us.len() < calls && (us.is_empty() || start.elapsed() < budget) {
        let t0 = Instant::now();
        control_request(control, request)?;
        us.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(us)
}

type Registered = (std::net::TcpListener, Control, u32);

/// Registers a new listener for each (address, generation) from `threads` threads at once;
/// what registered, and the first refusal if any.
fn register_parallel(
    stack: &Stack,
    threads: usize,
    what: impl Iterator<Item = (SocketAddr, u32)>,
) -> (Vec<Registered>, Option<String>) {
    let what: Vec<_> = what.collect();
    let chunk = what.len().div_ceil(threads.max(1)).max(1);
    thread::scope(|s| {
        let handles: Vec<_> = what
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    let mut done = Vec::new();
                    for &(addr, generation) in part {
                        let reg = fleet::listen(addr).and_then(|l| {
                            let reg =
                                fleet::register(&stack.control, &l, &group_name(addr), generation)?;
                            Ok((l, reg, generation))
                        });
                        match reg {
                            Ok(r) => done.push(r),
                            Err(e) => {
                                return (
                                    done,
                                    Some(format!("generation {generation} of {addr}: {e:#}")),
                                );
                            }
                        }
                    }
                    (done, None)
                })
            })
            .collect();
        let (mut all, mut refused) = (Vec::new(), None);
        for h in handles {
            let (done, e) = h.join().expect("registration thread");
            all.extend(done);
            refused = refused.or(e);
        }
        (all, refused)
    })
}

/// One group per socket size; see the module doc. Also returns the one-select reference
/// program's cost per run.
fn sockets_sweep(
    stack: &Stack,
    server: &Server,
    o: &ScaleOpts,
) -> anyhow::Result<(Vec<SocketsPoint>, Option<f64>)> {
    let stats = BpfStats::enable()?;
    let one_select = reference_cost(server, o)?;
    let mut points = Vec::new();
    for (k, &size) in o.sockets.iter().enumerate() {
        let addr = SocketAddr::from(([127, 0, 0, 1], SOCKET_PORTS + k as u16));
        points.push(socket_point(stack, server, o, addr, size.max(2))?);
    }
    drop(stats);
    Ok((points, Some(one_select)))
}

fn socket_point(
    stack: &Stack,
    server: &Server,
    o: &ScaleOpts,
    addr: SocketAddr,
    size: usize,
) -> anyhow::Result<SocketsPoint> {
    let group = group_name(addr);
    let mut members = Vec::new();
    let mut refused = None;
    let t0 = Instant::now();
    'gens: for generation in [1, 2] {
        for _ in 0..size / 2 {
            let l = fleet::listen(addr)?;
            match fleet::register(&stack.control, &l, &group, generation) {
                Ok(reg) => members.push(Member::new(server.serve(l, generation)?, reg)),
                Err(e) => {
                    refused = Some(format!("{e:#}"));
                    break 'gens;
                }
            }
        }
    }
    let registrations_per_s = members.len() as f64 / t0.elapsed().as_secs_f64();
    let registered = members.len();
    let mut point = SocketsPoint {
        sockets: size,
        registered,
        refused,
        registrations_per_s,
        flips: 0,
        flips_observed: 0,
        flip_latency_lower_us: None,
        load_requests: 0,
        failures: 0,
        program_ns_per_run: None,
    };
    if point.refused.is_none() {
        let prog = stack.pinned_program(addr)?;
        let before = prog_stats(&prog)?;
        let mut control = Control::connect(&stack.control)?;
        let load = Load::start(addr, o.clients, true);
        let mut flips = Vec::new();
        for k in 0..o.flips {
            let target = if k % 2 == 0 { 2 } else { 1 };
            let t = Instant::now();
            activate(&mut control, addr, target)?;
            flips.push((t, target));
            // Spacing between flips, so each one's tail can be told apart.
            thread::sleep(Duration::from_millis(10));
        }
        let (tally, records) = load.stop();
        let after = prog_stats(&prog)?;
        let (lower, _upper) = bounds(&flips, &records);
        let lower: Vec<f64> = lower.into_iter().flatten().collect();
        point.flips = flips.len();
        point.flips_observed = lower.len();
        point.flip_latency_lower_us = Some(Percentiles::of(lower));
        point.load_requests = tally.requests();
        point.failures = tally.failures();
        point.program_ns_per_run = ns_per_run("ours", before, after).ok();
    }
    println!(
        "bench scale: {size} sockets in one group: {registered} registered{}, flip p99 {}, failures {}; load {}",
        point
            .refused
            .as_deref()
            .map(|r| format!(" (then refused: {r})"))
            .unwrap_or_default(),
        point
            .flip_latency_lower_us
            .as_ref()
            .map_or("-".into(), |p| format!("{:.0} µs", p.p99)),
        point.failures,
        load_average()
    );
    Ok(point)
}

/// ns per run of the one-select reference program under the same load, on a group of its
/// own.
fn reference_cost(server: &Server, o: &ScaleOpts) -> anyhow::Result<f64> {
    let addr: SocketAddr = REFERENCE.parse().expect("valid");
    let prog = Loaded::load(Reference::OneSelect)?;
    let l = fleet::listen(addr)?;
    prog.attach(std::os::fd::AsRawFd::as_raw_fd(&l))?;
    let _served = server.serve(l, 1)?;
    let before = prog.stats()?;
    let load = Load::start(addr, o.clients, false);
    // The measurement window itself, not a readiness wait.
    thread::sleep(Duration::from_secs(3));
    load.stop();
    ns_per_run("one-select", before, prog.stats()?)
}

/// Restarts the agent under load on two groups and times its adoption of all `n`.
fn adopt(stack: &Stack, o: &ScaleOpts, n: usize) -> anyhow::Result<Adoption> {
    let loads = [
        Load::start(group_addr(0), o.clients, false),
        Load::start(group_addr(n - 1), o.clients, false),
    ];
    let t0 = Instant::now();
    stack.restart_agent()?;
    let mut control = Control::connect(&stack.control)?;
    let no_live = serde_json::json!({"v": 1, "op": "status", "live": false});
    loop {
        let v = control_request(&mut control, &no_live)?;
        if v["groups"].as_array().map_or(0, Vec::len) >= n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("the restarted agent did not list {n} groups within 600 s: {v}");
        }
        thread::sleep(Duration::from_millis(2));
    }
    let seconds = t0.elapsed().as_secs_f64();
    // Load keeps running a little after adoption, so losses at its end are seen too.
    thread::sleep(Duration::from_millis(500));
    let (mut requests, mut failures, mut kinds) = (0, 0, Vec::new());
    for l in loads {
        let (t, _) = l.stop();
        requests += t.requests();
        failures += t.failures();
        kinds.push(t.failure_line());
    }
    println!(
        "bench scale: adoption of {n} groups: {seconds:.2} s, {requests} requests, {failures} failed ({}); load {}",
        kinds.join("; "),
        load_average()
    );
    Ok(Adoption {
        groups: n,
        seconds,
        load_requests: requests,
        failures,
        failure_kinds: kinds.join("; "),
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
