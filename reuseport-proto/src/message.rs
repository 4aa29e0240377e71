//! The control protocol between the agent and its clients (`reuseportctl`, the launcher,
//! the client library). Specified for humans in `docs/protocol.md`; keep both in step.
//!
//! Every message is one frame: a 4-byte big-endian length, then that many bytes of JSON.
//! A `register` request carries the listening socket as `SCM_RIGHTS` on the same
//! `sendmsg` as its frame. Requests carry the protocol version in `v`.

use serde::{Deserialize, Serialize};

use crate::addr::GroupAddr;
pub use crate::health::{GenerationHealth, HealthState};

/// Current protocol version. The agent answers requests of another version with
/// [`ErrorKind::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts. Larger length prefixes are rejected before any byte
/// of the body is read. A request is one frame's worth at most; a reply may span several
/// frames (see [`crate::frame::MORE`]).
pub const MAX_FRAME: usize = 64 * 1024;

/// Largest reply a client reads: above what the agent produces at its default limits
/// (`status` of 256 groups of 1,024 sockets in 128 generations with the longest names is
/// about 47 MiB: 183 KB per full group), so that only a peer that is not an agent reaches it.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub use crate::text::{MAX_ADDR_LEN, MAX_ERROR_LEN, MAX_NAME_LEN};

/// A request from a client to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

impl Request {
    pub fn new(op: Op) -> Self {
        Self {
            v: PROTOCOL_VERSION,
            op,
        }
    }

    /// Decodes a frame's body as the agent does, refusing other protocol versions.
    pub fn decode(body: &[u8]) -> Result<Self, RequestError> {
        let req: Self = serde_json::from_slice(body)?;
        if req.v != PROTOCOL_VERSION {
            return Err(RequestError::UnsupportedVersion(req.v));
        }
        crate::text::check(&req.op)?;
        Ok(req)
    }
}

/// Why a frame's body is not a request this agent serves.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "protocol version {0} is not supported: this agent speaks version {PROTOCOL_VERSION} \
         (use a matching reuseportctl / client library)"
    )]
    UnsupportedVersion(u32),
    #[error("bad request: {0}")]
    Field(#[from] crate::text::FieldError),
}

impl RequestError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Malformed(_) | Self::Field(_) => ErrorKind::BadRequest,
            Self::UnsupportedVersion(_) => ErrorKind::UnsupportedVersion,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Adds the attached listening socket to its group (see [`Register`]).
    Register(Register),
    /// All groups, or the one named.
    Status {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<GroupAddr>,
        /// Read the live figures from the kernel (sock_diag): connections per generation,
        /// accept queues. `false` answers from the agent's own state only. Absent: yes for
        /// one named group, no for all groups (they cost a sock_diag query and a process
        /// walk per group: seconds at thousands of groups).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live: Option<bool>,
    },
    /// Make `generation` the only active generation; the previously active one drains.
    Activate { group: GroupAddr, generation: u32 },
    /// Stop sending new connections to `generation`.
    Drain { group: GroupAddr, generation: u32 },
    /// Send `weight` percent (1-99) of new connections to `generation` and the rest to the
    /// active generation, which stays active (`reuseportctl activate --weight`). A separate
    /// op rather than a field of [`Op::Activate`]: an agent that predates splits must refuse
    /// it, not ignore the field and flip everything. Answered with [`Reply::Changed`].
    Split {
        group: GroupAddr,
        generation: u32,
        weight: u8,
    },
    /// From a supervisor (`supervise --health`): the health of one of its generations, for
    /// `status`. Answered with [`Reply::Changed`].
    Health {
        group: GroupAddr,
        generation: u32,
        health: GenerationHealth,
    },
    /// Make the newest draining generation that still listens the active one again, as
    /// [`Op::Activate`] of it would. Answered with [`Reply::Changed`].
    Rollback { group: GroupAddr },
    /// Ask the `reuseportctl supervise` that manages `group` to start the next generation,
    /// as on SIGHUP. Answered with [`Reply::Restarting`]; the outcome follows on the same
    /// connection as [`Reply::RestartResult`].
    Restart { group: GroupAddr },
    /// From a supervisor: how the restart `id` ([`Reply::Restart`]) ended. Answered with the
    /// same frame as a [`Reply::RestartResult`].
    RestartResult {
        group: GroupAddr,
        id: u64,
        #[serde(flatten)]
        outcome: RestartOutcome,
    },
    /// From a launcher: what it did to the server of a draining generation, for `status`.
    /// Answered with [`Reply::Changed`].
    DrainProgress {
        group: GroupAddr,
        generation: u32,
        #[serde(flatten)]
        step: DrainStep,
    },
}

/// A `register` request: adds the attached listening socket to `group` as a member of
/// `generation`. The connection then stays open: closing it unregisters the socket, and the
/// agent pushes [`Reply::State`] on it whenever the generation's state changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub group: GroupAddr,
    pub generation: u32,
    /// Shown by `status`; at most [`MAX_NAME_LEN`] printable bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Make this generation active as soon as it is registered.
    #[serde(default)]
    pub activate: bool,
    /// The registering process is a `reuseportctl supervise` that starts the next
    /// generation when the agent pushes [`Reply::Restart`] on this connection.
    #[serde(default, skip_serializing_if = "is_false")]
    pub supervised: bool,
    /// The pid of the server that uses the socket, when a launcher registers it on the
    /// server's behalf (`status` shows it instead of the launcher's). It must be the
    /// registering process or one of its descendants, as the registering process's pid
    /// namespace numbers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_pid: Option<i32>,
}

impl Register {
    /// A plain registration of `generation` in `group`: no name, not activating, not on a
    /// server's behalf.
    pub fn new(group: GroupAddr, generation: u32) -> Self {
        Self {
            group,
            generation,
            name: None,
            activate: false,
            supervised: false,
            server_pid: None,
        }
    }
}

impl Op {
    /// The request's `op` as it is on the wire, for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Register(_) => "register",
            Self::Status { .. } => "status",
            Self::Activate { .. } => "activate",
            Self::Drain { .. } => "drain",
            Self::Split { .. } => "split",
            Self::Health { .. } => "health",
            Self::Rollback { .. } => "rollback",
            Self::Restart { .. } => "restart",
            Self::RestartResult { .. } => "restart_result",
            Self::DrainProgress { .. } => "drain_progress",
        }
    }
}

/// The agent that answers a `status`: its build and what it runs with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's package version (`0.1.0`).
    pub version: String,
    /// The ABI version of the objects it pins (see `reuseport-common`).
    pub abi: u32,
    /// `select-or-migrate` or `select-only`.
    pub mode: String,
    /// The kernel release it runs on.
    pub kernel: String,
}

/// What a launcher did to a draining generation's server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum DrainStep {
    /// It sent the drain signal (`--on-drain`), e.g. `SIGTERM`.
    Signalled { signal: String },
    /// It sent SIGKILL: the server outlived `--kill-timeout` after the signal.
    Killed,
}

/// The `id` of a `restart_result` for a restart nobody requested through the agent
/// (SIGHUP to the supervisor): reported only so that `status` shows it.
pub const UNREQUESTED_RESTART: u64 = 0;

/// How a requested restart ended: the generation that is now active, or why none is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RestartOutcome {
    Active { generation: u32 },
    Failed { error: String },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// State of a generation, as the kernel program treats it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenState {
    /// Receives every new connection.
    Active,
    /// Receives no new connection (unless nothing active is left); keeps its listener and
    /// its established connections.
    Draining,
    /// Registered but not activated yet: receives no new connection (unless nothing active
    /// or draining is left).
    Standby,
}

impl std::fmt::Display for GenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Standby => "standby",
        })
    }
}

/// A message from the agent: the answer to a request, or (on a registration connection) a
/// pushed state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Registered {
        group: GroupAddr,
        generation: u32,
        slot: u32,
        state: GenState,
    },
    Status {
        groups: Vec<GroupStatus>,
        /// Which agent answers; absent from agents that predate it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<AgentInfo>,
    },
    /// Answer to `activate` and `drain`: the group as it is after the change.
    Changed {
        group: GroupStatus,
        /// The other groups the generation spans (see [`GenerationStatus::also_in`]), which
        /// the same request changed, as they are after it. Absent from agents that predate
        /// generations across groups.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        others: Vec<GroupStatus>,
    },
    /// Pushed on a registration connection when its generation changes state.
    State {
        group: GroupAddr,
        generation: u32,
        state: GenState,
    },
    /// Answer to `restart`: the request went to the supervisor `supervisor_pid`; a
    /// [`Reply::RestartResult`] with the same `id` follows on this connection.
    Restarting {
        group: GroupAddr,
        id: u64,
        supervisor_pid: i32,
    },
    /// Pushed on a supervised registration connection: start the next generation (as on
    /// SIGHUP) and report the outcome with the `restart_result` request.
    Restart {
        group: GroupAddr,
        id: u64,
    },
    /// The outcome of restart `id`, pushed to whoever requested it (and the answer to the
    /// supervisor's `restart_result`).
    RestartResult {
        group: GroupAddr,
        id: u64,
        #[serde(flatten)]
        outcome: RestartOutcome,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Reply {
    /// The reply's `type` as it is on the wire, for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Registered { .. } => "registered",
            Self::Status { .. } => "status",
            Self::Changed { .. } => "changed",
            Self::State { .. } => "state",
            Self::Restarting { .. } => "restarting",
            Self::Restart { .. } => "restart",
            Self::RestartResult { .. } => "restart_result",
            Self::Error { .. } => "error",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame is not a valid request (bad JSON, unknown op, too large, missing socket).
    BadRequest,
    UnsupportedVersion,
    UnknownGroup,
    UnknownGeneration,
    /// The socket passed to `register` does not fit the group (not TCP, not listening, no
    /// SO_REUSEPORT, other address…).
    InvalidSocket,
    PermissionDenied,
    /// A documented limit (sockets per group, groups, generations) would be exceeded.
    Limit,
    /// The request conflicts with the group's state (e.g. draining the active generation).
    Conflict,
    /// The kernel refused something it should not have; the message says what.
    Kernel,
}

impl ErrorKind {
    /// Every kind, in declaration order (for counters kept per kind). NB: a test matches
    /// exhaustively, so a new kind fails to build until it is listed here too.
    pub const ALL: [ErrorKind; 9] = [
        Self::BadRequest,
        Self::UnsupportedVersion,
        Self::UnknownGroup,
        Self::UnknownGeneration,
        Self::InvalidSocket,
        Self::PermissionDenied,
        Self::Limit,
        Self::Conflict,
        Self::Kernel,
    ];

    /// The kind as it is on the wire (`unknown_group`), for messages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownGroup => "unknown_group",
            Self::UnknownGeneration => "unknown_generation",
            Self::InvalidSocket => "invalid_socket",
            Self::PermissionDenied => "permission_denied",
            Self::Limit => "limit",
            Self::Conflict => "conflict",
            Self::Kernel => "kernel",
        }
    }

    /// A refusal that may not hold at the next try, without anything changing in the
    /// request: a [`ErrorKind::Limit`] (someone else may close what fills it) or a
    /// [`ErrorKind::Kernel`] failure. Clients retry these with backoff; every other kind
    /// says what is wrong with the request itself.
    pub fn is_temporary(self) -> bool {
        matches!(self, Self::Limit | Self::Kernel)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: GroupAddr,
    /// `select-or-migrate` (5.14+) or `select-only`.
    pub mode: String,
    /// The active generation, if one is registered.
    pub active: Option<u32>,
    /// True when no active socket is left and new connections go to a fallback generation.
    pub falling_back: bool,
    pub generations: Vec<GenerationStatus>,
    /// Connections the program could not place on any registered socket (handed back to the
    /// kernel's hash).
    pub unsteered: u64,
    /// The limits in force for this group, agent-wide ones included. Absent from agents that
    /// predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// How the last restart of the group's supervisor ended (SIGHUP or `restart`), as it
    /// reported it. Absent until a supervisor reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<RestartOutcome>,
    /// Read from the kernel for this answer (see [`GroupLive`]). Absent when not asked for,
    /// from older agents, or when the kernel could not be asked (the agent logs why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<GroupLive>,
}

/// Live figures of a group, read from the kernel (sock_diag) when `status` was answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLive {
    /// Connected TCP sockets on the group's address and port in its network namespace, in
    /// the states `ss -tn` lists (established, closing ones, but not SYN-RECV or
    /// TIME-WAIT): those the generations hold, those queued in accept queues, and those
    /// already closed by their process that the kernel is still finishing.
    pub connections: u64,
}

/// Live figures of a generation (see [`GenerationLive::in_flight`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationLive {
    /// Connections the generation's processes hold open: sockets on the group's address
    /// whose descriptor a process of the generation has (its registered pids and their
    /// descendants).
    pub connections: u64,
    /// Connections waiting in the accept queues of its listeners.
    pub queued: u64,
}

impl GenerationLive {
    /// Connections the generation still has to serve: held or queued.
    pub fn in_flight(&self) -> u64 {
        self.connections + self.queued
    }
}

/// Live figures of a registered listening socket, matched to its slot by socket cookie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerLive {
    /// Connections in its accept queue (`idiag_rqueue` of a listener).
    pub queued: u32,
    /// Its backlog: how many the accept queue holds (`idiag_wqueue` of a listener).
    pub backlog: u32,
    /// Connection attempts it dropped since it registered (the socket's `sk_drops`, which
    /// for a listener counts a full accept queue above all).
    pub drops: u32,
}

/// Where a draining generation is on its way out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum DrainPhase {
    /// It still has connections in flight (held or queued).
    Serving { connections: u64 },
    /// Nothing in flight: it can exit without losing a connection.
    Idle,
    /// Its launcher sent it the drain signal.
    Signalled { signal: String },
    /// Its launcher sent SIGKILL.
    Killed,
}

impl From<DrainStep> for DrainPhase {
    fn from(step: DrainStep) -> Self {
        match step {
            DrainStep::Signalled { signal } => Self::Signalled { signal },
            DrainStep::Killed => Self::Killed,
        }
    }
}

impl std::fmt::Display for DrainPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Serving { connections } => write!(f, "serving {connections}"),
            Self::Idle => f.write_str("idle"),
            Self::Signalled { signal } => write!(f, "signalled {signal}"),
            Self::Killed => f.write_str("killed"),
        }
    }
}

/// What the agent holds at most. Exceeding one is a [`ErrorKind::Limit`] error, never a
/// silent drop. The per-uid quotas and root's reserves are absent from agents that predate
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Groups per agent (`reuseport-agent --max-groups`).
    pub groups: u32,
    /// Listening sockets per group: the size of the group's socket array.
    pub sockets_per_group: u32,
    /// Generations per group, draining ones included: each holds at least one socket, so
    /// this is the socket limit.
    pub generations_per_group: u32,
    /// Control connections open at once, registrations included
    /// (`reuseport-agent --max-connections`). At the limit the agent closes the connection
    /// that has been idle longest, never a registration.
    pub control_connections: u32,
    /// Groups one non-root uid may own (`reuseport-agent --max-groups-per-uid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_per_uid: Option<u32>,
    /// Control connections one non-root uid may hold
    /// (`reuseport-agent --max-connections-per-uid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_connections_per_uid: Option<u32>,
    /// Groups only root may create: users together stop short of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_reserved_for_root: Option<u32>,
    /// Control connections only root may open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_connections_reserved_for_root: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub generation: u32,
    pub name: Option<String>,
    pub state: GenState,
    pub sockets: Vec<SocketStatus>,
    pub counters: Counters,
    /// Read from the kernel for this answer; absent when the group's [`GroupStatus::live`]
    /// is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<GenerationLive>,
    /// Only for a draining generation: what its launcher did, else whether it is idle (from
    /// the live figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainPhase>,
    /// The other groups this generation spans: those where the same servers (registered
    /// with `server_pid`) have sockets of the same generation number. `activate` and
    /// `drain` act on all of them at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_in: Vec<GroupAddr>,
    /// During a weighted split (`split`), the percent of new connections each of the two
    /// active generations gets (they add up to 100); absent otherwise, and from agents
    /// that predate splits. The exact share is the percent rounded to whole entries of the
    /// steering table (README, "Steering policy").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Its health as its supervisor last reported it (`supervise --health`); absent without
    /// health checks, and from agents that predate them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<GenerationHealth>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStatus {
    pub slot: u32,
    /// The server's pid as its launcher registered it (`server_pid`), else the pid of the
    /// registering process.
    pub pid: i32,
    pub uid: u32,
    /// SO_COOKIE of the listening socket.
    pub cookie: u64,
    /// False once the process closed this listener (its slot is empty in the kernel) while
    /// its registration is still open.
    pub listening: bool,
    /// False while the socket's registration has not come back after an agent restart (the
    /// socket keeps its slot and is steered as before; see "What happens when…" in the
    /// README).
    #[serde(default = "yes")]
    pub registered: bool,
    /// Read from the kernel for this answer; absent when the group's [`GroupStatus::live`]
    /// is, or when the socket was not found listening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<ListenerLive>,
}

fn yes() -> bool {
    true
}

/// Counts of connections the kernel program placed, summed over CPUs and sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// New connections received as the active generation.
    pub selected: u64,
    /// New connections received as a fallback (no active socket was left).
    pub fallback: u64,
    /// Queued connections received from a closing listener.
    pub migrated: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_is_listed_once() {
        for (i, kind) in ErrorKind::ALL.into_iter().enumerate() {
            let position = match kind {
                ErrorKind::BadRequest => 0,
                ErrorKind::UnsupportedVersion => 1,
                ErrorKind::UnknownGroup => 2,
                ErrorKind::UnknownGeneration => 3,
                ErrorKind::InvalidSocket => 4,
                ErrorKind::PermissionDenied => 5,
                ErrorKind::Limit => 6,
                ErrorKind::Conflict => 7,
                ErrorKind::Kernel => 8,
            };
            assert_eq!(position, i, "{kind:?}");
        }
    }

    #[test]
    fn error_kind_names_are_the_wire_names() {
        for kind in ErrorKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.as_str())
            );
        }
    }

    #[test]
    fn request_wire_form_is_stable() {
        let r = Request::new(Op::Activate {
            group: "tcp://127.0.0.1:8080".parse().unwrap(),
            generation: 2,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"op":"activate","group":"tcp://127.0.0.1:8080","generation":2}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }

    #[test]
    fn register_defaults() {
        let r: Request =
            serde_json::from_str(r#"{"v":1,"op":"register","group":"[::1]:80","generation":3}"#)
                .unwrap();
        assert_eq!(
            r.op,
            Op::Register(Register {
                group: "[::1]:80".parse().unwrap(),
                generation: 3,
                name: None,
                activate: false,
                supervised: false,
                server_pid: None,
            })
        );
    }

    #[test]
    fn restart_outcomes_are_flat() {
        let r = Reply::RestartResult {
            group: "tcp://127.0.0.1:8080".parse().unwrap(),
            id: 3,
            outcome: RestartOutcome::Failed { error: "x".into() },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"type":"restart_result","group":"tcp://127.0.0.1:8080","id":3,"outcome":"failed","error":"x"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&s).unwrap(), r);
    }

    #[test]
    fn status_from_an_agent_without_limits_still_parses() {
        let old = r#"{"group":"tcp://127.0.0.1:80","mode":"select-only","active":1,
            "falling_back":false,"generations":[],"unsteered":0}"#;
        let g: GroupStatus = serde_json::from_str(old).unwrap();
        assert_eq!(g.limits, None);
        assert!(
            !serde_json::to_string(&g).unwrap().contains("limits"),
            "no limits, no field: older readers see the reply they know"
        );
    }

    #[test]
    fn reply_wire_form_is_stable() {
        let r = Reply::Error {
            kind: ErrorKind::UnknownGroup,
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"type":"error","kind":"unknown_group","message":"x"}"#
        );
    }
}
