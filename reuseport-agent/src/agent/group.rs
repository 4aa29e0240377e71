//! One managed group: its model, its kernel objects, its slot allocation.

use std::{
    collections::{BTreeSet, HashSet},
    os::fd::OwnedFd,
};

use reuseport_common::MAX_SLOTS;

use super::{
    grace::{Grace, Ticket},
    live,
    pinned::{self, GroupRecord},
    registry::{Member, Refusal, RegId, Registry},
    steering::{self, GroupKernel},
};
use crate::{
    addr::{GroupAddr, GroupKey},
    protocol::{
        DrainPhase, ErrorKind, GenState, GenerationStatus, GroupStatus, RestartOutcome,
        SocketStatus,
    },
};

/// Sockarray slots of a group: free ones, and freed ones that a program may still select
/// until an RCU grace period has passed.
pub(super) struct SlotPool {
    pub(super) free: BTreeSet<u32>,
    quarantine: Vec<(u32, Ticket)>,
}

impl SlotPool {
    pub(super) fn new() -> Self {
        Self {
            free: (0..MAX_SLOTS).collect(),
            quarantine: Vec::new(),
        }
    }

    /// The pool of an adopted group: `used` slots are taken; every other one may have been
    /// freed by the dead agent less than a grace period ago, so it is quarantined until
    /// `ticket` has passed.
    pub(super) fn adopted(used: &[u32], ticket: Ticket) -> Self {
        Self {
            free: BTreeSet::new(),
            quarantine: (0..MAX_SLOTS)
                .filter(|s| !used.contains(s))
                .map(|s| (s, ticket))
                .collect(),
        }
    }

    pub(super) fn alloc(&mut self, grace: &Grace) -> Option<u32> {
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

    pub(super) fn release(&mut self, slot: u32, ticket: Ticket) {
        self.quarantine.push((slot, ticket));
    }
}

pub(super) struct Group {
    pub(super) key: GroupKey,
    pub(super) owner_uid: u32,
    pub(super) registry: Registry,
    pub(super) kernel: GroupKernel,
    pub(super) slots: SlotPool,
    pub(super) serial: u32,
    /// The group's network namespace, for wake-ups. `None` for an adopted group until one
    /// of its sockets registers again.
    pub(super) netns: Option<OwnedFd>,
    /// ABI version written into the pinned record (the current one, except in tests that
    /// simulate an older agent).
    pub(super) record_abi: u32,
    /// Where the pinned record is encoded (see [`pinned::buffer`]).
    pub(super) record_buf: Box<reuseport_common::PinnedState>,
    /// Registered slots whose listener was seen closed (edge detection for wake-ups).
    pub(super) closed: HashSet<u32>,
    pub(super) logger: Option<tokio::task::JoinHandle<()>>,
    /// What its supervisor last reported about a restart (see `restart`).
    pub(super) last_restart: Option<RestartOutcome>,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(task) = self.logger.take() {
            task.abort();
        }
    }
}

impl Group {
    /// Pins the group's record and makes the kernel follow the table for the registry as it
    /// is now (see [`GroupKernel::publish`]).
    pub(super) fn publish(&mut self, grace: &Grace) -> Result<(), Refusal> {
        self.serial = self.serial.wrapping_add(1);
        let cfg = self.registry.steering_config(self.serial);
        // NB: the record first: an agent killed anywhere in here leaves a record that is
        // either the old state or the new one, and the agent that adopts the group
        // republishes the table from the record.
        self.save_record()?;
        self.kernel.publish(&cfg, grace).map_err(kernel_refusal)
    }

    /// Takes the sockets in `slots` out of the group: what they counted stays with their
    /// generation (if it lives on), the table is republished, and the slots return to the
    /// pool once no program invocation can still pick them.
    pub(super) fn remove_slots(&mut self, slots: &[u32], grace: &Grace) -> Result<(), Refusal> {
        for g in self.registry.generations.values_mut() {
            for slot in slots.iter().filter(|s| g.sockets.contains_key(s)) {
                let c = self.kernel.counters(*slot);
                g.retired_counters.selected += c.selected;
                g.retired_counters.fallback += c.fallback;
                g.retired_counters.migrated += c.migrated;
            }
        }
        let freed = self.registry.remove_slots(slots);
        let published = self.publish(grace);
        let ticket = grace.retire();
        for slot in freed {
            let _ = self.kernel.clear_slot(slot);
            self.slots.release(slot, ticket);
            self.closed.remove(&slot);
        }
        published
    }

    /// Pins the record alone (for what the kernel program does not read).
    pub(super) fn save_record(&mut self) -> Result<(), Refusal> {
        pinned::encode(&self.record(), self.record_abi, &mut self.record_buf)?;
        self.kernel
            .write_record(&self.record_buf)
            .map_err(kernel_refusal)
    }

    fn record(&self) -> GroupRecord {
        GroupRecord {
            addr: self.key.addr,
            netns: self.key.netns,
            owner_uid: self.owner_uid,
            serial: self.serial,
            program: self.kernel.program_id(),
            // NB: a clone per publish (at most MAX_SLOTS members): simpler than a borrowing
            // twin of the record type, and publishes are not a hot path.
            registry: Registry {
                generations: self.registry.generations.clone(),
            },
            last_restart: self.last_restart.clone(),
        }
    }

    pub(super) fn listening(&self, slot: u32, m: &Member) -> bool {
        self.kernel.slot_cookie(slot) == Some(m.cookie)
    }

    /// The address users see: without `@NETNS` when the group lives in the agent's own
    /// network namespace (the common case), with it otherwise.
    pub(super) fn addr(&self, own_netns: u64) -> GroupAddr {
        GroupAddr {
            addr: self.key.addr,
            netns: (self.key.netns != own_netns).then_some(self.key.netns),
        }
    }

    pub(super) fn status(&self, own_netns: u64, registered: impl Fn(RegId) -> bool) -> GroupStatus {
        let mut active_listening = false;
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
                        let c = self.kernel.counters(*slot);
                        counters.selected += c.selected;
                        counters.fallback += c.fallback;
                        counters.migrated += c.migrated;
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
                    counters,
                    live: None,
                    drain: g
                        .drain_step
                        .clone()
                        .filter(|_| g.state == GenState::Draining)
                        .map(DrainPhase::from),
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
    pub(super) fn probe(&self) -> live::Probe {
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

pub(super) fn kernel_refusal(e: steering::SteeringError) -> Refusal {
    // NB: the error's Display already ends with its source; no cause chain to append.
    Refusal::new(ErrorKind::Kernel, e.to_string())
}

/// Forwards the program's rare-event log lines (aya-log) while the group lives.
pub(super) fn spawn_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> Option<tokio::task::JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let _entered = handle.enter();
    // SAFETY: the logger owns its ring buffer descriptor and keeps it open until dropped,
    // which happens only with the AsyncFd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(error = %e, "program logger unavailable");
            return None;
        }
    };
    Some(handle.spawn(async move {
        let mut fd = fd;
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
