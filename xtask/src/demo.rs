//! `cargo xtask demo`: the live demo. In a private network namespace: the agent, a demo
//! server started through `reuseportctl exec` as generation 1, continuous client load (a new
//! connection per request), then generations 2..=N deployed one after the other, each
//! activated while the load runs; the old one drains, gets SIGTERM and exits. Prints a live
//! per-generation tally and the final count of failed requests (the point: 0).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{netns, setup};

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

pub fn demo(opts: &DemoOpts) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("cargo xtask demo needs root (it loads BPF programs); run it with sudo");
    }
    setup::setup()?;
    let root = crate::workspace();
    println!("demo: building reuseport-agent and reuseportctl (release)…");
    setup::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "-p", "reuseport-agent", "--bins"]),
    )?;
    let bin = root.join("target/release");
    netns::enter_new().context("creating the demo's private network namespace")?;

    let run = Run::new(&bin)?;
    let result = run.go(opts);
    run.cleanup();
    result
}

struct Run {
    bin: PathBuf,
    control: PathBuf,
    bpffs: PathBuf,
    tmp: PathBuf,
    agent: Mutex<Option<Child>>,
    servers: Mutex<Vec<Child>>,
}

impl Run {
    fn new(bin: &Path) -> anyhow::Result<Self> {
        let tmp = std::env::temp_dir().join(format!("reuseport-demo-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        Ok(Self {
            bin: bin.to_owned(),
            control: tmp.join("agent.sock"),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/reuseport-demo-{}", std::process::id())),
            tmp,
            agent: Mutex::new(None),
            servers: Mutex::new(Vec::new()),
        })
    }

    fn ctl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("reuseportctl"));
        cmd.arg("--control").arg(&self.control);
        cmd
    }

    fn go(&self, opts: &DemoOpts) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.tmp.join("agent.log"))?;
        let agent = Command::new(self.bin.join("reuseport-agent"))
            .arg("--control")
            .arg(&self.control)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .stderr(log)
            .spawn()
            .context("starting reuseport-agent")?;
        *self.agent.lock().expect("lock") = Some(agent);
        wait_for(
            Duration::from_secs(30),
            "the agent's control socket",
            || std::os::unix::net::UnixStream::connect(&self.control).is_ok(),
        )?;
        println!(
            "demo: agent up (logs: {})",
            self.tmp.join("agent.log").display()
        );

        self.start_generation(1)?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let addr: SocketAddr = ADDR.parse().expect("valid");
        let clients: Vec<_> = (0..opts.clients)
            .map(|_| {
                let (tally, stop) = (tally.clone(), stop.clone());
                thread::spawn(move || client_loop(addr, &tally, &stop))
            })
            .collect();

        let started = Instant::now();
        for generation in 1..=opts.generations {
            if generation > 1 {
                self.start_generation(generation)?;
                let out = self
                    .ctl()
                    .args([
                        "activate",
                        &format!("tcp://{ADDR}"),
                        &generation.to_string(),
                    ])
                    .output()?;
                println!("demo: {}", String::from_utf8_lossy(&out.stdout).trim());
                if !out.status.success() {
                    bail!(
                        "activate failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            let until = Instant::now() + Duration::from_secs(opts.interval);
            while Instant::now() < until {
                // Pacing the live display, not waiting for readiness.
                thread::sleep(Duration::from_millis(500));
                println!(
                    "  t={:>5.1}s  {}",
                    started.elapsed().as_secs_f64(),
                    tally.lock().expect("lock").line()
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let _ = c.join();
        }
        let status = self.ctl().arg("status").output()?;
        println!("\n{}", String::from_utf8_lossy(&status.stdout));
        let t = tally.lock().expect("lock");
        t.print_final(started.elapsed());
        if t.failures() > 0 {
            bail!("{} requests failed", t.failures());
        }
        Ok(())
    }

    /// Starts `generation` through the launcher and waits until the agent lists it.
    fn start_generation(&self, generation: u32) -> anyhow::Result<()> {
        let xtask = std::env::current_exe()?;
        let child = self
            .ctl()
            .args([
                "exec",
                "--listen",
                ADDR,
                "--generation",
                &generation.to_string(),
            ])
            .args([
                "--name",
                &format!("demo-v{generation}"),
                "--on-drain",
                "TERM",
                "--",
            ])
            .arg(xtask)
            .args(["demo-server", "--generation", &generation.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("starting reuseportctl exec")?;
        self.servers.lock().expect("lock").push(child);
        wait_for(
            Duration::from_secs(30),
            &format!("generation {generation} to register"),
            || {
                self.ctl()
                    .args(["status", "--json"])
                    .output()
                    .ok()
                    .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                    .is_some_and(|v| {
                        v.as_array().into_iter().flatten().any(|g| {
                            g["generations"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|x| x["generation"] == generation)
                        })
                    })
            },
        )?;
        println!("demo: generation {generation} registered");
        Ok(())
    }

    fn cleanup(&self) {
        for mut s in self.servers.lock().expect("lock").drain(..) {
            terminate(&mut s);
        }
        if let Some(mut a) = self.agent.lock().expect("lock").take() {
            terminate(&mut a);
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    while !ready() {
        if Instant::now() > until {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    by_generation: std::collections::BTreeMap<u32, u64>,
    refused: u64,
    reset: u64,
    timeout: u64,
    wrong: u64,
}

impl Tally {
    fn failures(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.wrong
    }

    fn line(&self) -> String {
        let gens: Vec<String> = self
            .by_generation
            .iter()
            .map(|(g, n)| format!("gen{g} {n:>6}"))
            .collect();
        format!("{}   failed {}", gens.join("  "), self.failures())
    }

    fn print_final(&self, elapsed: Duration) {
        let total: u64 = self.by_generation.values().sum();
        println!("| generation | requests |");
        println!("|---|---|");
        for (g, n) in &self.by_generation {
            println!("| {g} | {n} |");
        }
        println!(
            "\ndemo: {total} requests in {:.1}s ({:.0}/s, one new connection each); failed: {} \
             (refused {}, reset {}, timeout {}, wrong answer {})",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            self.failures(),
            self.refused,
            self.reset,
            self.timeout,
            self.wrong
        );
    }
}

/// One client: a new connection per request, `req N` → `gen G N+1`, checked.
fn client_loop(addr: SocketAddr, tally: &Mutex<Tally>, stop: &AtomicBool) {
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let res = request(addr, n);
        let mut t = tally.lock().expect("lock");
        match res {
            Ok(generation) => *t.by_generation.entry(generation).or_default() += 1,
            Err(Failure::Refused) => t.refused += 1,
            Err(Failure::Reset) => t.reset += 1,
            Err(Failure::Timeout) => t.timeout += 1,
            Err(Failure::Wrong) => t.wrong += 1,
        }
    }
}

enum Failure {
    Refused,
    Reset,
    Timeout,
    Wrong,
}

fn request(addr: SocketAddr, n: u64) -> Result<u32, Failure> {
    let classify = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Reset,
    };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(classify)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(classify)?;
    s.write_all(format!("req {n}\n").as_bytes())
        .map_err(classify)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(classify)?;
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|g| g.parse().ok()),
        parts.next(),
    ) {
        (Some("gen"), Some(generation), Some(m)) if m == (n + 1).to_string() => Ok(generation),
        _ if line.is_empty() => Err(Failure::Reset),
        _ => Err(Failure::Wrong),
    }
}
