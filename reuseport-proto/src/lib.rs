//! The control protocol of reuseport: what the agent and its clients (`reuseportctl`, the
//! launchers, the client library, anything else that speaks `docs/protocol.md`) exchange
//! over the agent's Unix control socket.
//!
//! - [`addr`]: group addresses (`tcp://127.0.0.1:8080@NETNS`) and group keys.
//! - [`message`]: requests, replies, status; re-exported here.
//! - [`health`]: a generation's health, as its supervisor's checks see it.
//! - [`frame`]: length-prefixed JSON frames with descriptors as `SCM_RIGHTS`: the codec, an
//!   async connection (feature `tokio`) and a blocking one.
//! - [`text`]: the caps on the strings a request carries, and escaping for terminals.
//!
//! No kernel, no eBPF: this crate builds on stable Rust alone.

pub mod addr;
pub mod frame;
pub mod health;
pub mod message;
pub mod text;

pub use self::{
    addr::{AddrError, GroupAddr, GroupKey},
    message::{
        AgentInfo, Counters, DrainPhase, DrainStep, ErrorKind, GenState, GenerationHealth,
        GenerationLive, GenerationStatus, GroupLive, GroupStatus, HealthState, Limits,
        ListenerLive, MAX_ADDR_LEN, MAX_ERROR_LEN, MAX_FRAME, MAX_MESSAGE, MAX_NAME_LEN, Op,
        PROTOCOL_VERSION, Register, Reply, Request, RequestError, RestartOutcome, SocketStatus,
        UNREQUESTED_RESTART,
    },
};

/// Default path of the agent's control socket.
pub const DEFAULT_CONTROL_PATH: &str = "/run/reuseport/agent.sock";
