//! The control socket: one task per connection; a connection that registers a socket
//! stays open and carries pushed state changes.

use std::{
    os::{fd::OwnedFd, unix::fs::PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::{Agent, Options, Peer, Registration, bpffs, registry::Refusal, steering, wake};
use crate::{
    frame::{Conn, FrameError},
    protocol::{ErrorKind, Op, Reply, Request},
};

/// How often registered slots are checked for listeners that closed.
const SCAN_INTERVAL: Duration = Duration::from_millis(50);

pub async fn run(opts: Options) -> anyhow::Result<()> {
    bpffs::ensure(&opts.bpffs)?;
    let force = opts.select_only;
    let mode = tokio::task::spawn_blocking(move || steering::detect_mode(force)).await??;
    let agent = Arc::new(Agent::new(mode, opts.bpffs.clone(), opts.wake_ups).context(
        "starting the RCU grace-period helper (membarrier MEMBARRIER_CMD_GLOBAL, Linux 4.3+)",
    )?);
    let listener = bind_control(&opts.control)?;
    tracing::info!(
        control = %opts.control.display(),
        bpffs = %opts.bpffs.display(),
        mode = mode.as_str(),
        kernel = %steering::kernel_release(),
        "reuseport-agent ready"
    );

    let scanner = tokio::spawn(scan_loop(agent.clone()));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve(agent.clone(), stream));
                }
                Err(e) => tracing::warn!(error = %e, "accepting a control connection"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    scanner.abort();
    // NB: pinned maps and attached programs stay: the data path does not depend on the
    // agent running.
    let _ = std::fs::remove_file(&opts.control);
    tracing::info!("reuseport-agent stopped; steering stays in place");
    Ok(())
}

/// Binds the control socket, replacing a stale socket file but never a live agent's.
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the control socket directory {}", dir.display()))?;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another reuseport-agent is already listening on {} (stop it, or pass --control PATH)",
            path.display()
        ),
        Err(_) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt as _;
                if !meta.file_type().is_socket() {
                    bail!(
                        "{} exists and is not a socket: remove it or pass --control PATH",
                        path.display()
                    );
                }
                std::fs::remove_file(path).with_context(|| {
                    format!("removing the stale control socket {}", path.display())
                })?;
            }
        }
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

async fn scan_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = agent.clone();
        match tokio::task::spawn_blocking(move || a.scan_closed()).await {
            Ok(wakeups) => wakeups.into_iter().for_each(wake::spawn),
            Err(e) => tracing::error!(error = %e, "slot scan failed"),
        }
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

async fn serve(agent: Arc<Agent>, stream: UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            pid: c.pid().unwrap_or(0),
            uid: c.uid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials");
            return;
        }
    };
    let mut conn = Conn::new(stream);
    let reg = agent.next_reg_id();
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut registered = false;
    loop {
        let frame = tokio::select! {
            frame = conn.recv() => frame,
            Some(event) = events.recv() => {
                if conn.send(&event, None).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                // The stream cannot be resynchronised after a bad length or a cut frame.
                if !matches!(e, FrameError::Io(_)) {
                    let _ = conn
                        .send(&bad_request(format!("{e}; closing the connection")), None)
                        .await;
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
                let is_register = matches!(req.op, Op::Register { .. });
                let reply = handle(&agent, peer, reg, req.op, frame.fds, registered, &tx).await;
                registered |= is_register && matches!(reply, Reply::Registered { .. });
                reply
            }
        };
        if conn.send(&reply, None).await.is_err() {
            break;
        }
    }
    if registered {
        let a = agent.clone();
        let _ = tokio::task::spawn_blocking(move || a.unregister(reg)).await;
    }
}

async fn handle(
    agent: &Arc<Agent>,
    peer: Peer,
    reg: u64,
    op: Op,
    mut fds: Vec<OwnedFd>,
    registered: bool,
    events: &mpsc::UnboundedSender<Reply>,
) -> Reply {
    let a = agent.clone();
    let result = match op {
        Op::Register {
            group,
            generation,
            name,
            activate,
        } => {
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
            let tx = events.clone();
            let req = Registration {
                group,
                generation,
                name,
                activate,
            };
            tokio::task::spawn_blocking(move || a.register(peer, reg, socket, req, tx)).await
        }
        Op::Status { group } => tokio::task::spawn_blocking(move || a.status(group.as_ref())).await,
        Op::Activate { group, generation } => {
            tokio::task::spawn_blocking(move || a.activate(peer, &group, generation)).await
        }
        Op::Drain { group, generation } => {
            tokio::task::spawn_blocking(move || a.drain(peer, &group, generation)).await
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
