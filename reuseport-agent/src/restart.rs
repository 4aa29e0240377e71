//! `restart GROUP`: the agent forwards it to the `reuseportctl supervise` that manages the
//! group, down one of that supervisor's registration connections, and relays the outcome
//! the supervisor reports back to whoever asked.
//!
//! The agent starts nothing itself: only the supervisor knows the command line, readiness
//! rule and drain policy of its server.
//!
//! What waits is bounded: at most [`MAX_WAITING_RESTARTS`] restarts per group and per
//! requesting connection, each for at most the agent's `--restart-timeout`. A restart whose
//! supervisor does not report in time fails for its requester and in `status`; a result
//! the supervisor reports later still reaches `status`.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, Peer, State},
    mailbox::{Full, MAX_WAITING_RESTARTS, Mailbox},
    registry::{Refusal, RegId},
};
use reuseport_proto::{
    addr::{GroupAddr, GroupKey},
    message::{ErrorKind, Reply, RestartOutcome, UNREQUESTED_RESTART},
};

/// Default of `reuseport-agent --restart-timeout`: longer than a supervisor's default
/// `--ready-timeout` (30 s) plus its activation, short enough that nothing waits forever.
pub const DEFAULT_RESTART_TIMEOUT: Duration = Duration::from_secs(600);

/// A restart forwarded to a supervisor, waiting for its `restart_result`.
struct Pending {
    key: GroupKey,
    /// The group as the requester named it.
    group: GroupAddr,
    supervisor_pid: i32,
    /// The requesting connection, and where its pushed frames go.
    requester: RegId,
    mailbox: Arc<Mailbox>,
    sent: Instant,
}

pub struct Restarts {
    /// Registrations made by a supervisor, and the supervisor's pid.
    supervisors: HashMap<RegId, i32>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    timeout: Duration,
}

impl Default for Restarts {
    fn default() -> Self {
        Self {
            supervisors: HashMap::new(),
            pending: HashMap::new(),
            next_id: 0,
            timeout: DEFAULT_RESTART_TIMEOUT,
        }
    }
}

impl Restarts {
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn add_supervisor(&mut self, reg: RegId, pid: i32) {
        self.supervisors.insert(reg, pid);
    }

    /// Forgets a closed registration. A supervisor with no registration left will not
    /// answer: its pending restarts fail now instead of at their time-out. Returns those,
    /// for `status`.
    pub fn remove_supervisor(&mut self, reg: RegId) -> Vec<(GroupKey, RestartOutcome)> {
        let Some(pid) = self.supervisors.remove(&reg) else {
            return Vec::new();
        };
        if self.supervisors.values().any(|p| *p == pid) {
            return Vec::new();
        }
        self.fail_where(
            |p| p.supervisor_pid == pid,
            |_| {
                format!(
                    "the supervisor (pid {pid}) closed its last registration before the \
                     restart finished: see its log"
                )
            },
        )
    }

    /// Fails the pending restarts `which` selects, telling their requesters why; returns
    /// the groups and outcomes, for `status`.
    fn fail_where(
        &mut self,
        which: impl Fn(&Pending) -> bool,
        why: impl Fn(&Pending) -> String,
    ) -> Vec<(GroupKey, RestartOutcome)> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| which(p))
            .map(|(id, _)| *id)
            .collect();
        let mut failed = Vec::new();
        for id in ids {
            let p = self.pending.remove(&id).expect("id from the map");
            let outcome = RestartOutcome::Failed { error: why(&p) };
            tracing::warn!(group = %p.key, id, ?outcome, "restart failed in the agent");
            deliver(&p, id, outcome.clone());
            failed.push((p.key, outcome));
        }
        failed
    }

    /// Refuses a restart when its group or its requester has as many waiting as allowed.
    fn room_for(&self, key: GroupKey, requester: RegId) -> Result<(), Refusal> {
        let of_group = self.pending.values().filter(|p| p.key == key).count();
        let of_requester = self
            .pending
            .values()
            .filter(|p| p.requester == requester)
            .count();
        let (count, whose) = if of_group >= MAX_WAITING_RESTARTS {
            (of_group, format!("of {key}"))
        } else if of_requester >= MAX_WAITING_RESTARTS {
            (of_requester, "asked on this connection".to_owned())
        } else {
            return Ok(());
        };
        Err(Refusal::new(
            ErrorKind::Limit,
            format!(
                "{count} restarts {whose} already wait for their supervisor (at most \
                 {MAX_WAITING_RESTARTS}): wait for their outcomes (each fails after {:?} at \
                 the latest)",
                self.timeout
            ),
        ))
    }
}

/// Pushes the outcome of restart `id` to its requester.
fn deliver(p: &Pending, id: u64, outcome: RestartOutcome) {
    let reply = Reply::RestartResult {
        group: p.group,
        id,
        outcome,
    };
    // NB: cannot be full: a connection gets at most MAX_WAITING_RESTARTS outcomes and
    // MAX_WAITING_RESTARTS requests (room_for).
    if p.mailbox.push_outcome(reply).is_err() {
        tracing::error!(group = %p.key, id, "a restart outcome found its requester's queue full");
    }
}

impl Agent {
    /// Forwards a restart of `wanted` to its supervisor; the outcome is pushed to
    /// `mailbox`, the requesting connection's (`requester`).
    pub fn restart(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        requester: RegId,
        mailbox: Arc<Mailbox>,
    ) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let state = &mut *state;
        let (key, addr, regs) = {
            let group = state.find(wanted)?;
            self.access
                .may_change(&peer, &group.key(), group.owner_uid(), "restart")?;
            // The supervisor of the active generation first, then of the newest other one.
            let regs = group.registrations_active_first();
            (group.key(), group.addr(self.own_netns), regs)
        };
        let target = regs
            .into_iter()
            .find_map(|reg| Some((reg, *state.restarts.supervisors.get(&reg)?)));
        let Some((reg, supervisor_pid)) = target else {
            return Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "no `reuseportctl supervise` manages {key}: restart its servers by hand or \
                     run them under supervise"
                ),
            ));
        };
        state.restarts.room_for(key, requester)?;
        // NB: ids start at 1: 0 is UNREQUESTED_RESTART.
        let id = state.restarts.next_id + 1;
        match state
            .subscribers
            .get(&reg)
            .map(|m| m.push(Reply::Restart { group: addr, id }))
        {
            Some(Ok(())) => {}
            Some(Err(Full)) => {
                return Err(Refusal::new(
                    ErrorKind::Limit,
                    format!(
                        "the supervisor of {key} (pid {supervisor_pid}) has not read the restart \
                         requests already sent to it: see its log"
                    ),
                ));
            }
            None => {
                return Err(Refusal::new(
                    ErrorKind::Conflict,
                    format!(
                        "the supervisor of {key} (pid {supervisor_pid}) is disconnecting; try again"
                    ),
                ));
            }
        }
        state.restarts.next_id = id;
        mailbox.expect_outcome();
        tracing::info!(group = %key, id, supervisor_pid, pid = peer.pid, "restart forwarded");
        state.restarts.pending.insert(
            id,
            Pending {
                key,
                group: addr,
                supervisor_pid,
                requester,
                mailbox,
                sent: Instant::now(),
            },
        );
        Ok(Reply::Restarting {
            group: addr,
            id,
            supervisor_pid,
        })
    }

    /// A supervisor reports how restart `id` ended; the requester gets it pushed. Id
    /// [`UNREQUESTED_RESTART`] is a restart nobody asked the agent for (SIGHUP), and a
    /// result nobody waits for any more (it timed out) is kept for `status` alone, like
    /// every outcome.
    pub fn restart_result(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        id: u64,
        outcome: RestartOutcome,
    ) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let state = &mut *state;
        let (key, regs) = {
            let group = state.find(wanted)?;
            (group.key(), group.registrations_active_first())
        };
        let supervises = regs
            .iter()
            .any(|reg| state.restarts.supervisors.get(reg) == Some(&peer.pid));
        let Some(p) = state.restarts.pending.get(&id) else {
            if id != UNREQUESTED_RESTART && !supervises {
                return Err(Refusal::new(
                    ErrorKind::BadRequest,
                    format!("no restart {id} is waiting for a result"),
                ));
            }
            if !supervises {
                return Err(Refusal::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "permission denied: pid {} does not supervise {key} (no supervised \
                         registration of it in that group); only the group's own `reuseportctl \
                         supervise` reports its restarts",
                        peer.pid
                    ),
                ));
            }
            let group = state.groups.get_mut(&key).expect("found above");
            group.set_last_restart(outcome.clone())?;
            tracing::info!(group = %key, id, ?outcome, "restart finished (nobody waits for it)");
            return Ok(Reply::RestartResult {
                group: *wanted,
                id,
                outcome,
            });
        };
        if p.supervisor_pid != peer.pid || p.key != key {
            return Err(Refusal::new(
                ErrorKind::PermissionDenied,
                format!(
                    "permission denied: restart {id} of {} was sent to the supervisor pid {}; \
                     pid {} may not report it for {key}",
                    p.key, p.supervisor_pid, peer.pid
                ),
            ));
        }
        let p = state.restarts.pending.remove(&id).expect("checked above");
        tracing::info!(group = %p.key, id, ?outcome, "restart finished");
        if let Some(group) = state.groups.get_mut(&p.key)
            && let Err(e) = group.set_last_restart(outcome.clone())
        {
            tracing::warn!(group = %p.key, error = %e, "pinning the restart outcome failed");
        }
        // The requester may have given up (timeout, Ctrl-C): nobody reads this then.
        deliver(&p, id, outcome.clone());
        Ok(Reply::RestartResult {
            group: p.group,
            id,
            outcome,
        })
    }

    /// Fails the restarts whose supervisor did not report within the time-out: their
    /// requesters are told, and `status` shows it as the group's last restart.
    pub fn expire_restarts(&self) {
        let mut state = self.lock();
        let timeout = state.restarts.timeout;
        let now = Instant::now();
        let failed = state.restarts.fail_where(
            |p| now.duration_since(p.sent) >= timeout,
            |p| {
                format!(
                    "the supervisor (pid {}) reported no outcome within {timeout:?} \
                     (reuseport-agent --restart-timeout); the restart may still finish: see \
                     its log",
                    p.supervisor_pid,
                )
            },
        );
        state.record_restarts(failed);
    }
}

impl State {
    /// Keeps outcomes the agent decided itself (a supervisor gone or silent) as their
    /// groups' last restart, for `status`.
    pub(super) fn record_restarts(&mut self, outcomes: Vec<(GroupKey, RestartOutcome)>) {
        for (key, outcome) in outcomes {
            if let Some(group) = self.groups.get_mut(&key)
                && let Err(e) = group.set_last_restart(outcome)
            {
                tracing::warn!(group = %key, error = %e, "pinning the restart outcome failed");
            }
        }
    }
}
