//! `supervise` as the main process of a systemd unit (`Type=notify`, or `Type=notify-reload`
//! on systemd 253+): sd_notify(3) messages to the `NOTIFY_SOCKET` systemd gave it.
//!
//! - `READY=1` once the first generation is active;
//! - on a restart (SIGHUP: `systemctl reload`; `reuseportctl restart`) `RELOADING=1` with
//!   `MONOTONIC_USEC`, then `READY=1` once the new generation is active or has failed, so
//!   that the reload job ends with the deploy;
//! - `STOPPING=1` on SIGTERM or SIGINT;
//! - a `STATUS=` line whenever it changes: `generation 7 active, 1 draining`.
//!
//! NB: that `NOTIFY_SOCKET` is systemd's, for this process alone: the generations never
//! inherit it (see `child_env`). Under `NotifyAccess=main` systemd would drop their messages
//! anyway; under `all`, a server's `READY=1` would end a reload before its generation is
//! active. With `--ready notify` they get supervise's own socket in its place.
//! Without `NOTIFY_SOCKET` (not run by systemd) nothing is sent.

use sd_notify::NotifyState;

use crate::events::warn;

/// The supervisor's generations as systemd is told about them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Snapshot {
    /// The generation that serves.
    pub(super) current: Option<u32>,
    pub(super) starting: Option<u32>,
    /// A restart waits for the starting generation.
    pub(super) restart_pending: bool,
    pub(super) draining: usize,
    pub(super) running: usize,
}

/// What systemd was told last.
pub(super) struct Service {
    enabled: bool,
    ready: bool,
    reloading: bool,
    stopping: bool,
    status: String,
    /// Why the last restart failed, until the next one succeeds.
    failure: Option<String>,
}

impl Service {
    pub(super) fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            ready: false,
            reloading: false,
            stopping: false,
            status: String::new(),
            failure: None,
        }
    }

    /// A restart begins. Sent at once, before anything is started: systemd 253+
    /// (`Type=notify-reload`) waits for it after its SIGHUP.
    pub(super) fn reloading(&mut self) {
        if self.reloading || !self.ready || self.stopping {
            return;
        }
        self.reloading = true;
        let mut states = vec![NotifyState::Reloading];
        // NB: systemd 253+ takes RELOADING=1 as the answer to its SIGHUP only with a
        // timestamp taken after it.
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }

    /// A restart failed with `why` (it names what stays active).
    pub(super) fn failed(&mut self, why: &str) {
        self.failure = Some(why.to_owned());
    }

    /// A generation became active after a restart.
    pub(super) fn succeeded(&mut self) {
        self.failure = None;
    }

    pub(super) fn stopping(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.send(&[NotifyState::Stopping]);
    }

    /// After each event: `READY=1` when the first generation is active or a restart is over,
    /// and the `STATUS=` line if it changed.
    pub(super) fn update(&mut self, now: Snapshot) {
        if !self.enabled {
            return;
        }
        let status = self.status_line(now);
        // Over, whichever way it went: nothing starting, nothing waiting to start.
        let reload_over = now.starting.is_none() && !now.restart_pending;
        let ready = !self.stopping
            && ((!self.ready && now.current.is_some()) || (self.reloading && reload_over));
        if ready {
            self.ready = true;
            self.reloading = false;
            self.status = status;
            self.send(&[NotifyState::Ready, NotifyState::Status(&self.status)]);
        } else if status != self.status {
            self.status = status;
            self.send(&[NotifyState::Status(&self.status)]);
        }
    }

    /// `generation 8 starting; generation 7 active, 2 draining; last restart failed: …`.
    fn status_line(&self, now: Snapshot) -> String {
        let mut parts = Vec::new();
        if self.stopping {
            parts.push(format!(
                "stopping: waiting for {} generation(s) to exit",
                now.running
            ));
        } else if let Some(n) = now.starting {
            parts.push(format!("generation {n} starting"));
        }
        let active = match now.current {
            Some(n) => format!("generation {n} active"),
            None => "no generation active".into(),
        };
        parts.push(if now.draining > 0 {
            format!("{active}, {} draining", now.draining)
        } else {
            active
        });
        if let Some(why) = &self.failure {
            parts.push(format!("last restart failed: {why}"));
        }
        parts.join("; ")
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            warn(format_args!(
                "cannot notify the service manager (NOTIFY_SOCKET): {e}"
            ));
        }
    }
}
