//! Requests that get one answer each (`status`, `activate`, `drain`, `restart`, and what
//! launchers report): the async [`ControlClient`], and what each request expects back,
//! which [`crate::blocking::ControlClient`] shares.

use reuseport_proto::{AgentInfo, GroupStatus, Reply, RestartOutcome};

use crate::ClientError;

/// The agent's answer, or what stands for it: no answer is [`ClientError::ConnectionClosed`],
/// an error reply is [`ClientError::Agent`].
pub(crate) fn answer(reply: Option<Reply>) -> Result<Reply, ClientError> {
    match reply {
        None => Err(ClientError::ConnectionClosed),
        Some(Reply::Error { kind, message }) => Err(ClientError::Agent { kind, message }),
        Some(reply) => Ok(reply),
    }
}

fn unexpected(request: &'static str, reply: &Reply) -> ClientError {
    ClientError::UnexpectedReply {
        request,
        reply: reply.name(),
    }
}

/// What `status` expects: every group asked for.
pub(crate) fn groups(reply: Reply) -> Result<Vec<GroupStatus>, ClientError> {
    match reply {
        Reply::Status { groups, .. } => Ok(groups),
        other => Err(unexpected("status", &other)),
    }
}

/// Which agent answered a `status`; `None` from agents that predate the field.
pub(crate) fn agent_info(reply: Reply) -> Result<Option<AgentInfo>, ClientError> {
    match reply {
        Reply::Status { agent, .. } => Ok(agent),
        other => Err(unexpected("status", &other)),
    }
}

/// What a change (`activate`, `drain`, `drain_progress`) expects: the group after it.
pub(crate) fn changed(request: &'static str, reply: Reply) -> Result<GroupStatus, ClientError> {
    changed_all(request, reply).map(|mut groups| groups.swap_remove(0))
}

/// What `activate` and `drain` expect: every group the generation spans after the change,
/// the requested one first.
pub(crate) fn changed_all(
    request: &'static str,
    reply: Reply,
) -> Result<Vec<GroupStatus>, ClientError> {
    match reply {
        Reply::Changed { group, others } => {
            let mut groups = Vec::with_capacity(1 + others.len());
            groups.push(group);
            groups.extend(others);
            Ok(groups)
        }
        other => Err(unexpected(request, &other)),
    }
}

/// What `restart` expects: the restart's id and the supervisor's pid.
pub(crate) fn restarting(reply: Reply) -> Result<(u64, i32), ClientError> {
    match reply {
        Reply::Restarting {
            id, supervisor_pid, ..
        } => Ok((id, supervisor_pid)),
        other => Err(unexpected("restart", &other)),
    }
}

/// What a supervisor's `restart_result` expects: the same frame back.
pub(crate) fn restart_reported(reply: Reply) -> Result<(), ClientError> {
    match reply {
        Reply::RestartResult { .. } => Ok(()),
        other => Err(unexpected("restart_result", &other)),
    }
}

/// Restart `id`'s outcome, if `pushed` is it.
pub(crate) fn outcome_of(pushed: Reply, id: u64) -> Option<RestartOutcome> {
    match pushed {
        Reply::RestartResult {
            id: got, outcome, ..
        } if got == id => Some(outcome),
        other => {
            tracing::debug!(reply = other.name(), "ignoring a pushed frame");
            None
        }
    }
}

#[cfg(feature = "tokio")]
pub use self::async_client::ControlClient;
#[cfg(feature = "tokio")]
pub(crate) use self::async_client::{connect_conn, round_trip};

#[cfg(feature = "tokio")]
mod async_client {
    use std::{os::fd::BorrowedFd, path::Path};

    use reuseport_proto::{
        AgentInfo, DrainStep, GenerationHealth, GroupAddr, GroupStatus, Op, Reply, Request,
        RestartOutcome, frame::Conn,
    };
    use tokio::net::UnixStream;

    use super::{
        agent_info, answer, changed, changed_all, groups, outcome_of, restart_reported, restarting,
    };
    use crate::{ClientError, connect_error};

    pub(crate) async fn connect_conn(path: &Path) -> Result<Conn, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| connect_error(path, e))?;
        Ok(Conn::new(stream))
    }

    /// Sends `op` (with `fd` attached) and returns the first reply, turning
    /// [`Reply::Error`] into [`ClientError::Agent`].
    pub(crate) async fn round_trip(
        conn: &mut Conn,
        op: Op,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, ClientError> {
        conn.send(&Request::new(op), fd).await?;
        // Descriptors are never expected on replies; dropping them closes them.
        answer(conn.recv_msg::<Reply>().await?.map(|(reply, _fds)| reply))
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

        /// All groups, or only `group`; with the live figures for one group, without them
        /// for all groups (the agent's default, see [`Op::Status`]).
        pub async fn status(
            &mut self,
            group: Option<GroupAddr>,
        ) -> Result<Vec<GroupStatus>, ClientError> {
            groups(self.request(Op::Status { group, live: None }).await?)
        }

        /// [`ControlClient::status`]; `live: false` leaves out the figures the agent reads
        /// from the kernel (connections per generation, accept queues), which cost it a
        /// sock_diag query per group.
        pub async fn status_with(
            &mut self,
            group: Option<GroupAddr>,
            live: bool,
        ) -> Result<Vec<GroupStatus>, ClientError> {
            groups(
                self.request(Op::Status {
                    group,
                    live: Some(live),
                })
                .await?,
            )
        }

        /// Which agent answers (version, ABI, mode, kernel); `None` from an agent that
        /// predates it.
        pub async fn agent_info(&mut self) -> Result<Option<AgentInfo>, ClientError> {
            let op = Op::Status {
                group: None,
                live: Some(false),
            };
            agent_info(self.request(op).await?)
        }

        /// Makes `generation` the active one; returns the group after the change.
        pub async fn activate(
            &mut self,
            group: GroupAddr,
            generation: u32,
        ) -> Result<GroupStatus, ClientError> {
            self.change(Op::Activate { group, generation }).await
        }

        /// From a launcher: what it did to the server of the draining `generation` (shown
        /// by `status`); returns the group after the change.
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

        /// From a supervisor: the health of `generation` as its checks see it (shown by
        /// `status`); returns the group after the report.
        pub async fn report_health(
            &mut self,
            group: GroupAddr,
            generation: u32,
            health: GenerationHealth,
        ) -> Result<GroupStatus, ClientError> {
            self.change(Op::Health {
                group,
                generation,
                health,
            })
            .await
        }

        /// Makes `generation` the active one in `group` and in every other group it spans
        /// (the groups of a server with several listeners), all or none; returns every group
        /// after the change, `group` first.
        pub async fn activate_all(
            &mut self,
            group: GroupAddr,
            generation: u32,
        ) -> Result<Vec<GroupStatus>, ClientError> {
            let reply = self.request(Op::Activate { group, generation }).await?;
            changed_all("activate", reply)
        }

        /// [`ControlClient::drain`] that returns every group the generation spans, as
        /// [`ControlClient::activate_all`] does.
        pub async fn drain_all(
            &mut self,
            group: GroupAddr,
            generation: u32,
        ) -> Result<Vec<GroupStatus>, ClientError> {
            let reply = self.request(Op::Drain { group, generation }).await?;
            changed_all("drain", reply)
        }

        /// Sends `weight` percent (1-99) of new connections to `generation` and the rest to
        /// the active generation, in `group` and every other group `generation` spans, all or
        /// none; returns every group after the change, `group` first.
        pub async fn split_all(
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
            changed_all("split", self.request(op).await?)
        }

        /// Makes the newest draining generation of `group` that still listens the active
        /// one again (in every group it spans, all or none); returns every group after the
        /// change, `group` first. Refused (`ErrorKind::Conflict`) when none qualifies.
        pub async fn rollback_all(
            &mut self,
            group: GroupAddr,
        ) -> Result<Vec<GroupStatus>, ClientError> {
            let reply = self.request(Op::Rollback { group }).await?;
            changed_all("rollback", reply)
        }

        /// Stops sending new connections to `generation`; returns the group after the
        /// change.
        pub async fn drain(
            &mut self,
            group: GroupAddr,
            generation: u32,
        ) -> Result<GroupStatus, ClientError> {
            self.change(Op::Drain { group, generation }).await
        }

        /// Asks the `reuseportctl supervise` of `group` to start its next generation.
        /// Returns the restart's id and the supervisor's pid;
        /// [`ControlClient::restart_outcome`] then waits for the outcome on this connection.
        pub async fn restart(&mut self, group: GroupAddr) -> Result<(u64, i32), ClientError> {
            restarting(self.request(Op::Restart { group }).await?)
        }

        /// The outcome of restart `id`, as the supervisor reports it. Waits as long as it
        /// takes: put a timeout around it.
        pub async fn restart_outcome(&mut self, id: u64) -> Result<RestartOutcome, ClientError> {
            loop {
                match self.conn.recv_msg::<Reply>().await? {
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
        pub async fn report_restart(
            &mut self,
            group: GroupAddr,
            id: u64,
            outcome: RestartOutcome,
        ) -> Result<(), ClientError> {
            restart_reported(
                self.request(Op::RestartResult { group, id, outcome })
                    .await?,
            )
        }

        async fn change(&mut self, op: Op) -> Result<GroupStatus, ClientError> {
            let request = op.name();
            changed(request, self.request(op).await?)
        }
    }
}

#[cfg(all(test, feature = "tokio"))]
mod tests {
    use reuseport_proto::{ErrorKind, Op, Reply, Request};
    use tokio::net::UnixListener;

    use crate::{
        ClientError, ControlClient,
        testing::{accept, group, recv_request, sock, status_of, tempdir},
    };

    #[tokio::test]
    async fn missing_socket_means_agent_not_running() {
        let dir = tempdir();
        let err = ControlClient::connect(sock(&dir)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::AgentNotRunning { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&sock(&dir).display().to_string()),
            "message names the path: {msg}"
        );
        assert!(
            msg.contains("--control"),
            "message says how to fix it: {msg}"
        );
    }

    #[tokio::test]
    async fn stale_socket_file_means_agent_not_running() {
        let dir = tempdir();
        drop(std::os::unix::net::UnixListener::bind(sock(&dir)).expect("bind"));
        let err = ControlClient::connect(sock(&dir)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::AgentNotRunning { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn requests_round_trip_and_agent_errors_keep_their_message() {
        let dir = tempdir();
        let listener = UnixListener::bind(sock(&dir)).expect("bind");
        let g = group("tcp://127.0.0.1:8080");
        let agent = tokio::spawn(async move {
            let mut conn = accept(&listener).await;
            let (req, _) = recv_request(&mut conn).await;
            assert_eq!(
                req,
                Request::new(Op::Status {
                    group: None,
                    live: None
                })
            );
            conn.send(
                &Reply::Status {
                    groups: vec![status_of(g, 1)],
                    agent: None,
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
                    others: Vec::new(),
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
        let mut client = ControlClient::connect(sock(&dir)).await.expect("connect");
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
        let dir = tempdir();
        let listener = UnixListener::bind(sock(&dir)).expect("bind");
        let g = group("tcp://127.0.0.1:8080");
        let agent = tokio::spawn(async move {
            let mut conn = accept(&listener).await;
            recv_request(&mut conn).await;
            conn.send(
                &Reply::Changed {
                    group: status_of(g, 1),
                    others: Vec::new(),
                },
                None,
            )
            .await
            .unwrap();
        });
        let mut client = ControlClient::connect(sock(&dir)).await.expect("connect");
        let err = client.status(Some(g)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::UnexpectedReply { .. }),
            "{err:?}"
        );
        agent.await.unwrap();
    }
}
