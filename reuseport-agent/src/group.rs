//! One managed group: its model, its kernel objects and its slots, changed only through
//! methods that keep its rules: a slot comes from the pool and goes back through the
//! quarantine, the record is pinned before the table it describes, the table is published
//! before a socket is attached, and a change that cannot be published is undone.

mod netns;
mod record;
mod status;

use netns::{OWN_NETNS, foreign_netns, own_netns};

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    io,
    os::fd::{BorrowedFd, OwnedFd},
};

use reuseport_common::{MAX_GENERATIONS, MAX_SLOTS};

use crate::{
    grace::{Grace, Ticket},
    kernel::{self, GroupKernel},
    pinned::GroupRecord,
    registry::{Generation, Member, Refusal, RegId, Registry, StateChange},
    slots::SlotPool,
    sockcheck::Listener,
};
use reuseport_proto::{
    addr::{GroupAddr, GroupKey},
    message::{ErrorKind, GenState, RestartOutcome},
};

/// A change staged by [`Group::stage`].
pub(crate) struct Staged {
    snap: Snapshot,
    pub(crate) changes: Vec<StateChange>,
    /// The buffer holding the new table; `None` when nothing changed.
    table: Option<u32>,
}

pub(crate) struct Group {
    key: GroupKey,
    owner_uid: u32,
    registry: Registry,
    kernel: GroupKernel,
    slots: SlotPool,
    serial: u32,
    /// The group's network namespace, for wake-ups, if it is not the agent's own (see
    /// [`foreign_netns`]). `None` for an adopted group until one of its sockets registers
    /// again.
    netns: Option<OwnedFd>,
    /// ABI version written into the pinned record (the current one, except in tests that
    /// simulate an older agent).
    record_abi: u32,
    /// Registered slots whose listener was seen closed (edge detection for wake-ups).
    closed: HashSet<u32>,
    /// What its supervisor last reported about a restart (see `restart`).
    last_restart: Option<RestartOutcome>,
    /// The record and the kernel's table lag behind the registry: a removal (which cannot be
    /// refused) failed to publish. Retried by [`Group::scan`] until it succeeds.
    stale: bool,
    /// The device its sockets are bound to (`SO_BINDTODEVICE`), `Some(None)` for none;
    /// `None` while unknown (adopted from an agent that did not keep it).
    device: Option<Option<String>>,
}

/// What a change may alter, kept to put it back if publishing the change fails.
struct Snapshot {
    generations: BTreeMap<u32, Generation>,
    last_restart: Option<RestartOutcome>,
}

/// What [`Group::scan`] found.
pub(crate) struct Scan {
    /// A registered listener closed since the last scan.
    pub(crate) newly_closed: bool,
    /// Listening sockets of the active generation.
    pub(crate) active_sockets: usize,
}

impl Group {
    /// A new group on freshly loaded kernel objects. Its (empty) record is pinned at once,
    /// before any socket is in its socket array: an agent that dies later always leaves a
    /// record to adopt, never a group whose record is missing.
    pub(crate) fn create(
        first: &Listener,
        kernel: GroupKernel,
        record_abi: u32,
    ) -> Result<Self, Refusal> {
        let mut group = Self {
            key: first.key,
            owner_uid: first.uid,
            registry: Registry::default(),
            kernel,
            slots: SlotPool::new(),
            serial: 0,
            netns: foreign_netns(&first.netns),
            record_abi,
            closed: HashSet::new(),
            last_restart: None,
            stale: false,
            device: Some(first.device.clone()),
        };
        if let Err(e) = group.save_record() {
            group.kernel.unpin();
            return Err(e);
        }
        Ok(group)
    }

    /// A group adopted from `record`, whose sockets hold the `used` slots (see
    /// [`SlotPool::adopted`]). The table is published again from the record, which completes
    /// a flip the dead agent may have been killed in the middle of.
    pub(crate) fn adopt(
        record: GroupRecord,
        kernel: GroupKernel,
        netns: Option<OwnedFd>,
        record_abi: u32,
        retired: Ticket,
        grace: &Grace,
    ) -> Result<Self, Refusal> {
        let used: Vec<u32> = record
            .registry
            .generations
            .values()
            .flat_map(|g| g.sockets.keys().copied())
            .collect();
        let mut group = Self {
            key: record.key(),
            owner_uid: record.owner_uid,
            registry: record.registry,
            kernel,
            slots: SlotPool::adopted(&used, retired),
            serial: record.serial,
            netns: netns.as_ref().and_then(foreign_netns),
            record_abi,
            closed: HashSet::new(),
            last_restart: record.last_restart,
            stale: false,
            device: record.bound_device,
        };
        group.publish(grace)?;
        Ok(group)
    }

    pub(crate) fn key(&self) -> GroupKey {
        self.key
    }

    /// The uid that owns the group's sockets (see `access`).
    pub(crate) fn owner_uid(&self) -> u32 {
        self.owner_uid
    }

    pub(crate) fn active(&self) -> Option<u32> {
        self.registry.active()
    }

    /// No socket is left: the group goes ([`Group::remove`]).
    pub(crate) fn is_empty(&self) -> bool {
        self.registry.is_empty()
    }

    pub(crate) fn state_of(&self, generation: u32) -> Option<GenState> {
        self.registry.generations.get(&generation).map(|g| g.state)
    }

    /// Each generation and its state, oldest first.
    pub(crate) fn generation_states(&self) -> impl Iterator<Item = (u32, GenState)> + '_ {
        self.registry.generations.iter().map(|(n, g)| (*n, g.state))
    }

    /// The registrations that hold sockets of `generation`.
    pub(crate) fn registrations_of(&self, generation: u32) -> BTreeSet<RegId> {
        self.registry
            .generations
            .get(&generation)
            .map(|g| g.sockets.values().map(|m| m.reg).collect())
            .unwrap_or_default()
    }

    /// Every registration that holds a socket here: those of the active generation first,
    /// then the newest generation's first.
    pub(crate) fn registrations_active_first(&self) -> Vec<RegId> {
        let mut gens: Vec<_> = self.registry.generations.iter().collect();
        gens.sort_by_key(|(n, g)| (g.state == GenState::Active, **n));
        gens.iter()
            .rev()
            .flat_map(|(_, g)| g.sockets.values().map(|m| m.reg))
            .collect()
    }

    /// Where the socket with `cookie` is registered: its generation, slot and member.
    pub(crate) fn find_socket(&self, cookie: u64) -> Option<(u32, u32, &Member)> {
        self.registry.generations.iter().find_map(|(n, g)| {
            g.sockets
                .iter()
                .find(|(_, m)| m.cookie == cookie)
                .map(|(slot, m)| (*n, *slot, m))
        })
    }

    /// Takes the network namespace of a socket that registered again, for a group adopted
    /// without one.
    pub(crate) fn learn_netns(&mut self, netns: &OwnedFd) {
        if self.netns.is_none() {
            self.netns = foreign_netns(netns);
        }
    }

    /// A descriptor of the group's network namespace (for wake-up connections); `None`
    /// while an adopted group in another namespace does not know it yet.
    pub(crate) fn netns(&self) -> Option<io::Result<OwnedFd>> {
        match &self.netns {
            Some(fd) => Some(fd.try_clone()),
            None if self.key.netns == own_netns().ok()? => {
                Some(std::fs::File::open(OWN_NETNS).map(OwnedFd::from))
            }
            None => None,
        }
    }

    /// Whether an adopted group kept the pinned program as it was.
    pub(crate) fn program_reused(&self) -> bool {
        self.kernel.program_reused()
    }

    /// The group has no socket left: its pins go. The program stays attached to the
    /// kernel's reuseport group while any socket still uses it.
    pub(crate) fn remove(self) {
        self.kernel.unpin();
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            generations: self.registry.generations.clone(),
            last_restart: self.last_restart.clone(),
        }
    }

    /// Puts the group back as `snap` describes it and republishes that, so that the record
    /// and the kernel show the old state again whatever step of the failed change had
    /// already been written. If even that fails, the group is left [`Group::stale`].
    fn undo(&mut self, snap: Snapshot, grace: &Grace) {
        self.registry.generations = snap.generations;
        self.last_restart = snap.last_restart;
        if let Err(e) = self.publish(grace) {
            self.stale = true;
            tracing::error!(
                group = %self.key, error = %e,
                "restoring the group after a failed change failed too; retrying"
            );
        }
    }

    /// The first half of a change that must happen in several groups or in none (a
    /// generation that spans groups, see `span`): applies `op` to the registry, pins the
    /// record and writes the table into a spare buffer, but leaves the live table alone.
    /// On failure nothing is changed. Follow with [`Group::switch`] or [`Group::unstage`].
    pub(crate) fn stage(
        &mut self,
        grace: &Grace,
        op: impl FnOnce(&mut Registry) -> Result<Vec<StateChange>, Refusal>,
    ) -> Result<Staged, Refusal> {
        let snap = self.snapshot();
        let weights = self.registry.weights();
        let changes = op(&mut self.registry)?;
        // NB: a new weight changes the table without changing any generation's state.
        if changes.is_empty() && !self.stale && weights == self.registry.weights() {
            return Ok(Staged {
                snap,
                changes,
                table: None,
            });
        }
        match self.stage_table(grace) {
            Ok(table) => Ok(Staged {
                snap,
                changes,
                table: Some(table),
            }),
            Err(e) => {
                self.undo(snap, grace);
                Err(e)
            }
        }
    }

    /// Makes a staged change live (one write in the kernel). On failure the live table is
    /// the old one still: [`Group::unstage`] puts the record back too.
    pub(crate) fn switch(&mut self, staged: &Staged, grace: &Grace) -> Result<(), Refusal> {
        crate::fault::fail("switch.table")
            .map_err(|e| kernel_refusal(kernel::injected("switching the steering table", e)))?;
        match staged.table {
            Some(table) => self.switch_table(table, grace),
            None => Ok(()),
        }
    }

    /// Takes back a staged change, switched or not: the registry, the record and the live
    /// table show the state before it again (see [`Group::undo`]).
    pub(crate) fn unstage(&mut self, staged: Staged, grace: &Grace) {
        if staged.table.is_some() {
            self.undo(staged.snap, grace);
        }
    }

    /// The server pids that named themselves (`server_pid`) for sockets of `generation`.
    pub(crate) fn servers_of(&self, generation: u32) -> impl Iterator<Item = i32> + '_ {
        self.registry
            .generations
            .get(&generation)
            .into_iter()
            .flat_map(|g| g.sockets.values())
            .filter(|m| m.server)
            .map(|m| m.pid)
    }

    /// Adds `socket` to `generation` (see [`Registry::register`]) in a free slot, publishes
    /// the table and attaches the program through the socket. All or nothing: on failure
    /// the slot is free again (after a grace period) and nothing else changed.
    pub(crate) fn add_socket(
        &mut self,
        grace: &Grace,
        socket: BorrowedFd<'_>,
        generation: u32,
        name: Option<String>,
        activate: bool,
        member: Member,
    ) -> Result<(u32, Vec<StateChange>), Refusal> {
        if !self.registry.generations.contains_key(&generation)
            && self.registry.generations.len() >= MAX_GENERATIONS as usize
        {
            return Err(Refusal::new(
                ErrorKind::Limit,
                format!(
                    "group {} already holds {MAX_GENERATIONS} generations: stop the servers of \
                     a drained generation before registering generation {generation}",
                    self.key
                ),
            ));
        }
        let slot = self.slots.alloc(grace).ok_or_else(|| {
            Refusal::new(
                ErrorKind::Limit,
                format!(
                    "group {} is full: it already holds {MAX_SLOTS} sockets",
                    self.key
                ),
            )
        })?;
        // NB: back through the quarantine, not straight to the free list: a failed attach
        // happens after a table naming this slot was published.
        let release = |group: &mut Self| {
            let _ = group.kernel.clear_slot(slot);
            group.slots.release(slot, grace.retire());
        };
        if let Err(e) = self
            .kernel
            .reset_counters(slot)
            .and_then(|()| self.kernel.set_slot(slot, socket))
        {
            release(self);
            return Err(kernel_refusal(e));
        }
        crate::fault::point("register.slot-set");
        let snap = self.snapshot();
        // NB: publish before attaching: a group that still runs an older program (or none)
        // must switch straight to a table that knows this socket.
        let changes = self
            .registry
            .register(generation, name, activate, slot, member);
        if let Err(e) = self.publish(grace).and_then(|()| self.attach(socket)) {
            self.undo(snap, grace);
            release(self);
            return Err(e);
        }
        Ok((slot, changes))
    }

    /// A socket the group already holds comes back on registration `reg` of process `pid`
    /// (its client reconnected after an agent restart). All or nothing, like
    /// [`Group::add_socket`]. Returns its generation and slot.
    pub(crate) fn reclaim(
        &mut self,
        grace: &Grace,
        socket: BorrowedFd<'_>,
        cookie: u64,
        reg: RegId,
        pid: i32,
    ) -> Result<(u32, u32), Refusal> {
        let snap = self.snapshot();
        let (generation, slot, member) = self
            .registry
            .find_cookie(cookie)
            .expect("the caller checked the cookie");
        member.reg = reg;
        member.pid = pid;
        // NB: attaching replaces an adopted group's program (possibly an older build) with
        // this agent's, atomically for the kernel; the maps stay the same.
        if let Err(e) = self.publish(grace).and_then(|()| self.attach(socket)) {
            self.undo(snap, grace);
            return Err(e);
        }
        Ok((generation, slot))
    }

    fn attach(&self, socket: BorrowedFd<'_>) -> Result<(), Refusal> {
        crate::fault::fail("attach").map_err(|e| kernel_refusal(kernel::injected("attach", e)))?;
        self.kernel.attach(socket).map_err(kernel_refusal)
    }

    /// Pins the group's record and makes the kernel follow the table for the registry as it
    /// is now (see [`GroupKernel::stage`] and [`GroupKernel::switch`]).
    fn publish(&mut self, grace: &Grace) -> Result<(), Refusal> {
        let table = self.stage_table(grace)?;
        self.switch_table(table, grace)
    }

    /// Pins the record of the registry as it is now and writes its table into a spare
    /// buffer (see [`GroupKernel::stage`]); returns the buffer for [`Group::switch_table`].
    fn stage_table(&mut self, grace: &Grace) -> Result<u32, Refusal> {
        self.serial = self.serial.wrapping_add(1);
        let cfg = self.registry.steering_config(self.serial);
        // NB: the record first: an agent killed anywhere in here leaves a record that is
        // either the old state or the new one, and the agent that adopts the group
        // republishes the table from the record.
        self.save_record()?;
        crate::fault::point(crate::fault::BETWEEN_RECORD_AND_TABLE);
        crate::fault::fail("publish.table")
            .map_err(|e| kernel_refusal(kernel::injected("writing the steering table", e)))?;
        self.kernel.stage(&cfg, grace).map_err(kernel_refusal)
    }

    fn switch_table(&mut self, table: u32, grace: &Grace) -> Result<(), Refusal> {
        self.kernel.switch(table, grace).map_err(kernel_refusal)?;
        self.stale = false;
        Ok(())
    }

    /// Takes the sockets of registration `reg` out of the group (see
    /// [`Group::remove_slots`]); false if it had none here.
    pub(crate) fn remove_registration(&mut self, reg: RegId, grace: &Grace) -> bool {
        let mine: Vec<u32> = self
            .registry
            .generations
            .values()
            .flat_map(|g| g.sockets.iter().filter(|(_, m)| m.reg == reg))
            .map(|(slot, _)| *slot)
            .collect();
        if mine.is_empty() {
            return false;
        }
        self.remove_slots(&mine, grace);
        true
    }

    /// Takes the sockets in `slots` out of the group: what they counted stays with their
    /// generation (if it lives on), the table is republished, and the slots return to the
    /// pool once no program invocation can still pick them.
    ///
    /// NB: a removal cannot be refused (the socket's registration or listener is gone): if
    /// publishing fails, the group is left [`Group::stale`] and [`Group::scan`] publishes it
    /// again until that succeeds. Until then the old table may still name the slots, whose
    /// sockets the kernel stops selecting once they close.
    fn remove_slots(&mut self, slots: &[u32], grace: &Grace) {
        for g in self.registry.generations.values_mut() {
            for slot in slots.iter().filter(|s| g.sockets.contains_key(s)) {
                g.retired_counters.add(&self.kernel.counters(*slot));
            }
        }
        let freed = self.registry.remove_slots(slots);
        if let Err(e) = self.publish(grace) {
            self.stale = true;
            tracing::error!(group = %self.key, error = %e, "republishing after sockets left failed; retrying");
        }
        let ticket = grace.retire();
        for slot in freed {
            let _ = self.kernel.clear_slot(slot);
            self.slots.release(slot, ticket);
            self.closed.remove(&slot);
        }
    }

    /// The periodic check of the group: publishes a [`Group::stale`] group again, drops
    /// adopted sockets whose client never came back once their listener closed (no
    /// connection close will ever unregister them), and reports listeners that closed.
    pub(crate) fn scan(&mut self, registered: impl Fn(RegId) -> bool, grace: &Grace) -> Scan {
        if self.stale
            && let Err(e) = self.publish(grace)
        {
            tracing::debug!(group = %self.key, error = %e, "republishing a stale group failed again");
        }
        let orphans: Vec<u32> = self
            .registry
            .generations
            .values()
            .flat_map(|g| g.sockets.iter())
            .filter(|(slot, m)| !registered(m.reg) && !self.listening(**slot, m))
            .map(|(slot, _)| *slot)
            .collect();
        if !orphans.is_empty() {
            self.remove_slots(&orphans, grace);
            tracing::info!(group = %self.key, slots = ?orphans, "closed sockets that were not registered again left the group");
        }
        let mut scan = Scan {
            newly_closed: false,
            active_sockets: 0,
        };
        let mut closed = std::mem::take(&mut self.closed);
        for g in self.registry.generations.values() {
            for (slot, m) in &g.sockets {
                if self.listening(*slot, m) {
                    closed.remove(slot);
                    scan.active_sockets += usize::from(g.state == GenState::Active);
                } else {
                    scan.newly_closed |= closed.insert(*slot);
                }
            }
        }
        self.closed = closed;
        scan
    }

    /// Refuses a socket bound to another device than the group's (`SO_BINDTODEVICE`): the
    /// kernel keeps it in a reuseport group of its own, which this group's program never
    /// steers, so the agent would show as one group what the kernel treats as two. A group
    /// whose device is unknown takes the socket's.
    pub(crate) fn admit_device(&mut self, listener: &Listener) -> Result<(), Refusal> {
        let Some(ours) = &self.device else {
            self.device = Some(listener.device.clone());
            return Ok(());
        };
        if *ours == listener.device {
            return Ok(());
        }
        let name = |d: &Option<String>| match d {
            Some(d) => format!("device {d:?}"),
            None => "no device".to_owned(),
        };
        Err(Refusal::new(
            ErrorKind::InvalidSocket,
            format!(
                "the socket is bound to {} (SO_BINDTODEVICE) and the sockets of {} to {}: the \
                 kernel keeps them in separate reuseport groups; bind every socket of a group \
                 to the same device, or to none",
                name(&listener.device),
                self.key,
                name(ours)
            ),
        ))
    }

    /// Whether any socket of `generation` is still in the kernel's socket array (its
    /// listener open).
    pub(crate) fn listens(&self, generation: u32) -> bool {
        self.registry
            .generations
            .get(&generation)
            .is_some_and(|g| g.sockets.iter().any(|(slot, m)| self.listening(*slot, m)))
    }

    pub(crate) fn listening(&self, slot: u32, m: &Member) -> bool {
        self.kernel.slot_cookie(slot) == Some(m.cookie)
    }

    /// The address users see: without `@NETNS` when the group lives in the agent's own
    /// network namespace (the common case), with it otherwise.
    pub(crate) fn addr(&self, own_netns: u64) -> GroupAddr {
        GroupAddr {
            addr: self.key.addr,
            netns: (self.key.netns != own_netns).then_some(self.key.netns),
        }
    }
}

pub(crate) fn kernel_refusal(e: kernel::KernelError) -> Refusal {
    // NB: the error's Display already ends with its source; no cause chain to append.
    Refusal::new(ErrorKind::Kernel, e.to_string())
}
