//! Probe connections: a TCP connection from a loopback address and a source port in
//! [`PROBE_PORTS`] reaches the group's **newest** generation whatever its state (README,
//! "Steering policy", rule 0), so a health check can reach a standby generation through the
//! real port before any client does. Binding a port below 1024 needs `CAP_NET_BIND_SERVICE`.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

pub use reuseport_common::PROBE_PORTS;

/// Where a probe of a group listening on `addr` connects: `addr` itself, or the loopback
/// address of its family when it is the unspecified address (`0.0.0.0`, `[::]`).
pub fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The next probe port to try: probes take turns over [`PROBE_PORTS`].
static NEXT: AtomicU16 = AtomicU16::new(0);

/// Connects to `target` from a free port of [`PROBE_PORTS`] (each call starts at the next
/// one) on the loopback address of `target`'s family, within `timeout`.
///
/// NB: the connection is reset when it is dropped (`SO_LINGER` 0): a port reused for the
/// next probe must not find its last connection in TIME-WAIT on either side (the server's
/// TIME-WAIT ends on the reset), with 16 ports shared by every probe.
pub fn connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let source_ip: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    let (first, count) = (*PROBE_PORTS.start(), PROBE_PORTS.len() as u16);
    let start = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut last = None;
    for port in (0..count).map(|i| first + start.wrapping_add(i) % count) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            None,
        )?;
        // NB: a port this prober used moments ago may still be in TIME-WAIT.
        socket.set_reuse_address(true)?;
        socket.set_linger(Some(Duration::ZERO))?;
        match socket.bind(&SocketAddr::new(source_ip, port).into()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(e);
                continue;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot bind probe port {source_ip}:{port}: {e}"),
                ));
            }
        }
        match socket.connect_timeout(&target.into(), timeout) {
            Ok(()) => return Ok(socket.into()),
            // The 4-tuple is still in TIME-WAIT from an earlier probe: try the next port.
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no probe port")))
}
