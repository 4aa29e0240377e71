//! A registration: the listener's place in its group, for as long as its control
//! connection stays open, and the generation's state as the agent pushes it (see
//! [`crate::rejoin`] for what happens when the agent restarts).

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use reuseport_proto::{GenState, GroupAddr, Op, Register, Reply, frame::Conn};
use socket2::SockRef;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    ClientError,
    control::{connect_conn, round_trip},
    rejoin::{Rejoin, SocketSource, follow},
};

/// Options for one registration: where the agent is, what to ask of it, and whether to come
/// back when it restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterOptions {
    /// The agent's control socket.
    pub control: PathBuf,
    /// The `register` request as it is sent (group, generation, name, activation, and for
    /// a launcher the server's pid and whether it supervises).
    pub request: Register,
    /// Reconnect and register the socket again when the agent goes away (restart,
    /// upgrade), for as long as the socket stays open.
    pub reconnect: bool,
}

impl RegisterOptions {
    /// Options with the default control socket, no name, not activating, reconnecting.
    pub fn new(group: GroupAddr, generation: u32) -> Self {
        Self {
            control: PathBuf::from(crate::DEFAULT_CONTROL_PATH),
            request: Register::new(group, generation),
            reconnect: true,
        }
    }
}

/// A live registration. It keeps the control connection open: closing it (dropping the
/// `Registration`) unregisters the socket. If the agent goes away, it reconnects and
/// registers the socket again (unless [`RegisterOptions::reconnect`] is off).
#[derive(Debug)]
pub struct Registration {
    group: GroupAddr,
    generation: u32,
    slot: u32,
    state: watch::Receiver<GenState>,
    /// Restart ids the agent pushed (supervised registrations only).
    restarts: Option<mpsc::UnboundedReceiver<u64>>,
    /// Follows the agent's pushes and reconnects; owns the connection. `None` once
    /// [`Registration::closed`] saw it finish.
    reader: Option<JoinHandle<Result<(), ClientError>>>,
    shared: Arc<Shared>,
}

/// What the registration's task shares with its handle.
#[derive(Debug)]
pub(crate) struct Shared {
    /// A second descriptor of the current connection's socket, so that `drop` can shut the
    /// connection down at once rather than when the runtime next polls the aborted task.
    pub(crate) shutdown: Mutex<Option<OwnedFd>>,
    /// Where to find the socket to register it again.
    pub(crate) source: Mutex<SocketSource>,
}

impl Shared {
    pub(crate) fn set_connection(&self, conn: &Conn) {
        let dup = conn.stream().as_fd().try_clone_to_owned().ok();
        *self.shutdown.lock().expect("not poisoned") = dup;
    }
}

impl Registration {
    /// The slot the agent gave the socket in the group's socket array.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The group as the agent names it (with its network namespace).
    pub fn group(&self) -> GroupAddr {
        self.group
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The generation's state, updated whenever the agent pushes a change. The sender side
    /// is dropped when the registration ends, so `changed()` then fails.
    pub fn state(&self) -> watch::Receiver<GenState> {
        self.state.clone()
    }

    /// The socket now lives as descriptor `fd` of process `pid` (a launcher handed it to
    /// its server and closed its own copy): that is where a re-registration finds it.
    pub fn follow_child(&self, pid: i32, fd: RawFd) {
        *self.shared.source.lock().expect("not poisoned") = SocketSource::Child { pid, fd };
    }

    /// The ids of the restarts the agent forwards to this registration (`reuseportctl
    /// restart`); only a supervised registration gets any. `None` after the first call.
    pub fn take_restart_requests(&mut self) -> Option<mpsc::UnboundedReceiver<u64>> {
        self.restarts.take()
    }

    /// Resolves when the registration ends for good: `Ok` when the socket was closed (or,
    /// without reconnect, when the agent closed the connection cleanly), `Err` when the
    /// agent refused to take the socket back or, without reconnect, the connection broke.
    /// Either way the socket is no longer registered. Cancel-safe; resolves at once on
    /// later calls.
    pub async fn closed(&mut self) -> Result<(), ClientError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(());
        };
        let res = reader.await;
        self.reader = None;
        match res {
            Ok(res) => res,
            Err(e) => Err(ClientError::Io {
                context: "registration reader task failed".into(),
                source: io::Error::other(e),
            }),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The agent must see the close even if the runtime is never polled again.
        if let Some(fd) = self.shared.shutdown.lock().expect("not poisoned").as_ref() {
            let _ = SockRef::from(fd).shutdown(std::net::Shutdown::Both);
        }
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

/// Applies pushed state changes until the connection ends.
pub(crate) async fn read_pushed(
    conn: &mut Conn,
    generation: u32,
    state: &watch::Sender<GenState>,
    restarts: &mpsc::UnboundedSender<u64>,
) -> Result<(), ClientError> {
    loop {
        match conn.recv_msg::<Reply>().await? {
            None => return Ok(()),
            Some((
                Reply::State {
                    generation: g,
                    state: s,
                    ..
                },
                _,
            )) if g == generation => {
                state.send_replace(s);
            }
            Some((Reply::Restart { id, .. }, _)) => {
                // Nobody listening (not a supervisor): the agent never sends one then.
                let _ = restarts.send(id);
            }
            Some((other, _)) => {
                tracing::debug!(reply = other.name(), "ignoring unexpected pushed frame");
            }
        }
    }
}

/// Registers the listening `socket` with the agent as `opts.request` says. The agent checks
/// that it is a listening TCP socket with `SO_REUSEPORT` bound to the group's address.
pub async fn register(
    socket: BorrowedFd<'_>,
    opts: &RegisterOptions,
) -> Result<Registration, ClientError> {
    let cookie = SockRef::from(&socket)
        .cookie()
        .map_err(|source| ClientError::Io {
            context: "reading the socket's cookie (SO_COOKIE)".into(),
            source,
        })?;
    let mut conn = connect_conn(&opts.control).await?;
    let op = Op::Register(opts.request.clone());
    let (group, generation, slot, state) = match round_trip(&mut conn, op, Some(socket)).await? {
        Reply::Registered {
            group,
            generation,
            slot,
            state,
        } => (group, generation, slot, state),
        other => {
            return Err(ClientError::UnexpectedReply {
                request: "register",
                reply: other.name(),
            });
        }
    };
    let shared = Arc::new(Shared {
        shutdown: Mutex::new(None),
        source: Mutex::new(SocketSource::Fd(socket.as_raw_fd())),
    });
    shared.set_connection(&conn);
    let (tx, rx) = watch::channel(state);
    let (restarts_tx, restarts_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(follow(
        conn,
        Rejoin {
            // NB: the agent's name for the group, @NETNS included (see in_caller_netns).
            opts: RegisterOptions {
                request: Register {
                    group,
                    ..opts.request.clone()
                },
                ..opts.clone()
            },
            cookie,
            shared: shared.clone(),
        },
        tx,
        restarts_tx,
    ));
    Ok(Registration {
        group,
        generation,
        slot,
        state: rx,
        restarts: Some(restarts_rx),
        reader: Some(reader),
        shared,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use reuseport_proto::{ErrorKind, Request};
    use socket2::SockRef;

    use super::*;
    use crate::{
        bind_and_register,
        testing::{accept, recv_request, registration_fixture},
    };

    #[tokio::test]
    async fn register_passes_the_socket_and_follows_pushed_state() {
        let (_dir, listener, _probe, g, mut opts) = registration_fixture(7);
        opts.request.name = Some("v7".into());

        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let agent = tokio::spawn(async move {
            let mut conn = accept(&listener).await;
            let (req, fds) = recv_request(&mut conn).await;
            assert_eq!(
                req,
                Request::new(Op::Register(Register {
                    group: g,
                    generation: 7,
                    name: Some("v7".into()),
                    activate: false,
                    supervised: false,
                    server_pid: None,
                }))
            );
            assert_eq!(fds.len(), 1, "register should carry exactly one descriptor");
            let local = SockRef::from(&fds[0]).local_addr().unwrap().as_socket();
            assert_eq!(
                local,
                Some(g.addr),
                "the passed socket should be the group's listener"
            );
            let canonical = GroupAddr {
                netns: Some(4026531840),
                ..g
            };
            let reply = Reply::Registered {
                group: canonical,
                generation: 7,
                slot: 3,
                state: GenState::Standby,
            };
            conn.send(&reply, None).await.unwrap();
            let push = |state| Reply::State {
                group: canonical,
                generation: 7,
                state,
            };
            conn.send(&push(GenState::Active), None).await.unwrap();
            conn.send(&push(GenState::Draining), None).await.unwrap();
            // The client closes the connection when the Registration is dropped.
            let end = tokio::time::timeout(Duration::from_secs(5), conn.recv()).await;
            closed_tx.send(matches!(end, Ok(Ok(None)))).unwrap();
        });

        let (tcp, reg) = bind_and_register(&opts).await.expect("bind and register");
        assert_eq!(tcp.local_addr().unwrap(), g.addr);
        assert_eq!(reg.slot(), 3);
        assert_eq!(reg.generation(), 7);
        assert_eq!(
            reg.group().netns,
            Some(4026531840),
            "group as the agent names it"
        );
        let mut state = reg.state();
        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| *s == GenState::Draining),
        )
        .await
        .expect("pushed draining state should reach the watch within 5 s")
        .map(|s| *s);
        assert_eq!(seen.unwrap(), GenState::Draining);

        // Dropping without polling the runtime afterwards must still close the connection.
        drop(reg);
        assert!(
            closed_rx.await.unwrap(),
            "agent should see a clean close when the Registration is dropped"
        );
        agent.await.unwrap();
        assert!(
            state.changed().await.is_err(),
            "state watch should end with the connection"
        );
    }

    #[tokio::test]
    async fn closed_resolves_when_the_agent_goes_away() {
        let (_dir, listener, tcp, g, mut opts) = registration_fixture(1);
        opts.reconnect = false;
        let agent = tokio::spawn(async move {
            let mut conn = accept(&listener).await;
            recv_request(&mut conn).await;
            let reply = Reply::Registered {
                group: g,
                generation: 1,
                slot: 0,
                state: GenState::Active,
            };
            conn.send(&reply, None).await.unwrap();
        });
        let mut reg = register(tcp.as_fd(), &opts).await.expect("register");
        agent.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), reg.closed())
            .await
            .expect("closed() should resolve once the agent closed the connection")
            .expect("a clean close");
        reg.closed().await.expect("later calls resolve at once");
    }

    #[tokio::test]
    async fn a_restarted_agent_gets_the_same_socket_again() {
        let (_dir, listener, tcp, g, mut opts) = registration_fixture(4);
        opts.request.activate = true;
        let cookie = SockRef::from(&tcp).cookie().unwrap();
        let registered = move |state| Reply::Registered {
            group: g,
            generation: 4,
            slot: 9,
            state,
        };
        let agent = tokio::spawn(async move {
            let mut first = accept(&listener).await;
            recv_request(&mut first).await;
            first
                .send(&registered(GenState::Active), None)
                .await
                .unwrap();
            drop(first); // the agent dies
            let mut second = accept(&listener).await;
            let (req, fds) = recv_request(&mut second).await;
            assert_eq!(fds.len(), 1, "the socket should come along again");
            assert_eq!(
                SockRef::from(&fds[0]).cookie().unwrap(),
                cookie,
                "the very same socket should be registered again"
            );
            assert!(
                matches!(
                    req.op,
                    Op::Register(Register {
                        generation: 4,
                        activate: false,
                        ..
                    })
                ),
                "a re-registration must not activate again: {req:?}"
            );
            second
                .send(&registered(GenState::Draining), None)
                .await
                .unwrap();
            second
        });
        let mut reg = register(tcp.as_fd(), &opts).await.expect("register");
        let mut state = reg.state();
        tokio::time::timeout(
            Duration::from_secs(5),
            state.wait_for(|s| *s == GenState::Draining),
        )
        .await
        .expect("the state from the re-registration should reach the watch")
        .unwrap();
        let second = agent.await.unwrap();
        // Socket closed, then the agent goes away again: nothing left to register.
        drop(tcp);
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), reg.closed())
            .await
            .expect("closed() should resolve once the socket is gone")
            .expect("a clean end");
    }

    #[tokio::test]
    async fn register_error_is_the_agents_message() {
        let (_dir, listener, tcp, _g, opts) = registration_fixture(1);
        let agent = tokio::spawn(async move {
            let mut conn = accept(&listener).await;
            recv_request(&mut conn).await;
            let reply = Reply::Error {
                kind: ErrorKind::Limit,
                message: "group is full (64 sockets)".into(),
            };
            conn.send(&reply, None).await.unwrap();
        });
        let err = register(tcp.as_fd(), &opts).await.unwrap_err();
        assert_eq!(err.to_string(), "group is full (64 sockets)");
        agent.await.unwrap();
    }
}
