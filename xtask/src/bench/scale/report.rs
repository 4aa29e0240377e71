//! The scale benchmark's table: each figure at the largest size measured, against its target.

use super::{ScaleReport, SocketsPoint};

const MIB: f64 = 1048576.0;

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "not met" }
}

pub fn print(r: &ScaleReport) {
    println!(
        "\nbench scale: {} CPUs, kernel {}, load average {} at the start, {} at the end, RLIMIT_NOFILE {}",
        r.machine.cpus, r.machine.kernel, r.load_average[0], r.load_average[1], r.nofile_limit
    );
    print_groups(r);
    print_sockets(r);
    println!("\n| figure | target | measured | |");
    println!("|---|---|---|---|");
    let full = r
        .sockets
        .iter()
        .filter(|p| p.refused.is_none())
        .max_by_key(|p| p.sockets);
    let most = r.sockets.iter().map(|p| p.registered).max().unwrap_or(0);
    let flip_failures: u64 = r.sockets.iter().map(|p| p.failures).sum();
    println!(
        "| sockets in one group | ≥ 1,024, 0 failed connections through flips | {most} registered at most{}; {flip_failures} failed connections over every size's flips | {} |",
        r.sockets
            .iter()
            .find_map(|p| p
                .refused
                .as_ref()
                .map(|e| format!(" (the next refused: {e})")))
            .unwrap_or_default(),
        met(most >= 1024 && flip_failures == 0)
    );
    let smallest = r.sockets.iter().find_map(|p| p.program_ns_per_run);
    let largest = full.and_then(|p| p.program_ns_per_run.map(|ns| (p.sockets, ns)));
    if let (Some(small), Some((n, ns))) = (smallest, largest) {
        println!(
            "| program cost | with 1,024 slots within 10 ns of today's | {ns:.1} ns per run at {n} sockets, {small:.1} ns at {} (one-select reference {}) | {} |",
            r.sockets.first().map_or(0, |p| p.sockets),
            r.one_select_program_ns_per_run
                .map_or("-".into(), |v| format!("{v:.1} ns")),
            met(n >= 1024 && ns - small <= 10.0)
        );
    }
    if let Some(g) = r.groups.last() {
        println!(
            "| groups per agent | ≥ 4,096, 2 generations each | {} groups, {} sockets{} | {} |",
            g.groups,
            g.sockets,
            g.stopped
                .as_deref()
                .map(|e| format!("; then refused: {e}"))
                .unwrap_or_default(),
            met(g.groups >= 4096 && g.stopped.is_none())
        );
        println!(
            "| `status` of all groups | p99 ≤ 50 ms at 4,096 groups | default: p99 {:.1} ms over {} calls ({} KiB); `\"live\": false`: p99 {:.1} ms over {} calls | {} |",
            g.status_all_us.p99 / 1e3,
            g.status_all_calls,
            g.status_all_bytes / 1024,
            g.status_all_no_live_us.p99 / 1e3,
            g.status_all_no_live_calls,
            met(g.groups >= 4096 && g.status_all_us.p99 <= 50e3)
        );
        println!(
            "| agent memory | RSS ≤ 64 MiB at 4,096 groups; kernel memory per group | RSS {:.1} MiB ({:.1} MiB after the status calls), {} descriptors; kernel per group {:.0} KiB of maps and JITed code, memlock {:.0} KiB | {} |",
            g.agent_rss_bytes as f64 / MIB,
            g.agent_rss_after_status_bytes as f64 / MIB,
            g.agent_fds,
            g.kernel_per_group.bytes as f64 / 1024.0,
            g.kernel_per_group.memlock as f64 / 1024.0,
            met(g.groups >= 4096 && g.agent_rss_bytes as f64 <= 64.0 * MIB)
        );
        println!(
            "| registrations | ≥ 2,000/s into existing groups; a new group's first timed | {:.0}/s ({} threads); new group p50 {:.1} ms, p99 {:.1} ms | {} |",
            g.registrations_per_s,
            r.registration_threads,
            g.new_group_registration_ms.p50,
            g.new_group_registration_ms.p99,
            met(g.registrations_per_s >= 2000.0)
        );
    }
    if let Some(a) = &r.adoption {
        println!(
            "| agent restart | adoption of 4,096 groups ≤ 5 s, 0 connections lost | {} groups in {:.2} s; {} of {} requests failed ({}) | {} |",
            a.groups,
            a.seconds,
            a.failures,
            a.load_requests,
            a.failure_kinds,
            met(a.groups >= 4096 && a.seconds <= 5.0 && a.failures == 0)
        );
    }
    if let Some(p) = full {
        let p99 = p.flip_latency_lower_us.as_ref().map_or(0.0, |l| l.p99);
        println!(
            "| flip latency | p99 ≤ 1 ms at 1,024 sockets, under load | p99 {:.0} µs at {} sockets ({} of {} flips observed) | {} |",
            p99,
            p.sockets,
            p.flips_observed,
            p.flips,
            met(p.sockets >= 1024 && p99 <= 1000.0)
        );
    }
}

fn print_groups(r: &ScaleReport) {
    println!(
        "\n| groups | sockets | new group p50 / p99 | registrations/s | agent RSS (after status) | descriptors | status all p50 / p99 (calls) | without live figures p50 / p99 | kernel per group |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for g in &r.groups {
        println!(
            "| {} | {} | {:.1} / {:.1} ms | {:.0} | {:.1} MiB ({:.1}) | {} | {:.1} / {:.1} ms ({}) | {:.2} / {:.2} ms | {:.0} KiB (memlock {:.0} KiB) |",
            g.groups,
            g.sockets,
            g.new_group_registration_ms.p50,
            g.new_group_registration_ms.p99,
            g.registrations_per_s,
            g.agent_rss_bytes as f64 / MIB,
            g.agent_rss_after_status_bytes as f64 / MIB,
            g.agent_fds,
            g.status_all_us.p50 / 1e3,
            g.status_all_us.p99 / 1e3,
            g.status_all_calls,
            g.status_all_no_live_us.p50 / 1e3,
            g.status_all_no_live_us.p99 / 1e3,
            g.kernel_per_group.bytes as f64 / 1024.0,
            g.kernel_per_group.memlock as f64 / 1024.0,
        );
    }
    if let Some(g) = r.groups.last() {
        println!("\none group's kernel objects:");
        for m in &g.kernel_per_group.maps {
            println!(
                "  map {:<10} type {:>2}  key {:>3} B  value {:>6} B  × {:>5}  = {:>8} B  memlock {:>8} B",
                m.pin, m.map_type, m.key_size, m.value_size, m.max_entries, m.bytes, m.memlock
            );
        }
        for p in &g.kernel_per_group.programs {
            println!(
                "  prog {:<20} JITed {:>6} B  xlated {:>6} B  memlock {:>6} B",
                p.pin, p.jited_bytes, p.xlated_bytes, p.memlock
            );
        }
    }
}

fn print_sockets(r: &ScaleReport) {
    println!(
        "\n| sockets in one group | registered | registrations/s | flip latency p50 / p99 (observed of flips) | requests | failed | program ns per run |"
    );
    println!("|---|---|---|---|---|---|---|");
    for p in &r.sockets {
        let SocketsPoint {
            sockets,
            registered,
            ..
        } = p;
        println!(
            "| {sockets} | {registered}{} | {:.0} | {} | {} | {} | {} |",
            if p.refused.is_some() {
                " (refused)"
            } else {
                ""
            },
            p.registrations_per_s,
            p.flip_latency_lower_us
                .as_ref()
                .map_or("-".into(), |l| format!(
                    "{:.0} / {:.0} µs ({} of {})",
                    l.p50, l.p99, p.flips_observed, p.flips
                )),
            p.load_requests,
            p.failures,
            p.program_ns_per_run
                .map_or("-".into(), |v| format!("{v:.1}")),
        );
    }
    if let Some(ns) = r.one_select_program_ns_per_run {
        println!("one-select reference program: {ns:.1} ns per run");
    }
}
