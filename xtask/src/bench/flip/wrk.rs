//! wrk as the second client of the flip benchmark: HTTP with `Connection: close` (a new
//! connection per request), and what its output and our script's per-generation counts say.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::deploy::reap;

/// The wrk binary and a script that counts answers per generation.
pub(super) struct Wrk {
    pub(super) version: String,
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
    pub(super) fn ensure(tmp: &Path) -> anyhow::Result<Self> {
        crate::packages::ensure("bench", &[("wrk", "wrk")])
            .context("wrk is needed for the wrk rounds (or skip them: --no-wrk)")?;
        let version = wrk_version().context("wrk installed but does not run")?;
        let script = tmp.join("flip.lua");
        std::fs::write(&script, WRK_SCRIPT)?;
        Ok(Self { version, script })
    }

    pub(super) fn start(
        &self,
        addr: SocketAddr,
        connections: usize,
        seconds: u64,
    ) -> anyhow::Result<Child> {
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
pub(super) struct WrkResult {
    pub(super) requests: u64,
    pub(super) duration_s: f64,
    pub(super) requests_per_s: f64,
    pub(super) connect: u64,
    pub(super) read: u64,
    pub(super) write: u64,
    pub(super) timeout: u64,
    pub(super) non_2xx: u64,
    pub(super) wrong_body: u64,
    pub(super) by_generation: BTreeMap<u32, u64>,
}

impl WrkResult {
    /// Reads wrk's summary:
    /// `  1234 requests in 10.00s, 1.2MB read`,
    /// `  Socket errors: connect 0, read 3, write 0, timeout 0` (only when there are some),
    /// `  Non-2xx or 3xx responses: 5` (idem), `Requests/sec:   123.4`.
    pub(super) fn parse(text: &str) -> anyhow::Result<Self> {
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

/// Waits for `child` (bounded) and returns its exit status and stdout.
pub(super) fn wait_output(
    mut child: Child,
    limit: Duration,
) -> anyhow::Result<(ExitStatus, String)> {
    let status = reap(&mut child, limit).context("waiting for wrk")?;
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text)?;
    }
    Ok((status, text))
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
    fn wrk_durations() {
        assert!((wrk_seconds("1.50m").unwrap() - 90.0).abs() < 1e-9);
    }
}
