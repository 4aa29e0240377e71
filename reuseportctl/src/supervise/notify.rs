//! The supervisor's end of NOTIFY_SOCKET (`--ready notify`): readiness messages of its
//! generations, each with the pid that sent it.

use std::{
    io::{self, IoSliceMut},
    os::fd::AsRawFd as _,
};

use nix::{
    sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt},
    unistd::Pid,
};
use tokio::io::Interest;

/// The supervisor's end of NOTIFY_SOCKET.
pub(super) struct Notifier {
    socket: tokio::net::UnixDatagram,
    /// `@reuseportctl-…`, as NOTIFY_SOCKET spells an abstract address.
    pub(super) name: String,
}

impl Notifier {
    /// NB: an abstract address belongs to the network namespace: a server that moves into
    /// another one cannot reach it. In exchange, nothing is left behind in the file system.
    pub(super) fn bind() -> io::Result<Self> {
        use std::os::linux::net::SocketAddrExt as _;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("reuseportctl-supervise-{}-{nanos}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            name: format!("@{name}"),
        })
    }

    /// The next message and the pid that sent it (from SCM_CREDENTIALS).
    async fn recv(&self) -> io::Result<(Option<Pid>, Vec<u8>)> {
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || {
                recv_with_pid(self.socket.as_raw_fd())
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

pub(super) async fn recv_notify(notifier: Option<&Notifier>) -> io::Result<(Option<Pid>, Vec<u8>)> {
    match notifier {
        Some(n) => n.recv().await,
        None => std::future::pending().await,
    }
}

fn recv_with_pid(fd: std::os::fd::RawFd) -> io::Result<(Option<Pid>, Vec<u8>)> {
    let mut buf = vec![0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    // NB: room for credentials only: descriptors someone attaches do not fit and the
    // kernel closes them instead of installing them here.
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg[..]),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let pid = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::ScmCredentials(creds) => Some(Pid::from_raw(creds.pid())),
        _ => None,
    });
    let len = msg.bytes;
    buf.truncate(len);
    Ok((pid, buf))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A datagram carries the sender's pid, as the readiness check relies on.
    #[tokio::test]
    async fn notify_messages_carry_the_sender_pid() {
        let notifier = Notifier::bind().expect("bind the notify socket");
        let name = notifier.name.strip_prefix('@').unwrap();
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to_addr(b"STATUS=x\nREADY=1\n", &addr).unwrap();
        let (pid, text) = tokio::time::timeout(Duration::from_secs(5), notifier.recv())
            .await
            .expect("message within 5 s")
            .expect("recv");
        assert_eq!(pid, Some(nix::unistd::getpid()));
        assert_eq!(text, b"STATUS=x\nREADY=1\n");
    }
}
