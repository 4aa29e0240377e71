//! Live figures for `status`, read from the kernel when it is answered: each registered
//! listener's accept queue, backlog and drops (sock_diag, matched to its slot by socket
//! cookie), the connections each generation's processes hold ([`owners`]), and, for a
//! draining generation that its launcher has not signalled yet, whether it is idle.
//!
//! Queried in the group's network namespace, outside the agent's state lock: a status
//! never delays a flip.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Mutex,
};

use super::{
    diag::{DiagSocket, Snapshot},
    owners::{self, Roots},
};
use reuseport_proto::message::{
    DrainPhase, GenState, GenerationLive, GroupLive, GroupStatus, ListenerLive,
};

/// What the live figures of one group need from the agent's state (taken under its lock).
pub struct Probe {
    /// Inode of the group's network namespace.
    pub netns: u64,
    /// A descriptor of it, unless it is the agent's own (`None` then), or unknown: an
    /// adopted group before any of its sockets registered again.
    pub netns_fd: Option<OwnedFd>,
    pub addr: SocketAddr,
    /// `sk_drops` of each registered listener when it registered, by cookie.
    pub drops_base: HashMap<u64, u32>,
}

/// sock_diag sockets kept per network namespace between queries.
pub struct Live {
    own_netns: u64,
    sockets: Mutex<HashMap<u64, DiagSocket>>,
}

impl Live {
    pub fn new(own_netns: u64) -> Self {
        Self {
            own_netns,
            sockets: Mutex::new(HashMap::new()),
        }
    }

    /// Adds the live figures to `status` (the group `probe` describes).
    pub fn annotate(&self, status: &mut GroupStatus, probe: &Probe) -> io::Result<()> {
        let snapshot = self.dump(probe)?;
        fill(status, &snapshot, &probe.drops_base);
        Ok(())
    }

    /// Forgets the sockets of network namespaces no group lives in any more: a netlink
    /// socket keeps its namespace alive.
    pub fn retain(&self, netns: &HashSet<u64>) {
        self.lock().retain(|ns, _| netns.contains(ns));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DiagSocket>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One dump; the socket goes back to the cache only after a clean answer (a failed
    /// one may have left a half-read dump behind).
    fn dump(&self, probe: &Probe) -> io::Result<Snapshot> {
        let cached = self.lock().remove(&probe.netns);
        let mut socket = match (cached, &probe.netns_fd) {
            (Some(s), _) => s,
            (None, _) if probe.netns == self.own_netns => DiagSocket::open()?,
            (None, Some(fd)) => {
                use std::os::fd::AsFd as _;
                DiagSocket::open_in(fd.as_fd())?
            }
            (None, None) => {
                return Err(io::Error::other(
                    "the group's network namespace is not known yet: none of its sockets \
                     registered again since the agent adopted it",
                ));
            }
        };
        let snapshot = socket.dump(probe.addr)?;
        self.lock().insert(probe.netns, socket);
        Ok(snapshot)
    }
}

/// The figures of one dump, put where they belong in `status`.
fn fill(status: &mut GroupStatus, snapshot: &Snapshot, drops_base: &HashMap<u64, u32>) {
    let listeners: HashMap<u64, _> = snapshot.listeners.iter().map(|l| (l.cookie, l)).collect();
    let mut roots = Roots::new();
    for g in &status.generations {
        for s in &g.sockets {
            roots.entry(s.pid).or_default().insert(g.generation);
        }
    }
    let held_inodes: HashSet<u32> = snapshot
        .connected
        .iter()
        .copied()
        .filter(|i| *i != 0)
        .collect();
    let held: BTreeMap<u32, u64> = owners::held_by(&roots, &held_inodes);
    for g in &mut status.generations {
        let mut queued = 0;
        for s in &mut g.sockets {
            s.live = listeners.get(&s.cookie).map(|l| {
                queued += u64::from(l.queued);
                ListenerLive {
                    queued: l.queued,
                    backlog: l.backlog,
                    drops: l
                        .drops
                        .wrapping_sub(drops_base.get(&s.cookie).copied().unwrap_or(0)),
                }
            });
        }
        let live = GenerationLive {
            connections: held.get(&g.generation).copied().unwrap_or(0),
            queued,
        };
        g.live = Some(live);
        if g.state == GenState::Draining && g.drain.is_none() {
            g.drain = Some(match live.in_flight() {
                0 => DrainPhase::Idle,
                n => DrainPhase::Serving { connections: n },
            });
        }
    }
    status.live = Some(GroupLive {
        connections: snapshot.connected.len() as u64,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use reuseport_proto::{Counters, GenerationStatus, SocketStatus};

    use crate::diag::Listener;

    fn socket(cookie: u64, pid: i32) -> SocketStatus {
        SocketStatus {
            slot: cookie as u32,
            pid,
            uid: 0,
            cookie,
            listening: true,
            registered: true,
            live: None,
        }
    }

    fn generation(n: u32, state: GenState, sockets: Vec<SocketStatus>) -> GenerationStatus {
        GenerationStatus {
            generation: n,
            name: None,
            state,
            sockets,
            counters: Counters::default(),
            live: None,
            drain: None,
            also_in: Vec::new(),
            weight: None,
            health: None,
        }
    }

    /// Queues are summed per generation, drops count from registration, and a draining
    /// generation is idle only with nothing queued; no process holds the inode-less sockets.
    #[test]
    fn figures_land_on_their_slots_and_generations() {
        // NB: pids that cannot exist (above pid_max), so no process is walked.
        let mut status = GroupStatus {
            group: "tcp://127.0.0.1:80".parse().unwrap(),
            mode: "select-or-migrate".into(),
            active: Some(2),
            falling_back: false,
            generations: vec![
                generation(1, GenState::Draining, vec![socket(11, i32::MAX)]),
                generation(
                    2,
                    GenState::Active,
                    vec![socket(21, i32::MAX - 1), socket(22, i32::MAX - 1)],
                ),
                generation(3, GenState::Draining, vec![socket(31, i32::MAX - 2)]),
            ],
            unsteered: 0,
            limits: None,
            last_restart: None,
            live: None,
        };
        let l = |cookie, queued, drops| Listener {
            cookie,
            queued,
            backlog: 128,
            drops,
            inode: 0,
        };
        let snapshot = Snapshot {
            listeners: vec![
                l(11, 2, 0),
                l(21, 1, 7),
                l(22, 3, 0),
                l(31, 0, 0),
                l(99, 5, 0),
            ],
            connected: vec![0, 0, 0, 0, 0, 0],
        };
        fill(&mut status, &snapshot, &HashMap::from([(21, 4)]));
        let g = |n: usize| &status.generations[n];
        assert_eq!(
            g(0).live,
            Some(GenerationLive {
                connections: 0,
                queued: 2
            })
        );
        assert_eq!(g(0).drain, Some(DrainPhase::Serving { connections: 2 }));
        assert_eq!(g(1).live.map(|l| l.queued), Some(4));
        assert_eq!(
            g(1).drain,
            None,
            "only draining generations have a drain phase"
        );
        assert_eq!(g(1).sockets[0].live.map(|l| l.drops), Some(3));
        assert_eq!(g(2).drain, Some(DrainPhase::Idle));
        assert_eq!(status.live, Some(GroupLive { connections: 6 }));
    }
}
