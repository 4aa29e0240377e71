//! What `status` shows of a group (and what supervisors report for it: health), and what the
//! live figures need to read the kernel for it.

use reuseport_proto::message::{
    DrainPhase, ErrorKind, GenState, GenerationHealth, GenerationStatus, GroupStatus, SocketStatus,
};

use super::Group;
use crate::{
    live,
    registry::{Refusal, RegId, reported},
};

impl Group {
    /// Keeps what a supervisor reported of `generation`'s health (not pinned).
    pub(crate) fn set_health(
        &mut self,
        generation: u32,
        health: GenerationHealth,
    ) -> Result<(), Refusal> {
        let known: Vec<String> = self
            .registry
            .generations
            .keys()
            .map(u32::to_string)
            .collect();
        let Some(g) = self.registry.generations.get_mut(&generation) else {
            return Err(Refusal::new(
                ErrorKind::UnknownGeneration,
                format!(
                    "unknown generation {generation}: registered generations are {}",
                    known.join(", ")
                ),
            ));
        };
        g.health = Some(health);
        Ok(())
    }

    pub(crate) fn status(&self, own_netns: u64, registered: impl Fn(RegId) -> bool) -> GroupStatus {
        let mut active_listening = false;
        let split = self.registry.weighted();
        let weight_of = |n: u32| {
            let (weighted, weight) = split?;
            if n == weighted {
                Some(weight)
            } else {
                (Some(n) == self.registry.primary()).then_some(100 - weight)
            }
        };
        let generations = self
            .registry
            .generations
            .iter()
            .map(|(n, g)| {
                let mut counters = g.retired_counters;
                let sockets = g
                    .sockets
                    .iter()
                    .map(|(slot, m)| {
                        counters.add(&self.kernel.counters(*slot));
                        let listening = self.listening(*slot, m);
                        active_listening |= listening && g.state == GenState::Active;
                        SocketStatus {
                            slot: *slot,
                            pid: m.pid,
                            uid: m.uid,
                            cookie: m.cookie,
                            listening,
                            registered: registered(m.reg),
                            live: None,
                        }
                    })
                    .collect();
                GenerationStatus {
                    generation: *n,
                    name: g.name.clone(),
                    state: g.state,
                    sockets,
                    counters: reported(counters),
                    live: None,
                    drain: g
                        .drain_step
                        .clone()
                        .filter(|_| g.state == GenState::Draining)
                        .map(DrainPhase::from),
                    also_in: Vec::new(),
                    weight: weight_of(*n),
                    health: g.health.clone(),
                }
            })
            .collect();
        GroupStatus {
            group: self.addr(own_netns),
            mode: self.kernel.mode().as_str().into(),
            active: self.registry.active(),
            falling_back: !active_listening,
            generations,
            unsteered: self.kernel.group_counters().unsteered,
            limits: None,
            last_restart: self.last_restart.clone(),
            live: None,
        }
    }

    /// What [`live`](super::live) needs to read this group's figures from the kernel.
    pub(crate) fn probe(&self) -> live::Probe {
        live::Probe {
            netns: self.key.netns,
            netns_fd: self.netns.as_ref().and_then(|fd| fd.try_clone().ok()),
            addr: self.key.addr,
            drops_base: self
                .registry
                .generations
                .values()
                .flat_map(|g| g.sockets.values())
                .map(|m| (m.cookie, m.drops_base))
                .collect(),
        }
    }
}
