//! The control client without an async runtime: the requests of [`crate::ControlClient`]
//! on a blocking socket, each answered before the call returns.

use std::{os::unix::net::UnixStream, path::Path, time::Duration};

use reuseport_proto::{
    DrainStep, GroupAddr, GroupStatus, Op, Reply, Request, RestartOutcome, frame::blocking::Conn,
};

use crate::{
    ClientError, connect_error,
    control::{answer, changed, changed_all, groups, outcome_of, restart_reported, restarting},
};

/// A blocking control connection for requests that get one answer each.
#[derive(Debug)]
pub struct ControlClient {
    conn: Conn,
}

impl ControlClient {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
        Ok(Self {
            conn: Conn::new(stream),
        })
    }

    /// Bounds every wait for the agent (`None`: wait as long as it takes). A wait that runs
    /// out fails with [`ClientError::Protocol`] of kind `WouldBlock`.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.conn
            .stream()
            .set_read_timeout(timeout)
            .and_then(|()| self.conn.stream().set_write_timeout(timeout))
            .map_err(|source| ClientError::Io {
                context: "setting the control connection's time-out".into(),
                source,
            })
    }

    /// Sends `op` and returns the agent's reply; [`Reply::Error`] becomes
    /// [`ClientError::Agent`].
    pub fn request(&mut self, op: Op) -> Result<Reply, ClientError> {
        answer(self.conn.round_trip(&Request::new(op), None)?)
    }

    /// All groups, or only `group`; with the live figures for one group, without them for
    /// all groups (the agent's default, see [`Op::Status`]).
    pub fn status(&mut self, group: Option<GroupAddr>) -> Result<Vec<GroupStatus>, ClientError> {
        groups(self.request(Op::Status { group, live: None })?)
    }

    /// [`ControlClient::status`]; `live: false` leaves out the figures the agent reads from
    /// the kernel.
    pub fn status_with(
        &mut self,
        group: Option<GroupAddr>,
        live: bool,
    ) -> Result<Vec<GroupStatus>, ClientError> {
        groups(self.request(Op::Status {
            group,
            live: Some(live),
        })?)
    }

    /// Makes `generation` the active one; returns the group after the change.
    pub fn activate(
        &mut self,
        group: GroupAddr,
        generation: u32,
    ) -> Result<GroupStatus, ClientError> {
        changed(
            "activate",
            self.request(Op::Activate { group, generation })?,
        )
    }

    /// Stops sending new connections to `generation`; returns the group after the change.
    pub fn drain(&mut self, group: GroupAddr, generation: u32) -> Result<GroupStatus, ClientError> {
        changed("drain", self.request(Op::Drain { group, generation })?)
    }

    /// Sends `weight` percent (1-99) of new connections to `generation` and the rest to the
    /// active generation, in `group` and every other group `generation` spans, all or none;
    /// returns every group after the change, `group` first.
    pub fn split(
        &mut self,
        group: GroupAddr,
        generation: u32,
        weight: u8,
    ) -> Result<Vec<GroupStatus>, ClientError> {
        let op = Op::Split {
            group,
            generation,
            weight,
        };
        changed_all("split", self.request(op)?)
    }

    /// Makes the newest draining generation of `group` that still listens the active one
    /// again (in every group it spans, all or none); returns every group after the change,
    /// `group` first. Refused (`ErrorKind::Conflict`) when none qualifies.
    pub fn rollback(&mut self, group: GroupAddr) -> Result<Vec<GroupStatus>, ClientError> {
        changed_all("rollback", self.request(Op::Rollback { group })?)
    }

    /// From a launcher: what it did to the server of the draining `generation`.
    pub fn report_drain(
        &mut self,
        group: GroupAddr,
        generation: u32,
        step: DrainStep,
    ) -> Result<GroupStatus, ClientError> {
        let op = Op::DrainProgress {
            group,
            generation,
            step,
        };
        changed("drain_progress", self.request(op)?)
    }

    /// Asks the `reuseportctl supervise` of `group` to start its next generation: the
    /// restart's id and the supervisor's pid.
    pub fn restart(&mut self, group: GroupAddr) -> Result<(u64, i32), ClientError> {
        restarting(self.request(Op::Restart { group })?)
    }

    /// The outcome of restart `id`, as the supervisor reports it (bounded by
    /// [`ControlClient::set_timeout`]).
    pub fn restart_outcome(&mut self, id: u64) -> Result<RestartOutcome, ClientError> {
        loop {
            match self.conn.recv_msg::<Reply>()? {
                None => return Err(ClientError::ConnectionClosed),
                Some((pushed, _)) => {
                    if let Some(outcome) = outcome_of(pushed, id) {
                        return Ok(outcome);
                    }
                }
            }
        }
    }

    /// From a supervisor: how restart `id` ended.
    pub fn report_restart(
        &mut self,
        group: GroupAddr,
        id: u64,
        outcome: RestartOutcome,
    ) -> Result<(), ClientError> {
        restart_reported(self.request(Op::RestartResult { group, id, outcome })?)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use reuseport_proto::{ErrorKind, frame::blocking::Conn as AgentConn};

    use super::*;

    fn group() -> GroupAddr {
        "tcp://127.0.0.1:8080".parse().unwrap()
    }

    fn status(active: u32) -> GroupStatus {
        GroupStatus {
            group: group(),
            mode: "select-only".into(),
            active: Some(active),
            falling_back: false,
            generations: vec![],
            unsteered: 0,
            limits: None,
            last_restart: None,
            live: None,
        }
    }

    #[test]
    fn requests_get_their_answers_and_refusals_their_message() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let agent = std::thread::spawn(move || {
            let mut conn = AgentConn::for_requests(listener.accept().expect("accept").0);
            let mut next = || conn.recv_msg::<Request>().unwrap().expect("a request").0.op;
            assert_eq!(
                next(),
                Op::Activate {
                    group: group(),
                    generation: 2
                }
            );
            conn.send(
                &Reply::Changed {
                    group: status(2),
                    others: Vec::new(),
                },
                None,
            )
            .unwrap();
            let mut next = || conn.recv_msg::<Request>().unwrap().expect("a request").0.op;
            assert_eq!(next(), Op::Restart { group: group() });
            let refusal = Reply::Error {
                kind: ErrorKind::Conflict,
                message: "no supervisor".into(),
            };
            conn.send(&refusal, None).unwrap();
        });
        let mut client = ControlClient::connect(&path).expect("connect");
        client
            .set_timeout(Some(Duration::from_secs(5)))
            .expect("time-out");
        assert_eq!(client.activate(group(), 2).unwrap(), status(2));
        let err = client.restart(group()).unwrap_err();
        assert_eq!(err.agent_kind(), Some(ErrorKind::Conflict));
        assert_eq!(err.to_string(), "no supervisor");
        agent.join().unwrap();
        assert!(
            matches!(
                client.status(None),
                Err(ClientError::ConnectionClosed | ClientError::Protocol(_))
            ),
            "a closed connection should be an error"
        );
    }

    #[test]
    fn a_missing_socket_means_agent_not_running() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = ControlClient::connect(dir.path().join("agent.sock")).unwrap_err();
        assert!(
            matches!(err, ClientError::AgentNotRunning { .. }),
            "{err:?}"
        );
    }
}
