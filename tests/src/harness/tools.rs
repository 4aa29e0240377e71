//! Real tools the tests compare against: ApacheBench (`ab`) as an HTTP load generator, and
//! `ss` as the kernel's own socket listing. On the host a missing tool fails the test
//! (`cargo xtask test` installs them); the VM guests have neither, so tests that need one
//! skip there ([`tool_missing`]).

use std::{
    io::Read as _,
    net::SocketAddr,
    process::{Child, Command, Stdio},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::in_vm;

/// `Some(reason)` when `program` is not on PATH inside a VM guest (the test should skip);
/// panics when it is missing on the host.
pub fn tool_missing(program: &str) -> Option<String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    match (found, in_vm()) {
        (true, _) => None,
        (false, true) => Some(format!("{program} is not in the VM guest")),
        (false, false) => panic!(
            "{program} is not installed: `cargo xtask test` installs it (xtask/src/packages.rs)"
        ),
    }
}

/// `ab` running until stopped, a new connection per request (no keep-alive).
pub struct ApacheBench {
    child: Option<Child>,
}

/// What `ab` reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AbResult {
    pub complete: u64,
    /// ab's "Failed requests": connect, receive, length and exceptions together.
    pub failed: u64,
    pub non_2xx: u64,
    pub write_errors: u64,
    /// ab's own breakdown line, e.g. `(Connect: 0, Receive: 2, Length: 0, Exceptions: 0)`.
    pub breakdown: String,
}

impl AbResult {
    pub fn failures(&self) -> u64 {
        self.failed + self.non_2xx + self.write_errors
    }
}

impl std::fmt::Display for AbResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ab: {} complete, {} failed {}, {} non-2xx, {} write errors",
            self.complete, self.failed, self.breakdown, self.non_2xx, self.write_errors
        )
    }
}

impl ApacheBench {
    /// `ab -c concurrency` on `http://addr/`, for as long as it takes (until [`stop`]).
    /// `-r`: a failed receive is counted, not the end of the run.
    ///
    /// [`stop`]: ApacheBench::stop
    pub fn start(addr: SocketAddr, concurrency: usize) -> Self {
        Self::start_with(addr, concurrency, |_| {})
    }

    /// [`start`](Self::start), with `adjust` applied to the command first (e.g. to run it in
    /// another network namespace).
    pub fn start_with(
        addr: SocketAddr,
        concurrency: usize,
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let mut cmd = Command::new("ab");
        cmd.args(["-q", "-r", "-s", "30", "-t", "3600", "-n", "100000000"])
            .args(["-c", &concurrency.to_string()])
            .arg(format!("http://{addr}/"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        adjust(&mut cmd);
        let child = cmd.spawn().expect("start ab");
        Self { child: Some(child) }
    }

    /// What the kernel says of the running `ab`, for a test that finds it making no progress:
    /// its network namespace, where it waits and its descriptors.
    pub fn describe(&self) -> String {
        let pid = self.child.as_ref().expect("ab running").id();
        let read = |what: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/{what}"))
                .unwrap_or_else(|e| format!("({e})"))
        };
        let link = |what: &str| {
            std::fs::read_link(format!("/proc/{pid}/{what}"))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|e| format!("({e})"))
        };
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| link(&format!("fd/{}", e.file_name().to_string_lossy())))
            .collect();
        format!(
            "ab (pid {pid}): netns {}, wchan {}, state {}, descriptors {fds:?}",
            link("ns/net"),
            read("wchan"),
            read("stat").split_whitespace().nth(2).unwrap_or("?"),
        )
    }

    /// Panics with ab's output if it has exited (it gives up on a refused connection).
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("ab running");
        if let Some(status) = child.try_wait().expect("wait for ab") {
            let mut out = String::new();
            let mut err = String::new();
            let _ = child.stdout.take().expect("piped").read_to_string(&mut out);
            let _ = child.stderr.take().expect("piped").read_to_string(&mut err);
            panic!("ab exited ({status}) before it was stopped:\n{out}\n{err}");
        }
    }

    /// SIGINT, on which ab prints its results and exits; returns them.
    pub fn stop(mut self) -> AbResult {
        let mut child = self.child.take().expect("ab running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .expect("read ab's output");
        let _ = child.stderr.take().expect("piped").read_to_string(&mut err);
        let _ = child.wait();
        parse_ab(&out).unwrap_or_else(|| panic!("ab printed no results:\n{out}\n{err}"))
    }
}

impl Drop for ApacheBench {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_ab(out: &str) -> Option<AbResult> {
    let mut r = AbResult::default();
    let mut seen = false;
    let number = |rest: &str| rest.trim().parse::<u64>().ok();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("Complete requests:") {
            r.complete = number(rest)?;
            seen = true;
        } else if let Some(rest) = line.strip_prefix("Failed requests:") {
            r.failed = number(rest)?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx responses:") {
            r.non_2xx = number(rest)?;
        } else if let Some(rest) = line.strip_prefix("Write errors:") {
            r.write_errors = number(rest)?;
        } else if line.trim_start().starts_with("(Connect:") {
            r.breakdown = line.trim().to_string();
        }
    }
    seen.then_some(r)
}

/// One socket as `ss -tnpe` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SsSocket {
    pub state: String,
    pub recv_q: u64,
    pub send_q: u64,
    /// Pids of the processes holding it (`users:(("x",pid=1,fd=3),…)`), empty when none.
    pub pids: Vec<i32>,
    /// The socket cookie (`sk:` in the extended output).
    pub cookie: Option<u64>,
}

/// `ss -Htnpe [-l] sport = :PORT`: the TCP sockets with local port `port` in the caller's
/// network namespace, listeners (`listening`) or connected ones (the states `ss -tn` shows).
pub fn ss(port: u16, listening: bool) -> Vec<SsSocket> {
    let mut cmd = Command::new("ss");
    cmd.arg(if listening { "-Htnpel" } else { "-Htnpe" })
        .arg(format!("sport = :{port}"));
    let out = cmd.output().expect("run ss");
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_ss_line)
        .collect()
}

fn parse_ss_line(line: &str) -> SsSocket {
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |i: usize| words.get(i).copied().unwrap_or_default();
    let pids = line
        .split("pid=")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let cookie = words
        .iter()
        .find_map(|w| w.strip_prefix("sk:"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok());
    SsSocket {
        state: field(0).to_string(),
        recv_q: field(1).parse().unwrap_or(0),
        send_q: field(2).parse().unwrap_or(0),
        pids,
        cookie,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_abs_summary() {
        let out = "Complete requests:      2415\nFailed requests:        3\n   \
                   (Connect: 0, Receive: 3, Length: 0, Exceptions: 0)\nNon-2xx responses:      1\n";
        let r = parse_ab(out).unwrap();
        assert_eq!((r.complete, r.failed, r.non_2xx), (2415, 3, 1));
        assert_eq!(r.failures(), 4);
        assert!(r.breakdown.contains("Receive: 3"));
        assert_eq!(parse_ab("nothing"), None);
    }

    #[test]
    fn reads_ss_lines() {
        let line = "ESTAB 0      0      127.0.0.1:7812 127.0.0.1:40000 \
                    users:((\"reuseport_tests\",pid=4242,fd=12),(\"x\",pid=7,fd=3)) \
                    ino:123 sk:1f cgroup:/ <->";
        let s = parse_ss_line(line);
        assert_eq!(s.state, "ESTAB");
        assert_eq!(s.pids, [4242, 7]);
        assert_eq!(s.cookie, Some(0x1f));
        let l = parse_ss_line("LISTEN 2 4096 127.0.0.1:7812 0.0.0.0:* ino:9 sk:a0");
        assert_eq!((l.recv_q, l.send_q, l.pids.len()), (2, 4096, 0));
    }
}
