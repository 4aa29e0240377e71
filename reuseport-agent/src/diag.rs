//! The kernel's view of a group's TCP sockets through sock_diag (`NETLINK_SOCK_DIAG`,
//! inet_diag): its listeners with their accept queues, and the connected sockets on its
//! address. One dump request per query, answered from the kernel's socket tables.
//!
//! A netlink socket answers for the network namespace it was created in, so a socket for a
//! group in another namespace is created on a short-lived thread that entered it first
//! ([`DiagSocket::open_in`]).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, BorrowedFd},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// `TCP_LISTEN` in `include/net/tcp_states.h`.
const TCP_LISTEN: u8 = 10;

/// A listening socket as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub cookie: u64,
    /// Connections in its accept queue (`idiag_rqueue`).
    pub queued: u32,
    /// Its backlog (`idiag_wqueue`).
    pub backlog: u32,
    /// `sk_drops` (SK_MEMINFO_DROPS); 0 if the kernel sent no meminfo.
    pub drops: u32,
    /// Inode of its `struct socket`.
    pub inode: u32,
}

/// One dump of a group's address.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub listeners: Vec<Listener>,
    /// Inodes of the connected sockets; 0 for a socket no process holds: queued in an
    /// accept queue, or closed by its process and being finished by the kernel.
    pub connected: Vec<u32>,
}

/// A sock_diag socket of one network namespace.
pub struct DiagSocket {
    socket: Socket,
    buf: Vec<u8>,
}

/// Big enough for one netlink datagram of a dump: the kernel fills at most a page-sized
/// (up to 32 KiB) skb per `recv`.
const RECV_BUF: usize = 64 * 1024;

impl DiagSocket {
    /// A socket in the caller's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        Ok(Self {
            socket,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// A socket in the network namespace `netns` refers to.
    pub fn open_in(netns: BorrowedFd<'_>) -> io::Result<Self> {
        use nix::sched::{CloneFlags, setns};
        // NB: setns moves the calling thread for good: never a runtime's thread.
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Self::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the sock_diag thread panicked")))
        })
    }

    /// The listeners and connected sockets bound to `addr` (a listener on the unspecified
    /// address covers connections to any local address with its port).
    pub fn dump(&mut self, addr: SocketAddr) -> io::Result<Snapshot> {
        let (family, mut id) = match addr {
            SocketAddr::V4(_) => (AF_INET, SocketId::new_v4()),
            SocketAddr::V6(_) => (AF_INET6, SocketId::new_v6()),
        };
        // The kernel skips sockets of other local ports itself (inet_diag_dump_icsk).
        id.source_port = addr.port();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::SKMEMINFO,
                states: StateFlags::LISTEN | connected_states(),
                socket_id: id,
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        let mut snapshot = Snapshot::default();
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            if n > self.buf.len() {
                return Err(io::Error::other("sock_diag answer truncated"));
            }
            let mut rest = &self.buf[..n];
            while !rest.is_empty() {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                    .map_err(|e| io::Error::other(format!("malformed sock_diag answer: {e}")))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(snapshot),
                    NetlinkPayload::Error(e) => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        take(&mut snapshot, &r, addr);
                    }
                    _ => {}
                }
                // NB: netlink messages are 4-byte aligned within a datagram.
                let step = len.next_multiple_of(4);
                if len == 0 || step > rest.len() {
                    break;
                }
                rest = &rest[step..];
            }
        }
    }
}

/// The states `ss -tn` lists by default: every connected state but SYN-RECV and TIME-WAIT
/// (and CLOSE). Neither of those has a process to hold it.
fn connected_states() -> StateFlags {
    StateFlags::ESTABLISHED
        | StateFlags::SYN_SENT
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
}

fn take(snapshot: &mut Snapshot, r: &InetResponse, group: SocketAddr) {
    let h = &r.header;
    let (local, group_ip): (IpAddr, IpAddr) = (h.socket_id.source_address, group.ip());
    if h.socket_id.source_port != group.port() {
        return;
    }
    if h.state == TCP_LISTEN {
        if local != group_ip {
            return;
        }
        let drops = r
            .nlas
            .iter()
            .find_map(|n| match n {
                Nla::MemInfo(m) => Some(m.drops),
                _ => None,
            })
            .unwrap_or(0);
        snapshot.listeners.push(Listener {
            cookie: cookie(&h.socket_id.cookie),
            queued: h.recv_queue,
            backlog: h.send_queue,
            drops,
            inode: h.inode,
        });
    } else if group_ip.is_unspecified() || local == group_ip {
        snapshot.connected.push(h.inode);
    }
}

/// `idiag_cookie` is two u32 in host order, low half first (`sock_diag_save_cookie`).
fn cookie(raw: &[u8; 8]) -> u64 {
    let half = |b: &[u8]| u64::from(u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    half(&raw[..4]) | (half(&raw[4..]) << 32)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use socket2::SockRef;

    use super::*;

    #[test]
    fn cookies_are_two_host_order_halves() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x0403_0201u32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x0807_0605u32.to_ne_bytes());
        assert_eq!(cookie(&raw), 0x0807_0605_0403_0201);
    }

    /// The dump finds a listener by its SO_COOKIE, with its queue and backlog, and the
    /// connections on its port (unprivileged: sock_diag needs no capability).
    #[test]
    fn dump_sees_a_listener_and_its_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let own = SockRef::from(&listener).cookie().expect("SO_COOKIE");
        let _clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let (held, _) = listener.accept().expect("accept");
        let mut diag = DiagSocket::open().expect("sock_diag socket");
        let snap = diag.dump(addr).expect("dump");
        let l = snap
            .listeners
            .iter()
            .find(|l| l.cookie == own)
            .unwrap_or_else(|| panic!("the listener should be in the dump: {snap:?}"));
        assert_eq!(l.queued, 2, "two connections wait to be accepted: {snap:?}");
        assert!(l.backlog > 0, "{snap:?}");
        assert_eq!(
            snap.connected.len(),
            3,
            "three server-side sockets: {snap:?}"
        );
        let held_inode = inode_of(&held);
        assert!(snap.connected.contains(&held_inode), "{snap:?}");
        assert_eq!(
            snap.connected.iter().filter(|i| **i == 0).count(),
            2,
            "queued connections have no inode yet: {snap:?}"
        );
    }

    fn inode_of(s: &TcpStream) -> u32 {
        use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
        std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .expect("fd")
            .ino() as u32
    }
}
