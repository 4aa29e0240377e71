//! What `exec` and `supervise` share: binding and registering a generation's listeners,
//! starting a server on them as fds 3, 4, …, and reporting how a server exited.

use std::{
    net::TcpListener,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use nix::{
    errno::Errno,
    sys::wait::{WaitPidFlag, WaitStatus, waitpid},
    unistd::Pid,
};

pub use super::events::note;
use super::{
    listeners::{Listen, Registrations},
    spawn,
};
use reuseport_client::{
    self as client, RegisterOptions,
    proto::{GroupAddr, Register},
};

/// LISTEN_FDNAMES when no --name is given.
pub const DEFAULT_FD_NAME: &str = "reuseport";

/// How a server ended, as a shell reports it: its exit code, or 128+N if signal N killed
/// it. `None` while it runs (or is merely stopped).
pub fn exit_code(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => Some(code as u8),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as u8),
        _ => None,
    }
}

/// `status 1` or `signal SIGKILL`, for log lines.
pub fn describe_exit(status: WaitStatus) -> String {
    match status {
        WaitStatus::Signaled(_, sig, _) => format!("signal {sig}"),
        WaitStatus::Exited(_, code) => format!("status {code}"),
        other => format!("{other:?}"),
    }
}

/// The wait status of `pid` if it has exited (it is reaped then), `None` while it runs.
pub fn try_reap(pid: Pid) -> anyhow::Result<Option<WaitStatus>> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => Ok(Some(status)),
        Ok(_) | Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot wait for pid {pid}")),
    }
}

/// A generation's listeners, bound, neither registered nor served yet.
pub struct Bound {
    listeners: Vec<(TcpListener, RegisterOptions)>,
    /// Several listeners to make active: one `activate` once all are registered, so that
    /// the generation switches in every group at once or in none (registering each with
    /// `activate` would switch the groups one by one).
    activate_together: bool,
}

/// Creates the SO_REUSEPORT listeners on the `listens`' addresses, to be registered as
/// `generation` by [`Bound::register_and_start`].
pub fn bind(
    control: &Path,
    listens: &[Listen],
    generation: u32,
    name: Option<String>,
    activate: bool,
) -> anyhow::Result<Bound> {
    bind_for(control, listens, generation, name, activate, false)
}

/// [`bind`], saying whether the launcher is a supervisor: then every listener's registration
/// takes `restart` requests for its group.
pub fn bind_for(
    control: &Path,
    listens: &[Listen],
    generation: u32,
    name: Option<String>,
    activate: bool,
    supervised: bool,
) -> anyhow::Result<Bound> {
    let activate_together = activate && listens.len() > 1;
    let listeners = listens
        .iter()
        .map(|l| {
            let (listener, mut opts) = bind_one(control, l.group, generation, name.clone())?;
            opts.request.activate = activate && !activate_together;
            opts.request.supervised = supervised;
            Ok((listener, opts))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Bound {
        listeners,
        activate_together,
    })
}

fn bind_one(
    control: &Path,
    group: GroupAddr,
    generation: u32,
    name: Option<String>,
) -> anyhow::Result<(TcpListener, RegisterOptions)> {
    let addr = group.addr;
    let group = group
        .in_caller_netns()
        .context("reading the network namespace (/proc/thread-self/ns/net)")?;
    let listener = client::reuseport_listener(addr).map_err(|e| client::listen_error(addr, e))?;
    // NB: systemd hands over listeners in blocking mode (unless NonBlocking=true), and
    // servers rely on it: Python's socket(fileno=3).accept() fails on a non-blocking one.
    listener
        .set_nonblocking(false)
        .context("cannot make the listener blocking for the server")?;
    let opts = RegisterOptions {
        control: PathBuf::from(control),
        request: Register {
            name,
            ..Register::new(group, generation)
        },
        reconnect: true,
    };
    Ok((listener, opts))
}

impl Bound {
    /// Forks the server held at a gate, registers each listener with the server's pid (so
    /// `status` shows the server, not the launcher), then lets the server run `plan` with
    /// the listeners as fds 3, 4, …, and closes the launcher's own copies: each listener
    /// lives exactly as long as the server keeps it. If the agent refuses any registration,
    /// the program never runs and the others are closed again. After an agent restart the
    /// registrations fetch the listeners from the server (`pidfd_getfd`) to register them
    /// again.
    ///
    /// NB: watch SIGCHLD before calling this, or an early exit of the server is missed.
    pub async fn register_and_start(
        self,
        plan: &mut spawn::Plan,
    ) -> anyhow::Result<(Pid, Registrations)> {
        let fds: Vec<_> = self.listeners.iter().map(|(l, _)| l.as_fd()).collect();
        let gated = spawn::spawn_gated(plan, &fds)?;
        let mut registrations = Vec::with_capacity(self.listeners.len());
        for (listener, opts) in &self.listeners {
            let mut opts = opts.clone();
            opts.request.server_pid = Some(gated.pid().as_raw());
            let registration = client::register(listener.as_fd(), &opts)
                .await
                .with_context(|| {
                    format!(
                        "cannot register generation {} in {}",
                        opts.request.generation, opts.request.group
                    )
                })?;
            registrations.push(registration);
        }
        if self.activate_together {
            let Register {
                group, generation, ..
            } = self.listeners[0].1.request;
            let mut agent = client::ControlClient::connect(&self.listeners[0].1.control).await?;
            agent
                .activate_all(group, generation)
                .await
                .with_context(|| format!("cannot activate generation {generation} in {group}"))?;
        }
        let pid = gated.release()?;
        drop(self.listeners);
        let registrations = Registrations::new(registrations);
        registrations.follow_child(pid.as_raw(), spawn::LISTEN_FD);
        Ok((pid, registrations))
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::Signal;

    use super::*;

    #[test]
    fn exits_are_reported_like_a_shell() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        let killed = WaitStatus::Signaled(pid, Signal::SIGKILL, false);
        assert_eq!(exit_code(killed), Some(137));
        assert_eq!(describe_exit(killed), "signal SIGKILL");
        assert_eq!(describe_exit(WaitStatus::Exited(pid, 1)), "status 1");
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }
}
