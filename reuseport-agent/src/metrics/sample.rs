//! One look at every group, as `/metrics` and the status page show it: what `status` says of
//! each group (counters read from the kernel's maps), its flips, and optionally the live
//! figures (sock_diag and the process walk, see [`live`](crate::live)).
//!
//! The agent's state lock is taken once per group, never across groups: the lock is held for
//! one group's counters (a map lookup per slot) at a time, and the live figures are read
//! after it is released, so a flip waits for at most one group's share of a sample.

use std::{
    collections::HashSet,
    time::{Duration, Instant, SystemTime},
};

use reuseport_proto::{addr::GroupKey, message::GroupStatus};

use crate::agent::Agent;

/// A group as one sample saw it.
#[derive(Clone, Debug)]
pub struct GroupSample {
    pub key: GroupKey,
    pub status: GroupStatus,
    pub flips: u64,
}

/// Every group at one moment (group by group, see the module doc).
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: SystemTime,
    pub groups: Vec<GroupSample>,
    /// What taking it cost.
    pub took: Duration,
}

impl Sample {
    pub fn empty() -> Self {
        Self {
            at: SystemTime::now(),
            groups: Vec::new(),
            took: Duration::ZERO,
        }
    }

    /// Reads every group; with `with_live`, adds the live figures of each (groups whose
    /// figures cannot be read keep none, and the agent logs why at debug level: `status`
    /// already warns about the same cause).
    pub fn take(agent: &Agent, with_live: bool) -> Self {
        let started = Instant::now();
        let keys: Vec<GroupKey> = agent.lock().groups.keys().copied().collect();
        let limits = agent.limits();
        let mut groups = Vec::with_capacity(keys.len());
        let mut probes = Vec::new();
        for key in keys {
            let state = agent.lock();
            // NB: the group may have gone between the two locks.
            let Some(group) = state.groups.get(&key) else {
                continue;
            };
            let mut status = group.status(agent.own_netns, |r| state.subscribers.contains_key(&r));
            status.limits = Some(limits);
            if with_live {
                probes.push(group.probe());
            }
            groups.push(GroupSample {
                key,
                status,
                flips: state.flips.of(&key),
            });
        }
        if with_live {
            for (g, probe) in groups.iter_mut().zip(&probes) {
                if let Err(e) = agent.live.annotate(&mut g.status, probe) {
                    tracing::debug!(group = %g.status.group, error = %e, "no live figures for the metrics");
                }
            }
            let namespaces: HashSet<u64> = groups.iter().map(|g| g.key.netns).collect();
            agent.live.retain(&namespaces);
        }
        Self {
            at: SystemTime::now(),
            groups,
            took: started.elapsed(),
        }
    }

    /// Copies the live figures of `live` (an older sample) onto the same groups,
    /// generations and listeners of this one. A generation or listener `live` does not
    /// know keeps none.
    pub fn with_live_of(mut self, live: &Sample) -> Self {
        for g in &mut self.groups {
            let Some(from) = live.groups.iter().find(|l| l.key == g.key) else {
                continue;
            };
            g.status.live = from.status.live;
            for generation in &mut g.status.generations {
                let Some(lg) = from
                    .status
                    .generations
                    .iter()
                    .find(|lg| lg.generation == generation.generation)
                else {
                    continue;
                };
                generation.live = lg.live;
                // NB: a drain phase read from the live figures holds only while the
                // generation still drains.
                if generation.drain.is_none() && generation.state == lg.state {
                    generation.drain = lg.drain.clone();
                }
                for s in &mut generation.sockets {
                    s.live = lg
                        .sockets
                        .iter()
                        .find(|ls| ls.cookie == s.cookie)
                        .and_then(|ls| ls.live);
                }
            }
        }
        self
    }
}
