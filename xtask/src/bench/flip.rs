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

use std::{
    collections::BTreeMap,
    fmt,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Control, Machine, Percentiles, control_request};
use crate::{
    load::{Load, Tally},
    stack::{Stack, spawn_plain, wait_for},
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
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub kill_old_delay: Duration,
    /// Only our client: skip the wrk runs.
    #[arg(long)]
    pub no_wrk: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("not a duration: {s:?} (use e.g. 1s or 300ms)")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Baseline,
    Reuseport,
    /// Reuseport with a slow server that exits at once on SIGTERM.
    Abrupt,
}

/// What each request takes the server of [`Mode::Abrupt`].
pub const ABRUPT_DELAY_MS: u64 = 50;

impl Mode {
    /// Deployed through `reuseportctl supervise` (a failure there fails the benchmark).
    pub fn supervised(self) -> bool {
        self != Mode::Baseline
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Baseline => "baseline",
            Mode::Reuseport => "reuseport",
            Mode::Abrupt => "abrupt",
        })
    }
}

/// Ports of the four runs: a fresh group for each (no TIME_WAIT or leftover listener of one
/// run can touch the next).
const PORT_BASE: u16 = 9100;

pub fn flip(stack: &Stack, o: &FlipOpts) -> anyhow::Result<()> {
    let wrk = if o.no_wrk {
        None
    } else {
        Some(Wrk::ensure(&stack.tmp)?)
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

#[derive(Serialize)]
struct FlipReport {
    machine: Machine,
    flips: u32,
    clients: usize,
    interval_ms: u64,
    kill_old_delay_ms: u64,
    wrk: Option<String>,
    load: Vec<LoadRow>,
    http: Vec<HttpRow>,
}

/// One mode under our client.
#[derive(Serialize)]
struct LoadRow {
    mode: Mode,
    flips: u32,
    duration_s: f64,
    requests: u64,
    failures: u64,
    conn_per_s: f64,
    #[serde(flatten)]
    tally: Tally,
    deploy: Deploys,
}

/// One mode under wrk.
#[derive(Serialize)]
struct HttpRow {
    mode: Mode,
    flips: u32,
    #[serde(flatten)]
    wrk: WrkResult,
    deploy: Deploys,
}

impl HttpRow {
    fn errors(&self) -> u64 {
        let w = &self.wrk;
        w.connect + w.read + w.write + w.timeout + w.non_2xx + w.wrong_body
    }
}

/// What the deploys themselves took (reuseport: SIGHUP → new generation active) and what the
/// agent counted.
#[derive(Serialize)]
struct Deploys {
    deploy_ms: Option<Percentiles>,
    migrated: Option<u64>,
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
    let deploy = d.finish();
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
    let deploy = d.finish();
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

/// Runs the generations of one mode on one address.
pub struct Deployer<'a> {
    stack: &'a Stack,
    mode: Mode,
    addr: SocketAddr,
    http: bool,
    delay: Duration,
    generation: u32,
    /// Baseline: every server process started, oldest first; the last one is the new one.
    servers: Vec<Child>,
    /// Reuseport: `reuseportctl supervise`, its log and a control connection to the agent.
    supervisor: Option<(Child, PathBuf)>,
    control: Option<Control>,
    deploy_ms: Vec<f64>,
    /// Highest `migrated` counter seen per generation.
    migrated: BTreeMap<u32, u64>,
}

impl<'a> Deployer<'a> {
    /// Starts generation 1 and waits until it answers (reuseport: and is active).
    pub fn start(
        stack: &'a Stack,
        mode: Mode,
        addr: SocketAddr,
        http: bool,
        delay: Duration,
    ) -> anyhow::Result<Self> {
        let mut d = Self {
            stack,
            mode,
            addr,
            http,
            delay,
            generation: 1,
            servers: Vec::new(),
            supervisor: None,
            control: None,
            deploy_ms: Vec::new(),
            migrated: BTreeMap::new(),
        };
        match mode {
            Mode::Baseline => d.servers.push(spawn_plain(addr, 1, http)?),
            Mode::Reuseport | Mode::Abrupt => {
                let log = stack.tmp.join(format!("supervise-{}.log", addr.port()));
                let mut cmd = stack.ctl();
                cmd.args(["supervise", "--listen", &addr.to_string()])
                    .args(["--ready", &format!("delay={}ms", delay.as_millis())])
                    .args(["--on-drain", "TERM", "--drain-timeout", "10s"])
                    .args(["--name", "flip", "--"])
                    .arg(std::env::current_exe()?)
                    .arg("demo-server");
                if http {
                    cmd.arg("--http");
                }
                if mode == Mode::Abrupt {
                    cmd.args(["--abrupt", "--delay-ms", &ABRUPT_DELAY_MS.to_string()]);
                }
                let child = cmd
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .context("starting reuseportctl supervise")?;
                d.supervisor = Some((child, log));
                d.control =
                    Some(Control::connect(&d.stack.control).context("connecting to the agent")?);
                d.wait_active(1)?;
            }
        }
        wait_for(
            Duration::from_secs(30),
            &format!("generation 1 on {addr} to answer"),
            || probe(addr, http),
        )?;
        Ok(d)
    }

    /// One deploy: the next generation takes over from the current one.
    pub fn deploy(&mut self) -> anyhow::Result<()> {
        let next = self.generation + 1;
        match self.mode {
            Mode::Baseline => {
                self.servers.push(spawn_plain(self.addr, next, self.http)?);
                // start_server's KILL_OLD_DELAY: the method itself, not a readiness wait.
                thread::sleep(self.delay);
                let old = &self.servers[self.servers.len() - 2];
                // SAFETY: kill(2) with the pid of a child we have not reaped.
                unsafe { libc::kill(old.id() as i32, libc::SIGTERM) };
                for s in &mut self.servers {
                    let _ = s.try_wait(); // reap the ones that are done
                }
            }
            Mode::Reuseport | Mode::Abrupt => {
                let t0 = Instant::now();
                let pid = self.supervisor.as_ref().expect("reuseport mode").0.id();
                // SAFETY: kill(2) with the pid of a child we have not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGHUP) };
                self.wait_active(next)?;
                self.deploy_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        self.generation = next;
        Ok(())
    }

    /// One deploy through `reuseportctl restart` (reuseport mode): the agent forwards it to
    /// the supervisor, which restarts as on SIGHUP; returns what the command printed once
    /// the next generation is active.
    pub fn restart_command(&mut self) -> anyhow::Result<String> {
        if !self.mode.supervised() {
            bail!("reuseportctl restart needs a supervisor: the baseline has none");
        }
        let next = self.generation + 1;
        let t0 = Instant::now();
        let out = self
            .stack
            .ctl_ok(&["restart", &self.addr.to_string(), "--timeout", "40s"])?;
        // The command returns once the agent has the new generation active; confirm.
        self.wait_active(next)?;
        self.deploy_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        self.generation = next;
        Ok(out.trim().to_owned())
    }

    /// Waits until the agent reports `generation` active; fails if supervise exits or the
    /// generation is not active within the ready delay plus 30 s.
    fn wait_active(&mut self, generation: u32) -> anyhow::Result<()> {
        let until = Instant::now() + self.delay + Duration::from_secs(30);
        loop {
            if self.active()? == Some(generation) {
                return Ok(());
            }
            let (child, log) = self.supervisor.as_mut().expect("reuseport mode");
            if let Some(status) = child.try_wait()? {
                bail!(
                    "reuseportctl supervise exited with {status} before generation {generation} was active: {}",
                    read_log(log)
                );
            }
            if Instant::now() > until {
                bail!(
                    "generation {generation} of {} not active in time; supervise says: {}",
                    self.addr,
                    read_log(log)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The group's active generation, per the agent; notes the migration counters.
    fn active(&mut self) -> anyhow::Result<Option<u32>> {
        let control = self.control.as_mut().expect("reuseport mode");
        let group = format!("tcp://{}", self.addr);
        let v = control_request(
            control,
            &serde_json::json!({"v": 1, "op": "status", "group": group}),
        )?;
        let Some(g) = v["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["group"] == group.as_str())
        else {
            return Ok(None);
        };
        for generation in g["generations"].as_array().into_iter().flatten() {
            if let (Some(n), Some(m)) = (
                generation["generation"].as_u64(),
                generation["counters"]["migrated"].as_u64(),
            ) {
                let seen = self.migrated.entry(n as u32).or_default();
                *seen = (*seen).max(m);
            }
        }
        Ok(g["active"].as_u64().map(|a| a as u32))
    }

    /// Stops everything of this mode (bounded) and returns what the deploys took.
    fn finish(mut self) -> Deploys {
        if self.mode.supervised() {
            let _ = self.active(); // the last generation's migration counter
        }
        self.stop();
        let reuseport = self.mode.supervised();
        Deploys {
            deploy_ms: reuseport.then(|| Percentiles::of(std::mem::take(&mut self.deploy_ms))),
            migrated: reuseport.then(|| self.migrated.values().sum()),
        }
    }

    fn stop(&mut self) {
        let children = self
            .supervisor
            .take()
            .map(|(c, _)| c)
            .into_iter()
            .chain(self.servers.drain(..));
        for mut c in children {
            if c.try_wait().ok().flatten().is_none() {
                // SAFETY: kill(2) with the pid of a child we have not reaped.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                reap(&mut c, Duration::from_secs(15));
            }
        }
    }
}

impl Drop for Deployer<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Waits for `child` up to `limit`, then SIGKILLs it.
fn reap(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < until => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return child.wait().ok();
            }
        }
    }
}

/// Waits for `child` (bounded) and returns its exit status and stdout.
fn wait_output(mut child: Child, limit: Duration) -> anyhow::Result<(ExitStatus, String)> {
    let status = reap(&mut child, limit).context("waiting for wrk")?;
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text)?;
    }
    Ok((status, text))
}

/// One request answered with a generation.
fn probe(addr: SocketAddr, http: bool) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let request: &[u8] = if http {
        b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    } else {
        b"req 0\n"
    };
    let mut answer = String::new();
    s.write_all(request).is_ok() && s.read_to_string(&mut answer).is_ok() && answer.contains("gen ")
}

/// The wrk binary and a script that counts answers per generation.
struct Wrk {
    version: String,
    script: PathBuf,
}

/// Counts 200 answers by the generation their body names; any other 200 body is "wrong".
/// `done` prints the counts of every thread (`thread:get` copies tables).
const WRK_SCRIPT: &str = r#"
gens = {}
wrong = 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status ~= 200 then return end
  local g = body and body:match("^gen (%d+)")
  if g then gens[g] = (gens[g] or 0) + 1 else wrong = wrong + 1 end
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    io.write(string.format("xtask-wrong %d\n", t:get("wrong")))
    for g, n in pairs(t:get("gens")) do io.write(string.format("xtask-gen %s %d\n", g, n)) end
  end
end
"#;

impl Wrk {
    /// Finds wrk, installing the Debian package if it is missing.
    fn ensure(tmp: &Path) -> anyhow::Result<Self> {
        crate::packages::ensure("bench", &[("wrk", "wrk")])
            .context("wrk is needed for the wrk rounds (or skip them: --no-wrk)")?;
        let version = wrk_version().context("wrk installed but does not run")?;
        let script = tmp.join("flip.lua");
        std::fs::write(&script, WRK_SCRIPT)?;
        Ok(Self { version, script })
    }

    fn start(&self, addr: SocketAddr, connections: usize, seconds: u64) -> anyhow::Result<Child> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = connections.clamp(1, cpus);
        Command::new("wrk")
            .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
            .args(["-d", &format!("{seconds}s"), "--timeout", "5s"])
            .args(["-H", "Connection: close", "-s"])
            .arg(&self.script)
            .arg(format!("http://{addr}/"))
            .stdout(Stdio::piped())
            .spawn()
            .context("starting wrk")
    }
}

/// `wrk 4.1.0 [epoll] …` (wrk -v exits 1).
fn wrk_version() -> Option<String> {
    let out = Command::new("wrk").arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?;
    first.starts_with("wrk ").then(|| {
        first
            .split(" Copyright")
            .next()
            .unwrap_or(first)
            .trim()
            .to_owned()
    })
}

/// wrk's own figures plus the script's per-generation counts.
#[derive(Serialize, Default, Debug)]
struct WrkResult {
    requests: u64,
    duration_s: f64,
    requests_per_s: f64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    non_2xx: u64,
    wrong_body: u64,
    by_generation: BTreeMap<u32, u64>,
}

impl WrkResult {
    /// Reads wrk's summary:
    /// `  1234 requests in 10.00s, 1.2MB read`,
    /// `  Socket errors: connect 0, read 3, write 0, timeout 0` (only when there are some),
    /// `  Non-2xx or 3xx responses: 5` (idem), `Requests/sec:   123.4`.
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut r = Self::default();
        let mut summary = false;
        for line in text.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [n, "requests", "in", d, ..] => {
                    r.requests = n.parse()?;
                    r.duration_s = wrk_seconds(d.trim_end_matches(','))?;
                    summary = true;
                }
                ["Socket", "errors:", rest @ ..] => {
                    for pair in rest.join(" ").split(',') {
                        let mut kv = pair.split_whitespace();
                        let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                            continue;
                        };
                        let v: u64 = v.parse()?;
                        match k {
                            "connect" => r.connect = v,
                            "read" => r.read = v,
                            "write" => r.write = v,
                            "timeout" => r.timeout = v,
                            _ => {}
                        }
                    }
                }
                ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse()?,
                ["Requests/sec:", n] => r.requests_per_s = n.parse()?,
                ["xtask-wrong", n] => r.wrong_body += n.parse::<u64>()?,
                ["xtask-gen", g, n] => {
                    *r.by_generation.entry(g.parse()?).or_default() += n.parse::<u64>()?;
                }
                _ => {}
            }
        }
        if !summary {
            bail!("no `N requests in T` line");
        }
        Ok(r)
    }
}

/// wrk's durations: `10.00s`, `1.00m`, `500.00ms`.
fn wrk_seconds(d: &str) -> anyhow::Result<f64> {
    let split = d
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .context("a duration without a unit")?;
    let (n, unit) = d.split_at(split);
    let n: f64 = n.parse()?;
    Ok(match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("unknown unit in {d:?}"),
    })
}

impl FlipReport {
    fn print(&self) {
        let m = &self.machine;
        let machine = format!("{} CPUs, kernel {}", m.cpus, m.kernel);
        let delay = self.kill_old_delay_ms;
        println!(
            "\n| our client: {} threads, a new connection per request | baseline: plain SO_REUSEPORT, old one killed {delay} ms after the new one starts | reuseport: `reuseportctl supervise --ready delay={delay}ms`, SIGHUP | reuseport, a server that exits at once on SIGTERM and takes {ABRUPT_DELAY_MS} ms per request |",
            self.clients
        );
        println!("|---|---|---|---|");
        let row = |name: &str, f: &dyn Fn(&LoadRow) -> String| {
            let cells: Vec<String> = self.load.iter().map(f).collect();
            println!("| {name} | {} |", cells.join(" | "));
        };
        row("machine", &|_| machine.clone());
        row("deploys done", &|r| r.flips.to_string());
        row("requests", &|r| r.requests.to_string());
        row("**failed**", &|r| format!("**{}**", r.failures));
        row(
            "refused / reset / closed unanswered / timeout / slower than 500 ms / wrong answer / other",
            &|r| {
                let t = &r.tally;
                format!(
                    "{} / {} / {} / {} / {} / {} / {}",
                    t.refused, t.reset, t.closed, t.timeout, t.slow, t.wrong, t.other
                )
            },
        );
        row("requests per generation", &|r| {
            per_generation(&r.tally.by_generation)
        });
        row("duration", &|r| format!("{:.1} s", r.duration_s));
        row("conn/s", &|r| format!("{:.0}", r.conn_per_s));
        row("deploy (SIGHUP → new generation active)", &|r| {
            deploy_cell(&r.deploy)
        });
        row("queued connections migrated at close", &|r| {
            r.deploy.migrated.map_or("—".into(), |n| n.to_string())
        });
        if self.http.is_empty() {
            return;
        }
        println!(
            "\n| {}: -c {}, `Connection: close` | baseline | reuseport | reuseport, exits on SIGTERM, {ABRUPT_DELAY_MS} ms per request |",
            self.wrk.as_deref().unwrap_or("wrk"),
            self.clients
        );
        println!("|---|---|---|---|");
        let row = |name: &str, f: &dyn Fn(&HttpRow) -> String| {
            let cells: Vec<String> = self.http.iter().map(f).collect();
            println!("| {name} | {} |", cells.join(" | "));
        };
        row("machine", &|_| machine.clone());
        row("deploys done during the run", &|r| r.flips.to_string());
        row("requests", &|r| r.wrk.requests.to_string());
        row("**errors**", &|r| format!("**{}**", r.errors()));
        row("socket errors connect / read / write / timeout", &|r| {
            let w = &r.wrk;
            format!("{} / {} / {} / {}", w.connect, w.read, w.write, w.timeout)
        });
        row("non-2xx / 200 without a generation", &|r| {
            format!("{} / {}", r.wrk.non_2xx, r.wrk.wrong_body)
        });
        row("requests per generation", &|r| {
            per_generation(&r.wrk.by_generation)
        });
        row("duration", &|r| format!("{:.1} s", r.wrk.duration_s));
        row("requests/s", &|r| format!("{:.0}", r.wrk.requests_per_s));
        row("deploy (SIGHUP → new generation active)", &|r| {
            deploy_cell(&r.deploy)
        });
        row("queued connections migrated at close", &|r| {
            r.deploy.migrated.map_or("—".into(), |n| n.to_string())
        });
    }
}

fn deploy_cell(d: &Deploys) -> String {
    d.deploy_ms.as_ref().map_or("—".into(), |p| {
        format!("p50 {:.0} ms, max {:.0} ms", p.p50, p.max)
    })
}

/// `21 generations: min 812, median 1010, max 1302`.
fn per_generation(by: &BTreeMap<u32, u64>) -> String {
    let mut n: Vec<u64> = by.values().copied().collect();
    n.sort_unstable();
    match (n.first(), n.last()) {
        (Some(min), Some(max)) => format!(
            "{} generations: min {min}, median {}, max {max}",
            n.len(),
            n[n.len() / 2]
        ),
        _ => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 3s test @ http://127.0.0.1:9103/
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   348.12us  120.01us   4.10ms   80.00%
    Req/Sec     5.12k   300.00     5.80k    70.00%
  30586 requests in 3.00s, 2.80MB read
  Socket errors: connect 2, read 17, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:  10195.33
Transfer/sec:      0.93MB
xtask-wrong 0
xtask-gen 1 15000
xtask-gen 2 7000
xtask-wrong 1
xtask-gen 2 8566
";
        let r = WrkResult::parse(text).unwrap();
        assert_eq!(r.requests, 30586);
        assert_eq!((r.connect, r.read, r.write, r.timeout), (2, 17, 0, 1));
        assert_eq!((r.non_2xx, r.wrong_body), (3, 1));
        assert_eq!(r.by_generation, BTreeMap::from([(1, 15000), (2, 15566)]));
        assert!((r.duration_s - 3.0).abs() < 1e-9);
        assert!((r.requests_per_s - 10195.33).abs() < 1e-6);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("1m").is_err());
        assert!((wrk_seconds("1.50m").unwrap() - 90.0).abs() < 1e-9);
    }
}
