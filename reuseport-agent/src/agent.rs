//! The agent's state: its groups, the registrations that push to clients, and the requests
//! that look groups up and change them (`status`, `activate`, `drain`); registration,
//! adoption, the slot scan and restarts add to it in their own modules.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use reuseport_common::{MAX_GENERATIONS, MAX_SLOTS};

use crate::{
    access, creation, fault,
    grace::Grace,
    group::Group,
    live,
    mailbox::Mailbox,
    metrics,
    quota::Quotas,
    registry::{Refusal, RegId, StateChange},
    restart,
};
pub use crate::{admission::DEFAULT_MAX_CONNECTIONS, kernel::Mode, server::run};
use reuseport_proto::{
    addr::{GroupAddr, GroupKey},
    message::{AgentInfo, ErrorKind, GroupStatus, Limits, Reply},
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
    /// Groups one non-root uid may own; a quarter of `max_groups` by default.
    pub groups_per_uid: Option<u32>,
    /// Control connections open at once at most (lowered to what RLIMIT_NOFILE allows).
    pub max_connections: u32,
    /// Control connections one non-root uid may hold; a quarter of `max_connections` by
    /// default.
    pub connections_per_uid: Option<u32>,
    /// How long a restart may wait for its supervisor's outcome.
    pub restart_timeout: Duration,
    /// Where to serve `/metrics` and the status page, if anywhere.
    pub metrics: Option<metrics::Listen>,
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
pub(crate) struct State {
    pub(crate) groups: BTreeMap<GroupKey, Group>,
    /// Groups being created (see [`creation`]).
    pub(crate) creating: HashMap<GroupKey, creation::Creating>,
    /// Where to push state changes for each live registration.
    pub(crate) subscribers: HashMap<RegId, Arc<Mailbox>>,
    /// Supervised registrations and restarts waiting for their supervisor.
    pub(crate) restarts: restart::Restarts,
    /// Flips per group, for `/metrics`.
    pub(crate) flips: metrics::events::Flips,
}

impl State {
    pub(crate) fn find(&mut self, wanted: &GroupAddr) -> Result<&mut Group, Refusal> {
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

    /// Drops groups left without a socket, and their pins.
    pub(crate) fn remove_groups(&mut self, keys: &[GroupKey]) {
        for key in keys {
            if let Some(g) = self.groups.remove(key) {
                self.flips.forget(key);
                g.remove();
                tracing::info!(group = %key, "group removed: no registered socket left");
            }
        }
    }

    /// Pushes state changes to `reg` from now on; a supervisor also gets restart requests.
    pub(crate) fn subscribe(&mut self, reg: RegId, events: Arc<Mailbox>, supervisor: Option<i32>) {
        self.subscribers.insert(reg, events);
        if let Some(pid) = supervisor {
            self.restarts.add_supervisor(reg, pid);
        }
    }

    pub(crate) fn notify(&self, group: &Group, changes: &[StateChange], own_netns: u64) {
        self.flips.record(group.key(), changes);
        for ch in changes {
            for reg in group.registrations_of(ch.generation) {
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

pub struct Agent {
    pub(crate) state: Mutex<State>,
    /// Whose new group may load its program now (see [`creation`]).
    pub(crate) creations: creation::Gate,
    pub(crate) grace: Grace,
    pub(crate) mode: Mode,
    pub(crate) bpffs: PathBuf,
    pub(crate) next_reg: AtomicU64,
    /// Inode of the agent's own network namespace.
    pub(crate) own_netns: u64,
    pub(crate) wake_ups: bool,
    pub(crate) pin_abi: u32,
    pub(crate) access: access::Policy,
    /// The group quotas are enforced here, the connection quotas by the server's
    /// admission; `status` reports both.
    pub(crate) quotas: Quotas,
    pub(crate) live: live::Live,
    /// Error answers sent, by kind, for `/metrics`.
    pub(crate) refusals: metrics::events::Refusals,
}

impl Agent {
    pub(crate) fn new(
        mode: Mode,
        bpffs: PathBuf,
        wake_ups: bool,
        pin_abi: u32,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let own_netns = std::fs::metadata("/proc/self/ns/net")?.ino();
        Ok(Self {
            state: Mutex::new(State::default()),
            creations: creation::Gate::new(),
            grace: Grace::start()?,
            mode,
            bpffs,
            next_reg: AtomicU64::new(1),
            own_netns,
            wake_ups,
            pin_abi,
            access: access::Policy::default(),
            quotas: Quotas::new(DEFAULT_MAX_GROUPS, None, DEFAULT_MAX_CONNECTIONS, None),
            live: live::Live::new(own_netns),
            refusals: metrics::events::Refusals::default(),
        })
    }

    /// Who answers a `status`.
    pub(crate) fn info(&self) -> AgentInfo {
        AgentInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            abi: reuseport_common::ABI_VERSION,
            mode: self.mode.as_str().into(),
            kernel: crate::kernel::kernel_release(),
        }
    }

    pub(crate) fn limits(&self) -> Limits {
        let mut limits = Limits {
            groups: self.quotas.max_groups,
            sockets_per_group: MAX_SLOTS,
            generations_per_group: MAX_GENERATIONS,
            control_connections: self.quotas.max_connections,
            ..Limits::default()
        };
        self.quotas.report(&mut limits);
        limits
    }

    /// `live`: registrations with an open connection (see [`Group::status`]).
    pub(crate) fn group_status(&self, group: &Group, live: &HashSet<RegId>) -> GroupStatus {
        GroupStatus {
            limits: Some(self.limits()),
            ..group.status(self.own_netns, |r| live.contains(&r))
        }
    }

    /// What a launcher reports about one of its generations (a drain step, a health check):
    /// the group it names, checked as any change of it is (`what` says what is refused),
    /// then `apply`; answers with the group as it is now.
    pub(crate) fn launcher_report(
        &self,
        peer: &Peer,
        wanted: &GroupAddr,
        what: &str,
        apply: impl FnOnce(&mut Group) -> Result<(), Refusal>,
    ) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let live: HashSet<_> = state.subscribers.keys().copied().collect();
        let group = state.find(wanted)?;
        self.access
            .may_change(peer, &group.key(), group.owner_uid(), what)?;
        apply(group)?;
        Ok(Reply::Changed {
            group: self.group_status(group, &live),
            others: Vec::new(),
        })
    }

    /// NB: a panic aborts the agent (see the binary's panic hook), so the lock is never
    /// found poisoned: a restarted agent adopts the pinned state instead of a process that
    /// would answer "internal error" forever.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("agent state poisoned")
    }

    pub fn next_reg_id(&self) -> RegId {
        self.next_reg.fetch_add(1, Ordering::Relaxed)
    }

    /// Removes the sockets of a closed registration and republishes the table.
    pub fn unregister(&self, reg: RegId) {
        let mut state = self.lock();
        state.subscribers.remove(&reg);
        let failed = state.restarts.remove_supervisor(reg);
        state.record_restarts(failed);
        let mut emptied = Vec::new();
        for (key, group) in &mut state.groups {
            let had_active = group.active();
            if !group.remove_registration(reg, &self.grace) {
                continue;
            }
            tracing::info!(group = %key, reg, "registration closed; its sockets left the group");
            if had_active.is_some() && group.active().is_none() && !group.is_empty() {
                tracing::warn!(
                    group = %key,
                    "the active generation is gone; new connections fall back to the newest \
                     draining generation until another one is activated"
                );
            }
            if group.is_empty() {
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
        self.change_spanning(peer, group, generation, |r, g| r.activate(g), "activate")
    }

    /// `weight` percent of new connections to `generation`, the rest to the active one
    /// (see [`crate::registry::Registry::split`]).
    pub fn split(
        &self,
        peer: Peer,
        group: &GroupAddr,
        generation: u32,
        weight: u8,
    ) -> Result<Reply, Refusal> {
        self.change_spanning(
            peer,
            group,
            generation,
            |r, g| r.split(g, weight),
            "activate",
        )
    }

    pub fn drain(&self, peer: Peer, group: &GroupAddr, generation: u32) -> Result<Reply, Refusal> {
        self.change_spanning(peer, group, generation, |r, g| r.drain(g), "drain")
    }

    /// `with_live`: add the figures read from the kernel (see [`live`]), after the state
    /// lock is released.
    pub fn status(&self, wanted: Option<&GroupAddr>, with_live: bool) -> Result<Reply, Refusal> {
        let (mut groups, probes, namespaces) = {
            let mut state = self.lock();
            fault::panic_point("status.locked");
            let live: HashSet<RegId> = state.subscribers.keys().copied().collect();
            let chosen: Vec<&Group> = match wanted {
                Some(w) => vec![&*state.find(w)?],
                None => state.groups.values().collect(),
            };
            let groups: Vec<GroupStatus> =
                chosen.iter().map(|g| self.group_status(g, &live)).collect();
            let probes: Vec<live::Probe> = if with_live {
                chosen.iter().map(|g| g.probe()).collect()
            } else {
                Vec::new()
            };
            let keys: Vec<GroupKey> = chosen.iter().map(|g| g.key()).collect();
            let mut groups = groups;
            let mut spans: Vec<(GroupKey, &mut GroupStatus)> =
                keys.into_iter().zip(groups.iter_mut()).collect();
            state.fill_spans(&mut spans, self.own_netns);
            let namespaces: HashSet<u64> = state.groups.keys().map(|k| k.netns).collect();
            (groups, probes, namespaces)
        };
        for (status, probe) in groups.iter_mut().zip(&probes) {
            if let Err(e) = self.live.annotate(status, probe) {
                tracing::warn!(group = %status.group, error = %e, "no live figures for status");
            }
        }
        self.live.retain(&namespaces);
        Ok(Reply::Status {
            groups,
            agent: Some(self.info()),
        })
    }
}
