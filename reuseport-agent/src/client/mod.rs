//! Client library: bind a listener and register it with the agent, or ask the agent about
//! its groups.
//!
//! A server that links this crate calls [`bind_and_register`] (or [`reuseport_listener`]
//! then [`register`] when it wants to create the socket itself) and keeps the returned
//! [`Registration`] alive for as long as the listener should stay in the group: dropping it
//! closes the control connection, which unregisters the socket. [`Registration::state`]
//! follows the generation's state as the agent pushes it, so a server can stop accepting
//! when it becomes [`GenState::Draining`].
//!
//! Servers in other languages use `reuseportctl exec` instead (see [`crate::ctl`]).
//!
//! When the agent restarts, a registration reconnects with backoff and registers the same
//! socket again (see [`rejoin`]); the agent, which adopted the group from its pins, gives
//! it back its slot.

mod rejoin;

use self::rejoin::{Rejoin, SocketSource, follow};

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    net::UnixStream,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{
    addr::GroupAddr,
    frame::{Conn, FrameError},
    protocol::{
        DrainStep, ErrorKind, GenState, GroupStatus, Op, Register, Reply, Request, RestartOutcome,
    },
};

/// Backlog of listeners created by [`reuseport_listener`]. The kernel caps it at
/// `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "agent not running: no control socket at {} (start reuseport-agent, or pass --control PATH)",
        path.display()
    )]
    AgentNotRunning { path: PathBuf },
    #[error(
        "permission denied on {}: run as root or as a member of the agent's control group",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    /// The agent refused the request; its message names what to change.
    #[error("{message}")]
    Agent { kind: ErrorKind, message: String },
    #[error("agent closed the control connection before answering (see the agent's log)")]
    ConnectionClosed,
    #[error("agent answered a {request} request with an unexpected {reply} reply")]
    UnexpectedReply {
        request: &'static str,
        reply: &'static str,
    },
    #[error(transparent)]
    Protocol(#[from] FrameError),
    /// Creating or binding the listener failed.
    #[error("cannot listen on {addr}{hint}")]
    Listen {
        addr: SocketAddr,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl ClientError {
    /// The agent's error kind, when the agent refused the request.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Agent { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

fn connect_error(path: &Path, source: io::Error) -> ClientError {
    match source.kind() {
        // NB: a socket file left behind by a dead agent refuses connections: same advice.
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::AgentNotRunning {
                path: path.to_owned(),
            }
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: path.to_owned(),
        },
        _ => ClientError::Io {
            context: format!("cannot connect to {}", path.display()),
            source,
        },
    }
}

async fn connect_conn(path: &Path) -> Result<Conn, ClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| connect_error(path, e))?;
    Ok(Conn::new(stream))
}

/// Sends `op` (with `fd` attached) and returns the first reply, turning
/// [`Reply::Error`] into [`ClientError::Agent`].
async fn round_trip(
    conn: &mut Conn,
    op: Op,
    fd: Option<BorrowedFd<'_>>,
) -> Result<Reply, ClientError> {
    conn.send(&Request::new(op), fd).await?;
    match conn.recv_msg::<Reply>().await? {
        None => Err(ClientError::ConnectionClosed),
        Some((Reply::Error { kind, message }, _)) => Err(ClientError::Agent { kind, message }),
        // Descriptors are never expected on replies; dropping them closes them.
        Some((reply, _fds)) => Ok(reply),
    }
}

/// A control connection for requests that get one answer each (`status`, `activate`,
/// `drain`). Requests are answered in order, so one client serves any number of them.
#[derive(Debug)]
pub struct ControlClient {
    conn: Conn,
}

impl ControlClient {
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Ok(Self {
            conn: connect_conn(path.as_ref()).await?,
        })
    }

    /// Sends `op` and returns the agent's reply; [`Reply::Error`] becomes
    /// [`ClientError::Agent`].
    pub async fn request(&mut self, op: Op) -> Result<Reply, ClientError> {
        round_trip(&mut self.conn, op, None).await
    }

    /// All groups, or only `group`.
    pub async fn status(
        &mut self,
        group: Option<GroupAddr>,
    ) -> Result<Vec<GroupStatus>, ClientError> {
        self.status_with(group, true).await
    }

    /// [`ControlClient::status`]; `live: false` leaves out the figures the agent reads
    /// from the kernel (connections per generation, accept queues), which cost it a
    /// sock_diag query per group.
    pub async fn status_with(
        &mut self,
        group: Option<GroupAddr>,
        live: bool,
    ) -> Result<Vec<GroupStatus>, ClientError> {
        match self.request(Op::Status { group, live }).await? {
            Reply::Status { groups } => Ok(groups),
            other => Err(ClientError::UnexpectedReply {
                request: "status",
                reply: other.name(),
            }),
        }
    }

    /// Makes `generation` the active one; returns the group after the change.
    pub async fn activate(
        &mut self,
        group: GroupAddr,
        generation: u32,
    ) -> Result<GroupStatus, ClientError> {
        self.change(Op::Activate { group, generation }).await
    }

    /// From a launcher: what it did to the server of the draining `generation` (shown by
    /// `status`); returns the group after the change.
    pub async fn report_drain(
        &mut self,
        group: GroupAddr,
        generation: u32,
        step: DrainStep,
    ) -> Result<GroupStatus, ClientError> {
        self.change(Op::DrainProgress {
            group,
            generation,
            step,
        })
        .await
    }

    /// Stops sending new connections to `generation`; returns the group after the change.
    pub async fn drain(
        &mut self,
        group: GroupAddr,
        generation: u32,
    ) -> Result<GroupStatus, ClientError> {
        self.change(Op::Drain { group, generation }).await
    }

    /// Asks the `reuseportctl supervise` of `group` to start its next generation. Returns
    /// the restart's id and the supervisor's pid; [`ControlClient::restart_outcome`] then
    /// waits for the outcome on this connection.
    pub async fn restart(&mut self, group: GroupAddr) -> Result<(u64, i32), ClientError> {
        match self.request(Op::Restart { group }).await? {
            Reply::Restarting {
                id, supervisor_pid, ..
            } => Ok((id, supervisor_pid)),
            other => Err(ClientError::UnexpectedReply {
                request: "restart",
                reply: other.name(),
            }),
        }
    }

    /// The outcome of restart `id`, as the supervisor reports it. Waits as long as it
    /// takes: put a timeout around it.
    pub async fn restart_outcome(&mut self, id: u64) -> Result<RestartOutcome, ClientError> {
        loop {
            match self.conn.recv_msg::<Reply>().await? {
                None => return Err(ClientError::ConnectionClosed),
                Some((
                    Reply::RestartResult {
                        id: got, outcome, ..
                    },
                    _,
                )) if got == id => return Ok(outcome),
                Some((other, _)) => {
                    tracing::debug!(reply = other.name(), "ignoring a pushed frame");
                }
            }
        }
    }

    /// From a supervisor: how restart `id` ended.
    pub async fn report_restart(
        &mut self,
        group: GroupAddr,
        id: u64,
        outcome: RestartOutcome,
    ) -> Result<(), ClientError> {
        match self
            .request(Op::RestartResult { group, id, outcome })
            .await?
        {
            Reply::RestartResult { .. } => Ok(()),
            other => Err(ClientError::UnexpectedReply {
                request: "restart_result",
                reply: other.name(),
            }),
        }
    }

    async fn change(&mut self, op: Op) -> Result<GroupStatus, ClientError> {
        let request = op.name();
        match self.request(op).await? {
            Reply::Changed { group } => Ok(group),
            other => Err(ClientError::UnexpectedReply {
                request,
                reply: other.name(),
            }),
        }
    }
}

/// Options for one registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterOptions {
    /// The agent's control socket.
    pub control: PathBuf,
    pub group: GroupAddr,
    pub generation: u32,
    /// Shown by `reuseportctl status`; at most [`crate::protocol::MAX_NAME_LEN`] bytes.
    pub name: Option<String>,
    /// Make the generation active as soon as the socket is registered.
    pub activate: bool,
    /// Reconnect and register the socket again when the agent goes away (restart,
    /// upgrade), for as long as the socket stays open.
    pub reconnect: bool,
}

impl RegisterOptions {
    /// Options with the default control socket, no name, not activating.
    pub fn new(group: GroupAddr, generation: u32) -> Self {
        Self {
            control: PathBuf::from(crate::DEFAULT_CONTROL_PATH),
            group,
            generation,
            name: None,
            activate: false,
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
struct Shared {
    /// A second descriptor of the current connection's socket, so that `drop` can shut the
    /// connection down at once rather than when the runtime next polls the aborted task.
    shutdown: Mutex<Option<OwnedFd>>,
    /// Where to find the socket to register it again.
    source: Mutex<SocketSource>,
}

impl Shared {
    fn set_connection(&self, conn: &Conn) {
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
async fn read_pushed(
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

/// Registers the listening `socket` with the agent. The agent checks that it is a
/// listening TCP socket with `SO_REUSEPORT` bound to the group's address.
pub async fn register(
    socket: BorrowedFd<'_>,
    opts: &RegisterOptions,
) -> Result<Registration, ClientError> {
    register_for(socket, opts, &Launcher::default()).await
}

/// What a launcher (`reuseportctl exec` / `supervise`) adds to a registration it makes on
/// behalf of a server.
#[derive(Clone, Debug, Default)]
pub(crate) struct Launcher {
    /// The launcher is a supervisor that takes `restart` requests.
    pub supervised: bool,
    /// The server's pid, for `status`.
    pub server_pid: Option<i32>,
}

pub(crate) async fn register_for(
    socket: BorrowedFd<'_>,
    opts: &RegisterOptions,
    launcher: &Launcher,
) -> Result<Registration, ClientError> {
    let cookie = SockRef::from(&socket)
        .cookie()
        .map_err(|source| ClientError::Io {
            context: "reading the socket's cookie (SO_COOKIE)".into(),
            source,
        })?;
    let mut conn = connect_conn(&opts.control).await?;
    let op = Op::Register(Register {
        group: opts.group,
        generation: opts.generation,
        name: opts.name.clone(),
        activate: opts.activate,
        supervised: launcher.supervised,
        server_pid: launcher.server_pid,
    });
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
                group,
                ..opts.clone()
            },
            launcher: launcher.clone(),
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

pub(crate) fn listen_error(addr: SocketAddr, source: io::Error) -> ClientError {
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

/// [`reuseport_listener`] on the group's address, then [`register`]. The returned
/// [`Registration`] must live as long as the listener serves the group.
pub async fn bind_and_register(
    opts: &RegisterOptions,
) -> Result<(tokio::net::TcpListener, Registration), ClientError> {
    let addr = opts.group.addr;
    let listener = reuseport_listener(addr).map_err(|e| listen_error(addr, e))?;
    let registration = register(listener.as_fd(), opts).await?;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|source| ClientError::Io {
            context: "cannot add the listener to the tokio runtime".into(),
            source,
        })?;
    Ok((listener, registration))
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use tokio::net::UnixListener;

    use super::*;
    use crate::protocol::{Counters, GenerationStatus};

    /// A directory of its own for each test's control socket.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "reuseport-client-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }

        fn sock(&self) -> PathBuf {
            self.0.join("agent.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn group(s: &str) -> GroupAddr {
        s.parse().expect("valid group address")
    }

    fn status_of(group: GroupAddr, active: u32) -> GroupStatus {
        GroupStatus {
            group,
            mode: "select-or-migrate".into(),
            active: Some(active),
            falling_back: false,
            generations: vec![GenerationStatus {
                generation: active,
                name: None,
                state: GenState::Active,
                sockets: vec![],
                counters: Counters::default(),
                live: None,
                drain: None,
            }],
            unsteered: 0,
            limits: None,
            last_restart: None,
            live: None,
        }
    }

    async fn accept(listener: &UnixListener) -> Conn {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("client should connect within 5 s")
            .expect("accept");
        Conn::new(stream)
    }

    async fn recv_request(conn: &mut Conn) -> (Request, Vec<OwnedFd>) {
        tokio::time::timeout(Duration::from_secs(5), conn.recv_msg::<Request>())
            .await
            .expect("client should send a request within 5 s")
            .expect("well-formed request")
            .expect("a request, not a close")
    }

    /// A fake agent's control socket, a listener on a free port, and options registering it
    /// as `generation` through that socket. The TempDir must outlive the test.
    fn registration_fixture(
        generation: u32,
    ) -> (
        TempDir,
        UnixListener,
        std::net::TcpListener,
        GroupAddr,
        RegisterOptions,
    ) {
        let dir = TempDir::new();
        let listener = UnixListener::bind(dir.sock()).expect("bind");
        // A port nobody else holds, then the group on it.
        let tcp = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let g = group(&format!("tcp://{}", tcp.local_addr().unwrap()));
        let mut opts = RegisterOptions::new(g, generation);
        opts.control = dir.sock();
        (dir, listener, tcp, g, opts)
    }

    #[tokio::test]
    async fn missing_socket_means_agent_not_running() {
        let dir = TempDir::new();
        let err = ControlClient::connect(dir.sock()).await.unwrap_err();
        assert!(
            matches!(err, ClientError::AgentNotRunning { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.sock().display().to_string()),
            "message names the path: {msg}"
        );
        assert!(
            msg.contains("--control"),
            "message says how to fix it: {msg}"
        );
    }

    #[tokio::test]
    async fn stale_socket_file_means_agent_not_running() {
        let dir = TempDir::new();
        drop(std::os::unix::net::UnixListener::bind(dir.sock()).expect("bind"));
        let err = ControlClient::connect(dir.sock()).await.unwrap_err();
        assert!(
            matches!(err, ClientError::AgentNotRunning { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn eacces_means_permission_denied() {
        // Root bypasses file permissions, so the mapping is tested without a real socket.
        let err = connect_error(Path::new("/x"), io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(
            err.to_string(),
            "permission denied on /x: run as root or as a member of the agent's control group"
        );
    }

    #[tokio::test]
    async fn requests_round_trip_and_agent_errors_keep_their_message() {
        let dir = TempDir::new();
        let listener = UnixListener::bind(dir.sock()).expect("bind");
        let g = group("tcp://127.0.0.1:8080");
        let agent = tokio::spawn(async move {
            let mut conn = accept(&listener).await;
            let (req, _) = recv_request(&mut conn).await;
            assert_eq!(
                req,
                Request::new(Op::Status {
                    group: None,
                    live: true
                })
            );
            conn.send(
                &Reply::Status {
                    groups: vec![status_of(g, 1)],
                },
                None,
            )
            .await
            .unwrap();
            let (req, _) = recv_request(&mut conn).await;
            assert_eq!(
                req,
                Request::new(Op::Activate {
                    group: g,
                    generation: 2
                })
            );
            conn.send(
                &Reply::Changed {
                    group: status_of(g, 2),
                },
                None,
            )
            .await
            .unwrap();
            let (req, _) = recv_request(&mut conn).await;
            assert_eq!(
                req,
                Request::new(Op::Drain {
                    group: g,
                    generation: 2
                })
            );
            let reply = Reply::Error {
                kind: ErrorKind::Conflict,
                message: "generation 2 is the active generation of tcp://127.0.0.1:8080; \
                          activate another one first"
                    .into(),
            };
            conn.send(&reply, None).await.unwrap();
        });
        let mut client = ControlClient::connect(dir.sock()).await.expect("connect");
        assert_eq!(client.status(None).await.unwrap(), vec![status_of(g, 1)]);
        assert_eq!(client.activate(g, 2).await.unwrap(), status_of(g, 2));
        let err = client.drain(g, 2).await.unwrap_err();
        assert_eq!(err.agent_kind(), Some(ErrorKind::Conflict));
        assert!(
            err.to_string().starts_with("generation 2 is the active"),
            "{err}"
        );
        agent.await.unwrap();
        let err = client.status(None).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::ConnectionClosed | ClientError::Protocol(_)
            ),
            "a closed connection should be an error: {err:?}"
        );
    }

    #[tokio::test]
    async fn unexpected_reply_is_an_error() {
        let dir = TempDir::new();
        let listener = UnixListener::bind(dir.sock()).expect("bind");
        let g = group("tcp://127.0.0.1:8080");
        let agent = tokio::spawn(async move {
            let mut conn = accept(&listener).await;
            recv_request(&mut conn).await;
            conn.send(
                &Reply::Changed {
                    group: status_of(g, 1),
                },
                None,
            )
            .await
            .unwrap();
        });
        let mut client = ControlClient::connect(dir.sock()).await.expect("connect");
        let err = client.status(Some(g)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::UnexpectedReply { .. }),
            "{err:?}"
        );
        agent.await.unwrap();
    }

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

    #[tokio::test]
    async fn register_passes_the_socket_and_follows_pushed_state() {
        let (_dir, listener, _probe, g, mut opts) = registration_fixture(7);
        opts.name = Some("v7".into());

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
        opts.activate = true;
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
