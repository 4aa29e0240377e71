//! The deployer the demo and the flip benchmark share: the generations of a server on one
//! address, replaced one after the other, either the usual plain SO_REUSEPORT way (start the
//! new server, kill the old one after a delay) or through `reuseportctl supervise` (SIGHUP
//! or `reuseportctl restart`, the next deploy once the agent reports the new generation
//! active).

use std::{
    collections::BTreeMap,
    fmt,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::stack::{Control, Stack, control_request, spawn_plain, wait_for};

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

/// What the supervised deploys of one mode took and what the agent counted.
pub struct Deployed {
    /// Each deploy, from SIGHUP to the new generation active, in ms.
    pub deploy_ms: Vec<f64>,
    /// Connections migrated to the generations, as the agent counted them.
    pub migrated: u64,
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
    /// Reuseport: `reuseportctl supervise` and its log.
    supervisor: Option<(Child, PathBuf)>,
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
            deploy_ms: Vec::new(),
            migrated: BTreeMap::new(),
        };
        match mode {
            Mode::Baseline => d.servers.push(spawn_plain(addr, 1, http)?),
            Mode::Reuseport | Mode::Abrupt => {
                let log = stack.tmp().join(format!("supervise-{}.log", addr.port()));
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
        // NB: a connection per question: the agent closes one that stays silent for 30 s,
        // and deploys can be further apart than that (`demo --interval`).
        let mut control =
            Control::connect(&self.stack.control).context("connecting to the agent")?;
        let group = format!("tcp://{}", self.addr);
        let v = control_request(
            &mut control,
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

    /// Stops everything of this mode (bounded) and returns what the deploys took: `None`
    /// for the baseline, which has no agent to ask.
    pub fn finish(mut self) -> Option<Deployed> {
        if self.mode.supervised() {
            let _ = self.active(); // the last generation's migration counter
        }
        self.stop();
        self.mode.supervised().then(|| Deployed {
            deploy_ms: std::mem::take(&mut self.deploy_ms),
            migrated: self.migrated.values().sum(),
        })
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
pub fn reap(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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
