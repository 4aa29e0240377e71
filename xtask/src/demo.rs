//! `cargo xtask demo`: the live demo. In a private network namespace: the agent, the demo
//! HTTP server run by `reuseportctl supervise` as generation 1, continuous HTTP load (a new
//! connection per request, each carrying a counter the server must echo incremented), then
//! one `reuseportctl restart` per deploy: the agent forwards it to supervise, which starts
//! the next generation, activates it once ready, and the old one drains, gets SIGTERM and
//! exits. Prints a live per-generation tally and the final count of failed requests (the
//! point: 0), and the address of the agent's status page (on the host's loopback, relayed into
//! the demo's namespace by [`PageBridge`]), up while the demo runs.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    deploy::{Deployer, Mode},
    load::{Load, Proto},
    page_bridge::PageBridge,
    stack::{Stack, build_release},
};

#[derive(clap::Args, Debug)]
pub struct DemoOpts {
    /// Generations to roll through (the first one plus this many - 1 deploys).
    #[arg(long, default_value_t = 4)]
    pub generations: u32,
    /// Seconds of load between two deploys.
    #[arg(long, default_value_t = 3)]
    pub interval: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
}

const ADDR: &str = "127.0.0.1:8080";
/// The agent's metrics listener inside the demo's namespace, and the port the page is offered
/// on at the host's loopback (another one if it is taken).
const METRICS: &str = "127.0.0.1:9464";

pub fn demo(opts: &DemoOpts) -> anyhow::Result<()> {
    let metrics: SocketAddr = METRICS.parse().expect("valid");
    let bin = build_release("demo")?;
    // NB: bound before the stack moves this thread into the demo's namespace.
    let page = PageBridge::bind(metrics).context("binding the status page's port on the host")?;
    let page_addr = page.addr()?;
    let stack = Stack::start_with("demo", &bin, &["--metrics-listen", METRICS])?;
    page.relay_to(metrics);
    println!("demo: agent up (logs: {})", stack.agent_log().display());
    println!(
        "demo: status page: http://{page_addr}/ (also /metrics, /status.json, /status.csv), up \
         while the demo runs"
    );
    let result = run(&stack, opts);
    stack.stop();
    result
}

fn run(stack: &Stack, opts: &DemoOpts) -> anyhow::Result<()> {
    let addr: SocketAddr = ADDR.parse().expect("valid");
    let ready = Duration::from_millis(300);
    let mut deployer = Deployer::start(stack, Mode::Reuseport, addr, true, ready)?;
    println!("demo: reuseportctl supervise runs generation 1 of the HTTP demo server on {ADDR}");
    println!(
        "demo: {} HTTP clients, a new connection per request (GET /?n=N, the answer must be \
         `gen G N+1`)",
        opts.clients
    );
    let load = Load::start_proto(addr, opts.clients, false, Proto::Http);
    let started = Instant::now();
    for generation in 1..=opts.generations {
        if generation > 1 {
            println!("demo: reuseportctl restart {ADDR}");
            let said = deployer.restart_command()?;
            println!("demo: {said}; generation {} drains", generation - 1);
        }
        let until = Instant::now() + Duration::from_secs(opts.interval);
        while Instant::now() < until {
            // Pacing the live display, not waiting for readiness.
            thread::sleep(Duration::from_millis(500));
            println!(
                "  t={:>5.1}s  {}",
                started.elapsed().as_secs_f64(),
                load.tally().line()
            );
        }
    }
    let (tally, _) = load.stop();
    let elapsed = started.elapsed();
    println!("\n{}", stack.ctl_ok(&["status"])?);
    println!("| generation | requests |");
    println!("|---|---|");
    for (g, n) in &tally.by_generation {
        println!("| {g} | {n} |");
    }
    println!(
        "\ndemo: {} HTTP requests in {:.1}s ({:.0}/s, one new connection each); {}",
        tally.requests(),
        elapsed.as_secs_f64(),
        tally.requests() as f64 / elapsed.as_secs_f64(),
        tally.failure_line()
    );
    if tally.failures() > 0 {
        bail!("{} requests failed", tally.failures());
    }
    Ok(())
}
