//! The supervisor's state machine: its generations and where each is in its life, and what
//! it does on each event of the main loop (signals, exits, the agent's pushes, readiness,
//! timers). Starting a generation and activating it are in [`super::generation`]; deploys as
//! they are asked for, and their outcomes, in [`super::deploys`].

use std::{collections::BTreeMap, path::PathBuf};

use nix::{
    sys::{
        signal::{Signal, kill, killpg},
        wait::WaitStatus,
    },
    unistd::Pid,
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use super::{
    SuperviseArgs,
    service::{Service, Snapshot},
};
use crate::{
    draining::{Drain, DrainTask},
    events::{self, Via, note, secs, warn},
    launch::{self, describe_exit},
    listeners::{Registrations, RestartRequest},
    reaper::Reaper,
};
use reuseport_client::proto::{GenState, GroupAddr, RestartOutcome};

/// What the agent pushed on a generation's registration, forwarded into the main loop.
pub(super) enum Event {
    State(u32, GenState),
    Closed(u32),
    /// `reuseportctl restart`, forwarded by the agent with its id.
    Restart(RestartRequest),
    /// One health check of a generation (`--health`).
    Health(u32, Result<(), String>),
}

/// Where a generation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Registered as standby, not ready yet. `ready_at`: when `--ready delay=…` elapses.
    Starting {
        ready_at: Option<Instant>,
        give_up_at: Instant,
    },
    Active,
    /// Up, and active for `--canary`'s share of new connections next to `primary`, the
    /// generation that served before it, until `until`; then promoted (see `gate`).
    Canary {
        until: Instant,
        primary: u32,
    },
    /// Waiting until idle, signalled or killed: see its [`DrainTask`].
    Draining {
        since: Instant,
    },
    /// Did not get ready; SIGKILLed, its exit is not news.
    Failed,
}

/// One running generation. Dropping it closes its registration.
pub(super) struct Gen {
    pub(super) pid: Pid,
    /// Its listeners' groups, in `--listen` order.
    pub(super) groups: Vec<GroupAddr>,
    pub(super) phase: Phase,
    pub(super) drain: Option<DrainTask>,
    pub(super) forwarder: JoinHandle<()>,
    /// While it drains within `--rollback-window`: when its drain starts (until then it
    /// keeps its listener and is not signalled).
    pub(super) hold_until: Option<Instant>,
    /// Its health checks while it starts (`--health`), see [`super::gate`].
    pub(super) health: Option<super::gate::Checking>,
    pub(super) _registrations: Registrations,
}

impl Drop for Gen {
    fn drop(&mut self) {
        self.forwarder.abort();
        if let Some(h) = &self.health {
            h.task.abort();
        }
    }
}

pub(super) struct Shutdown {
    /// The supervisor's exit status once every generation is gone.
    pub(super) code: u8,
    pub(super) kill_at: Instant,
    pub(super) killed: bool,
}

pub(super) struct Supervisor {
    pub(super) control: PathBuf,
    pub(super) program: PathBuf,
    /// NOTIFY_SOCKET for the children, with `--ready notify`.
    pub(super) notify_socket: Option<String>,
    pub(super) args: SuperviseArgs,
    pub(super) gens: BTreeMap<u32, Gen>,
    pub(super) next_generation: u32,
    /// The generation that serves: the last one activated.
    pub(super) current: Option<u32>,
    /// A SIGHUP came while a generation was starting.
    pub(super) restart_pending: bool,
    /// Restarts requested through the agent, by the generation started for them; they are
    /// answered when it is active or has failed.
    pub(super) waiters: BTreeMap<u32, Vec<RestartRequest>>,
    /// Requested restarts no generation was started for yet.
    pub(super) unattached: Vec<RestartRequest>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) shutdown: Option<Shutdown>,
    /// Waits for the generations, and for the orphans it inherits as PID 1 or a subreaper.
    pub(super) reaper: Reaper,
    /// What systemd is told, when supervise is a unit's main process.
    pub(super) service: Service,
    // NB: no Drop needed for the children: they get SIGTERM through PR_SET_PDEATHSIG if the
    // supervisor dies.
}

impl Supervisor {
    /// Brings systemd up to date after an event (see [`Service::update`]).
    pub(super) fn tell_service(&mut self) {
        let now = Snapshot {
            current: self.current,
            starting: self.starting(),
            restart_pending: self.restart_pending,
            draining: self
                .gens
                .values()
                .filter(|g| matches!(g.phase, Phase::Draining { .. }))
                .count(),
            running: self.gens.len(),
        };
        self.service.update(now);
    }

    /// The exit status, once there is nothing left to supervise.
    pub(super) fn finished(&self) -> Option<u8> {
        if !self.gens.is_empty() {
            return None;
        }
        Some(self.shutdown.as_ref().map_or(1, |s| s.code))
    }

    pub(super) fn starting(&self) -> Option<u32> {
        self.gens
            .iter()
            .find(|(_, g)| matches!(g.phase, Phase::Starting { .. } | Phase::Canary { .. }))
            .map(|(n, _)| *n)
    }

    /// `; generation 2 stays active`, for failure lines.
    pub(super) fn stays_active(&self) -> String {
        self.current
            .map(|n| format!("; generation {n} stays active"))
            .unwrap_or_default()
    }

    pub(super) fn on_state(&mut self, generation: u32, state: GenState) {
        let Some(g) = self.gens.get_mut(&generation) else {
            return;
        };
        match state {
            // NB: a canary is active next to the generation that serves, which stays current
            // until the canary is promoted.
            GenState::Active if matches!(g.phase, Phase::Canary { .. }) => {}
            GenState::Active => {
                g.phase = Phase::Active;
                // Active again (`reuseportctl rollback` or `activate`): its drain is over.
                (g.drain, g.hold_until) = (None, None);
                self.current = Some(generation);
            }
            GenState::Draining => {
                if !matches!(g.phase, Phase::Draining { .. }) {
                    g.phase = Phase::Draining {
                        since: Instant::now(),
                    };
                    let window = self.args.health.rollback_window;
                    if window.is_zero() {
                        self.start_drain(generation);
                    } else {
                        g.hold_until = Some(Instant::now() + window);
                        note(format_args!(
                            "generation {generation} drains; it keeps its listener and is not \
                             signalled for the --rollback-window of {window:?}: `reuseportctl \
                             rollback GROUP` brings it back"
                        ));
                    }
                }
                if self.current == Some(generation) {
                    // Someone else activated another generation (reuseportctl activate).
                    self.current = None;
                }
            }
            GenState::Standby => {}
        }
    }

    /// Starts the drain of `generation` (see [`Drain`]): signalled once idle.
    pub(super) fn start_drain(&mut self, generation: u32) {
        let Some(g) = self.gens.get_mut(&generation) else {
            return;
        };
        g.hold_until = None;
        g.drain = Some(
            Drain {
                control: self.control.clone(),
                groups: g.groups.clone(),
                generation,
                pid: g.pid,
                signal: self.args.on_drain,
                opts: self.args.drain.clone(),
            }
            .start(),
        );
    }

    pub(super) async fn on_event(&mut self, event: Event) {
        match event {
            Event::State(generation, state) => {
                if self.gens.contains_key(&generation) {
                    events::Event::State { generation, state }.report_json_only();
                }
                self.on_state(generation, state);
            }
            Event::Health(generation, result) => self.on_health(generation, result).await,
            Event::Restart(request) => {
                if self.shutdown.is_some() {
                    events::Event::ReloadIgnored { via: Via::Agent }
                        .report(format_args!("restart request ignored: stopping"));
                    self.report(
                        vec![request],
                        RestartOutcome::Failed {
                            error: "the supervisor is stopping".into(),
                        },
                    );
                    return;
                }
                events::Event::Reload {
                    via: Via::Agent,
                    group: Some(request.group),
                }
                .report(format_args!(
                    "restart of {} requested through the agent",
                    request.group
                ));
                self.unattached.push(request);
                self.restart().await;
            }
            Event::Closed(generation) => {
                if let Some(g) = self.gens.get(&generation) {
                    warn(format_args!(
                        "the agent closed the control connection of generation {generation}: \
                         pid {} keeps running, but its listener is no longer registered",
                        g.pid
                    ));
                }
            }
        }
    }

    pub(super) async fn on_notify(&mut self, pid: Option<Pid>, text: &[u8]) {
        let ready = text.split(|b| *b == b'\n').any(|line| line == b"READY=1");
        let Some(pid) = pid else { return };
        let starting = self
            .gens
            .iter()
            .find(|(_, g)| g.pid == pid && matches!(g.phase, Phase::Starting { .. }));
        if let (true, Some((&generation, _))) = (ready, starting) {
            self.on_ready(generation).await;
        }
    }

    /// Reaps every generation that exited (SIGCHLDs coalesce: one may stand for several).
    pub(super) async fn reap(&mut self) -> anyhow::Result<()> {
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

    pub(super) fn on_exit(&mut self, generation: u32, status: WaitStatus) {
        let Some(g) = self.gens.remove(&generation) else {
            return;
        };
        let how = describe_exit(status);
        let pid = g.pid;
        if self.shutdown.is_some() {
            events::Event::exited(generation, status, events::Phase::Stopping, None).report(
                format_args!("generation {generation} (pid {pid}) exited with {how}"),
            );
            return;
        }
        match g.phase {
            Phase::Starting { .. } => {
                events::Event::exited(generation, status, events::Phase::Starting, None)
                    .report_json_only();
                self.restart_failed(
                    Some(generation),
                    format_args!("generation {generation} exited with {how} before it was ready"),
                )
            }
            Phase::Canary { .. } => {
                events::Event::exited(generation, status, events::Phase::Canary, None)
                    .report_json_only();
                self.restart_failed(
                    Some(generation),
                    format_args!("generation {generation} exited with {how} during its canary"),
                )
            }
            Phase::Failed => events::Event::exited(generation, status, events::Phase::Failed, None)
                .report_json_only(),
            Phase::Draining { since, .. } => {
                let drained = since.elapsed();
                events::Event::exited(generation, status, events::Phase::Draining, Some(drained))
                    .report(format_args!(
                        "generation {generation} (pid {pid}) exited with {how} after draining \
                         for {:.1}s",
                        drained.as_secs_f64()
                    ))
            }
            Phase::Active => {
                events::Event::exited(generation, status, events::Phase::Active, None).report(
                    format_args!(
                        "generation {generation} (pid {pid}), the active one, exited with \
                         {how}: stopping"
                    ),
                );
                self.current = None;
                self.begin_shutdown(Signal::SIGTERM, launch::exit_code(status).unwrap_or(1));
                return;
            }
        }
        if self.current.is_none() && self.starting().is_none() && !self.gens.is_empty() {
            warn(format_args!(
                "no generation of this supervisor is active; send SIGHUP to start one"
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
    pub(super) fn begin_shutdown(&mut self, sig: Signal, code: u8) {
        self.service.stopping();
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
                let generations: Vec<u32> = self.gens.keys().copied().collect();
                let gens: Vec<String> = generations.iter().map(u32::to_string).collect();
                let timeout = self.args.drain.kill_timeout;
                events::Event::Stopping {
                    signal: sig.to_string(),
                    generations,
                    kill_timeout_secs: secs(timeout),
                }
                .report(format_args!(
                    "sending {sig} to generation(s) {} and waiting up to {timeout:?}",
                    gens.join(", "),
                ));
            }
        }
        for g in self.gens.values() {
            let _ = kill(g.pid, sig);
        }
    }

    pub(super) fn forward_to_current(&self, sig: Signal) {
        match self.current.and_then(|n| self.gens.get(&n)) {
            Some(g) => {
                let _ = kill(g.pid, sig);
            }
            None => events::Event::Warning {
                message: format!("{sig} not forwarded: no generation is active"),
            }
            .report(format_args!("{sig} not forwarded: no generation is active")),
        }
    }

    /// The next time [`Self::on_timers`] has something to do.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
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
            if let Phase::Canary { until, .. } = g.phase {
                consider(until);
            }
            if let Some(t) = g.hold_until {
                consider(t);
            }
        }
        next
    }

    pub(super) async fn on_timers(&mut self) {
        let now = Instant::now();
        let timeout = self.args.drain.kill_timeout;
        if let Some(s) = &mut self.shutdown
            && !s.killed
            && s.kill_at <= now
        {
            s.killed = true;
            for (&generation, g) in &self.gens {
                events::Event::Killed {
                    generation,
                    pid: g.pid.as_raw(),
                    after_secs: secs(timeout),
                }
                .report(format_args!(
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
                self.on_ready(generation).await;
            }
        }
        self.promote_canaries(now).await;
        let held: Vec<u32> = self
            .gens
            .iter()
            .filter(|(_, g)| g.hold_until.is_some_and(|t| t <= now))
            .map(|(n, _)| *n)
            .collect();
        for generation in held {
            self.start_drain(generation);
        }
    }
}
