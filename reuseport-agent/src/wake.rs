//! Wake-ups for connections migrated to a listener without a wake-up.
//!
//! NB: when a listener closes, kernels without the upstream fix "tcp: call sk_data_ready()
//! after listener migration" move its queued connections onto the chosen listener's accept
//! queue without calling `sk_data_ready`
//! (`inet_csk_listen_stop()`,
//! <https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/inet_connection_sock.c>):
//! a server blocked in epoll (tokio, nginx, Go) is not told they are there until another
//! connection arrives. After the agent sees a registered listener close, it therefore makes
//! a few short connections of its own to the group: each lands on an active listener
//! through the program, wakes it, and the server's accept loop then finds the migrated
//! connections too. Servers see these as connections that close without sending anything.
//!
//! The worker enters a group's network namespace (`setns`, which takes `CAP_SYS_ADMIN`) only
//! when it is not in it already: groups in the agent's own namespace never need it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::OwnedFd,
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

/// One group to poke: where, from which namespace, how many connections.
pub struct WakeUp {
    /// The group's network namespace inode with its address: one wake-up per group at a
    /// time, however many closes it saw.
    pub group: (u64, SocketAddr),
    pub target: SocketAddr,
    pub netns: OwnedFd,
    pub connections: usize,
}

/// Delays after the close was seen: the first catches the common case; the second covers a
/// close that was still migrating when the scan saw its slot empty.
const ROUNDS: [Duration; 2] = [Duration::from_millis(5), Duration::from_millis(200)];

pub fn target_for(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// A wake-up waiting for its next round.
struct Pending {
    wake: WakeUp,
    /// Index into [`ROUNDS`] of the next round.
    round: usize,
    /// When the close was seen.
    seen: Instant,
}

#[derive(Default)]
struct Queue {
    pending: HashMap<(u64, SocketAddr), Pending>,
}

/// The wake-up worker: ONE thread for every group, whatever happens. Closes seen while a
/// group's wake-up is pending are folded into it (the rounds start again, with the larger
/// number of connections), so a client that registers and closes listeners in a loop costs
/// at most one queued entry per group, never a thread.
#[derive(Clone)]
pub struct Waker {
    queue: Arc<(Mutex<Queue>, Condvar)>,
}

impl Waker {
    /// `own_netns`: the inode of the namespace the worker starts in (the agent's).
    pub fn start(own_netns: u64) -> std::io::Result<Self> {
        let waker = Self {
            queue: Arc::default(),
        };
        let worker = waker.clone();
        thread::Builder::new()
            .name("wake-up".into())
            .spawn(move || worker.run(own_netns))?;
        Ok(waker)
    }

    pub fn push(&self, wake: WakeUp) {
        let (lock, ready) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let connections = q
            .pending
            .get(&wake.group)
            .map_or(0, |p| p.wake.connections)
            .max(wake.connections);
        q.pending.insert(
            wake.group,
            Pending {
                wake: WakeUp {
                    connections,
                    ..wake
                },
                round: 0,
                seen: Instant::now(),
            },
        );
        ready.notify_one();
    }

    /// `netns`: the inode of the namespace the worker thread is in.
    fn run(&self, mut netns: u64) {
        let (lock, ready) = &*self.queue;
        let mut q = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            let next = q
                .pending
                .iter()
                .map(|(key, p)| (p.seen + ROUNDS[p.round], *key))
                .min();
            let Some((due, key)) = next else {
                q = ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            if due > now {
                q = ready
                    .wait_timeout(q, due - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            let p = q.pending.get_mut(&key).expect("key from the map");
            let round = p.round;
            let (target, connections) = (p.wake.target, p.wake.connections);
            let (group_netns, fd) = (p.wake.group.0, p.wake.netns.try_clone());
            p.round += 1;
            if p.round == ROUNDS.len() {
                q.pending.remove(&key);
            }
            drop(q);
            match fd {
                Ok(fd) => {
                    if enter(&mut netns, group_netns, &fd) {
                        poke(target, connections, round);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up: cannot duplicate the netns descriptor")
                }
            }
            q = lock.lock().unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Moves the worker thread into the group's namespace (inode `wanted`, descriptor `fd`)
/// unless it is there (`current`) already. False if it cannot.
fn enter(current: &mut u64, wanted: u64, fd: &OwnedFd) -> bool {
    if *current == wanted {
        return true;
    }
    match setns(fd, CloneFlags::CLONE_NEWNET) {
        Ok(()) => {
            *current = wanted;
            true
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                netns = wanted,
                "wake-up: cannot enter the group's network namespace (needs CAP_SYS_ADMIN)"
            );
            false
        }
    }
}

/// One round of wake-up connections to `target`, from the worker's namespace.
fn poke(target: SocketAddr, connections: usize, round: usize) {
    for _ in 0..connections {
        // NB: short: one worker serves every group, and a listener whose backlog is full
        // would hold it for the whole time-out.
        if let Err(e) = TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
            tracing::debug!(error = %e, %target, round, "wake-up connection failed");
        }
    }
}
