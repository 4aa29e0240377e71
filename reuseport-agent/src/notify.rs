//! The agent as a `Type=notify` service (sd_notify(3) through `NOTIFY_SOCKET`): `READY=1`
//! once the pinned groups are adopted and the control socket accepts, a `STATUS=` line with
//! what it manages whenever that changes, `STOPPING=1` on the way out. Without
//! `NOTIFY_SOCKET` (not started by systemd, or not as `Type=notify`) nothing is sent.

use std::{sync::Arc, time::Duration};

use sd_notify::NotifyState;

use crate::agent::Agent;

/// How often the `STATUS=` line is brought up to date (only sent when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The control socket accepts and every pinned group is adopted.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The agent is on its way out; steering stays in place.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping; steering stays in place"),
    ]);
}

/// `STATUS=` kept up to date with [`Agent::summary`] until the task is dropped.
pub(crate) async fn status_loop(agent: Arc<Agent>, mut last: String) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = agent.summary();
        if now != last {
            send(&[NotifyState::Status(&now)]);
            last = now;
        }
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

impl Agent {
    /// One line for `systemctl status`: `2 groups, 5 registrations; select-or-migrate`.
    pub(crate) fn summary(&self) -> String {
        let (groups, registrations) = {
            let state = self.lock();
            (state.groups.len(), state.subscribers.len())
        };
        let mode = self.mode.as_str();
        format!(
            "{groups} group{}, {registrations} registration{}; {mode}",
            plural(groups),
            plural(registrations)
        )
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
