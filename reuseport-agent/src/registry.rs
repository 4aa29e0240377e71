//! The model of one group: generations, their states, and which sockarray slot holds which
//! registered socket. Pure bookkeeping (no syscalls), so the policy is unit-tested here and
//! the kernel side only ever sees tables this module computed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use reuseport_common::{MAX_SLOTS, SlotCounters, SteeringConfig};

use reuseport_proto::message::{Counters, DrainStep, ErrorKind, GenState, GenerationHealth};

/// Identifies one registration connection (one registering process).
pub type RegId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub reg: RegId,
    pub pid: i32,
    pub uid: u32,
    pub cookie: u64,
    /// The listener's `sk_drops` when it registered: `status` reports drops since then.
    pub drops_base: u32,
    /// `pid` is the server its registrant named (`server_pid`): with the sockets of the same
    /// server and generation in other groups, this one makes one generation across groups
    /// (see `span`).
    pub server: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Generation {
    pub state: GenState,
    pub name: Option<String>,
    /// Slot → socket registered in it.
    /// NB: pinned in the record's binary slot table, not with the rest (see `pinned`).
    #[serde(skip)]
    pub sockets: BTreeMap<u32, Member>,
    /// Counters folded in from slots this generation no longer holds. Pinned as the
    /// protocol's [`Counters`] (the group-wide `unsteered` has no place in a slot's).
    #[serde(with = "retired")]
    pub retired_counters: SlotCounters,
    /// What its launcher last did to it while it drained (see `DrainProgress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_step: Option<DrainStep>,
    /// Percent of new connections while it shares the active state with the previously
    /// active generation, which gets the rest (see `split`); `None` for every other
    /// generation. Only an active generation has one, and only while another one is active.
    /// NB: an agent that predates weights adopts a split as two active generations and
    /// steers by the lower-numbered one alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// What its supervisor's health checks last reported (`health`). Not pinned: the next
    /// report after an agent restart brings it back.
    #[serde(skip)]
    pub health: Option<GenerationHealth>,
}

impl Generation {
    /// Puts generation `n` in state `want`, noting the change; a new state starts without
    /// the previous drain's step.
    fn move_to(&mut self, n: u32, want: GenState, changes: &mut Vec<StateChange>) {
        if want != self.state {
            self.state = want;
            self.drain_step = None;
            changes.push(StateChange {
                generation: n,
                state: want,
            });
        }
    }
}

/// A slot's counters as `status` reports them.
pub fn reported(c: SlotCounters) -> Counters {
    Counters {
        selected: c.selected,
        fallback: c.fallback,
        migrated: c.migrated,
    }
}

/// How [`Generation::retired_counters`] is pinned: as the protocol's [`Counters`], the form
/// records of earlier agents have.
mod retired {
    use reuseport_common::SlotCounters;
    use reuseport_proto::message::Counters;
    use serde::{Deserialize as _, Deserializer, Serialize as _, Serializer};

    pub fn serialize<S: Serializer>(c: &SlotCounters, s: S) -> Result<S::Ok, S::Error> {
        super::reported(*c).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SlotCounters, D::Error> {
        let c = Counters::deserialize(d)?;
        Ok(SlotCounters {
            selected: c.selected,
            fallback: c.fallback,
            migrated: c.migrated,
            unsteered: 0,
        })
    }
}

/// A refused request: what kind, and a one-line actionable message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// A generation whose state changed, to be pushed to its registered processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub generation: u32,
    pub state: GenState,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    pub generations: BTreeMap<u32, Generation>,
}

impl Registry {
    /// The active generation; during a weighted split, the one that was activated with a
    /// weight (the newcomer).
    pub fn active(&self) -> Option<u32> {
        self.weighted().map(|(n, _)| n).or_else(|| self.primary())
    }

    /// The active generation that has no weight: the only active one, or the one that gets
    /// the rest of a split.
    pub fn primary(&self) -> Option<u32> {
        self.generations
            .iter()
            .find(|(_, g)| g.state == GenState::Active && g.weight.is_none())
            .map(|(n, _)| *n)
    }

    /// The generation activated with a weight, and its weight, during a split.
    pub fn weighted(&self) -> Option<(u32, u8)> {
        self.generations.iter().find_map(|(n, g)| {
            g.weight
                .filter(|_| g.state == GenState::Active)
                .map(|w| (*n, w))
        })
    }

    /// Each generation's weight, to tell whether a change altered a split.
    pub fn weights(&self) -> Vec<(u32, Option<u8>)> {
        self.generations
            .iter()
            .map(|(n, g)| (*n, g.weight))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.generations.is_empty()
    }

    /// Adds `member` in `slot` to `generation`. The first generation of a group becomes
    /// active; a new later one is standby unless `activate`.
    pub fn register(
        &mut self,
        generation: u32,
        name: Option<String>,
        activate: bool,
        slot: u32,
        member: Member,
    ) -> Vec<StateChange> {
        let first = self.generations.is_empty();
        let g = self
            .generations
            .entry(generation)
            .or_insert_with(|| Generation {
                state: if first {
                    GenState::Active
                } else {
                    GenState::Standby
                },
                name: None,
                sockets: BTreeMap::new(),
                retired_counters: SlotCounters::default(),
                drain_step: None,
                weight: None,
                health: None,
            });
        if g.name.is_none() {
            g.name = name;
        }
        g.sockets.insert(slot, member);
        if activate && g.state != GenState::Active {
            self.activate(generation)
                .expect("generation was just inserted")
        } else {
            Vec::new()
        }
    }

    /// Makes `generation` the only active one; the previously active one drains.
    pub fn activate(&mut self, generation: u32) -> Result<Vec<StateChange>, Refusal> {
        if !self.generations.contains_key(&generation) {
            return Err(self.unknown_generation(generation));
        }
        let mut changes = Vec::new();
        for (n, g) in &mut self.generations {
            let want = if *n == generation {
                GenState::Active
            } else if g.state == GenState::Active {
                GenState::Draining
            } else {
                g.state
            };
            g.weight = None;
            g.move_to(*n, want, &mut changes);
        }
        Ok(changes)
    }

    /// Sends `weight` percent of new connections to `generation` and the rest to the
    /// generation that is active without a weight (the primary), which stays active; a
    /// generation that had a weight before, if another one, drains. Refused without a
    /// primary to share with, or for the primary itself.
    pub fn split(&mut self, generation: u32, weight: u8) -> Result<Vec<StateChange>, Refusal> {
        if !(crate::split::MIN_WEIGHT..=crate::split::MAX_WEIGHT).contains(&weight) {
            return Err(Refusal::new(
                ErrorKind::BadRequest,
                format!(
                    "weight {weight} is out of range: a split gives {}-{} % to the generation \
                     (100 % is a plain activate)",
                    crate::split::MIN_WEIGHT,
                    crate::split::MAX_WEIGHT
                ),
            ));
        }
        if !self.generations.contains_key(&generation) {
            return Err(self.unknown_generation(generation));
        }
        let Some(primary) = self.primary() else {
            return Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "no generation is active to take the other {} %: activate one first \
                     (reuseportctl activate GROUP GEN)",
                    100 - weight
                ),
            ));
        };
        if primary == generation {
            return Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "generation {generation} is the active generation already: --weight gives \
                     a share to another generation (reuseportctl activate GROUP NEW --weight P)"
                ),
            ));
        }
        let mut changes = Vec::new();
        for (n, g) in &mut self.generations {
            let want = if *n == generation {
                g.weight = Some(weight);
                GenState::Active
            } else if *n != primary && g.state == GenState::Active {
                g.weight = None;
                GenState::Draining
            } else {
                g.state
            };
            g.move_to(*n, want, &mut changes);
        }
        Ok(changes)
    }

    /// Stops new connections to `generation`. Refuses for the active generation: with no
    /// active generation left, new connections would fall back to it anyway.
    pub fn drain(&mut self, generation: u32) -> Result<Vec<StateChange>, Refusal> {
        let Some(g) = self.generations.get_mut(&generation) else {
            return Err(self.unknown_generation(generation));
        };
        match g.state {
            GenState::Active => Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "generation {generation} is the active generation; activate another \
                     generation first (reuseportctl activate GROUP GEN), which drains this one"
                ),
            )),
            GenState::Draining => Ok(Vec::new()),
            GenState::Standby => {
                g.state = GenState::Draining;
                Ok(vec![StateChange {
                    generation,
                    state: GenState::Draining,
                }])
            }
        }
    }

    /// Records what a launcher did to the server of the draining `generation`.
    pub fn drain_step(&mut self, generation: u32, step: DrainStep) -> Result<(), Refusal> {
        let Some(g) = self.generations.get_mut(&generation) else {
            return Err(self.unknown_generation(generation));
        };
        if g.state != GenState::Draining {
            return Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "generation {generation} is {}, not draining: a drain step is reported \
                     only for a draining generation",
                    g.state
                ),
            ));
        }
        g.drain_step = Some(step);
        Ok(())
    }

    /// Removes every socket of registration `reg`. Returns the freed slots; generations left
    /// without sockets disappear (an active one leaves the group without an active
    /// generation: the program then falls back, see [`Registry::steering_config`]).
    #[cfg(test)]
    pub fn unregister(&mut self, reg: RegId) -> Vec<u32> {
        self.remove_where(|_, m| m.reg == reg)
    }

    /// Removes the sockets in `slots` (see [`Registry::unregister`]).
    pub fn remove_slots(&mut self, slots: &[u32]) -> Vec<u32> {
        self.remove_where(|slot, _| slots.contains(&slot))
    }

    fn remove_where(&mut self, gone: impl Fn(u32, &Member) -> bool) -> Vec<u32> {
        let mut freed = Vec::new();
        for g in self.generations.values_mut() {
            g.sockets.retain(|slot, m| {
                let keep = !gone(*slot, m);
                if !keep {
                    freed.push(*slot);
                }
                keep
            });
        }
        self.generations.retain(|_, g| !g.sockets.is_empty());
        if self.primary().is_none() {
            // The primary of a split is gone: its share goes to the weighted generation,
            // which is then simply the active one.
            for g in self.generations.values_mut() {
                g.weight = None;
            }
        }
        freed
    }

    /// The socket with `cookie`, wherever it is registered: (generation, slot, member).
    pub fn find_cookie(&mut self, cookie: u64) -> Option<(u32, u32, &mut Member)> {
        self.generations.iter_mut().find_map(|(n, g)| {
            g.sockets
                .iter_mut()
                .find(|(_, m)| m.cookie == cookie)
                .map(|(slot, m)| (*n, *slot, m))
        })
    }

    /// The table the kernel program follows: active slots first, then fallbacks (draining
    /// newest first, then standby newest first).
    pub fn steering_config(&self, serial: u32) -> SteeringConfig {
        let mut cfg = SteeringConfig::EMPTY;
        cfg.serial = serial;
        let slots_of =
            |n: u32| -> Vec<u32> { self.generations[&n].sockets.keys().copied().collect() };
        match (self.weighted(), self.primary()) {
            (Some((weighted, weight)), Some(primary)) => {
                // NB: slots are below MAX_SLOTS, which fits the tables' u16.
                let entries = |n: u32| -> Vec<u16> {
                    slots_of(n)
                        .into_iter()
                        .map(|s| (s & (MAX_SLOTS - 1)) as u16)
                        .collect()
                };
                let listed = crate::split::fill(
                    &mut cfg.active,
                    &entries(weighted),
                    &entries(primary),
                    weight,
                );
                cfg.n_active = listed as u32;
            }
            (Some((n, _)), None) | (None, Some(n)) => {
                cfg.n_active = SteeringConfig::fill_cyclic(&mut cfg.active, &slots_of(n));
            }
            (None, None) => {}
        }
        let mut fallback: Vec<u32> = Vec::new();
        for state in [GenState::Draining, GenState::Standby] {
            for g in self.generations.values().rev().filter(|g| g.state == state) {
                let slots: Vec<u32> = g.sockets.keys().copied().collect();
                if fallback.is_empty() {
                    cfg.n_preferred = SteeringConfig::fill_cyclic(&mut cfg.preferred, &slots);
                }
                fallback.extend(slots);
            }
        }
        cfg.n_fallback = SteeringConfig::fill_cyclic(&mut cfg.fallback, &fallback);
        cfg.probe = self.probe_target().unwrap_or(reuseport_common::NO_PROBE);
        cfg
    }

    /// Where probe connections go (`reuseport_common::PROBE_PORTS`): the lowest slot of the
    /// newest (highest-numbered) generation, whatever its state. A new generation is the
    /// one a deploy checks before it gets traffic, and during a canary. `None` when the
    /// newest generation is the only active one: ordinary steering reaches it anyway, and
    /// the program then skips the probe test for every connection.
    pub fn probe_target(&self) -> Option<u32> {
        let (_, newest) = self.generations.last_key_value()?;
        if newest.state == GenState::Active && self.weighted().is_none() {
            return None;
        }
        newest.sockets.keys().next().copied()
    }

    fn unknown_generation(&self, generation: u32) -> Refusal {
        let known: Vec<String> = self.generations.keys().map(u32::to_string).collect();
        Refusal::new(
            ErrorKind::UnknownGeneration,
            format!(
                "unknown generation {generation}: registered generations are {}",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(reg: RegId) -> Member {
        Member {
            reg,
            pid: reg as i32,
            uid: 0,
            cookie: reg,
            drops_base: 0,
            server: false,
        }
    }

    fn states(r: &Registry) -> Vec<(u32, GenState)> {
        r.generations.iter().map(|(n, g)| (*n, g.state)).collect()
    }

    #[test]
    fn first_generation_is_active_later_ones_standby() {
        let mut r = Registry::default();
        assert!(r.register(1, None, false, 0, member(1)).is_empty());
        assert!(r.register(2, None, false, 1, member(2)).is_empty());
        assert_eq!(states(&r), [(1, GenState::Active), (2, GenState::Standby)]);
    }

    #[test]
    fn activate_drains_the_previous_active_only() {
        let mut r = Registry::default();
        r.register(1, None, false, 0, member(1));
        r.register(2, None, false, 1, member(2));
        r.register(3, None, false, 2, member(3));
        let ch = r.activate(2).unwrap();
        assert_eq!(
            ch,
            [
                StateChange {
                    generation: 1,
                    state: GenState::Draining
                },
                StateChange {
                    generation: 2,
                    state: GenState::Active
                }
            ]
        );
        assert_eq!(r.active(), Some(2));
        assert_eq!(r.generations[&3].state, GenState::Standby);
        assert_eq!(
            r.activate(9).unwrap_err().kind,
            ErrorKind::UnknownGeneration
        );
    }

    #[test]
    fn register_with_activate_flips_at_once() {
        let mut r = Registry::default();
        r.register(1, None, false, 0, member(1));
        let ch = r.register(2, Some("v2".into()), true, 1, member(2));
        assert_eq!(ch.len(), 2);
        assert_eq!(r.active(), Some(2));
        assert_eq!(r.generations[&2].name.as_deref(), Some("v2"));
    }

    #[test]
    fn draining_the_active_generation_is_refused() {
        let mut r = Registry::default();
        r.register(1, None, false, 0, member(1));
        r.register(2, None, false, 1, member(2));
        assert_eq!(r.drain(1).unwrap_err().kind, ErrorKind::Conflict);
        assert_eq!(
            r.drain(2).unwrap(),
            [StateChange {
                generation: 2,
                state: GenState::Draining
            }]
        );
        assert!(r.drain(2).unwrap().is_empty());
    }

    #[test]
    fn config_orders_active_then_draining_newest_then_standby() {
        let mut r = Registry::default();
        r.register(1, None, false, 10, member(1));
        r.register(1, None, false, 11, member(1));
        r.register(2, None, false, 20, member(2));
        r.register(3, None, false, 30, member(3));
        r.register(4, None, false, 40, member(4));
        r.register(4, None, false, 41, member(4));
        r.activate(2).unwrap(); // 1 draining
        r.activate(3).unwrap(); // 2 draining
        let c = r.steering_config(7);
        assert_eq!(c.serial, 7);
        assert_eq!(c.n_active, 1);
        assert!(
            c.active.iter().all(|s| *s == 30),
            "one active slot fills the ring"
        );
        // Preferred: the newest draining generation (2).
        assert_eq!(c.n_preferred, 1);
        assert!(c.preferred.iter().all(|s| *s == 20));
        // Draining newest first (2, then 1), then standby (4).
        assert_eq!(c.n_fallback, 5);
        assert_eq!(&c.fallback[..6], &[20, 10, 11, 40, 41, 20]);
    }

    #[test]
    fn cyclic_fill_spreads_evenly() {
        let mut r = Registry::default();
        for slot in [3, 5, 9] {
            r.register(1, None, false, slot, member(1));
        }
        let c = r.steering_config(1);
        assert_eq!(c.n_active, 3);
        for slot in [3, 5, 9] {
            let n = c.active.iter().filter(|s| **s == slot).count();
            assert!((341..=342).contains(&n), "slot {slot} appears {n} times");
        }
        // The first n entries (the program's walk after a failed pick) are the distinct list.
        assert_eq!(&c.active[..3], &[3, 5, 9]);
    }

    #[test]
    fn thirty_two_and_more_generations_drain_at_once() {
        // As many generations as a group holds, one socket each.
        let gens = reuseport_common::MAX_GENERATIONS;
        let mut r = Registry::default();
        for g in 1..=gens {
            r.register(g, None, true, g - 1, member(u64::from(g)));
        }
        let draining = r
            .generations
            .values()
            .filter(|g| g.state == GenState::Draining)
            .count();
        assert_eq!(
            draining,
            gens as usize - 1,
            "each activation drains the previous one"
        );
        assert!(draining >= 32);
        let c = r.steering_config(1);
        assert_eq!(c.n_active, 1);
        assert_eq!(
            c.n_fallback,
            gens - 1,
            "every draining generation stays a fallback"
        );
        let newest_first: Vec<u16> = (0..gens as u16 - 1).rev().collect();
        assert_eq!(&c.fallback[..newest_first.len()], newest_first.as_slice());
    }

    #[test]
    fn a_split_keeps_the_active_generation_and_weights_the_table() {
        let len = reuseport_common::MAX_SLOTS as usize;
        let mut r = Registry::default();
        r.register(1, None, false, 10, member(1));
        r.register(2, None, false, 20, member(2));
        r.register(3, None, false, 30, member(3));
        assert_eq!(r.split(1, 10).unwrap_err().kind, ErrorKind::Conflict);
        assert_eq!(r.split(2, 100).unwrap_err().kind, ErrorKind::BadRequest);
        assert_eq!(
            r.split(2, 10).unwrap(),
            [StateChange {
                generation: 2,
                state: GenState::Active
            }]
        );
        assert_eq!(
            (r.active(), r.primary(), r.weighted()),
            (Some(2), Some(1), Some((2, 10)))
        );
        let c = r.steering_config(1);
        assert_eq!(c.n_active, 2);
        let twos = c.active.iter().filter(|s| **s == 20).count();
        assert_eq!(twos, crate::split::entries(10, len));
        assert_eq!(twos + c.active.iter().filter(|s| **s == 10).count(), len);
        // A new weight changes no state; another generation's split drains the previous one.
        assert!(r.split(2, 50).unwrap().is_empty());
        assert_eq!(r.weighted(), Some((2, 50)));
        let ch = r.split(3, 5).unwrap();
        assert_eq!(
            states(&r),
            [
                (1, GenState::Active),
                (2, GenState::Draining),
                (3, GenState::Active)
            ]
        );
        assert_eq!(ch.len(), 2);
        assert_eq!(r.generations[&2].weight, None);
        // A plain activate of the weighted generation ends the split.
        r.activate(3).unwrap();
        assert_eq!(
            states(&r),
            [
                (1, GenState::Draining),
                (2, GenState::Draining),
                (3, GenState::Active)
            ]
        );
        assert!(r.generations.values().all(|g| g.weight.is_none()));
        assert!(r.steering_config(2).active.iter().all(|s| *s == 30));
    }

    #[test]
    fn probes_go_to_the_newest_generation_unless_it_alone_is_active() {
        let no_probe = reuseport_common::NO_PROBE;
        let mut r = Registry::default();
        r.register(1, None, false, 10, member(1));
        assert_eq!(
            r.steering_config(1).probe,
            no_probe,
            "steady state: no probe test"
        );
        r.register(2, None, false, 20, member(2));
        assert_eq!(r.steering_config(2).probe, 20, "the standby newcomer");
        r.split(2, 10).unwrap();
        assert_eq!(r.steering_config(3).probe, 20, "the canary");
        r.activate(2).unwrap();
        assert_eq!(r.steering_config(4).probe, no_probe);
        r.activate(1).unwrap();
        assert_eq!(
            r.steering_config(5).probe,
            20,
            "rolled back: the newest drains"
        );
    }

    #[test]
    fn a_split_whose_active_generation_leaves_gives_everything_to_the_other() {
        let mut r = Registry::default();
        r.register(1, None, false, 10, member(1));
        r.register(2, None, false, 20, member(2));
        r.split(2, 10).unwrap();
        r.unregister(1);
        assert_eq!(
            (r.active(), r.primary(), r.weighted()),
            (Some(2), Some(2), None)
        );
        assert!(r.steering_config(1).active.iter().all(|s| *s == 20));
        assert_eq!(r.split(2, 10).unwrap_err().kind, ErrorKind::Conflict);
    }

    #[test]
    fn losing_the_active_generation_falls_back_to_newest_draining() {
        let mut r = Registry::default();
        r.register(1, None, false, 0, member(1));
        r.register(2, None, true, 1, member(2));
        assert_eq!(r.unregister(2), [1]);
        assert_eq!(r.active(), None);
        let c = r.steering_config(1);
        assert_eq!((c.n_active, c.n_preferred, c.n_fallback), (0, 1, 1));
        assert_eq!(c.fallback[0], 0);
        assert_eq!(r.unregister(1), [0]);
        assert!(r.is_empty());
    }
}
