//! Control-plane events that `status` keeps no trace of, counted for `/metrics`: flips per
//! group and refused requests per kind. Counted whether or not `--metrics-listen` is given
//! (a few atomics), so the figures start at the agent's start, not at the first scrape.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use reuseport_proto::{
    addr::GroupKey,
    message::{ErrorKind, GenState},
};

use crate::registry::StateChange;

/// Error replies the agent sent, by kind: requests refused, and connections turned away at
/// the connection limit (`limit`).
#[derive(Default)]
pub struct Refusals([AtomicU64; ErrorKind::ALL.len()]);

impl Refusals {
    pub fn count(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("every kind is listed");
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// `(kind, refusals)` for every kind, zeros included: a series that exists from the
    /// start makes `increase()` see the first refusal.
    pub fn snapshot(&self) -> Vec<(ErrorKind, u64)> {
        ErrorKind::ALL
            .iter()
            .zip(&self.0)
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Flips per group: how often a generation became the active one (by `activate`, or by a
/// registration with `activate`). Kept in the agent's state, with the groups.
///
/// NB: behind a lock of its own: state changes are announced through a shared borrow of the
/// state (the group announced is borrowed from it). Never contended: the state lock is held.
#[derive(Default)]
pub struct Flips(Mutex<BTreeMap<GroupKey, u64>>);

impl Flips {
    pub fn record(&self, group: GroupKey, changes: &[StateChange]) {
        let flips = changes
            .iter()
            .filter(|c| c.state == GenState::Active)
            .count() as u64;
        if flips > 0 {
            *self.lock().entry(group).or_default() += flips;
        }
    }

    /// The group is gone: a group created again on the same address counts from 0 (a
    /// counter reset, which Prometheus's `rate()` and `increase()` handle).
    pub fn forget(&self, group: &GroupKey) {
        self.lock().remove(group);
    }

    pub fn of(&self, group: &GroupKey) -> u64 {
        self.lock().get(group).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupKey, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_counted_under_its_wire_name() {
        let refusals = Refusals::default();
        refusals.count(ErrorKind::Conflict);
        refusals.count(ErrorKind::Conflict);
        refusals.count(ErrorKind::Limit);
        let snapshot = refusals.snapshot();
        assert_eq!(
            snapshot.len(),
            ErrorKind::ALL.len(),
            "a series for every kind"
        );
        for (kind, n) in snapshot {
            let wire = serde_json::to_value(kind).expect("kind serializes");
            assert_eq!(wire, kind.as_str(), "the protocol's name for {kind:?}");
            let expected = match kind {
                ErrorKind::Conflict => 2,
                ErrorKind::Limit => 1,
                _ => 0,
            };
            assert_eq!(n, expected, "{kind:?}");
        }
    }

    #[test]
    fn a_flip_is_a_generation_becoming_active() {
        let key = GroupKey {
            addr: "127.0.0.1:80".parse().unwrap(),
            netns: 1,
        };
        let flips = Flips::default();
        let change = |generation, state| StateChange { generation, state };
        flips.record(
            key,
            &[change(1, GenState::Draining), change(2, GenState::Active)],
        );
        flips.record(key, &[change(3, GenState::Draining)]);
        assert_eq!(flips.of(&key), 1, "a drain alone is no flip");
        flips.forget(&key);
        assert_eq!(flips.of(&key), 0);
    }
}
