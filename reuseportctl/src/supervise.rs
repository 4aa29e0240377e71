//! `reuseportctl supervise`: a zero-loss replacement for `start_server` (Server::Starter).
//! It runs COMMAND as a generation the way `exec` does and, on SIGHUP, starts the next
//! generation next to it, waits until that one is ready, activates it through the agent and
//! lets the previous one drain: nothing new reaches it, it gets `--on-drain SIGNAL`, and
//! what was still queued in its listener when it closes migrates to the new generation.
//!
//! One task runs everything (the runtime is current-thread, see [`super::main`]): signals,
//! the children's exits, the states the agent pushes, readiness messages and timers all
//! arrive in one `select!` loop, so the table of generations needs no lock.

use std::{
    collections::BTreeMap,
    ffi::{CString, OsString},
    io::{self, IoSliceMut},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;
use nix::{
    sys::{
        signal::{Signal, kill, killpg},
        socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt},
        wait::WaitStatus,
    },
    unistd::Pid,
};
use tokio::{
    io::Interest,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};

use super::{
    GlobalOpts,
    draining::{Drain, DrainOpts, DrainTask},
    launch::{self, DEFAULT_FD_NAME, describe_exit, note, parse_name, parse_signal},
    reaper::Reaper,
    spawn,
};
use reuseport_client::{
    ClientError, ControlClient, Registration,
    proto::{ErrorKind, GenState, GroupAddr, RestartOutcome, UNREQUESTED_RESTART},
};

/// Tells each server its generation number (the test servers answer with it).
pub const GENERATION_VAR: &str = "REUSEPORT_GENERATION";

/// Run a server as generations that replace each other on SIGHUP without losing a
/// connection.
#[derive(Debug, Args)]
#[command(
    long_about = "Run a server as generations that replace each other on SIGHUP without \
        losing a connection: a replacement for start_server (Server::Starter).\n\n\
        Each generation is started as `reuseportctl exec` starts a server: a registered \
        SO_REUSEPORT listener as fd 3, LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES, \
        SERVER_STARTER_PORT, plus REUSEPORT_GENERATION=<N>. The first generation is the \
        highest one the group has + 1 (1 for a new group).\n\n\
        On SIGHUP, or `reuseportctl restart GROUP` (forwarded by the agent):\
        \n  1. COMMAND starts again as the next generation, registered as standby: it gets no \
        connection yet;\
        \n  2. the supervisor waits until it is ready (--ready);\
        \n  3. it activates the new generation: from then on every new connection goes to it, \
        and the previous generation drains;\
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
    /// brackets, e.g. [::]:443).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: GroupAddr,
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
    /// Name of the generations, shown by `status` and passed in LISTEN_FDNAMES.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,
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

/// `500ms`, `2s`, `1m`, `1h`: a whole number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let usage = || format!("{s:?} is not a duration: use a number and a unit (500ms, 2s, 1m, 1h)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(usage)?;
    let n: u64 = s[..split].parse().map_err(|_| usage())?;
    let secs = |factor: u64| n.checked_mul(factor).map(Duration::from_secs);
    match &s[split..] {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => None,
    }
    .ok_or_else(usage)
}

pub async fn run(global: &GlobalOpts, mut args: SuperviseArgs) -> anyhow::Result<ExitCode> {
    args.listen = args
        .listen
        .in_caller_netns()
        .context("reading the network namespace")?;
    // Resolved first: a typo in COMMAND should not touch the agent.
    let program = spawn::resolve_program(&args.command[0], std::env::var_os("PATH").as_deref())?;
    let first = first_generation(global, args.listen).await?;
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
    };
    sup.start_generation().await?;
    loop {
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
                Err(e) => note(format_args!("warning: reading NOTIFY_SOCKET: {e}")),
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

/// What the agent pushed on a generation's registration, forwarded into the main loop.
enum Event {
    State(u32, GenState),
    Closed(u32),
    /// `reuseportctl restart`, forwarded by the agent with its id.
    Restart(u64),
}

/// Where a generation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Registered as standby, not ready yet. `ready_at`: when `--ready delay=…` elapses.
    Starting {
        ready_at: Option<Instant>,
        give_up_at: Instant,
    },
    Active,
    /// Waiting until idle, signalled or killed: see its [`DrainTask`].
    Draining {
        since: Instant,
    },
    /// Did not get ready; SIGKILLed, its exit is not news.
    Failed,
}

/// One running generation. Dropping it closes its registration.
struct Gen {
    pid: Pid,
    group: GroupAddr,
    phase: Phase,
    drain: Option<DrainTask>,
    forwarder: JoinHandle<()>,
    _registration: Registration,
}

impl Drop for Gen {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

struct Shutdown {
    /// The supervisor's exit status once every generation is gone.
    code: u8,
    kill_at: Instant,
    killed: bool,
}

struct Supervisor {
    control: PathBuf,
    program: PathBuf,
    /// NOTIFY_SOCKET for the children, with `--ready notify`.
    notify_socket: Option<String>,
    args: SuperviseArgs,
    gens: BTreeMap<u32, Gen>,
    next_generation: u32,
    /// The generation that serves: the last one activated.
    current: Option<u32>,
    /// A SIGHUP came while a generation was starting.
    restart_pending: bool,
    /// Restarts requested through the agent, by the generation started for them; they are
    /// answered when it is active or has failed.
    waiters: BTreeMap<u32, Vec<u64>>,
    /// Requested restarts no generation was started for yet.
    unattached: Vec<u64>,
    events: mpsc::UnboundedSender<Event>,
    shutdown: Option<Shutdown>,
    /// Waits for the generations, and for the orphans it inherits as PID 1 or a subreaper.
    reaper: Reaper,
    // NB: no Drop needed for the children: they get SIGTERM through PR_SET_PDEATHSIG if the
    // supervisor dies.
}

impl Supervisor {
    /// The exit status, once there is nothing left to supervise.
    fn finished(&self) -> Option<u8> {
        if !self.gens.is_empty() {
            return None;
        }
        Some(self.shutdown.as_ref().map_or(1, |s| s.code))
    }

    fn starting(&self) -> Option<u32> {
        self.gens
            .iter()
            .find(|(_, g)| matches!(g.phase, Phase::Starting { .. }))
            .map(|(n, _)| *n)
    }

    /// `; generation 2 stays active`, for failure lines.
    fn stays_active(&self) -> String {
        self.current
            .map(|n| format!("; generation {n} stays active"))
            .unwrap_or_default()
    }

    /// Logs why `generation` (or, with `None`, the next one) did not take over, and tells
    /// the restart requests waiting for it.
    fn restart_failed(&mut self, generation: Option<u32>, what: std::fmt::Arguments<'_>) {
        let verb = if self.current.is_some() {
            "restart"
        } else {
            "start"
        };
        let why = format!("{what}{}", self.stays_active());
        note(format_args!("{verb} failed: {why}"));
        let ids = match generation {
            Some(n) => self.waiters.remove(&n).unwrap_or_default(),
            None => std::mem::take(&mut self.unattached),
        };
        self.report(ids, RestartOutcome::Failed { error: why });
    }

    /// Reports the outcome of a restart to the agent, in the background (the loop must not
    /// wait on the agent): to the requests waiting for it, or, for a SIGHUP, just for
    /// `status`.
    fn report(&self, ids: Vec<u64>, outcome: RestartOutcome) {
        let ids = if ids.is_empty() {
            vec![UNREQUESTED_RESTART]
        } else {
            ids
        };
        let (control, group) = (self.control.clone(), self.args.listen);
        tokio::spawn(async move {
            let res = async {
                let mut client = ControlClient::connect(&control).await?;
                for id in ids {
                    client.report_restart(group, id, outcome.clone()).await?;
                }
                Ok::<_, ClientError>(())
            }
            .await;
            if let Err(e) = res {
                note(format_args!(
                    "warning: cannot report a restart's outcome to the agent: {e}"
                ));
            }
        });
    }

    fn child_env(&self, generation: u32) -> Vec<CString> {
        // NB: an inherited NOTIFY_SOCKET (the supervisor runs under systemd) would let the
        // server tell systemd it is ready, which systemd refuses from a pid it did not start.
        let inherited =
            std::env::vars_os().filter(|(key, _)| key != "NOTIFY_SOCKET" && key != GENERATION_VAR);
        let fd_name = self.args.name.as_deref().unwrap_or(DEFAULT_FD_NAME);
        let mut env = spawn::child_env(inherited, self.args.listen.addr, fd_name);
        env.push(CString::new(format!("{GENERATION_VAR}={generation}")).expect("no NUL"));
        if let Some(socket) = &self.notify_socket {
            env.push(CString::new(format!("NOTIFY_SOCKET={socket}")).expect("no NUL"));
        }
        env
    }

    /// Starts COMMAND as the next generation, registered as standby (active if the group is
    /// new).
    async fn start_generation(&mut self) -> anyhow::Result<()> {
        let generation = self.next_generation;
        self.next_generation = generation
            .checked_add(1)
            .context("no generation number left")?;
        let bound = launch::bind_for(
            &self.control,
            self.args.listen,
            generation,
            self.args.name.clone(),
            false,
            true,
        )
        .with_context(|| format!("generation {generation}"))?;
        let mut plan = spawn::Plan::new(
            &self.program,
            &self.args.command,
            self.child_env(generation),
        )
        .context("the command line contains a NUL byte")?;
        let (pid, mut registration) = bound.register_and_start(&mut plan).await?;
        drop(plan);
        self.reaper.track(pid);

        let mut state = registration.state();
        let mut restarts = registration.take_restart_requests();
        let initial = *state.borrow_and_update();
        let events = self.events.clone();
        let forwarder = tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    changed = state.changed() => match changed {
                        Ok(()) => Event::State(generation, *state.borrow_and_update()),
                        Err(_) => break,
                    },
                    Some(id) = recv_restart(restarts.as_mut()) => Event::Restart(id),
                };
                if events.send(event).is_err() {
                    return;
                }
            }
            let _ = events.send(Event::Closed(generation));
        });
        let now = Instant::now();
        let phase = Phase::Starting {
            ready_at: match self.args.ready {
                Ready::Delay(delay) => Some(now + delay),
                Ready::Notify => None,
            },
            give_up_at: now + self.args.ready_timeout,
        };
        let group = registration.group();
        self.gens.insert(
            generation,
            Gen {
                pid,
                group,
                phase,
                drain: None,
                forwarder,
                _registration: registration,
            },
        );
        if initial == GenState::Active {
            // The group was new: the agent made the first generation active at once.
            note(format_args!(
                "generation {generation} of {group} started (pid {pid}) and is active"
            ));
        } else {
            let waiting = match self.args.ready {
                Ready::Notify => "READY=1".to_string(),
                Ready::Delay(delay) => format!("{delay:?}"),
            };
            note(format_args!(
                "generation {generation} of {group} started (pid {pid}) as standby; \
                 waiting for {waiting} before activating it"
            ));
        }
        self.on_state(generation, initial);
        Ok(())
    }

    /// A new generation is ready: make it the active one. The previous one drains (and is
    /// signalled when the agent pushes that state).
    async fn activate(&mut self, generation: u32) {
        let Some(gen_) = self.gens.get(&generation) else {
            return;
        };
        let (group, pid) = (gen_.group, gen_.pid);
        // NB: its SIGCHLD may still be queued: activating a generation that just died would
        // drain the one that serves and leave the group falling back.
        match self.reaper.try_reap(pid) {
            Ok(Some(status)) => return self.on_exit(generation, status),
            Ok(None) => {}
            Err(e) => note(format_args!("warning: {}", super::one_line(&e))),
        }
        let changed = async {
            let mut client = ControlClient::connect(&self.control).await?;
            client.activate(group, generation).await
        }
        .await;
        match changed {
            Ok(_) => {
                let waiting = self.waiters.remove(&generation).unwrap_or_default();
                self.report(waiting, RestartOutcome::Active { generation });
                let previous = self.current.replace(generation);
                if let Some(g) = self.gens.get_mut(&generation) {
                    g.phase = Phase::Active;
                }
                match previous {
                    Some(p) => note(format_args!(
                        "generation {generation} is ready and active; generation {p} drains"
                    )),
                    None => note(format_args!("generation {generation} is ready and active")),
                }
                if self.restart_pending {
                    self.restart_pending = false;
                    self.restart().await;
                }
            }
            Err(e) => {
                self.restart_failed(
                    Some(generation),
                    format_args!("cannot activate generation {generation}: {e}"),
                );
                self.give_up(generation);
            }
        }
    }

    /// Kills a generation that will not become active.
    fn give_up(&mut self, generation: u32) {
        if let Some(g) = self.gens.get_mut(&generation) {
            g.phase = Phase::Failed;
            // Its own session (spawn calls setsid): the group takes its workers along.
            let _ = killpg(g.pid, Signal::SIGKILL);
        }
    }

    async fn restart(&mut self) {
        if let Some(starting) = self.starting() {
            self.restart_pending = true;
            note(format_args!(
                "SIGHUP: generation {starting} is still starting; restarting again once it is \
                 ready"
            ));
            return;
        }
        let generation = self.next_generation;
        match self.start_generation().await {
            Ok(()) => {
                let ids = std::mem::take(&mut self.unattached);
                if !ids.is_empty() {
                    self.waiters.insert(generation, ids);
                }
            }
            Err(e) => self.restart_failed(
                None,
                format_args!(
                    "cannot start generation {generation}: {}",
                    super::one_line(&e)
                ),
            ),
        }
    }

    async fn on_hangup(&mut self) {
        if self.shutdown.is_some() {
            note(format_args!("SIGHUP ignored: stopping"));
            return;
        }
        self.restart().await;
    }

    fn on_state(&mut self, generation: u32, state: GenState) {
        let Some(g) = self.gens.get_mut(&generation) else {
            return;
        };
        match state {
            GenState::Active => {
                g.phase = Phase::Active;
                self.current = Some(generation);
            }
            GenState::Draining => {
                if !matches!(g.phase, Phase::Draining { .. }) {
                    g.phase = Phase::Draining {
                        since: Instant::now(),
                    };
                    g.drain = Some(
                        Drain {
                            control: self.control.clone(),
                            group: g.group,
                            generation,
                            pid: g.pid,
                            signal: self.args.on_drain,
                            opts: self.args.drain.clone(),
                        }
                        .start(),
                    );
                }
                if self.current == Some(generation) {
                    // Someone else activated another generation (reuseportctl activate).
                    self.current = None;
                }
            }
            GenState::Standby => {}
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::State(generation, state) => self.on_state(generation, state),
            Event::Restart(id) => {
                if self.shutdown.is_some() {
                    note(format_args!("restart request ignored: stopping"));
                    self.report(
                        vec![id],
                        RestartOutcome::Failed {
                            error: "the supervisor is stopping".into(),
                        },
                    );
                    return;
                }
                note(format_args!("restart requested through the agent"));
                self.unattached.push(id);
                self.restart().await;
            }
            Event::Closed(generation) => {
                if let Some(g) = self.gens.get(&generation) {
                    note(format_args!(
                        "warning: the agent closed the control connection of generation \
                         {generation}: pid {} keeps running, but its listener is no longer \
                         registered",
                        g.pid
                    ));
                }
            }
        }
    }

    async fn on_notify(&mut self, pid: Option<Pid>, text: &[u8]) {
        let ready = text.split(|b| *b == b'\n').any(|line| line == b"READY=1");
        let Some(pid) = pid else { return };
        let starting = self
            .gens
            .iter()
            .find(|(_, g)| g.pid == pid && matches!(g.phase, Phase::Starting { .. }));
        if let (true, Some((&generation, _))) = (ready, starting) {
            self.activate(generation).await;
        }
    }

    /// Reaps every generation that exited (SIGCHLDs coalesce: one may stand for several).
    async fn reap(&mut self) -> anyhow::Result<()> {
        let mut exited = Vec::new();
        for (&generation, g) in &self.gens {
            if let Some(status) = self.reaper.try_reap(g.pid)? {
                exited.push((generation, status));
            }
        }
        for (generation, status) in exited {
            self.on_exit(generation, status);
        }
        if self.restart_pending && self.shutdown.is_none() && self.starting().is_none() {
            self.restart_pending = false;
            self.restart().await;
        }
        Ok(())
    }

    fn on_exit(&mut self, generation: u32, status: WaitStatus) {
        let Some(g) = self.gens.remove(&generation) else {
            return;
        };
        let how = describe_exit(status);
        let pid = g.pid;
        if self.shutdown.is_some() {
            note(format_args!(
                "generation {generation} (pid {pid}) exited with {how}"
            ));
            return;
        }
        match g.phase {
            Phase::Starting { .. } => self.restart_failed(
                Some(generation),
                format_args!("generation {generation} exited with {how} before it was ready"),
            ),
            Phase::Failed => {}
            Phase::Draining { since, .. } => note(format_args!(
                "generation {generation} (pid {pid}) exited with {how} after draining for \
                 {:.1}s",
                since.elapsed().as_secs_f64()
            )),
            Phase::Active => {
                note(format_args!(
                    "generation {generation} (pid {pid}), the active one, exited with {how}: \
                     stopping"
                ));
                self.current = None;
                self.begin_shutdown(Signal::SIGTERM, launch::exit_code(status).unwrap_or(1));
                return;
            }
        }
        if self.current.is_none() && self.starting().is_none() && !self.gens.is_empty() {
            note(format_args!(
                "warning: no generation of this supervisor is active; send SIGHUP to start one"
            ));
        }
        // Nothing left (the first start failed): exit with that generation's status, or 1
        // if it was killed for not getting ready.
        if self.gens.is_empty() {
            let code = match g.phase {
                Phase::Failed => None,
                _ => launch::exit_code(status),
            };
            self.shutdown = Some(Shutdown {
                code: code.unwrap_or(1),
                kill_at: Instant::now(),
                killed: true,
            });
        }
    }

    /// Forwards `sig` to every generation; once all have exited (or were SIGKILLed after
    /// `--kill-timeout`) the supervisor exits with `code`.
    fn begin_shutdown(&mut self, sig: Signal, code: u8) {
        if self.shutdown.is_none() {
            self.shutdown = Some(Shutdown {
                code,
                kill_at: Instant::now() + self.args.drain.kill_timeout,
                killed: false,
            });
            self.restart_pending = false;
            let mut ids = std::mem::take(&mut self.unattached);
            ids.extend(std::mem::take(&mut self.waiters).into_values().flatten());
            self.report(
                ids,
                RestartOutcome::Failed {
                    error: "the supervisor is stopping".into(),
                },
            );
            if !self.gens.is_empty() {
                let gens: Vec<String> = self.gens.keys().map(u32::to_string).collect();
                note(format_args!(
                    "sending {sig} to generation(s) {} and waiting up to {:?}",
                    gens.join(", "),
                    self.args.drain.kill_timeout
                ));
            }
        }
        for g in self.gens.values() {
            let _ = kill(g.pid, sig);
        }
    }

    fn forward_to_current(&self, sig: Signal) {
        match self.current.and_then(|n| self.gens.get(&n)) {
            Some(g) => {
                let _ = kill(g.pid, sig);
            }
            None => note(format_args!("{sig} not forwarded: no generation is active")),
        }
    }

    /// The next time [`Self::on_timers`] has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(s) = &self.shutdown
            && !s.killed
        {
            consider(s.kill_at);
        }
        for g in self.gens.values() {
            if let Phase::Starting {
                ready_at,
                give_up_at,
            } = g.phase
            {
                consider(give_up_at);
                if let Some(t) = ready_at {
                    consider(t);
                }
            }
        }
        next
    }

    async fn on_timers(&mut self) {
        let now = Instant::now();
        let timeout = self.args.drain.kill_timeout;
        if let Some(s) = &mut self.shutdown
            && !s.killed
            && s.kill_at <= now
        {
            s.killed = true;
            for (generation, g) in &self.gens {
                note(format_args!(
                    "generation {generation} (pid {}) still runs {timeout:?} after the \
                     signal: SIGKILL",
                    g.pid
                ));
                let _ = killpg(g.pid, Signal::SIGKILL);
            }
        }
        let mut ready = Vec::new();
        let mut late = Vec::new();
        for (&generation, g) in &self.gens {
            match &g.phase {
                Phase::Starting { give_up_at, .. } if *give_up_at <= now => late.push(generation),
                Phase::Starting {
                    ready_at: Some(t), ..
                } if *t <= now => ready.push(generation),
                _ => {}
            }
        }
        for generation in late {
            let limit = self.args.ready_timeout;
            self.restart_failed(
                Some(generation),
                format_args!("generation {generation} was not ready within {limit:?}"),
            );
            self.give_up(generation);
        }
        for generation in ready {
            // NB: the generation may have exited since; its SIGCHLD is handled next.
            if self.shutdown.is_none() {
                self.activate(generation).await;
            }
        }
    }
}

/// The supervisor's end of NOTIFY_SOCKET.
struct Notifier {
    socket: tokio::net::UnixDatagram,
    /// `@reuseportctl-…`, as NOTIFY_SOCKET spells an abstract address.
    name: String,
}

impl Notifier {
    /// NB: an abstract address belongs to the network namespace: a server that moves into
    /// another one cannot reach it. In exchange, nothing is left behind in the file system.
    fn bind() -> io::Result<Self> {
        use std::os::linux::net::SocketAddrExt as _;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("reuseportctl-supervise-{}-{nanos}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            name: format!("@{name}"),
        })
    }

    /// The next message and the pid that sent it (from SCM_CREDENTIALS).
    async fn recv(&self) -> io::Result<(Option<Pid>, Vec<u8>)> {
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || {
                recv_with_pid(self.socket.as_raw_fd())
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

async fn recv_restart(restarts: Option<&mut mpsc::UnboundedReceiver<u64>>) -> Option<u64> {
    match restarts {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_notify(notifier: Option<&Notifier>) -> io::Result<(Option<Pid>, Vec<u8>)> {
    match notifier {
        Some(n) => n.recv().await,
        None => std::future::pending().await,
    }
}

fn recv_with_pid(fd: std::os::fd::RawFd) -> io::Result<(Option<Pid>, Vec<u8>)> {
    let mut buf = vec![0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    // NB: room for credentials only: descriptors someone attaches do not fit and the
    // kernel closes them instead of installing them here.
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg[..]),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let pid = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::ScmCredentials(creds) => Some(Pid::from_raw(creds.pid())),
        _ => None,
    });
    let len = msg.bytes;
    buf.truncate(len);
    Ok((pid, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "2 s",
            "3d",
            "-1s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

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

    /// A datagram carries the sender's pid, as the readiness check relies on.
    #[tokio::test]
    async fn notify_messages_carry_the_sender_pid() {
        let notifier = Notifier::bind().expect("bind the notify socket");
        let name = notifier.name.strip_prefix('@').unwrap();
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to_addr(b"STATUS=x\nREADY=1\n", &addr).unwrap();
        let (pid, text) = tokio::time::timeout(Duration::from_secs(5), notifier.recv())
            .await
            .expect("message within 5 s")
            .expect("recv");
        assert_eq!(pid, Some(nix::unistd::getpid()));
        assert_eq!(text, b"STATUS=x\nREADY=1\n");
    }
}
