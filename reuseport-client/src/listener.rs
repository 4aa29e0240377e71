//! The listening socket a group member needs: `SO_REUSEPORT` before `bind`, and errors that
//! say why binding failed.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::ClientError;
#[cfg(feature = "tokio")]
use crate::{RegisterOptions, Registration, register};

/// Backlog of listeners created by [`reuseport_listener`]. The kernel caps it at
/// `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Creates a listening TCP socket that can join a reuseport group: `SO_REUSEPORT` (and
/// `SO_REUSEADDR`, as `std`'s `TcpListener::bind` sets it) before `bind`, backlog
/// [`LISTEN_BACKLOG`], non-blocking, close-on-exec.
///
/// `IPV6_V6ONLY` is left at the system default (`net.ipv6.bindv6only`, normally 0, so
/// `[::]` also accepts IPv4): the kernel only groups sockets that agree on it, and servers
/// that bind themselves use that default too.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    // NB: socket2 creates the socket with SOCK_CLOEXEC on Linux.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The error for a listener that could not be created on `addr`, with a hint at the usual
/// causes.
pub fn listen_error(addr: SocketAddr, source: io::Error) -> ClientError {
    let hint = match source.kind() {
        io::ErrorKind::AddrInUse => {
            " (the address is held by a socket without SO_REUSEPORT, or by another user: \
             members of a reuseport group must share the owner uid)"
        }
        io::ErrorKind::AddrNotAvailable => " (no local interface has that address)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    };
    ClientError::Listen { addr, hint, source }
}

/// [`reuseport_listener`] on the group's address, then [`register`](crate::register). The returned
/// [`Registration`] must live as long as the listener serves the group.
///
/// As the README shows it:
///
/// ```no_run
/// # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
/// use reuseport_client::{ControlClient, RegisterOptions, bind_and_register};
///
/// let opts = RegisterOptions::new("tcp://127.0.0.1:8080".parse()?, 2);
/// let (listener, registration) = bind_and_register(&opts).await?; // tokio TcpListener
/// let mut state = registration.state(); // watch::Receiver<GenState>, pushed by the agent
/// // … serve; when *state.borrow() becomes Draining, finish in-flight work and exit.
/// # let _ = (listener, state.borrow_and_update());
///
/// let mut control = ControlClient::connect(reuseport_client::DEFAULT_CONTROL_PATH).await?;
/// for g in &control.status(Some(opts.request.group)).await?[0].generations {
///     // GenerationLive { connections, queued }; drain: Serving / Idle / Signalled / Killed
///     println!("{} {:?} {:?}", g.generation, g.live.map(|l| l.in_flight()), g.drain);
/// }
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "tokio")]
pub async fn bind_and_register(
    opts: &RegisterOptions,
) -> Result<(tokio::net::TcpListener, Registration), ClientError> {
    let addr = opts.request.group.addr;
    let listener = reuseport_listener(addr).map_err(|e| listen_error(addr, e))?;
    let registration = register(std::os::fd::AsFd::as_fd(&listener), opts).await?;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| ClientError::Io {
            context: "cannot add the listener to the tokio runtime".into(),
            source,
        })?;
    Ok((listener, registration))
}

#[cfg(test)]
mod tests {
    use socket2::SockRef;

    use super::*;

    #[test]
    fn listeners_share_a_port() {
        let a = reuseport_listener("127.0.0.1:0".parse().unwrap()).expect("first listener");
        let addr = a.local_addr().unwrap();
        let b = reuseport_listener(addr).expect("second listener on the same port");
        for l in [&a, &b] {
            let s = SockRef::from(l);
            assert!(s.reuse_port().unwrap(), "SO_REUSEPORT should be set");
            assert!(s.nonblocking().unwrap(), "listener should be non-blocking");
            let flags = nix::fcntl::fcntl(l, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_eq!(
                flags & libc::FD_CLOEXEC,
                libc::FD_CLOEXEC,
                "listener should be CLOEXEC"
            );
        }
        // A plain listener on the same port has no SO_REUSEPORT: the hint must say so.
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = reuseport_listener(plain.local_addr().unwrap()).unwrap_err();
        let err = listen_error(plain.local_addr().unwrap(), err);
        assert!(err.to_string().contains("without SO_REUSEPORT"), "{err}");
    }
}
