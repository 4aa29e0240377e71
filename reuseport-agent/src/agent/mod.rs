//! The agent daemon: owns the kernel program of every group it manages and answers the
//! control protocol.
//!
//! - [`registry`]: the model of a group (generations, states, slots) and the policy table.
//! - [`group`]: one managed group: model, kernel objects, slot allocation, status.
//! - [`steering`]: the kernel objects of a group and the atomic table flip.
//! - [`grace`]: RCU grace periods that make rewriting a retired table safe.
//! - [`sockcheck`]: validation of sockets passed for registration.
//! - [`server`]: the control socket.
//! - [`access`]: who may do what (SO_PEERCRED, the control group).
//! - [`conns`]: bounds on control connections (count, time, size).
//! - [`control_socket`]: the control socket's file (mode, group, stale and live sockets).
//! - [`wake`]: wake-ups for connections migrated to a listener without a wake-up.

mod access;
mod bpffs;
mod conns;
mod control_socket;
mod grace;
mod group;
mod registry;
mod server;
mod sockcheck;
mod steering;
mod sys;
mod wake;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use reuseport_common::MAX_SLOTS;
use tokio::sync::mpsc::UnboundedSender;

pub use self::{conns::DEFAULT_MAX_CONNECTIONS, server::run, steering::Mode};
use self::{
    grace::Grace,
    group::{Group, SlotPool, kernel_refusal, spawn_logger},
    registry::{Member, Refusal, RegId, Registry, StateChange},
    steering::GroupKernel,
};
use crate::{
    addr::{GroupAddr, GroupKey},
    protocol::{ErrorKind, GenState, GroupStatus, Limits, MAX_NAME_LEN, Reply},
};

/// Default of `reuseport-agent --max-groups`: each group costs a loaded program, its maps
/// and about a dozen descriptors.
pub const DEFAULT_MAX_GROUPS: u32 = 256;

/// Command-line options of `reuseport-agent`.
#[derive(Clone, Debug)]
pub struct Options {
    pub control: PathBuf,
    pub bpffs: PathBuf,
    pub select_only: bool,
    /// Make wake-up connections after a registered listener closes (see [`wake`]). Off
    /// only in tests that measure what the kernel does by itself.
    pub wake_ups: bool,
    /// Group name or numeric gid whose members may activate and drain any group; the
    /// control socket belongs to it.
    pub control_group: Option<String>,
    /// Groups this agent manages at most.
    pub max_groups: u32,
    /// Control connections open at once at most (lowered to what RLIMIT_NOFILE allows).
    pub max_connections: u32,
}

/// Who is on the other end of a control connection (SO_PEERCRED, SO_PEERGROUPS); see
/// [`access`].
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    /// The control group is the peer's primary or a supplementary group.
    pub in_control_group: bool,
}

#[derive(Default)]
struct State {
    groups: BTreeMap<GroupKey, Group>,
    /// Where to push state changes for each live registration.
    subscribers: HashMap<RegId, UnboundedSender<Reply>>,
}

impl State {
    fn find(&mut self, wanted: &GroupAddr) -> Result<&mut Group, Refusal> {
        let matches: Vec<GroupKey> = self
            .groups
            .keys()
            .filter(|k| k.matches(wanted))
            .copied()
            .collect();
        match matches.as_slice() {
            [key] => Ok(self.groups.get_mut(key).expect("key from the map")),
            [] => {
                let known: Vec<String> = self.groups.keys().map(|k| k.to_string()).collect();
                Err(Refusal::new(
                    ErrorKind::UnknownGroup,
                    format!(
                        "unknown group {wanted}: the agent manages {}",
                        if known.is_empty() {
                            "no group yet".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                ))
            }
            many => Err(Refusal::new(
                ErrorKind::BadRequest,
                format!(
                    "{wanted} exists in several network namespaces ({}): add @NETNS to the address",
                    many.iter()
                        .map(|k| k.netns.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Refuses a new group beyond `max` (`--max-groups`).
    fn room_for_group(&self, max: u32) -> Result<(), Refusal> {
        if self.groups.len() < max as usize {
            return Ok(());
        }
        Err(Refusal::new(
            ErrorKind::Limit,
            format!(
                "the agent already manages {max} groups, its limit: close the registrations of \
                 a group, or restart the agent with a higher --max-groups"
            ),
        ))
    }

    fn notify(&self, group: &Group, changes: &[StateChange], own_netns: u64) {
        for ch in changes {
            let Some(g) = group.registry.generations.get(&ch.generation) else {
                continue;
            };
            let regs: BTreeSet<RegId> = g.sockets.values().map(|m| m.reg).collect();
            for reg in regs {
                if let Some(tx) = self.subscribers.get(&reg) {
                    let _ = tx.send(Reply::State {
                        group: group.addr(own_netns),
                        generation: ch.generation,
                        state: ch.state,
                    });
                }
            }
        }
    }
}

/// What one registration asks for.
pub struct Registration {
    pub group: GroupAddr,
    pub generation: u32,
    pub name: Option<String>,
    pub activate: bool,
}

pub struct Agent {
    state: Mutex<State>,
    grace: Grace,
    mode: Mode,
    bpffs: PathBuf,
    next_reg: AtomicU64,
    /// Inode of the agent's own network namespace.
    own_netns: u64,
    wake_ups: bool,
    access: access::Policy,
    max_groups: u32,
    /// Reported in `status`; enforced by the server's admission.
    max_connections: u32,
}

impl Agent {
    fn new(mode: Mode, bpffs: PathBuf, wake_ups: bool) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(Self {
            state: Mutex::new(State::default()),
            grace: Grace::start()?,
            mode,
            bpffs,
            next_reg: AtomicU64::new(1),
            own_netns: std::fs::metadata("/proc/self/ns/net")?.ino(),
            wake_ups,
            access: access::Policy::default(),
            max_groups: DEFAULT_MAX_GROUPS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            groups: self.max_groups,
            sockets_per_group: MAX_SLOTS,
            generations_per_group: MAX_SLOTS,
            control_connections: self.max_connections,
        }
    }

    fn group_status(&self, group: &Group) -> GroupStatus {
        GroupStatus {
            limits: Some(self.limits()),
            ..group.status(self.own_netns)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("agent state poisoned")
    }

    pub fn next_reg_id(&self) -> RegId {
        self.next_reg.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a listening socket to its group (creating the group on first use).
    pub fn register(
        &self,
        peer: Peer,
        reg: RegId,
        socket: OwnedFd,
        req: Registration,
        events: UnboundedSender<Reply>,
    ) -> Result<Reply, Refusal> {
        if let Some(name) = &req.name
            && (name.len() > MAX_NAME_LEN || name.chars().any(char::is_control))
        {
            return Err(Refusal::new(
                ErrorKind::BadRequest,
                format!("generation name must be at most {MAX_NAME_LEN} printable characters"),
            ));
        }
        let listener = sockcheck::check(socket.as_fd(), &req.group)?;
        self.access.may_register(&peer, listener.uid)?;
        let mut state = self.lock();
        let key = listener.key;
        match state.groups.get(&key) {
            Some(g) => self.access.may_join(&key, g.owner_uid, listener.uid)?,
            None => state.room_for_group(self.max_groups)?,
        }
        let created = !state.groups.contains_key(&key);
        if created {
            let pin_dir = self.bpffs.join(key.pin_name());
            let mut kernel = GroupKernel::create(self.mode, &pin_dir).map_err(kernel_refusal)?;
            let logger = kernel.take_logger().and_then(spawn_logger);
            state.groups.insert(
                key,
                Group {
                    key,
                    owner_uid: listener.uid,
                    registry: Registry::default(),
                    kernel,
                    slots: SlotPool::new(),
                    serial: 0,
                    netns: listener.netns,
                    closed: HashSet::new(),
                    logger,
                },
            );
            tracing::info!(group = %key, mode = self.mode.as_str(), "group created");
        }
        let result = self.add_socket(
            &mut state,
            key,
            peer,
            reg,
            &socket,
            &req,
            listener.uid,
            listener.cookie,
        );
        match result {
            Ok((slot, changes)) => {
                state.subscribers.insert(reg, events);
                let group = &state.groups[&key];
                state.notify(group, &changes, self.own_netns);
                let gen_state = group.registry.generations[&req.generation].state;
                tracing::info!(
                    group = %key, generation = req.generation, slot, pid = peer.pid,
                    state = %gen_state, "socket registered"
                );
                Ok(Reply::Registered {
                    group: group.addr(self.own_netns),
                    generation: req.generation,
                    slot,
                    state: gen_state,
                })
            }
            Err(e) => {
                if created && state.groups[&key].registry.is_empty() {
                    let g = state.groups.remove(&key).expect("just created");
                    g.kernel.unpin();
                }
                Err(e)
            }
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; a struct would only rename them"
    )]
    fn add_socket(
        &self,
        state: &mut State,
        key: GroupKey,
        peer: Peer,
        reg: RegId,
        socket: &OwnedFd,
        req: &Registration,
        uid: u32,
        cookie: u64,
    ) -> Result<(u32, Vec<StateChange>), Refusal> {
        let group = state.groups.get_mut(&key).expect("group exists");
        let slot = group.slots.alloc(&self.grace).ok_or_else(|| {
            Refusal::new(
                ErrorKind::Limit,
                format!("group {key} is full: it already holds {MAX_SLOTS} sockets"),
            )
        })?;
        // NB: back through the quarantine, not straight to the free list: a failed attach
        // happens after a table naming this slot was published.
        let undo_slot = |group: &mut Group| {
            let _ = group.kernel.clear_slot(slot);
            group.slots.release(slot, self.grace.retire());
        };
        if let Err(e) = group
            .kernel
            .reset_counters(slot)
            .and_then(|()| group.kernel.set_slot(slot, socket.as_fd()))
        {
            undo_slot(group);
            return Err(kernel_refusal(e));
        }
        let member = Member {
            reg,
            pid: peer.pid,
            uid,
            cookie,
        };
        let changes =
            group
                .registry
                .register(req.generation, req.name.clone(), req.activate, slot, member);
        // NB: publish before attaching: a group that still runs an older program (or none)
        // must switch straight to a table that knows this socket.
        if let Err(e) = group
            .publish(&self.grace)
            .and_then(|()| group.kernel.attach(socket.as_fd()).map_err(kernel_refusal))
        {
            group.registry.unregister(reg);
            let _ = group.publish(&self.grace);
            undo_slot(group);
            return Err(e);
        }
        Ok((slot, changes))
    }

    /// Removes the sockets of a closed registration and republishes the table.
    pub fn unregister(&self, reg: RegId) {
        let mut state = self.lock();
        state.subscribers.remove(&reg);
        let mut emptied = Vec::new();
        for (key, group) in &mut state.groups {
            let had_active = group.registry.active();
            let mine: Vec<(u32, u32)> = group
                .registry
                .generations
                .iter()
                .flat_map(|(n, g)| {
                    g.sockets
                        .iter()
                        .filter(|(_, m)| m.reg == reg)
                        .map(move |(slot, _)| (*slot, *n))
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            // Keep what the freed slots counted with their generation, if it lives on.
            for (slot, generation) in &mine {
                let c = group.kernel.counters(*slot);
                if let Some(g) = group.registry.generations.get_mut(generation) {
                    g.retired_counters.selected += c.selected;
                    g.retired_counters.fallback += c.fallback;
                    g.retired_counters.migrated += c.migrated;
                }
            }
            let freed = group.registry.unregister(reg);
            if let Err(e) = group.publish(&self.grace) {
                tracing::error!(group = %key, error = %e, "republishing after unregister failed");
            }
            let ticket = self.grace.retire();
            for slot in freed {
                let _ = group.kernel.clear_slot(slot);
                group.slots.release(slot, ticket);
                group.closed.remove(&slot);
            }
            tracing::info!(group = %key, reg, "registration closed; its sockets left the group");
            if had_active.is_some()
                && group.registry.active().is_none()
                && !group.registry.is_empty()
            {
                tracing::warn!(
                    group = %key,
                    "the active generation is gone; new connections fall back to the newest \
                     draining generation until another one is activated"
                );
            }
            if group.registry.is_empty() {
                emptied.push(*key);
            }
        }
        for key in emptied {
            if let Some(g) = state.groups.remove(&key) {
                g.kernel.unpin();
                tracing::info!(group = %key, "group removed: no registered socket left");
            }
        }
    }

    pub fn activate(
        &self,
        peer: Peer,
        group: &GroupAddr,
        generation: u32,
    ) -> Result<Reply, Refusal> {
        self.change(peer, group, |r| r.activate(generation), "activate")
    }

    pub fn drain(&self, peer: Peer, group: &GroupAddr, generation: u32) -> Result<Reply, Refusal> {
        self.change(peer, group, |r| r.drain(generation), "drain")
    }

    fn change(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        op: impl FnOnce(&mut Registry) -> Result<Vec<StateChange>, Refusal>,
        what: &str,
    ) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let group = state.find(wanted)?;
        self.access
            .may_change(&peer, &group.key, group.owner_uid, what)?;
        let changes = op(&mut group.registry)?;
        if !changes.is_empty() {
            group.publish(&self.grace)?;
        }
        let key = group.key;
        let status = self.group_status(group);
        let group = &state.groups[&key];
        state.notify(group, &changes, self.own_netns);
        for ch in &changes {
            tracing::info!(group = %key, generation = ch.generation, state = %ch.state, "state changed");
        }
        Ok(Reply::Changed { group: status })
    }

    pub fn status(&self, wanted: Option<&GroupAddr>) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let groups = match wanted {
            Some(w) => vec![self.group_status(state.find(w)?)],
            None => state
                .groups
                .values()
                .map(|g| self.group_status(g))
                .collect(),
        };
        Ok(Reply::Status { groups })
    }

    /// Looks for registered listeners that closed since the last scan; returns the wake-ups
    /// their groups need (see [`wake`]).
    fn scan_closed(&self) -> Vec<wake::WakeUp> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for group in state.groups.values_mut() {
            let mut newly_closed = false;
            let mut active_sockets = 0;
            let mut closed = std::mem::take(&mut group.closed);
            for g in group.registry.generations.values() {
                for (slot, m) in &g.sockets {
                    let listening = group.listening(*slot, m);
                    if listening {
                        closed.remove(slot);
                        active_sockets += usize::from(g.state == GenState::Active);
                    } else {
                        newly_closed |= closed.insert(*slot);
                    }
                }
            }
            group.closed = closed;
            if newly_closed
                && active_sockets > 0
                && self.mode == Mode::SelectOrMigrate
                && self.wake_ups
            {
                match group.netns.try_clone() {
                    Ok(netns) => out.push(wake::WakeUp {
                        target: wake::target_for(group.key.addr),
                        netns,
                        connections: active_sockets + 1,
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "wake-up: cannot duplicate the netns descriptor")
                    }
                }
            }
        }
        out
    }
}
