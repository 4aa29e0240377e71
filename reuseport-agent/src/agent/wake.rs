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

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::OwnedFd,
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

/// One group to poke: where, from which namespace, how many connections.
pub struct WakeUp {
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

/// Runs the wake-up on its own thread (it has to enter the group's network namespace).
pub fn spawn(w: WakeUp) {
    let res = thread::Builder::new().name("wake-up".into()).spawn(move || {
        if let Err(e) = setns(&w.netns, CloneFlags::CLONE_NEWNET) {
            tracing::warn!(error = %e, "wake-up: cannot enter the group's network namespace");
            return;
        }
        for delay in ROUNDS {
            // Not a readiness wait: spacing the rounds is the point (see ROUNDS).
            thread::sleep(delay);
            for _ in 0..w.connections {
                if let Err(e) = TcpStream::connect_timeout(&w.target, Duration::from_secs(1)) {
                    tracing::debug!(error = %e, target = %w.target, "wake-up connection failed");
                }
            }
        }
    });
    if let Err(e) = res {
        tracing::warn!(error = %e, "cannot start a wake-up thread");
    }
}
