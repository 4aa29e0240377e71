//! Health checks of a new generation (`supervise --health`), with tengine's rise/fall
//! semantics: a generation is **up** after `--rise` consecutive successful checks and
//! **down** after `--fall` consecutive failures; a result of the other kind resets the count.
//!
//! `tcp` and `http://PATH` checks connect from a probe port (`reuseport_client::probe`), so
//! the agent's program sends them to the newest generation, the one being started, through
//! the group's real address while every client still reaches the active one. `exec:CMD`
//! runs `sh -c CMD` with `REUSEPORT_GENERATION`, `REUSEPORT_HEALTH_ADDR` and
//! `REUSEPORT_PROBE_PORTS` (e.g. `curl -fs --local-port $REUSEPORT_PROBE_PORTS …` probes the
//! same way); exit status 0 is a success. Every check must finish within
//! `--health-timeout`.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::Args;
use tokio::{sync::mpsc, task::JoinHandle};

use super::machine::Event;
use crate::args::parse_duration;
use reuseport_client::{
    probe::{self, PROBE_PORTS},
    proto::{GenerationHealth, HealthState},
};

/// What a check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A probe connection is accepted.
    Tcp,
    /// `GET PATH HTTP/1.0` on a probe connection answers 2xx or 3xx.
    Http(String),
    /// `sh -c CMD` exits 0.
    Exec(String),
}

pub fn parse_check(s: &str) -> Result<Check, String> {
    if s == "tcp" {
        return Ok(Check::Tcp);
    }
    if let Some(path) = s.strip_prefix("http://") {
        let path = path.trim_start_matches('/');
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{s:?}: the path may not contain spaces"));
        }
        return Ok(Check::Http(format!("/{path}")));
    }
    match s.strip_prefix("exec:") {
        Some(cmd) if !cmd.trim().is_empty() => Ok(Check::Exec(cmd.into())),
        _ => Err(format!(
            "{s:?}: use tcp, http://PATH (e.g. http:///healthz) or exec:CMD"
        )),
    }
}

fn parse_count(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: use a whole number of checks, 1 or more")),
    }
}

/// `supervise`'s health check options.
#[derive(Clone, Debug, Args)]
pub struct HealthOpts {
    /// Check each new generation before activating it: tcp, http://PATH (through the first
    /// --listen's address, from a probe port, so the standby generation answers) or
    /// exec:CMD. Without it, a ready generation is activated at once.
    #[arg(long, value_name = "tcp|http://PATH|exec:CMD", value_parser = parse_check)]
    pub health: Option<Check>,
    /// Time between two checks of a generation (from the start of one to the next; a
    /// check that takes longer delays the next).
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// The most one check may take; a check that takes longer failed.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration)]
    pub health_timeout: Duration,
    /// Consecutive successful checks after which a generation is up (and activated).
    #[arg(long, value_name = "N", default_value = "2", value_parser = parse_count)]
    pub rise: u32,
    /// Consecutive failed checks after which a generation is down (and not activated, or
    /// rolled back during its canary).
    #[arg(long, value_name = "N", default_value = "3", value_parser = parse_count)]
    pub fall: u32,
    /// Once up, a new generation first gets P % of new connections for DURATION (a weighted
    /// split, checks going on), then all of them; if it goes down meanwhile, the previous
    /// generation gets everything again and the new one drains and is stopped. Needs
    /// --health.
    #[arg(long, value_name = "P:DURATION", value_parser = parse_canary, requires = "health")]
    pub canary: Option<Canary>,
    /// How long a generation that drains after a newer one took over keeps its listener
    /// and stays unsignalled, so that `reuseportctl rollback GROUP` can bring it back in one
    /// flip; then its drain starts (idle, --on-drain signal). 0: at once.
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration)]
    pub rollback_window: Duration,
}

/// `--canary P:DURATION`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Canary {
    pub weight: u8,
    pub duration: Duration,
}

pub fn parse_canary(s: &str) -> Result<Canary, String> {
    let usage = || format!("{s:?}: use P:DURATION, P a percent from 1 to 99 (e.g. 10:5m)");
    let (weight, duration) = s.split_once(':').ok_or_else(usage)?;
    let weight = weight
        .trim_end_matches('%')
        .parse::<u8>()
        .map_err(|_| usage())?;
    if !(1..=99).contains(&weight) {
        return Err(usage());
    }
    Ok(Canary {
        weight,
        duration: parse_duration(duration)?,
    })
}

/// What a run of results decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Up,
    Down,
}

/// The rise/fall count of one generation.
#[derive(Clone, Debug)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    successes: u32,
    failures: u32,
    up: Option<bool>,
    /// The last failure's reason.
    pub last_error: Option<String>,
}

impl RiseFall {
    pub fn new(opts: &HealthOpts) -> Self {
        Self {
            rise: opts.rise,
            fall: opts.fall,
            successes: 0,
            failures: 0,
            up: None,
            last_error: None,
        }
    }

    /// What the agent is told (see `reuseport_client::proto::GenerationHealth`).
    pub fn report(&self) -> GenerationHealth {
        let last_check_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        GenerationHealth {
            state: match self.up {
                None => HealthState::Checking,
                Some(true) => HealthState::Up,
                Some(false) => HealthState::Down,
            },
            successes: self.successes,
            rise: self.rise,
            failures: self.failures,
            fall: self.fall,
            last_check_ms,
            last_error: self.last_error.clone(),
        }
    }

    /// Counts one result; the verdict when it makes the generation change state.
    pub fn record(&mut self, result: Result<(), String>) -> Option<Verdict> {
        match result {
            Ok(()) => {
                (self.successes, self.failures) = (self.successes + 1, 0);
                (self.successes >= self.rise && self.up != Some(true)).then(|| {
                    self.up = Some(true);
                    Verdict::Up
                })
            }
            Err(e) => {
                (self.successes, self.failures) = (0, self.failures + 1);
                self.last_error = Some(e);
                (self.failures >= self.fall && self.up != Some(false)).then(|| {
                    self.up = Some(false);
                    Verdict::Down
                })
            }
        }
    }
}

/// Checks `generation` every `--health-interval` through `target` and sends each result to
/// the main loop, until aborted.
pub fn spawn(
    check: Check,
    target: SocketAddr,
    opts: &HealthOpts,
    generation: u32,
    events: mpsc::UnboundedSender<Event>,
) -> JoinHandle<()> {
    let target = probe::probe_target(target);
    let (interval, timeout) = (opts.health_interval, opts.health_timeout);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let check = check.clone();
            let result =
                tokio::task::spawn_blocking(move || run(&check, target, timeout, generation))
                    .await
                    .unwrap_or_else(|e| Err(format!("the check did not finish: {e}")));
            if events.send(Event::Health(generation, result)).is_err() {
                return;
            }
        }
    })
}

/// One check, within `timeout`.
fn run(
    check: &Check,
    target: SocketAddr,
    timeout: Duration,
    generation: u32,
) -> Result<(), String> {
    match check {
        Check::Tcp => probe::connect(target, timeout)
            .map(drop)
            .map_err(|e| format!("tcp {target}: {e}")),
        Check::Http(path) => {
            http(target, path, timeout).map_err(|e| format!("http {target}{path}: {e}"))
        }
        Check::Exec(cmd) => {
            exec(cmd, target, timeout, generation).map_err(|e| format!("exec {cmd:?}: {e}"))
        }
    }
}

fn http(target: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let mut stream = probe::connect(target, timeout).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    // NB: one write: a server that answers after the request line and closes with the rest
    // unread would reset the connection under a second write.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) | Ok(httparse::Status::Partial)
                if response.code.is_some() =>
            {
                let code = response.code.unwrap_or_default();
                return if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("answered {code}"))
                };
            }
            Ok(_) => {}
            Err(e) => return Err(format!("not an HTTP answer: {e}")),
        }
        if buf.len() >= 8 * 1024 || Instant::now() >= deadline {
            return Err("no HTTP status line".into());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("closed before an HTTP status line".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // NB: a read timeout is EAGAIN on Linux.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no answer within {timeout:?}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn exec(cmd: &str, target: SocketAddr, timeout: Duration, generation: u32) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .args(["-c", cmd])
        .env(super::GENERATION_VAR, generation.to_string())
        .env("REUSEPORT_HEALTH_ADDR", target.to_string())
        .env(
            "REUSEPORT_PROBE_PORTS",
            format!("{}-{}", PROBE_PORTS.start(), PROBE_PORTS.end()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start /bin/sh: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => return Err(format!("exited with {status}")),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {timeout:?}: killed"));
            }
            // NB: a short poll: std has no wait with a timeout, and checks are seconds apart.
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse() {
        assert_eq!(parse_check("tcp"), Ok(Check::Tcp));
        assert_eq!(
            parse_check("http:///healthz"),
            Ok(Check::Http("/healthz".into()))
        );
        assert_eq!(
            parse_check("http://healthz"),
            Ok(Check::Http("/healthz".into()))
        );
        assert_eq!(parse_check("http://"), Ok(Check::Http("/".into())));
        assert_eq!(parse_check("exec:true"), Ok(Check::Exec("true".into())));
        assert!(parse_check("exec:").is_err());
        assert!(parse_check("udp").is_err());
        assert!(parse_count("0").is_err());
        assert_eq!(
            parse_canary("10:5m"),
            Ok(Canary {
                weight: 10,
                duration: Duration::from_secs(300)
            })
        );
        assert!(parse_canary("100:1s").is_err());
        assert!(parse_canary("10").is_err());
    }

    #[test]
    fn rise_and_fall_count_consecutive_results_only() {
        let opts = HealthOpts {
            health: Some(Check::Tcp),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_secs(2),
            rise: 3,
            fall: 2,
            canary: None,
            rollback_window: Duration::ZERO,
        };
        let mut rf = RiseFall::new(&opts);
        let fail = || Err("no".to_string());
        assert_eq!(rf.record(Ok(())), None);
        assert_eq!(rf.record(Ok(())), None);
        assert_eq!(rf.record(fail()), None, "a failure resets the successes");
        assert_eq!(rf.record(Ok(())), None);
        assert_eq!(rf.record(Ok(())), None);
        assert_eq!(rf.record(Ok(())), Some(Verdict::Up));
        assert_eq!(rf.record(Ok(())), None, "up once");
        assert_eq!(rf.record(fail()), None);
        assert_eq!(rf.record(fail()), Some(Verdict::Down));
        assert_eq!(rf.last_error.as_deref(), Some("no"));
        assert_eq!(rf.record(fail()), None, "down once");
    }
}
