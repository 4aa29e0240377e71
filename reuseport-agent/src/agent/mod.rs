//! The agent daemon: owns the kernel program of every group it manages and answers the
//! control protocol.
//!
//! - [`registry`]: the model of a group (generations, states, slots) and the policy table.
//! - [`group`]: one managed group: model, kernel objects, slot allocation, status.
//! - [`steering`]: the kernel objects of a group and the atomic table flip.
//! - [`pinned`]: the record pinned with a group's maps, and its adoption after a restart.
//! - [`grace`]: RCU grace periods that make rewriting a retired table safe.
//! - [`sockcheck`]: validation of sockets passed for registration.
//! - [`restart`]: `restart` requests relayed to a group's supervisor and back.
//! - [`mailbox`]: what is pushed to a connection, bounded however slowly it reads.
//! - [`server`]: the control socket.
//! - [`access`]: who may do what (SO_PEERCRED, the control group).
//! - [`conns`]: bounds on control connections (count, time, size).
//! - [`control_socket`]: the control socket's file (mode, group, stale and live sockets).
//! - [`wake`]: wake-ups for connections migrated to a listener without a wake-up.
//! - [`fault`]: fault-injection points for the tests (a feature of test builds).

mod access;
mod bpffs;
mod conns;
mod control_socket;
pub mod fault;
mod grace;
mod group;
mod mailbox;
mod pinned;
mod registry;
mod restart;
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
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use reuseport_common::{ABI_VERSION, ADOPTABLE_ABI, MAX_SLOTS};

pub use self::{
    conns::DEFAULT_MAX_CONNECTIONS, restart::DEFAULT_RESTART_TIMEOUT, server::run, steering::Mode,
};
use self::{
    grace::Grace,
    group::{Group, kernel_refusal},
    mailbox::Mailbox,
    registry::{Member, Refusal, RegId, Registry, StateChange},
    steering::{GroupKernel, PinnedRecord},
};
use crate::{
    addr::{GroupAddr, GroupKey},
    protocol::{ErrorKind, GroupStatus, Limits, Reply},
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
    /// ABI version written into pinned records: [`reuseport_common::ABI_VERSION`] except in
    /// tests that simulate an older agent.
    pub pin_abi: u32,
    /// Group name or numeric gid whose members may activate and drain any group; the
    /// control socket belongs to it.
    pub control_group: Option<String>,
    /// Groups this agent manages at most.
    pub max_groups: u32,
    /// Control connections open at once at most (lowered to what RLIMIT_NOFILE allows).
    pub max_connections: u32,
    /// How long a restart may wait for its supervisor's outcome.
    pub restart_timeout: Duration,
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
    subscribers: HashMap<RegId, Arc<Mailbox>>,
    /// Supervised registrations and restarts waiting for their supervisor.
    restarts: restart::Restarts,
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

    /// Drops groups left without a socket, and their pins.
    fn remove_groups(&mut self, keys: &[GroupKey]) {
        for key in keys {
            if let Some(g) = self.groups.remove(key) {
                g.kernel.unpin();
                tracing::info!(group = %key, "group removed: no registered socket left");
            }
        }
    }

    /// Pushes state changes to `reg` from now on; a supervisor also gets restart requests.
    fn subscribe(&mut self, reg: RegId, events: Arc<Mailbox>, supervisor: Option<i32>) {
        self.subscribers.insert(reg, events);
        if let Some(pid) = supervisor {
            self.restarts.add_supervisor(reg, pid);
        }
    }

    fn notify(&self, group: &Group, changes: &[StateChange], own_netns: u64) {
        for ch in changes {
            let Some(g) = group.registry.generations.get(&ch.generation) else {
                continue;
            };
            let regs: BTreeSet<RegId> = g.sockets.values().map(|m| m.reg).collect();
            for reg in regs {
                if let Some(mailbox) = self.subscribers.get(&reg) {
                    mailbox.push_state(Reply::State {
                        group: group.addr(own_netns),
                        generation: ch.generation,
                        state: ch.state,
                    });
                }
            }
        }
    }
}

/// A socket arriving in a `register` request, checked, with who sent it.
#[derive(Clone, Copy)]
struct Incoming<'a> {
    peer: Peer,
    reg: RegId,
    socket: &'a OwnedFd,
    req: &'a Registration,
    listener: &'a sockcheck::Listener,
}

/// What one registration asks for.
pub struct Registration {
    pub group: GroupAddr,
    pub generation: u32,
    pub name: Option<String>,
    pub activate: bool,
    /// Registered by `reuseportctl supervise` (it takes `restart` requests).
    pub supervised: bool,
    /// The server's pid when a launcher registers on its behalf.
    pub server_pid: Option<i32>,
}

pub struct Agent {
    state: Mutex<State>,
    /// Held while a new group's program loads, instead of `state`: a load takes 50 ms here
    /// and seconds on some kernels (the verifier), and `status`, flips and other groups'
    /// registrations must not wait for it. One creation at a time, so two registrations
    /// for the same new group never both load and pin it.
    creating: Mutex<()>,
    grace: Grace,
    mode: Mode,
    bpffs: PathBuf,
    next_reg: AtomicU64,
    /// Inode of the agent's own network namespace.
    own_netns: u64,
    wake_ups: bool,
    pin_abi: u32,
    access: access::Policy,
    max_groups: u32,
    /// Reported in `status`; enforced by the server's admission.
    max_connections: u32,
}

impl Agent {
    fn new(mode: Mode, bpffs: PathBuf, wake_ups: bool, pin_abi: u32) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(Self {
            state: Mutex::new(State::default()),
            creating: Mutex::new(()),
            grace: Grace::start()?,
            mode,
            bpffs,
            next_reg: AtomicU64::new(1),
            own_netns: std::fs::metadata("/proc/self/ns/net")?.ino(),
            wake_ups,
            pin_abi,
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

    /// `live`: registrations with an open connection (see [`Group::status`]).
    fn group_status(&self, group: &Group, live: &HashSet<RegId>) -> GroupStatus {
        GroupStatus {
            limits: Some(self.limits()),
            ..group.status(self.own_netns, |r| live.contains(&r))
        }
    }

    /// NB: a panic aborts the agent (see the binary's panic hook), so the lock is never
    /// found poisoned: a restarted agent adopts the pinned state instead of a process that
    /// would answer "internal error" forever.
    fn lock(&self) -> MutexGuard<'_, State> {
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
        events: Arc<Mailbox>,
    ) -> Result<Reply, Refusal> {
        let listener = sockcheck::check(socket.as_fd(), &req.group)?;
        self.access.may_register(&peer, listener.uid)?;
        let key = listener.key;
        let (mut state, created) = self.lock_with_group(&listener)?;
        self.access
            .may_join(&key, state.groups[&key].owner_uid, listener.uid)?;
        let incoming = Incoming {
            peer,
            reg,
            socket: &socket,
            req: &req,
            listener: &listener,
        };
        if !created && let Some(reclaimed) = self.reclaim(&mut state, key, &incoming) {
            if reclaimed.is_ok() {
                state.subscribe(reg, events, req.supervised.then_some(peer.pid));
            }
            return reclaimed;
        }
        let group = state.groups.get_mut(&key).expect("group exists");
        let member = Member {
            reg,
            pid: req.server_pid.unwrap_or(peer.pid),
            uid: listener.uid,
            cookie: listener.cookie,
        };
        let result = group.add_socket(
            &self.grace,
            socket.as_fd(),
            req.generation,
            req.name.clone(),
            req.activate,
            member,
        );
        match result {
            Ok((slot, changes)) => {
                state.subscribe(reg, events, req.supervised.then_some(peer.pid));
                let group = &state.groups[&key];
                state.notify(group, &changes, self.own_netns);
                let gen_state = group.registry.generations[&req.generation].state;
                tracing::info!(
                    group = %key, generation = req.generation, slot, pid = peer.pid,
                    state = %gen_state, "socket registered"
                );
                // NB: the full key, @NETNS included: a launcher that names the group by its
                // bare address breaks as soon as another namespace has the same one.
                Ok(Reply::Registered {
                    group: key.to_addr(),
                    generation: req.generation,
                    slot,
                    state: gen_state,
                })
            }
            Err(e) => {
                if created && state.groups[&key].registry.is_empty() {
                    state.remove_groups(&[key]);
                }
                Err(e)
            }
        }
    }

    /// The state, locked, with the listener's group in it; true if the group was created
    /// now (program loaded, maps pinned). Only `creating` is held during the load.
    fn lock_with_group(
        &self,
        listener: &sockcheck::Listener,
    ) -> Result<(MutexGuard<'_, State>, bool), Refusal> {
        let key = listener.key;
        let state = self.lock();
        if state.groups.contains_key(&key) {
            return Ok((state, false));
        }
        drop(state);
        let _creating = self.creating.lock().expect("group creation lock poisoned");
        {
            let state = self.lock();
            if state.groups.contains_key(&key) {
                return Ok((state, false));
            }
            // NB: exact, because creations are serialised and adoption ran before any.
            state.room_for_group(self.max_groups)?;
        }
        fault::hold("group.load");
        let pin_dir = self.bpffs.join(key.pin_name());
        refuse_unadoptable(&key, &pin_dir)?;
        let kernel = GroupKernel::create(self.mode, &pin_dir).map_err(kernel_refusal)?;
        let group = Group::create(
            key,
            listener.uid,
            kernel,
            listener.netns.try_clone().ok(),
            self.pin_abi,
        )?;
        let mut state = self.lock();
        state.groups.insert(key, group);
        tracing::info!(group = %key, mode = self.mode.as_str(), "group created");
        Ok((state, true))
    }

    /// A socket that is already in the group comes back on a new connection (its client
    /// reconnected after an agent restart): it keeps its slot, generation and state. `None`
    /// if the group does not know the socket.
    fn reclaim(
        &self,
        state: &mut State,
        key: GroupKey,
        incoming: &Incoming<'_>,
    ) -> Option<Result<Reply, Refusal>> {
        let Incoming {
            peer,
            reg,
            socket,
            req,
            listener,
        } = *incoming;
        let live = &state.subscribers;
        let group = state.groups.get_mut(&key)?;
        let (generation, slot, member) = group.registry.find_cookie(listener.cookie)?;
        if live.contains_key(&member.reg) {
            return Some(Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "this socket is already registered in {key} (generation {generation}, slot \
                     {slot}, pid {}): a socket registers once; close the other registration first",
                    member.pid
                ),
            )));
        }
        if generation != req.generation {
            return Some(Err(Refusal::new(
                ErrorKind::Conflict,
                format!(
                    "this socket is registered in {key} as generation {generation}, not {}: \
                     register it again as generation {generation}",
                    req.generation
                ),
            )));
        }
        if group.netns.is_none() {
            group.netns = listener.netns.try_clone().ok();
        }
        let pid = req.server_pid.unwrap_or(peer.pid);
        let (generation, slot) =
            match group.reclaim(&self.grace, socket.as_fd(), listener.cookie, reg, pid) {
                Ok(found) => found,
                Err(e) => return Some(Err(e)),
            };
        let gen_state = group.registry.generations[&generation].state;
        tracing::info!(group = %key, generation, slot, pid = peer.pid, "socket registered again");
        Some(Ok(Reply::Registered {
            group: key.to_addr(),
            generation,
            slot,
            state: gen_state,
        }))
    }

    /// Takes over the groups that an earlier agent pinned in the bpffs directory (see
    /// [`pinned`]). Their sockets keep their slots and are steered as before; clients that
    /// register them again get them back. Returns how many groups were adopted.
    pub fn adopt_pinned(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.bpffs) else {
            return 0;
        };
        let mut adopted = 0;
        // NB: a link here is never followed (see bpffs): adoption would take another
        // group's pins for this name's.
        for dir in entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| bpffs::is_real_dir(p))
        {
            match steering::read_pinned(&dir) {
                PinnedRecord::Adoptable(record) => match self.adopt_one(&dir, &record) {
                    Ok(true) => adopted += 1,
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        dir = %dir.display(), error = %e,
                        "cannot adopt the pinned group; it keeps steering as it was, unmanaged"
                    ),
                },
                PinnedRecord::Incompatible { abi_version } => tracing::error!(
                    dir = %dir.display(),
                    "pinned by an agent of ABI version {abi_version}, which this agent (ABI \
                     {ABI_VERSION}, adopts {ADOPTABLE_ABI:?}) cannot adopt; the group keeps \
                     steering on its old program, unmanaged: {}",
                    UNADOPTABLE_ADVICE
                ),
                PinnedRecord::Missing if steering::pinned_sockets_live(&dir) => tracing::error!(
                    dir = %dir.display(),
                    "pinned without a group record (ABI version 1, or not ours); its sockets \
                     keep being steered by the old program, unmanaged: {}",
                    UNADOPTABLE_ADVICE
                ),
                PinnedRecord::Missing => {}
                PinnedRecord::Unwritten => {
                    steering::remove_pins(&dir);
                    tracing::info!(
                        dir = %dir.display(),
                        "an agent died creating this group, before its first record: nothing \
                         to adopt, its pins were removed (its sockets register afresh)"
                    );
                }
            }
        }
        adopted
    }

    /// Adopts one group; `Ok(false)` when none of its sockets is left (its pins go).
    fn adopt_one(
        &self,
        dir: &std::path::Path,
        state: &reuseport_common::PinnedState,
    ) -> Result<bool, String> {
        let record = pinned::decode(state)?;
        let key = record.key();
        let kernel = GroupKernel::adopt(self.mode, dir, &record.program, &self.grace)
            .map_err(|e| e.to_string())?;
        let mut registry = record.registry;
        // Registration ids of the dead agent mean nothing here: one fresh id per old one,
        // none of them connected until its client registers again.
        let mut fresh: HashMap<RegId, RegId> = HashMap::new();
        let mut gone = Vec::new();
        for g in registry.generations.values_mut() {
            for (slot, m) in &mut g.sockets {
                m.reg = *fresh.entry(m.reg).or_insert_with(|| self.next_reg_id());
                if kernel.slot_cookie(*slot) != Some(m.cookie) {
                    gone.push(*slot);
                }
            }
        }
        let dropped = registry.remove_slots(&gone);
        for slot in &dropped {
            let _ = kernel.clear_slot(*slot);
        }
        if registry.is_empty() {
            kernel.unpin();
            tracing::info!(group = %key, "pinned group has no socket left; its pins were removed");
            return Ok(false);
        }
        let sockets = registry
            .generations
            .values()
            .map(|g| g.sockets.len())
            .sum::<usize>();
        let netns = registry
            .generations
            .values()
            .flat_map(|g| g.sockets.values())
            .find_map(|m| netns_of(m.pid, key.netns));
        let record = pinned::GroupRecord { registry, ..record };
        let group = Group::adopt(record, kernel, netns, self.pin_abi, &self.grace)
            .map_err(|r| r.message)?;
        let generations: Vec<String> = group
            .registry
            .generations
            .iter()
            .map(|(n, g)| format!("{n}:{}", g.state))
            .collect();
        tracing::info!(
            group = %key, generations = %generations.join(","), sockets,
            dropped = dropped.len(), abi = state.header.abi_version,
            program = if group.kernel.program_reused() { "reused" } else { "reloaded" },
            "adopted pinned group; its clients re-register their sockets"
        );
        self.lock().groups.insert(key, group);
        Ok(true)
    }

    /// Removes the sockets of a closed registration and republishes the table.
    pub fn unregister(&self, reg: RegId) {
        let mut state = self.lock();
        state.subscribers.remove(&reg);
        let failed = state.restarts.remove_supervisor(reg);
        state.record_restarts(failed);
        let mut emptied = Vec::new();
        for (key, group) in &mut state.groups {
            let had_active = group.registry.active();
            if !group.remove_registration(reg, &self.grace) {
                continue;
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
        state.remove_groups(&emptied);
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
        let live: HashSet<RegId> = state.subscribers.keys().copied().collect();
        let group = state.find(wanted)?;
        self.access
            .may_change(&peer, &group.key, group.owner_uid, what)?;
        let changes = group.change(&self.grace, op)?;
        let key = group.key;
        let status = self.group_status(group, &live);
        let group = &state.groups[&key];
        state.notify(group, &changes, self.own_netns);
        for ch in &changes {
            tracing::info!(group = %key, generation = ch.generation, state = %ch.state, "state changed");
        }
        Ok(Reply::Changed { group: status })
    }

    pub fn status(&self, wanted: Option<&GroupAddr>) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        fault::panic_point("status.locked");
        let live: HashSet<RegId> = state.subscribers.keys().copied().collect();
        let groups = match wanted {
            Some(w) => vec![self.group_status(state.find(w)?, &live)],
            None => state
                .groups
                .values()
                .map(|g| self.group_status(g, &live))
                .collect(),
        };
        Ok(Reply::Status { groups })
    }

    /// Looks for registered listeners that closed since the last scan; returns the wake-ups
    /// their groups need (see [`wake`]).
    fn scan_closed(&self) -> Vec<wake::WakeUp> {
        let mut state = self.lock();
        let mut out = Vec::new();
        let State {
            groups,
            subscribers,
            ..
        } = &mut *state;
        let mut emptied = Vec::new();
        for group in groups.values_mut() {
            let scan = group.scan(|reg| subscribers.contains_key(&reg), &self.grace);
            if group.registry.is_empty() {
                emptied.push(group.key);
                continue;
            }
            if scan.newly_closed
                && scan.active_sockets > 0
                && self.mode == Mode::SelectOrMigrate
                && self.wake_ups
            {
                match group.netns.as_ref().map(OwnedFd::try_clone) {
                    Some(Ok(netns)) => out.push(wake::WakeUp {
                        group: (group.key.netns, group.key.addr),
                        target: wake::target_for(group.key.addr),
                        netns,
                        connections: scan.active_sockets + 1,
                    }),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "wake-up: cannot duplicate the netns descriptor")
                    }
                    None => {}
                }
            }
        }
        state.remove_groups(&emptied);
        out
    }
}

const UNADOPTABLE_ADVICE: &str = "finish the deploy with the agent version that pinned it, or \
    stop the group's servers (once no socket is left, this agent replaces the pins)";

/// Refuses to create a group over pins that another agent version left with sockets still
/// listening: a fresh program would not know those sockets.
fn refuse_unadoptable(key: &GroupKey, pin_dir: &std::path::Path) -> Result<(), Refusal> {
    // NB: a link is not a group's pins, whatever it points at: creation removes it.
    if !bpffs::is_real_dir(pin_dir) || !steering::pinned_sockets_live(pin_dir) {
        return Ok(());
    }
    let version = match steering::read_pinned(pin_dir) {
        PinnedRecord::Incompatible { abi_version } => abi_version.to_string(),
        PinnedRecord::Missing => "1".into(),
        PinnedRecord::Adoptable(_) => "an adoptable version that failed to load".into(),
        // NB: never attached, so nothing steers by it: replaced like stale pins.
        PinnedRecord::Unwritten => return Ok(()),
    };
    Err(Refusal::new(
        ErrorKind::Conflict,
        format!(
            "group {key} is still steered by objects that an agent of ABI version {version} \
             pinned in {} (this agent: ABI {ABI_VERSION}, adopts {ADOPTABLE_ABI:?}): \
             {UNADOPTABLE_ADVICE}",
            pin_dir.display()
        ),
    ))
}

/// The network namespace of process `pid` if it is the group's (inode `netns`).
fn netns_of(pid: i32, netns: u64) -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt as _;
    let file = std::fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
    (file.metadata().ok()?.ino() == netns).then(|| file.into())
}
