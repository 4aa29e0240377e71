//! Checks that a descriptor received for registration is a listening SO_REUSEPORT TCP
//! socket bound to the group's address, and reads what the agent records about it.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use nix::sys::stat::{SFlag, fstat};
use socket2::{Domain, Protocol, SockRef, Type};

use super::registry::Refusal;
use reuseport_proto::{
    addr::{GroupAddr, GroupKey},
    message::ErrorKind,
};

/// What the agent keeps about a registered listener.
#[derive(Debug)]
pub struct Listener {
    pub key: GroupKey,
    /// Owner of the socket (the uid that created it).
    pub uid: u32,
    pub cookie: u64,
    /// The socket's network namespace, kept to reach the group later (wake-ups).
    pub netns: OwnedFd,
    /// The device it is bound to (`SO_BINDTODEVICE`, a VRF included), if any: the kernel
    /// puts sockets bound to different devices in different reuseport groups.
    pub device: Option<String>,
    /// Its `sk_drops` now (0 if the kernel cannot tell): the base of the drops `status`
    /// reports.
    pub drops: u32,
}

fn invalid(msg: impl Into<String>) -> Refusal {
    Refusal::new(ErrorKind::InvalidSocket, msg)
}

pub fn check(fd: BorrowedFd<'_>, wanted: &GroupAddr) -> Result<Listener, Refusal> {
    let st = fstat(fd).map_err(|e| invalid(format!("cannot fstat the passed descriptor: {e}")))?;
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFSOCK {
        return Err(invalid(format!(
            "the passed descriptor is not a socket (it is a {}): pass the listening TCP socket",
            file_kind(kind)
        )));
    }
    let sock = SockRef::from(&fd);
    let get =
        |what: &str, e: std::io::Error| invalid(format!("cannot read the socket's {what}: {e}"));
    let domain = sock.domain().map_err(|e| get("domain", e))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(invalid(
            "the socket is not an IPv4/IPv6 socket: pass a TCP listener",
        ));
    }
    let ty = sock.r#type().map_err(|e| get("type", e))?;
    let proto = sock.protocol().map_err(|e| get("protocol", e))?;
    if ty == Type::DGRAM || proto == Some(Protocol::UDP) {
        return Err(invalid(
            "the socket is UDP: only TCP listeners can be registered",
        ));
    }
    if ty != Type::STREAM || proto != Some(Protocol::TCP) {
        return Err(invalid(
            "the socket is not a TCP socket: pass a TCP listener",
        ));
    }
    if !sock.reuse_port().map_err(|e| get("SO_REUSEPORT", e))? {
        return Err(invalid(
            "SO_REUSEPORT is not set on the socket: set it before bind() (or use reuseportctl exec)",
        ));
    }
    let local = sock
        .local_addr()
        .map_err(|e| get("address", e))?
        .as_socket()
        .ok_or_else(|| invalid("the socket has no IP address"))?;
    if local.port() == 0 {
        return Err(invalid(
            "the socket is not bound: bind it to the group's address and listen()",
        ));
    }
    if !same_addr(local, wanted.addr) {
        return Err(invalid(format!(
            "the socket is bound to {local}, not to the group's address {}: bind it to {} \
             (the group address must match exactly)",
            wanted.addr, wanted.addr
        )));
    }
    if !sock.is_listener().map_err(|e| get("listening state", e))? {
        return Err(invalid(
            "the socket is not listening: call listen() before registering",
        ));
    }
    let cookie = sock.cookie().map_err(|e| get("cookie", e))?;
    let device = sock
        .device()
        .map_err(|e| get("device (SO_BINDTODEVICE)", e))?
        .map(|name| String::from_utf8_lossy(&name).into_owned());
    let netns = socket_netns(fd).map_err(|e| get("network namespace", e))?;
    let netns_ino = fstat(&netns)
        .map_err(|e| get("network namespace", e.into()))?
        .st_ino;
    if let Some(ns) = wanted.netns
        && ns != netns_ino
    {
        return Err(invalid(format!(
            "the socket lives in network namespace {netns_ino}, not in {ns} as the group address says"
        )));
    }
    Ok(Listener {
        key: GroupKey {
            addr: local,
            netns: netns_ino,
        },
        uid: st.st_uid,
        cookie,
        netns,
        device,
        drops: drops(fd).unwrap_or(0),
    })
}

/// `SO_MEMINFO`'s `SK_MEMINFO_DROPS` (Linux 4.12+; the same figure sock_diag reports).
fn drops(fd: BorrowedFd<'_>) -> Option<u32> {
    // NB: 55 on x86, arm and the other generic-socket.h architectures; libc does not
    // export it.
    const SO_MEMINFO: libc::c_int = 55;
    const DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
    let mut info = [0u32; DROPS + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize > DROPS * 4).then_some(info[DROPS])
}

/// `0.0.0.0:80` and `[::ffff:0.0.0.0]:80` are different groups in the kernel, so compare
/// exactly, except that an IPv6 scope id is not part of what users type.
fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip() && a.port() == b.port()
}

/// `SIOCGSKNS`: a descriptor for the network namespace a socket belongs to (Linux 4.9+).
fn socket_netns(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the ioctl just created this descriptor for us.
    Ok(unsafe { OwnedFd::from_raw_fd(ns) })
}

fn file_kind(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFIFO => "pipe",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFLNK => "symlink",
        _ => "non-socket file",
    }
}
