//! Exit statuses, one per kind of failure a script may want to tell apart (listed in
//! `reuseportctl --help`, docs/operations.md). `exec` and `supervise` exit with their
//! server's status once it runs, which may be any of these numbers.

use reuseport_client::{ClientError, proto::ErrorKind};

use crate::spawn::SpawnError;

/// Any other failure (I/O, a restart whose new generation did not become active, …).
pub const FAILURE: u8 = 1;
/// A bad command line (clap's own status); also `status --check`: problems found.
pub const USAGE: u8 = 2;
/// No agent answers at the control socket.
pub const AGENT_NOT_RUNNING: u8 = 3;
/// The control socket or the agent refused the caller (uid, control group).
pub const PERMISSION_DENIED: u8 = 4;
/// The group or generation does not exist.
pub const NOT_FOUND: u8 = 5;
/// The agent refused the request for what it asks (conflict with the group's state, a
/// limit, an unfit socket, an unsupported protocol version, the kernel's refusal).
pub const REFUSED: u8 = 6;
/// A wait gave up (`restart --timeout`); as timeout(1).
pub const TIMEOUT: u8 = 124;

/// A wait that gave up; the operation may still finish.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

/// The status for `err`: the first cause in its chain with a kind of its own.
pub fn code_of(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|cause| {
            if let Some(e) = cause.downcast_ref::<ClientError>() {
                return client_code(e);
            }
            if let Some(e) = cause.downcast_ref::<SpawnError>() {
                return Some(e.exit_code());
            }
            cause.downcast_ref::<TimedOut>().map(|_| TIMEOUT)
        })
        .unwrap_or(FAILURE)
}

fn client_code(err: &ClientError) -> Option<u8> {
    Some(match err {
        ClientError::AgentNotRunning { .. } => AGENT_NOT_RUNNING,
        ClientError::PermissionDenied { .. } => PERMISSION_DENIED,
        ClientError::Agent { kind, .. } => match kind {
            ErrorKind::PermissionDenied => PERMISSION_DENIED,
            ErrorKind::UnknownGroup | ErrorKind::UnknownGeneration => NOT_FOUND,
            ErrorKind::BadRequest
            | ErrorKind::UnsupportedVersion
            | ErrorKind::InvalidSocket
            | ErrorKind::Limit
            | ErrorKind::Conflict
            | ErrorKind::Kernel => REFUSED,
        },
        _ => return None,
    })
}

/// For `--help`.
pub const HELP: &str = "Exit status: 0 success; 1 any other failure; 2 a bad command line (and \
    `status --check`: problems found); 3 the agent is not running (no control socket, or \
    nothing listens on it); 4 permission denied (by the socket's mode or by the agent); 5 no \
    such group or generation; 6 refused by the agent (conflict with the group's state, a \
    limit, an unfit socket); 124 a wait timed out (`restart --timeout`). `exec` and \
    `supervise` exit with their server's status once it started (126: it cannot be \
    executed, 127: not found).";

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn each_kind_has_its_status_through_context() {
        let agent = |kind| ClientError::Agent {
            kind,
            message: "m".into(),
        };
        let cases = [
            (
                ClientError::AgentNotRunning {
                    path: PathBuf::from("/x"),
                },
                AGENT_NOT_RUNNING,
            ),
            (
                ClientError::PermissionDenied {
                    path: PathBuf::from("/x"),
                },
                PERMISSION_DENIED,
            ),
            (agent(ErrorKind::PermissionDenied), PERMISSION_DENIED),
            (agent(ErrorKind::UnknownGroup), NOT_FOUND),
            (agent(ErrorKind::UnknownGeneration), NOT_FOUND),
            (agent(ErrorKind::Conflict), REFUSED),
            (agent(ErrorKind::Limit), REFUSED),
            (ClientError::ConnectionClosed, FAILURE),
        ];
        for (err, code) in cases {
            let what = err.to_string();
            let err = anyhow::Error::new(err).context("while doing something");
            assert_eq!(code_of(&err), code, "{what}");
        }
        let err = anyhow::Error::new(TimedOut("no outcome".into())).context("restart");
        assert_eq!(code_of(&err), TIMEOUT);
        assert_eq!(code_of(&anyhow::anyhow!("other")), FAILURE);
    }
}
