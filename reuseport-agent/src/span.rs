//! A generation across groups. A server with several listeners (`exec` or `supervise` with
//! several `--listen`, or any registrant that names its `server_pid`) has a socket in each of
//! their groups under one generation number. Such a generation is one unit: `activate` and
//! `drain` change it in every group it spans, all or none, and `status` names its other
//! groups (`also_in`).
//!
//! The groups a generation spans: those where the same server pid has sockets of that
//! generation, and, transitively, where those groups' other servers of it do. Sockets
//! registered without `server_pid` (the client library's own) link nothing: a process that
//! registers unrelated groups under the same number keeps them independent.
//!
//! All or none: every group's change is staged first (registry, pinned record, a spare
//! table, see [`Group::stage`]), then each group's live table is switched; a failure at any
//! step takes back every group already staged or switched, and the refusal names the group
//! that failed.
//!
//! NB: an agent killed while it stages leaves the groups it already staged with records
//! that hold the change, and the others without: the agent that adopts them steers each
//! group as its record says, and the operator repeats the request. Once every group is
//! staged, every record holds the change, so a kill while switching completes it everywhere.

use std::collections::{BTreeSet, HashMap, HashSet};

use reuseport_proto::{
    addr::{GroupAddr, GroupKey},
    message::{GroupStatus, Reply},
};

use crate::{
    agent::{Agent, Peer, State},
    group::Staged,
    registry::{Refusal, RegId, Registry, StateChange},
};

/// What a [`Agent::change_chosen`] chooser sees: the agent's state, locked, and the group the
/// request named.
pub(crate) struct Choice<'a> {
    pub(crate) state: &'a State,
    index: &'a ServerIndex,
    pub(crate) group: GroupKey,
    pub(crate) own_netns: u64,
}

impl Choice<'_> {
    /// The groups `generation` of the named group spans, the named group first.
    pub(crate) fn span(&self, generation: u32) -> Vec<GroupKey> {
        self.index.span(self.state, self.group, generation)
    }
}

/// Which groups each (generation, server pid) has sockets in, built once per request.
struct ServerIndex(HashMap<(u32, i32), BTreeSet<GroupKey>>);

impl ServerIndex {
    fn new(state: &State) -> Self {
        let mut index: HashMap<(u32, i32), BTreeSet<GroupKey>> = HashMap::new();
        for (key, group) in &state.groups {
            for (generation, _) in group.generation_states() {
                for pid in group.servers_of(generation) {
                    index.entry((generation, pid)).or_default().insert(*key);
                }
            }
        }
        Self(index)
    }

    /// The groups `generation` of group `first` spans, `first` first.
    fn span(&self, state: &State, first: GroupKey, generation: u32) -> Vec<GroupKey> {
        let mut keys = vec![first];
        let mut seen_servers = HashSet::new();
        let mut i = 0;
        while let Some(key) = keys.get(i).copied() {
            i += 1;
            let Some(group) = state.groups.get(&key) else {
                continue;
            };
            for pid in group.servers_of(generation) {
                if !seen_servers.insert(pid) {
                    continue;
                }
                for other in self.0.get(&(generation, pid)).into_iter().flatten() {
                    if !keys.contains(other) {
                        keys.push(*other);
                    }
                }
            }
        }
        keys
    }
}

impl State {
    /// Fills in `also_in` of every generation of `status`, the status of group `key`.
    pub(crate) fn fill_spans(&self, statuses: &mut [(GroupKey, &mut GroupStatus)], own_netns: u64) {
        let index = ServerIndex::new(self);
        for (key, status) in statuses {
            for generation in &mut status.generations {
                generation.also_in = index
                    .span(self, *key, generation.generation)
                    .into_iter()
                    .skip(1)
                    .filter_map(|k| self.groups.get(&k).map(|g| g.addr(own_netns)))
                    .collect();
            }
        }
    }
}

impl Agent {
    /// Applies `op` to `generation` in the group `wanted` names and in every other group the
    /// generation spans, all or none (see the module doc). `what` names the operation for
    /// access refusals.
    pub(crate) fn change_spanning(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        generation: u32,
        op: impl Fn(&mut Registry, u32) -> Result<Vec<StateChange>, Refusal>,
        what: &str,
    ) -> Result<Reply, Refusal> {
        self.change_chosen(peer, wanted, |_| Ok(generation), op, what)
    }

    /// [`Agent::change_spanning`] of the generation `choose` picks, under the same lock as
    /// the change itself, so that what it saw is what is changed.
    pub(crate) fn change_chosen(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        choose: impl FnOnce(&Choice<'_>) -> Result<u32, Refusal>,
        op: impl Fn(&mut Registry, u32) -> Result<Vec<StateChange>, Refusal>,
        what: &str,
    ) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let live: HashSet<RegId> = state.subscribers.keys().copied().collect();
        let first = state.find(wanted)?;
        let (first, owner) = (first.key(), first.owner_uid());
        self.access.may_change(&peer, &first, owner, what)?;
        let index = ServerIndex::new(&state);
        let generation = choose(&Choice {
            state: &state,
            index: &index,
            group: first,
            own_netns: self.own_netns,
        })?;
        let keys = index.span(&state, first, generation);
        let op = |r: &mut Registry| op(r, generation);
        let refused = |key: &GroupKey, e: Refusal| {
            if keys.len() == 1 {
                return e;
            }
            Refusal::new(
                e.kind,
                format!(
                    "{key}: {}; generation {generation} is unchanged in all {} groups it spans",
                    e.message,
                    keys.len()
                ),
            )
        };
        for key in &keys {
            let group = &state.groups[key];
            self.access
                .may_change(&peer, key, group.owner_uid(), what)
                .map_err(|e| refused(key, e))?;
        }
        let mut staged: Vec<(GroupKey, Staged)> = Vec::with_capacity(keys.len());
        for key in &keys {
            let group = state.groups.get_mut(key).expect("key from the map");
            match group.stage(&self.grace, op) {
                Ok(s) => staged.push((*key, s)),
                Err(e) => {
                    self.take_back(&mut state, staged);
                    return Err(refused(key, e));
                }
            }
        }
        for i in 0..staged.len() {
            let (key, s) = &staged[i];
            let key = *key;
            if let Err(e) = state
                .groups
                .get_mut(&key)
                .expect("staged")
                .switch(s, &self.grace)
            {
                self.take_back(&mut state, staged);
                return Err(refused(&key, e));
            }
        }
        let mut statuses = Vec::with_capacity(staged.len());
        for (key, s) in &staged {
            let group = &state.groups[key];
            state.notify(group, &s.changes, self.own_netns);
            if !s.changes.is_empty() {
                // One line per change of a group's table (a flip is two state changes).
                let changed: Vec<String> = s
                    .changes
                    .iter()
                    .map(|ch| format!("{} {}", ch.generation, ch.state))
                    .collect();
                tracing::info!(
                    group = %key, op = what, active = group.active(), changes = %changed.join(", "),
                    pid = peer.pid, uid = peer.uid, "state changed"
                );
            }
            statuses.push(self.group_status(group, &live));
        }
        let mut statuses = statuses.into_iter();
        let group = statuses.next().expect("the requested group");
        Ok(Reply::Changed {
            group,
            others: statuses.collect(),
        })
    }

    /// Takes back staged (and maybe switched) changes, the last staged first.
    fn take_back(&self, state: &mut State, staged: Vec<(GroupKey, Staged)>) {
        for (key, s) in staged.into_iter().rev() {
            if let Some(group) = state.groups.get_mut(&key) {
                group.unstage(s, &self.grace);
            }
        }
    }
}
