//! The sockarray slots of one group: which are free, and which wait out a grace period
//! before reuse (a program invocation may still select a freed slot's old socket until then).

use std::collections::BTreeSet;

use reuseport_common::MAX_SLOTS;

use crate::grace::{Grace, Ticket};

/// Sockarray slots of a group: free ones, and freed ones that a program may still select
/// until an RCU grace period has passed.
pub(crate) struct SlotPool {
    free: BTreeSet<u32>,
    quarantine: Vec<(u32, Ticket)>,
}

impl SlotPool {
    pub(crate) fn new() -> Self {
        Self {
            free: (0..MAX_SLOTS).collect(),
            quarantine: Vec::new(),
        }
    }

    /// The pool of an adopted group: `used` slots are taken; every other one may have been
    /// freed by the dead agent less than a grace period ago, so it is quarantined until
    /// `ticket` has passed.
    pub(crate) fn adopted(used: &[u32], ticket: Ticket) -> Self {
        Self {
            free: BTreeSet::new(),
            quarantine: (0..MAX_SLOTS)
                .filter(|s| !used.contains(s))
                .map(|s| (s, ticket))
                .collect(),
        }
    }

    pub(crate) fn alloc(&mut self, grace: &Grace) -> Option<u32> {
        if self.free.is_empty() {
            let oldest = self.quarantine.iter().map(|(_, t)| *t).min()?;
            grace.wait(oldest);
            self.quarantine.retain(|(slot, t)| {
                let done = grace.passed(*t);
                if done {
                    self.free.insert(*slot);
                }
                !done
            });
        }
        self.free.pop_first()
    }

    pub(crate) fn release(&mut self, slot: u32, ticket: Ticket) {
        self.quarantine.push((slot, ticket));
    }
}
