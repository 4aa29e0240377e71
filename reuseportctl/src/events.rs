//! What the launchers (`exec`, `supervise`) report while they run: a line for people on
//! stderr, or with `--json` one JSON object per line on stdout, each an [`Event`]. The schema
//! is documented in docs/operations.md ("Launcher events"); a field is never renamed or
//! removed, new events and fields may be added.
//!
//! With `--json`, stdout carries the events alone: the servers' standard output goes to the
//! launcher's stderr instead (see [`use_json`]). Every call site passes the human line
//! along with the event, so the text output stays what it was; events that have no line of
//! their own are JSON only.

use std::{
    fmt,
    fs::File,
    io::Write as _,
    os::fd::AsFd as _,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use nix::{sys::wait::WaitStatus, unistd::Pid};
use serde::Serialize;

use crate::launch::exit_code;
use reuseport_client::proto::{GenState, GroupAddr};

/// The stream of JSON events, once `--json` was given.
static JSON: OnceLock<File> = OnceLock::new();

/// Switches this process to JSON events on stdout: the stream keeps a copy of stdout of its
/// own, and fd 1 becomes a copy of stderr, so that whatever the servers (which inherit fd 1)
/// and anything else print to stdout goes to stderr and no line of the stream is foreign.
pub fn use_json() -> anyhow::Result<()> {
    let events = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| anyhow::anyhow!("cannot duplicate stdout for the JSON events: {e}"))?;
    nix::unistd::dup2_stdout(std::io::stderr())
        .map_err(|e| anyhow::anyhow!("cannot point stdout to stderr for the servers: {e}"))?;
    let _ = JSON.set(File::from(events));
    Ok(())
}

/// Whether the launcher reports JSON events.
pub fn json() -> bool {
    JSON.get().is_some()
}

/// Why the launcher restarts (a deploy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// SIGHUP: `kill -HUP`, or systemd's reload of a `Type=notify-reload` unit.
    Sighup,
    /// `reuseportctl restart`, forwarded by the agent (`ExecReload=` of the template unit).
    Agent,
}

/// Where a generation was in its life when its server exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Started by `supervise`, not ready yet.
    Starting,
    /// Getting its share of a weighted split while its health is watched (`--canary`).
    Canary,
    Standby,
    Active,
    Draining,
    /// Killed by `supervise` for not getting ready.
    Failed,
    /// The launcher was stopping (SIGTERM or SIGINT) and had signalled it.
    Stopping,
}

impl From<GenState> for Phase {
    fn from(state: GenState) -> Self {
        match state {
            GenState::Active => Self::Active,
            GenState::Draining => Self::Draining,
            GenState::Standby => Self::Standby,
        }
    }
}

/// Why a draining server got its `--on-drain` signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalReason {
    /// `--immediate-signal`: as soon as the generation drained.
    Immediate,
    /// No connection in flight, empty accept queues.
    Idle,
    /// The agent reports no live figures for the generation: it cannot be waited for.
    NoLiveFigures,
    /// `--drain-timeout` passed with connections still in flight.
    DrainTimeout,
}

/// One thing a launcher did or saw. Serialized as `{"event": "<name>", <fields>…, "time":
/// "<RFC 3339>"}`; `generation` always names the generation concerned, `pid` its server.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A generation's server runs, its listeners registered in `groups` with `state`.
    Started {
        generation: u32,
        pid: i32,
        groups: Vec<GroupAddr>,
        state: GenState,
    },
    /// The agent pushed a new state for a running generation (in every group it spans).
    State { generation: u32, state: GenState },
    /// `supervise` begins a deploy; `group`: the one `reuseportctl restart` named.
    Reload { via: Via, group: Option<GroupAddr> },
    /// A deploy asked for while a generation is still starting: it follows that one.
    ReloadDeferred { starting: u32 },
    /// A deploy asked for while stopping: not done.
    ReloadIgnored { via: Via },
    /// A starting generation is ready (`--ready`): `supervise` activates it next.
    Ready { generation: u32 },
    /// `supervise` made `generation` the active one; `previous` (if any) drains.
    Activated {
        generation: u32,
        previous: Option<u32>,
    },
    /// A deploy (or the first start) failed; `active` serves on.
    DeployFailed {
        generation: Option<u32>,
        error: String,
        active: Option<u32>,
    },
    /// A draining generation got the `--on-drain` signal.
    Signalled {
        generation: u32,
        pid: i32,
        signal: String,
        reason: SignalReason,
        /// Seconds since the generation started draining.
        drained_secs: f64,
        /// Connections still in flight (0 when idle; null when unknown).
        in_flight: Option<u64>,
    },
    /// A server still running `--kill-timeout` after its signal got SIGKILL (its process
    /// group).
    Killed {
        generation: u32,
        pid: i32,
        after_secs: f64,
    },
    /// `supervise` stops: `signal` went to every running generation.
    Stopping {
        signal: String,
        generations: Vec<u32>,
        kill_timeout_secs: f64,
    },
    /// A generation's server exited: `status` as a shell reports it, from `code` or `signal`.
    Exited {
        generation: u32,
        pid: i32,
        status: u8,
        code: Option<i32>,
        signal: Option<String>,
        phase: Phase,
        /// Seconds it drained before it exited, if it was draining.
        drained_secs: Option<f64>,
    },
    /// Something went wrong that the launcher survives.
    Warning { message: String },
    /// Any other remark.
    Message { message: String },
    /// The launcher failed and exits with `exit_status` (docs/operations.md, "Scripting").
    Error { message: String, exit_status: u8 },
}

/// An event as written: the event, then when.
#[derive(Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    event: &'a Event,
    time: String,
}

impl Event {
    /// `exited` for the server of `generation`, which ended with `status` (exited or killed).
    pub fn exited(
        generation: u32,
        status: WaitStatus,
        phase: Phase,
        drained: Option<Duration>,
    ) -> Self {
        let (pid, code, signal) = match status {
            WaitStatus::Exited(pid, code) => (pid, Some(code), None),
            WaitStatus::Signaled(pid, sig, _) => (pid, None, Some(sig.to_string())),
            other => (other.pid().unwrap_or(Pid::from_raw(0)), None, None),
        };
        Self::Exited {
            generation,
            pid: pid.as_raw(),
            status: exit_code(status).unwrap_or(1),
            code,
            signal,
            phase,
            drained_secs: drained.map(secs),
        }
    }

    /// Reports the event: as JSON with `--json`, else `human` as a line on stderr.
    pub fn report(&self, human: fmt::Arguments<'_>) {
        if !self.write_json() {
            write_stderr(human);
        }
    }

    /// Reports an event that has no line in the text output: with `--json` only.
    pub fn report_json_only(&self) {
        self.write_json();
    }

    /// The JSON line, without its newline.
    fn to_json(&self, time: SystemTime) -> String {
        let line = Line {
            event: self,
            time: humantime::format_rfc3339_millis(time).to_string(),
        };
        serde_json::to_string(&line).expect("events hold only strings and numbers")
    }

    /// Writes the event if the events are JSON; whether they are.
    fn write_json(&self) -> bool {
        let Some(mut out) = JSON.get() else {
            return false;
        };
        let mut line = self.to_json(SystemTime::now());
        line.push('\n');
        // NB: one `write` per line, as for the text lines; a reader that went away is not
        // worth stopping the launcher (its servers would go with it).
        let _ = out.write_all(line.as_bytes());
        true
    }
}

/// A remark of the launcher: the text line on stderr, or with `--json` a `message` event.
///
/// Unlike `eprintln!`, a broken stderr is ignored: a panic here would kill the launcher,
/// unregister the socket and SIGTERM the server.
pub fn note(msg: fmt::Arguments<'_>) {
    Event::Message {
        message: msg.to_string(),
    }
    .report(msg);
}

/// `warning: <msg>` on stderr, or with `--json` a `warning` event.
pub fn warn(msg: fmt::Arguments<'_>) {
    Event::Warning {
        message: msg.to_string(),
    }
    .report(format_args!("warning: {msg}"));
}

/// Seconds, for the events' durations.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// NB: one `write` per line: `writeln!` with arguments writes piece by piece, and lines of
/// several supervisors (or of their servers) sharing a terminal would interleave.
fn write_stderr(msg: fmt::Arguments<'_>) {
    let line = format!("reuseportctl: {msg}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(event: &Event) -> serde_json::Value {
        serde_json::from_str(&event.to_json(SystemTime::UNIX_EPOCH)).expect("valid JSON")
    }

    #[test]
    fn events_are_flat_objects_named_by_event() {
        let started = Event::Started {
            generation: 2,
            pid: 42,
            groups: vec!["tcp://127.0.0.1:8080".parse().unwrap()],
            state: GenState::Standby,
        };
        assert_eq!(
            json(&started),
            serde_json::json!({
                "event": "started",
                "generation": 2,
                "pid": 42,
                "groups": ["tcp://127.0.0.1:8080"],
                "state": "standby",
                "time": "1970-01-01T00:00:00.000Z",
            })
        );
        let exited = Event::Exited {
            generation: 1,
            pid: 41,
            status: 143,
            code: None,
            signal: Some("SIGTERM".into()),
            phase: Phase::Draining,
            drained_secs: Some(0.5),
        };
        let v = json(&exited);
        assert_eq!(v["event"], "exited");
        assert_eq!(v["phase"], "draining");
        assert_eq!(v["code"], serde_json::Value::Null, "absent values are null");
        let reload = json(&Event::Reload {
            via: Via::Sighup,
            group: None,
        });
        assert_eq!(reload["event"], "reload");
        assert_eq!(reload["via"], "sighup");
    }

    #[test]
    fn one_event_is_one_line() {
        let warning = Event::Warning {
            message: "two\nlines".into(),
        };
        assert!(!warning.to_json(SystemTime::now()).contains('\n'));
    }
}
