//! Registering a socket again after the agent restarted: where the socket is found again,
//! and the reconnect loop, which retries until the socket is back or gone: a refusal the
//! agent calls temporary (`ErrorKind::is_temporary`) is retried like a closed connection.
//!
//! A registration does not keep a descriptor of its own: a second descriptor would keep
//! the listener open after the server closed it, and the connections queued on it would
//! neither be accepted nor migrated. It remembers where the socket lives instead, and the
//! socket's cookie to be sure it finds the same one.

use std::{
    io,
    os::fd::{AsFd, FromRawFd as _, OwnedFd, RawFd},
    sync::Arc,
    time::Duration,
};

use socket2::SockRef;
use tokio::sync::{mpsc, watch};

use reuseport_proto::{GenState, Op, Register, Reply, frame::Conn};

use crate::{
    ClientError, RegisterOptions,
    control::{connect_conn, round_trip},
    registration::{Shared, read_pushed},
};

/// Where a registered socket can be found again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// A descriptor of this process (the client library's caller owns the listener).
    Fd(RawFd),
    /// A descriptor of a child process (a launcher's server), fetched with `pidfd_getfd`.
    Child { pid: i32, fd: RawFd },
}

impl SocketSource {
    /// A new descriptor of the socket, if it is still open and still the one with `cookie`
    /// (the descriptor number may have been reused).
    pub fn fetch(self, cookie: u64) -> Option<OwnedFd> {
        let fd = match self {
            Self::Fd(fd) => dup(fd),
            Self::Child { pid, fd } => fd_of_process(pid, fd),
        }
        .ok()?;
        (SockRef::from(&fd.as_fd()).cookie().ok()? == cookie).then_some(fd)
    }
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on any number is safe; a closed one gives EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor fcntl just created for us.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `pidfd_open` + `pidfd_getfd` (Linux 5.6+; needs ptrace access to `pid`, which a parent
/// of the same uid, or root, has).
fn fd_of_process(pid: i32, fd: RawFd) -> io::Result<OwnedFd> {
    let raw = |rc: libc::c_long| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as RawFd)
        }
    };
    // SAFETY: plain syscalls with integer arguments.
    let pidfd = raw(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: pidfd_open returned a descriptor we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    use std::os::fd::AsRawFd as _;
    // SAFETY: as above; the new descriptor is close-on-exec.
    let got = raw(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: pidfd_getfd returned a descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

/// What a registration needs to register its socket again.
pub(crate) struct Rejoin {
    pub(crate) opts: RegisterOptions,
    pub(crate) cookie: u64,
    pub(crate) shared: Arc<Shared>,
}

/// The registration's task: follows pushes and, when the agent goes away, registers the
/// socket again on a new connection.
pub(crate) async fn follow(
    mut conn: Conn,
    rejoin: Rejoin,
    state: watch::Sender<GenState>,
    restarts: mpsc::UnboundedSender<u64>,
) -> Result<(), ClientError> {
    let opts = &rejoin.opts;
    loop {
        let end = read_pushed(&mut conn, opts.request.generation, &state, &restarts).await;
        if !opts.reconnect {
            return end;
        }
        tracing::warn!(
            group = %opts.request.group, generation = opts.request.generation,
            "lost the agent's control connection; registering the socket again when it is back"
        );
        match register_again(&rejoin, &state).await? {
            Some(new) => conn = new,
            None => return Ok(()),
        }
    }
}

/// Reconnects with backoff and registers the socket again. `None` once the socket is gone.
async fn register_again(
    rejoin: &Rejoin,
    state: &watch::Sender<GenState>,
) -> Result<Option<Conn>, ClientError> {
    let Rejoin {
        opts,
        cookie,
        shared,
    } = rejoin;
    let mut backoff = Backoff::new();
    loop {
        tokio::time::sleep(backoff.next_delay()).await;
        let source = *shared.source.lock().expect("not poisoned");
        let Some(socket) = source.fetch(*cookie) else {
            return Ok(None);
        };
        let Ok(mut conn) = connect_conn(&opts.control).await else {
            continue;
        };
        // The agent keeps the generation's state; `activate` was for the first time only.
        let op = Op::Register(Register {
            activate: false,
            ..opts.request.clone()
        });
        match round_trip(&mut conn, op, Some(socket.as_fd())).await {
            Ok(Reply::Registered { state: s, slot, .. }) => {
                state.send_replace(s);
                shared.set_connection(&conn);
                tracing::info!(group = %opts.request.group, generation = opts.request.generation, slot, "socket registered again");
                return Ok(Some(conn));
            }
            Ok(other) => {
                return Err(ClientError::UnexpectedReply {
                    request: "register",
                    reply: other.name(),
                });
            }
            // NB: a limit or a kernel failure may be gone at the next try (another group
            // closed, the agent is still adopting): the server must not stay unregistered
            // for good because of it.
            Err(ClientError::Agent { kind, message }) if kind.is_temporary() => {
                tracing::warn!(
                    group = %opts.request.group, generation = opts.request.generation, ?kind, %message,
                    "the agent refused the socket for now; trying again"
                );
            }
            Err(e @ ClientError::Agent { .. }) => return Err(e),
            // The agent went away again, or is not accepting yet.
            Err(_) => {}
        }
    }
}

/// Delays between reconnect attempts: short at first (an agent restart takes tens of
/// milliseconds), then at most one attempt per second for as long as the agent is away.
pub struct Backoff(Duration);

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(20);
    pub const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Self(Self::FIRST)
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_second() {
        let mut b = Backoff::new();
        let delays: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [20, 40, 80, 160, 320, 640, 1000, 1000]);
    }

    #[test]
    fn fetch_finds_the_same_socket_and_nothing_else() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cookie = SockRef::from(&a).cookie().unwrap();
        let src = SocketSource::Fd(a.as_raw_fd());
        let got = src.fetch(cookie).expect("the open listener is found");
        assert_eq!(SockRef::from(&got).cookie().unwrap(), cookie);
        assert!(
            src.fetch(cookie + 1).is_none(),
            "another cookie is not our socket"
        );
        let raw = a.as_raw_fd();
        drop((a, got));
        assert!(
            SocketSource::Fd(raw).fetch(cookie).is_none(),
            "a closed descriptor is not found"
        );
        let me = std::process::id() as i32;
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cookie = SockRef::from(&b).cookie().unwrap();
        let src = SocketSource::Child {
            pid: me,
            fd: b.as_raw_fd(),
        };
        assert!(src.fetch(cookie).is_some(), "pidfd_getfd finds it too");
    }
}
