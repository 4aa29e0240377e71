//! `register`: a listening socket joins its group, which is created on first use (see
//! [`creation`](super::creation) for how a creation waits its turn and holds no lock), or
//! takes its slot back after an agent restart.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use reuseport_common::{ABI_VERSION, ADOPTABLE_ABI};
use tokio::sync::watch;

use crate::{
    adopt::UNADOPTABLE_ADVICE,
    agent::{Agent, Peer, State},
    bpffs,
    creation::{Creating, Permit},
    fault,
    group::{Group, kernel_refusal},
    kernel::{self, GroupKernel, PinnedRecord},
    lineage,
    mailbox::Mailbox,
    registry::{Member, Refusal, RegId},
    sockcheck,
};
use reuseport_proto::{
    addr::GroupKey,
    message::{ErrorKind, Register, Reply},
};

/// A socket arriving in a `register` request, checked, with who sent it and where its
/// pushes go.
struct Incoming {
    peer: Peer,
    reg: RegId,
    socket: OwnedFd,
    req: Register,
    listener: sockcheck::Listener,
    /// The pid `status` shows for the socket.
    pid: i32,
    events: Arc<Mailbox>,
}

/// What a registration does next, decided under the state lock.
enum Step {
    /// The group exists: join it.
    Join,
    /// Someone is creating the group: wait until that ends, then look again.
    Wait(watch::Receiver<()>),
    /// Create the group: it is reserved for this registration.
    Create(Reservation),
}

/// A group reserved for creation in [`State::creating`]; dropped, it ends the creation
/// (its waiters look again).
struct Reservation {
    key: GroupKey,
    agent: Option<Arc<Agent>>,
    _end: watch::Sender<()>,
}

impl Reservation {
    /// The group exists now (or its creation failed): forget the reservation, under the
    /// lock the caller already holds.
    fn finish(mut self, state: &mut State) {
        state.creating.remove(&self.key);
        self.agent = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // NB: only when the creation was given up without the state lock held (a failed
        // load, a cancelled request): `finish` runs under the lock otherwise.
        if let Some(agent) = self.agent.take() {
            agent.lock().creating.remove(&self.key);
        }
    }
}

impl Agent {
    /// Adds a listening socket to its group (creating the group on first use).
    pub async fn register(
        self: &Arc<Self>,
        peer: Peer,
        reg: RegId,
        socket: OwnedFd,
        req: Register,
        events: Arc<Mailbox>,
    ) -> Result<Reply, Refusal> {
        let listener = sockcheck::check(socket.as_fd(), &req.group)?;
        self.access.may_register(&peer, listener.uid)?;
        // NB: the agent's view of the server's pid; the launcher's may be a container's.
        let socket_ino = nix::sys::stat::fstat(socket.as_fd())
            .map_err(|e| Refusal::new(ErrorKind::Kernel, format!("fstat of the socket: {e}")))?
            .st_ino;
        let pid = match req.server_pid {
            None => peer.pid,
            Some(claimed) => tokio::task::spawn_blocking(move || {
                lineage::server_pid(peer.pid, claimed, &lineage::ProcFs).or_else(|refusal| {
                    lineage::holder_pid(peer.uid, claimed, socket_ino).ok_or(refusal)
                })
            })
            .await
            .map_err(|e| Refusal::new(ErrorKind::Kernel, format!("internal error: {e}")))??,
        };
        let mut incoming = Box::new(Incoming {
            peer,
            reg,
            socket,
            req,
            listener,
            pid,
            events,
        });
        loop {
            let step = self.next_step(&incoming)?;
            let a = self.clone();
            let done = match step {
                Step::Wait(mut done) => {
                    // Err: the creation ended (its sender is gone), which is all we wait for.
                    let _ = done.changed().await;
                    continue;
                }
                Step::Join => tokio::task::spawn_blocking(move || a.join(incoming)).await,
                Step::Create(reservation) => {
                    let permit = self.creations.enter(incoming.peer.uid).await;
                    tokio::task::spawn_blocking(move || a.create(incoming, reservation, permit))
                        .await
                }
            };
            match done
                .map_err(|e| Refusal::new(ErrorKind::Kernel, format!("internal error: {e}")))?
            {
                Ok(result) => return result,
                // The group went away (its last socket left) before this one joined.
                Err(back) => incoming = back,
            }
        }
    }

    fn next_step(self: &Arc<Self>, incoming: &Incoming) -> Result<Step, Refusal> {
        let key = incoming.listener.key;
        let mut state = self.lock();
        if state.groups.contains_key(&key) {
            return Ok(Step::Join);
        }
        if let Some(c) = state.creating.get(&key) {
            return Ok(Step::Wait(c.done.clone()));
        }
        let owners = state
            .groups
            .values()
            .map(|g| g.owner_uid())
            .chain(state.creating.values().map(|c| c.owner));
        self.quotas
            .room_for_group(incoming.peer.uid, incoming.listener.uid, owners)?;
        let (creating, end) = Creating::start(incoming.listener.uid);
        state.creating.insert(key, creating);
        Ok(Step::Create(Reservation {
            key,
            agent: Some(self.clone()),
            _end: end,
        }))
    }

    /// Loads and pins a new group's program and maps, then adds the socket to it. Holds no
    /// lock while the program loads.
    fn create(
        &self,
        incoming: Box<Incoming>,
        reservation: Reservation,
        permit: Permit,
    ) -> Result<Result<Reply, Refusal>, Box<Incoming>> {
        let key = incoming.listener.key;
        fault::hold("group.load");
        let pin_dir = self.bpffs.join(key.pin_name());
        let created = refuse_unadoptable(&key, &pin_dir).and_then(|()| {
            let kernel = GroupKernel::create(self.mode, &pin_dir).map_err(kernel_refusal)?;
            Group::create(&incoming.listener, kernel, self.pin_abi)
        });
        drop(permit);
        let group = match created {
            Ok(group) => group,
            Err(e) => return Ok(Err(e)),
        };
        let mut state = self.lock();
        reservation.finish(&mut state);
        state.groups.insert(key, group);
        tracing::info!(group = %key, mode = self.mode.as_str(), "group created");
        Ok(self.join_locked(&mut state, incoming, true))
    }

    /// Adds the socket to its existing group; gives it back if the group is gone.
    fn join(&self, incoming: Box<Incoming>) -> Result<Result<Reply, Refusal>, Box<Incoming>> {
        let mut state = self.lock();
        if !state.groups.contains_key(&incoming.listener.key) {
            return Err(incoming);
        }
        Ok(self.join_locked(&mut state, incoming, false))
    }

    fn join_locked(
        &self,
        state: &mut State,
        incoming: Box<Incoming>,
        created: bool,
    ) -> Result<Reply, Refusal> {
        let key = incoming.listener.key;
        let group = state.groups.get_mut(&key).expect("group exists");
        self.access
            .may_join(&key, group.owner_uid(), incoming.listener.uid)?;
        group.admit_device(&incoming.listener)?;
        let Incoming {
            peer,
            reg,
            ref socket,
            ref req,
            ref listener,
            pid,
            ref events,
        } = *incoming;
        let supervisor = req.supervised.then_some(peer.pid);
        if !created && let Some(reclaimed) = self.reclaim(state, &incoming) {
            if reclaimed.is_ok() {
                state.subscribe(reg, events.clone(), supervisor);
            }
            return reclaimed;
        }
        let group = state.groups.get_mut(&key).expect("group exists");
        let member = Member {
            reg,
            pid,
            uid: listener.uid,
            cookie: listener.cookie,
            drops_base: listener.drops,
            server: req.server_pid.is_some(),
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
                state.subscribe(reg, events.clone(), supervisor);
                let group = &state.groups[&key];
                state.notify(group, &changes, self.own_netns);
                let gen_state = group
                    .state_of(req.generation)
                    .expect("the socket joined this generation");
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
                if created && state.groups[&key].is_empty() {
                    state.remove_groups(&[key]);
                }
                Err(e)
            }
        }
    }

    /// A socket that is already in the group comes back on a new connection (its client
    /// reconnected after an agent restart): it keeps its slot, generation and state. `None`
    /// if the group does not know the socket.
    fn reclaim(&self, state: &mut State, incoming: &Incoming) -> Option<Result<Reply, Refusal>> {
        let Incoming {
            peer,
            reg,
            ref socket,
            ref req,
            ref listener,
            pid,
            ..
        } = *incoming;
        let key = listener.key;
        let live = &state.subscribers;
        let group = state.groups.get_mut(&key)?;
        let (generation, slot, member) = group.find_socket(listener.cookie)?;
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
        group.learn_netns(&listener.netns);
        let (generation, slot) =
            match group.reclaim(&self.grace, socket.as_fd(), listener.cookie, reg, pid) {
                Ok(found) => found,
                Err(e) => return Some(Err(e)),
            };
        let gen_state = group
            .state_of(generation)
            .expect("the socket is back in its generation");
        tracing::info!(group = %key, generation, slot, pid = peer.pid, "socket registered again");
        Some(Ok(Reply::Registered {
            group: key.to_addr(),
            generation,
            slot,
            state: gen_state,
        }))
    }
}

/// Refuses to create a group over pins that another agent version left with sockets still
/// listening: a fresh program would not know those sockets.
fn refuse_unadoptable(key: &GroupKey, pin_dir: &std::path::Path) -> Result<(), Refusal> {
    // NB: a link is not a group's pins, whatever it points at: creation removes it.
    if !bpffs::is_real_dir(pin_dir) || !kernel::pinned_sockets_live(pin_dir) {
        return Ok(());
    }
    let version = match kernel::read_pinned(pin_dir) {
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
