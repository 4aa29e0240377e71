//! `restart GROUP`: the agent forwards it to the `reuseportctl supervise` that manages the
//! group, down one of that supervisor's registration connections, and relays the outcome
//! the supervisor reports back to whoever asked.
//!
//! The agent starts nothing itself: only the supervisor knows the command line, readiness
//! rule and drain policy of its server.

use std::collections::HashMap;

use tokio::sync::mpsc::UnboundedSender;

use super::{Agent, Peer, registry::RegId};
use crate::{
    addr::{GroupAddr, GroupKey},
    protocol::{ErrorKind, GenState, Reply, RestartOutcome, UNREQUESTED_RESTART},
};

use super::registry::Refusal;

/// A restart forwarded to a supervisor, waiting for its `restart_result`.
struct Pending {
    key: GroupKey,
    /// The group as the requester named it.
    group: GroupAddr,
    supervisor_pid: i32,
    /// The requester's connection (its pushed frames).
    requester: UnboundedSender<Reply>,
}

#[derive(Default)]
pub struct Restarts {
    /// Registrations made by a supervisor, and the supervisor's pid.
    supervisors: HashMap<RegId, i32>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
}

impl Restarts {
    pub fn add_supervisor(&mut self, reg: RegId, pid: i32) {
        self.supervisors.insert(reg, pid);
    }

    /// Forgets a closed registration. A supervisor with no registration left will not
    /// answer: its pending restarts fail now instead of at the requester's timeout.
    pub fn remove_supervisor(&mut self, reg: RegId) {
        let Some(pid) = self.supervisors.remove(&reg) else {
            return;
        };
        if self.supervisors.values().any(|p| *p == pid) {
            return;
        }
        let orphaned: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.supervisor_pid == pid)
            .map(|(id, _)| *id)
            .collect();
        for id in orphaned {
            let p = self.pending.remove(&id).expect("id from the map");
            let _ = p.requester.send(Reply::RestartResult {
                group: p.group,
                id,
                outcome: RestartOutcome::Failed {
                    error: format!(
                        "the supervisor (pid {pid}) closed its last registration before the \
                         restart finished: see its log"
                    ),
                },
            });
        }
    }
}

impl Agent {
    /// Forwards a restart of `wanted` to its supervisor; `requester` receives the outcome.
    pub fn restart(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        requester: UnboundedSender<Reply>,
    ) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let state = &mut *state;
        let (key, addr, regs) = {
            let group = state.find(wanted)?;
            self.access
                .may_change(&peer, &group.key, group.owner_uid, "restart")?;
            // The supervisor of the active generation first, then of the newest other one.
            let mut gens: Vec<_> = group.registry.generations.iter().collect();
            gens.sort_by_key(|(n, g)| (g.state == GenState::Active, **n));
            let regs: Vec<RegId> = gens
                .iter()
                .rev()
                .flat_map(|(_, g)| g.sockets.values().map(|m| m.reg))
                .collect();
            (group.key, group.addr(self.own_netns), regs)
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
        // NB: ids start at 1: 0 is UNREQUESTED_RESTART.
        state.restarts.next_id += 1;
        let id = state.restarts.next_id;
        let delivered = state
            .subscribers
            .get(&reg)
            .is_some_and(|tx| tx.send(Reply::Restart { group: addr, id }).is_ok());
        if !delivered {
            return Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "the supervisor of {key} (pid {supervisor_pid}) is disconnecting; try again"
                ),
            ));
        }
        tracing::info!(group = %key, id, supervisor_pid, pid = peer.pid, "restart forwarded");
        state.restarts.pending.insert(
            id,
            Pending {
                key,
                group: addr,
                supervisor_pid,
                requester,
            },
        );
        Ok(Reply::Restarting {
            group: addr,
            id,
            supervisor_pid,
        })
    }

    /// A supervisor reports how restart `id` ended; the requester gets it pushed. Id
    /// [`UNREQUESTED_RESTART`] is a restart nobody asked the agent for (SIGHUP): it is only kept
    /// for `status`, like every outcome.
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
            let regs: Vec<RegId> = group
                .registry
                .generations
                .values()
                .flat_map(|g| g.sockets.values().map(|m| m.reg))
                .collect();
            (group.key, regs)
        };
        if id == UNREQUESTED_RESTART {
            let supervises = regs
                .iter()
                .any(|reg| state.restarts.supervisors.get(reg) == Some(&peer.pid));
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
            tracing::info!(group = %key, ?outcome, "restart finished (SIGHUP)");
            return Ok(Reply::RestartResult {
                group: *wanted,
                id,
                outcome,
            });
        }
        let Some(p) = state.restarts.pending.get(&id) else {
            return Err(Refusal::new(
                ErrorKind::BadRequest,
                format!("no restart {id} is waiting for a result"),
            ));
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
        let reply = Reply::RestartResult {
            group: p.group,
            id,
            outcome,
        };
        // The requester may have given up (timeout, Ctrl-C): nobody to tell then.
        let _ = p.requester.send(reply.clone());
        Ok(reply)
    }
}
