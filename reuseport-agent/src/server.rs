//! The control socket: one task per connection; a connection that registers a socket
//! stays open and carries pushed state changes.

use std::{os::fd::OwnedFd, sync::Arc};

use anyhow::Context as _;
use tokio::{
    net::UnixStream,
    signal::unix::{SignalKind, signal},
};

use crate::{
    access::{ControlGroup, Policy},
    admission::{self, Admission, Admitted},
    agent::{Agent, Options, Peer},
    bpffs,
    control_socket::ControlSocket,
    kernel,
    mailbox::Mailbox,
    notify,
    quota::Quotas,
    registry::Refusal,
    scan, wake,
};
use reuseport_proto::{
    frame::Conn,
    message::{ErrorKind, Op, Reply, Request},
};

pub async fn run(opts: Options) -> anyhow::Result<()> {
    // NB: first thing: a SIGTERM that arrives once the control socket exists must remove it
    // on the way out, not kill the process with the socket file left behind (seen in the
    // VM guests, where adoption and start-up are slow enough for that to happen).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    super::fault::check_env()?;
    bpffs::ensure(&opts.bpffs)?;
    let force = opts.select_only;
    let mode = tokio::task::spawn_blocking(move || kernel::detect_mode(force)).await??;
    let control_group = opts
        .control_group
        .as_deref()
        .map(ControlGroup::resolve)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let max_connections = admission::fit_connections(opts.max_connections, opts.max_groups);
    let quotas = Quotas::new(
        opts.max_groups,
        opts.groups_per_uid,
        max_connections as u32,
        opts.connections_per_uid,
    );
    let admission = Admission::new(quotas);
    let mut agent = Agent::new(mode, opts.bpffs.clone(), opts.wake_ups, opts.pin_abi).context(
        "starting the RCU grace-period helper (membarrier MEMBARRIER_CMD_GLOBAL, Linux 4.3+)",
    )?;
    agent.access = Policy::new(control_group.clone());
    agent.quotas = quotas;
    agent.lock().restarts.set_timeout(opts.restart_timeout);
    let agent = Arc::new(agent);
    // NB: the lock first: a second agent on the same directory must fail before it touches
    // the control socket path (it would replace what it takes for a stale socket).
    let _bpffs_lock = bpffs::lock(&opts.bpffs)?;
    let (control, listener) = ControlSocket::bind(&opts.control, control_group.as_ref())?;
    // NB: before the first accept: a client that reconnects must find its group adopted.
    let adopted = agent.adopt_pinned();
    if let Some(listen) = opts.metrics {
        crate::metrics::start(agent.clone(), listen).await?;
    }
    tracing::info!(
        control = %opts.control.display(),
        bpffs = %opts.bpffs.display(),
        mode = mode.as_str(),
        kernel = %kernel::kernel_release(),
        adopted,
        "reuseport-agent ready"
    );

    let waker =
        wake::Waker::start(agent.own_netns).context("starting the wake-up worker thread")?;
    let scanner = tokio::spawn(scan::scan_loop(agent.clone(), waker));
    // NB: the socket is listening (bound above) and adoption is over: a client that connects
    // once systemd calls the agent started finds every adopted group.
    let summary = agent.summary();
    notify::ready(&summary);
    let status = tokio::spawn(notify::status_loop(agent.clone(), summary));
    let mut exhausted = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    exhausted = false;
                    let peer = match agent.access.peer(&stream) {
                        Ok(peer) => peer,
                        Err(e) => {
                            tracing::warn!(error = %e, "control connection without peer credentials");
                            continue;
                        }
                    };
                    match admission.admit(peer.uid) {
                        Ok(slot) => tokio::spawn(serve(agent.clone(), stream, slot, peer)),
                        Err(message) => {
                            agent.refusals.count(ErrorKind::Limit);
                            tokio::spawn(refuse(
                                stream,
                                Reply::Error { kind: ErrorKind::Limit, message },
                            ))
                        }
                    };
                }
                Err(e) => accept_failed(&admission, &e, &mut exhausted).await,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notify::stopping();
    scanner.abort();
    status.abort();
    // NB: pinned maps and attached programs stay: the data path does not depend on the
    // agent running.
    control.remove();
    tracing::info!("reuseport-agent stopped; steering stays in place");
    Ok(())
}

/// accept() failed: out of descriptors (or memory) is waited out, not retried in a spin. The
/// longest-idle connection is closed to free a descriptor; only when none can be closed does
/// the loop pause for long. Logged once per episode, not per attempt.
async fn accept_failed(admission: &Admission, e: &std::io::Error, exhausted: &mut bool) {
    let out_of_resources = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !out_of_resources {
        tracing::warn!(error = %e, "accepting a control connection");
        return;
    }
    if !*exhausted {
        tracing::warn!(
            error = %e,
            "accepting a control connection: out of resources; closing idle connections to \
             make room"
        );
        *exhausted = true;
    }
    let pause = if admission.evict_one() {
        admission::EVICTION_PAUSE
    } else {
        admission::ACCEPT_BACKOFF
    };
    tokio::time::sleep(pause).await;
}

/// Tells a client there is no room for its connection, then closes it.
async fn refuse(stream: UnixStream, reply: Reply) {
    let conn = Conn::new(stream);
    let _ = tokio::time::timeout(admission::SEND_TIMEOUT, conn.send(&reply, None)).await;
}

fn count_refusal(agent: &Agent, reply: &Reply) {
    if let Reply::Error { kind, .. } = reply {
        agent.refusals.count(*kind);
    }
}

fn refusal_reply(r: Refusal) -> Reply {
    Reply::Error {
        kind: r.kind,
        message: r.message,
    }
}

fn bad_request(message: impl Into<String>) -> Reply {
    Reply::Error {
        kind: ErrorKind::BadRequest,
        message: message.into(),
    }
}

async fn serve(agent: Arc<Agent>, stream: UnixStream, mut admitted: Admitted, peer: Peer) {
    let mut conn = Conn::for_requests(stream);
    let reg = agent.next_reg_id();
    let mailbox = Mailbox::new();
    let mut registered = false;
    loop {
        // NB: a connection waiting for a restart's outcome is busy, not idle: the idle
        // time-out and eviction would take the outcome from it.
        let busy = registered || mailbox.awaits_outcome();
        let frame = tokio::select! {
            frame = admitted.next_frame(&mut conn, busy) => frame,
            event = mailbox.next() => {
                if !admitted.send(&conn, &event, registered).await {
                    break;
                }
                continue;
            }
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                // The stream cannot be resynchronised after a bad length, a cut frame or a
                // time-out.
                if let Some(reply) = e.reply() {
                    count_refusal(&agent, &reply);
                    let _ = admitted.send(&conn, &reply, registered).await;
                }
                break;
            }
        };
        let reply = match Request::decode(&frame.body) {
            Err(e) => Reply::Error {
                kind: e.kind(),
                message: e.to_string(),
            },
            Ok(req) => {
                let is_register = matches!(req.op, Op::Register(_));
                let reply =
                    handle(&agent, peer, reg, req.op, frame.fds, registered, &mailbox).await;
                registered |= is_register && matches!(reply, Reply::Registered { .. });
                reply
            }
        };
        count_refusal(&agent, &reply);
        if !admitted.send(&conn, &reply, registered).await {
            break;
        }
    }
    if registered {
        let a = agent.clone();
        let _ = tokio::task::spawn_blocking(move || a.unregister(reg)).await;
    }
}

/// Answers one request; a refusal is logged, one line with who asked and why.
async fn handle(
    agent: &Arc<Agent>,
    peer: Peer,
    reg: u64,
    op: Op,
    fds: Vec<OwnedFd>,
    registered: bool,
    mailbox: &Arc<Mailbox>,
) -> Reply {
    let name = op.name();
    let reply = answer(agent, peer, reg, op, fds, registered, mailbox).await;
    if let Reply::Error { kind, message } = &reply {
        tracing::info!(
            op = name, kind = kind.as_str(), pid = peer.pid, uid = peer.uid, reason = %message,
            "request refused"
        );
    }
    reply
}

async fn answer(
    agent: &Arc<Agent>,
    peer: Peer,
    reg: u64,
    op: Op,
    mut fds: Vec<OwnedFd>,
    registered: bool,
    mailbox: &Arc<Mailbox>,
) -> Reply {
    let a = agent.clone();
    let result = match op {
        Op::Register(req) => {
            if registered {
                return bad_request(
                    "this connection already registered a socket: use one connection per registration",
                );
            }
            if fds.len() != 1 {
                return bad_request(format!(
                    "register needs exactly one listening socket attached (SCM_RIGHTS); got {}",
                    fds.len()
                ));
            }
            let socket = fds.pop().expect("one descriptor");
            Ok(a.register(peer, reg, socket, req, mailbox.clone()).await)
        }
        Op::Status { group, live } => {
            let live = live.unwrap_or(group.is_some());
            tokio::task::spawn_blocking(move || a.status(group.as_ref(), live)).await
        }
        Op::Activate { group, generation } => {
            tokio::task::spawn_blocking(move || a.activate(peer, &group, generation)).await
        }
        Op::Drain { group, generation } => {
            tokio::task::spawn_blocking(move || a.drain(peer, &group, generation)).await
        }
        Op::Split {
            group,
            generation,
            weight,
        } => tokio::task::spawn_blocking(move || a.split(peer, &group, generation, weight)).await,
        Op::Health {
            group,
            generation,
            health,
        } => {
            tokio::task::spawn_blocking(move || a.report_health(peer, &group, generation, health))
                .await
        }
        Op::Rollback { group } => {
            tokio::task::spawn_blocking(move || a.rollback(peer, &group)).await
        }
        Op::Restart { group } => {
            let mailbox = mailbox.clone();
            tokio::task::spawn_blocking(move || a.restart(peer, &group, reg, mailbox)).await
        }
        Op::RestartResult { group, id, outcome } => {
            tokio::task::spawn_blocking(move || a.restart_result(peer, &group, id, outcome)).await
        }
        Op::DrainProgress {
            group,
            generation,
            step,
        } => {
            tokio::task::spawn_blocking(move || a.drain_progress(peer, &group, generation, step))
                .await
        }
    };
    match result {
        Ok(Ok(reply)) => reply,
        Ok(Err(refusal)) => refusal_reply(refusal),
        Err(e) => Reply::Error {
            kind: ErrorKind::Kernel,
            message: format!("internal error: {e}"),
        },
    }
}
