//! Client library of reuseport: bind a listener and register it with the agent, or ask the
//! agent about its groups and change them.
//!
//! A server that links this crate calls [`bind_and_register`] (or [`reuseport_listener`]
//! then [`register`] when it wants to create the socket itself) and keeps the returned
//! [`Registration`] alive for as long as the listener should stay in the group: dropping it
//! closes the control connection, which unregisters the socket. [`Registration::state`]
//! follows the generation's state as the agent pushes it, so a server can stop accepting
//! when it becomes [`GenState::Draining`]. When the agent restarts, a registration
//! reconnects with backoff and registers the same socket again; the agent, which adopted
//! the group from its pins, gives it back its slot.
//!
//! A launcher that registers a socket on behalf of the server it starts (as `reuseportctl
//! exec` and `supervise` do) says so in the request ([`Register::server_pid`],
//! [`Register::supervised`]) and tells the registration where the socket went
//! ([`Registration::follow_child`]).
//!
//! [`ControlClient`] sends `status`, `activate`, `drain` and `restart`.
//!
//! Features: `tokio` (default) gives the async API above. Without it, the crate offers
//! [`blocking::ControlClient`] and [`reuseport_listener`]; a registration, which follows the
//! agent's pushes and reconnects in the background, needs `tokio`.
//!
//! The protocol itself (addresses, messages, framing) is [`proto`]; servers in other
//! languages speak it directly, or run under `reuseportctl exec`.

pub mod blocking;
mod control;
mod listener;
pub mod probe;
#[cfg(feature = "tokio")]
mod registration;
#[cfg(feature = "tokio")]
mod rejoin;
#[cfg(all(test, feature = "tokio"))]
mod testing;

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

pub use reuseport_proto::{
    self as proto, DEFAULT_CONTROL_PATH, DrainStep, ErrorKind, GenState, GroupAddr, GroupStatus,
    Register, RestartOutcome, frame::FrameError,
};

pub use self::listener::{LISTEN_BACKLOG, listen_error, reuseport_listener};
#[cfg(feature = "tokio")]
pub use self::{
    control::ControlClient,
    listener::bind_and_register,
    registration::{RegisterOptions, Registration, register},
};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eacces_means_permission_denied() {
        // Root bypasses file permissions, so the mapping is tested without a real socket.
        let err = connect_error(Path::new("/x"), io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(
            err.to_string(),
            "permission denied on /x: run as root or as a member of the agent's control group"
        );
    }
}
