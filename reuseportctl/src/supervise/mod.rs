//! `reuseportctl supervise`: a zero-loss replacement for `start_server` (Server::Starter).
//! It runs COMMAND as a generation the way `exec` does and, on SIGHUP, starts the next
//! generation next to it, waits until that one is ready, activates it through the agent and
//! lets the previous one drain: nothing new reaches it, it gets `--on-drain SIGNAL`, and
//! what was still queued in its listener when it closes migrates to the new generation.
//!
//! One task runs everything (the runtime is current-thread, see `main`): signals,
//! the children's exits, the states the agent pushes, readiness messages and timers all
//! arrive in one `select!` loop, so the table of generations needs no lock.

use std::{collections::BTreeMap, ffi::OsString, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Args;
use nix::sys::signal::Signal;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::Instant,
};

use self::{
    machine::Supervisor,
    notify::{Notifier, recv_notify},
    service::Service,
};
use crate::{
    GlobalOpts,
    args::{parse_duration, parse_name, parse_signal},
    draining::DrainOpts,
    events::{self, warn},
    listeners::{Listen, check_listens, parse_listen},
    reaper::Reaper,
    spawn,
};
use reuseport_client::{
    ControlClient,
    proto::{ErrorKind, GroupAddr},
};

mod deploys;
mod gate;
mod generation;
mod health;
mod machine;
mod notify;
mod service;

/// Tells each server its generation number (the test servers answer with it).
pub const GENERATION_VAR: &str = "REUSEPORT_GENERATION";

/// Run a server as generations that replace each other on SIGHUP without losing a
/// connection.
#[derive(Debug, Args)]
#[command(
    long_about = "Run a server as generations that replace each other on SIGHUP without \
        losing a connection: a replacement for start_server (Server::Starter).\n\n\
        Each generation is started as `reuseportctl exec` starts a server: a registered \
        SO_REUSEPORT listener per --listen as fds 3, 4, …, LISTEN_FDS, LISTEN_PID, \
        LISTEN_FDNAMES, SERVER_STARTER_PORT, plus REUSEPORT_GENERATION=<N>. The first \
        generation is the highest one the groups have + 1 (1 for new groups). A server \
        with several listeners is deployed as one unit: it becomes active in every group, \
        and drains once it drains in every group.\n\n\
        On SIGHUP, or `reuseportctl restart GROUP` (forwarded by the agent):\
        \n  1. COMMAND starts again as the next generation, registered as standby: it gets no \
        connection yet;\
        \n  2. the supervisor waits until it is ready (--ready) and, with --health, up: its \
        health checks reach it through the group's port from probe ports while it is standby;\
        \n  3. it activates the new generation: from then on every new connection goes to it, \
        and the previous generation drains (with --canary P:DURATION: P % of them for \
        DURATION first, rolled back if it goes down meanwhile);\
        \n  4. once the draining generation is idle (no connection in flight, empty accept \
        queue: the agent reads both from the kernel), or --drain-timeout after the flip, it \
        gets --on-drain SIGNAL, and SIGKILL if it still runs --kill-timeout later. A server \
        that exits at once on the signal loses nothing. When its listener closes, whatever \
        is still queued in it moves to the active generation (Linux 5.14+).\n\n\
        If the new generation exits before it is ready, or is not ready within \
        --ready-timeout, it is killed and the previous one stays active (one `restart \
        failed: …` line on stderr). A SIGHUP while generations are draining starts another \
        one at once; a SIGHUP while one is still starting restarts again once it is done.\n\n\
        SIGTERM and SIGINT are forwarded to every generation; the supervisor waits for them \
        (SIGKILL after --kill-timeout) and exits 0. SIGQUIT, SIGUSR1 and SIGUSR2 go to the \
        active generation. If the active generation exits on its own, the supervisor stops \
        the others and exits with its status (128+N for signal N).",
    after_long_help = "--ready notify: NOTIFY_SOCKET names a datagram socket of the \
        supervisor (an abstract one, @reuseportctl-…, as sd_notify(3) accepts); the \
        generation is ready when its main process (LISTEN_PID; the sender is checked with \
        SCM_CREDENTIALS) sends a message with a READY=1 line. Messages from other processes, \
        such as forked workers, are ignored (systemd's NotifyAccess=main).\n\n\
        Example:\n\
        \x20 reuseportctl supervise --listen 0.0.0.0:8080 --ready notify -- ./server &\n\
        \x20 kill -HUP $!           # deploy: a new generation takes over, the old one drains\n\
        \x20 reuseportctl status 0.0.0.0:8080"
)]
pub struct SuperviseArgs {
    /// Address to listen on, the group's address: IP:PORT or tcp://IP:PORT (IPv6 in
    /// brackets, e.g. [::]:443), optionally with the listener's LISTEN_FDNAMES entry before
    /// it (http=0.0.0.0:80). Repeat it for several listeners: fds 3, 4, … in this order;
    /// every generation has a socket in each group, and `reuseportctl restart` takes the
    /// first one's group.
    #[arg(long, value_name = "[NAME=]ADDR:PORT", required = true, value_parser = parse_listen)]
    pub listen: Vec<Listen>,
    /// When a new generation counts as ready: `notify` (it sends READY=1 to NOTIFY_SOCKET)
    /// or `delay=DUR` (it is still running DUR after its start).
    #[arg(long, value_name = "notify|delay=DUR", default_value = "delay=1s", value_parser = parse_ready)]
    pub ready: Ready,
    /// A new generation not ready this long after its start is killed; the previous one
    /// stays active.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Signal sent to a draining generation, once, when it is idle (e.g. TERM, QUIT, 3).
    #[arg(long, value_name = "SIGNAL", default_value = "TERM", value_parser = parse_signal)]
    pub on_drain: Signal,
    #[command(flatten)]
    pub drain: DrainOpts,
    #[command(flatten)]
    pub health: health::HealthOpts,
    /// Name of the generations, shown by `status` and passed in LISTEN_FDNAMES for every
    /// listener that has no NAME= of its own.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// Report what happens as JSON events on stdout, one object per line (started, ready,
    /// activated, reload, deploy_failed, signalled, exited, …; docs/operations.md). The
    /// servers' stdout then goes to stderr.
    #[arg(long)]
    pub json: bool,
    /// The server and its arguments (after `--` if they start with `-`).
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<OsString>,
}

/// How a new generation tells that it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// `READY=1` on NOTIFY_SOCKET (sd_notify).
    Notify,
    /// Still running after this long.
    Delay(Duration),
}

fn parse_ready(s: &str) -> Result<Ready, String> {
    if s == "notify" {
        return Ok(Ready::Notify);
    }
    match s.strip_prefix("delay=") {
        Some(d) => parse_duration(d).map(Ready::Delay),
        None => Err(format!("{s:?}: use notify or delay=DUR (e.g. delay=2s)")),
    }
}

pub async fn run(global: &GlobalOpts, mut args: SuperviseArgs) -> anyhow::Result<ExitCode> {
    if args.json {
        events::use_json()?;
    }
    check_listens(&args.listen)?;
    for l in &mut args.listen {
        l.group = l
            .group
            .in_caller_netns()
            .context("reading the network namespace")?;
    }
    // Resolved first: a typo in COMMAND should not touch the agent.
    let program = spawn::resolve_program(&args.command[0], std::env::var_os("PATH").as_deref())?;
    let mut first = 1;
    for l in &args.listen {
        first = first.max(first_generation(global, l.group).await?);
    }
    let notifier = match args.ready {
        Ready::Notify => Some(Notifier::bind().context("cannot create the NOTIFY_SOCKET")?),
        Ready::Delay(_) => None,
    };
    // Watched before the first fork, so that neither an early exit nor a signal is lost.
    let mut signals = Signals::watch()?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut sup = Supervisor {
        control: global.control.clone(),
        program,
        notify_socket: notifier.as_ref().map(|n| n.name.clone()),
        args,
        gens: BTreeMap::new(),
        next_generation: first,
        current: None,
        restart_pending: false,
        waiters: BTreeMap::new(),
        unattached: Vec::new(),
        events: events_tx,
        shutdown: None,
        reaper: Reaper::new(),
        service: Service::from_env(),
    };
    sup.start_generation().await?;
    loop {
        sup.tell_service();
        if let Some(code) = sup.finished() {
            return Ok(ExitCode::from(code));
        }
        let deadline = sup.next_deadline();
        tokio::select! {
            _ = signals.child.recv() => sup.reap().await?,
            _ = signals.hangup.recv() => sup.on_hangup().await,
            _ = signals.terminate.recv() => sup.begin_shutdown(Signal::SIGTERM, 0),
            _ = signals.interrupt.recv() => sup.begin_shutdown(Signal::SIGINT, 0),
            _ = signals.quit.recv() => sup.forward_to_current(Signal::SIGQUIT),
            _ = signals.user1.recv() => sup.forward_to_current(Signal::SIGUSR1),
            _ = signals.user2.recv() => sup.forward_to_current(Signal::SIGUSR2),
            Some(event) = events.recv() => sup.on_event(event).await,
            message = recv_notify(notifier.as_ref()) => match message {
                Ok((pid, text)) => sup.on_notify(pid, &text).await,
                Err(e) => warn(format_args!("reading NOTIFY_SOCKET: {e}")),
            },
            () = sleep_until(deadline) => sup.on_timers().await,
        }
    }
}

/// The highest generation the group has + 1, or 1 if the agent does not know the group.
async fn first_generation(global: &GlobalOpts, group: GroupAddr) -> anyhow::Result<u32> {
    let mut client = ControlClient::connect(&global.control).await?;
    let groups = match client.status(Some(group)).await {
        Ok(groups) => groups,
        Err(e) if e.agent_kind() == Some(ErrorKind::UnknownGroup) => return Ok(1),
        Err(e) => return Err(e).with_context(|| format!("cannot get the status of {group}")),
    };
    let highest = groups
        .iter()
        .filter(|g| g.group.addr == group.addr)
        .flat_map(|g| &g.generations)
        .map(|g| g.generation)
        .max()
        .unwrap_or(0);
    highest
        .checked_add(1)
        .with_context(|| format!("{group} already has generation {highest}, the highest there is"))
}

struct Signals {
    child: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    user1: tokio::signal::unix::Signal,
    user2: tokio::signal::unix::Signal,
}

impl Signals {
    fn watch() -> anyhow::Result<Self> {
        let watch = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot watch {name}"))
        };
        Ok(Self {
            child: watch(SignalKind::child(), "SIGCHLD")?,
            hangup: watch(SignalKind::hangup(), "SIGHUP")?,
            terminate: watch(SignalKind::terminate(), "SIGTERM")?,
            interrupt: watch(SignalKind::interrupt(), "SIGINT")?,
            quit: watch(SignalKind::quit(), "SIGQUIT")?,
            user1: watch(SignalKind::user_defined1(), "SIGUSR1")?,
            user2: watch(SignalKind::user_defined2(), "SIGUSR2")?,
        })
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_notify_or_a_delay() {
        assert_eq!(parse_ready("notify"), Ok(Ready::Notify));
        assert_eq!(
            parse_ready("delay=300ms"),
            Ok(Ready::Delay(Duration::from_millis(300)))
        );
        assert!(parse_ready("delay").is_err());
        assert!(parse_ready("delay=1").is_err());
    }
}
