//! What a launcher (`exec --on-drain`, `supervise`) does with the server of a generation that
//! starts draining: wait until it is idle, signal it, kill it if it outlives the signal.
//!
//! Idle means no connection in flight: the generation's processes hold no connection on the
//! group's address and its listeners' accept queues are empty, as the agent reads them from
//! the kernel (`status` live figures). A draining generation gets no new connection, so once
//! idle it stays idle, and a server that exits at once on the signal (the default action of
//! SIGTERM) loses nothing. The wait is bounded by `--drain-timeout`: a server holding
//! keep-alive connections is signalled then all the same, and may finish them on the signal.
//!
//! NB: idle must be seen twice in a row, one poll apart. Between `accept()` giving a
//! connection its socket and the kernel installing its descriptor, a dump can see the socket
//! out of the accept queue and no process holding it yet.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::{task::JoinHandle, time::Instant};

use super::{
    args::parse_duration,
    events::{Event, SignalReason, secs, warn},
    listeners::groups_named,
};
use reuseport_client::{
    ControlClient,
    proto::{DrainStep, GroupAddr, GroupStatus},
};

/// How often the agent is asked whether a draining generation is idle.
const POLL: Duration = Duration::from_millis(50);

/// The drain options `exec` and `supervise` share.
#[derive(Clone, Debug, Args)]
pub struct DrainOpts {
    /// How long a draining generation may take to become idle (no connection in flight,
    /// empty accept queue) before it gets the --on-drain signal all the same.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// SIGKILL for a server still running this long after the --on-drain signal (its whole
    /// process group).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub kill_timeout: Duration,
    /// Send the --on-drain signal as soon as the generation starts draining, without
    /// waiting until it is idle. Only for servers that finish their connections on the
    /// signal: one that exits at once loses the connections it still had.
    #[arg(long)]
    pub immediate_signal: bool,
}

impl Default for DrainOpts {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            kill_timeout: Duration::from_secs(10),
            immediate_signal: false,
        }
    }
}

/// One server whose generation drains (in every group it has a listener in).
pub struct Drain {
    pub control: PathBuf,
    pub groups: Vec<GroupAddr>,
    pub generation: u32,
    pub pid: Pid,
    pub signal: Signal,
    pub opts: DrainOpts,
}

/// The drain of one server, running; dropping it stops it (the server exited).
pub struct DrainTask(JoinHandle<()>);

impl Drop for DrainTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drain {
    /// Starts the sequence: wait until idle (at most `--drain-timeout`), the signal, SIGKILL
    /// after `--kill-timeout`. Each step is logged and reported to the agent.
    pub fn start(self) -> DrainTask {
        DrainTask(tokio::spawn(self.run()))
    }

    async fn run(self) {
        let (generation, pid, sig) = (self.generation, self.pid, self.signal);
        let group = groups_named(&self.groups);
        let started = Instant::now();
        let end = if self.opts.immediate_signal {
            DrainEnd::Immediate
        } else {
            self.wait_idle().await
        };
        Event::Signalled {
            generation,
            pid: pid.as_raw(),
            signal: sig.to_string(),
            reason: end.reason(),
            drained_secs: secs(started.elapsed()),
            in_flight: end.in_flight(),
        }
        .report(format_args!(
            "generation {generation} of {group} {end}: sending {sig} to pid {pid}"
        ));
        // ESRCH only when the server is already gone, which the launcher's SIGCHLD sees.
        let _ = kill(pid, sig);
        self.report(DrainStep::Signalled {
            signal: sig.to_string(),
        })
        .await;
        tokio::time::sleep(self.opts.kill_timeout).await;
        Event::Killed {
            generation,
            pid: pid.as_raw(),
            after_secs: secs(self.opts.kill_timeout),
        }
        .report(format_args!(
            "generation {generation} (pid {pid}) still runs {:?} after {sig}: SIGKILL",
            self.opts.kill_timeout
        ));
        // NB: reported first: once the server is dead, the launcher reaps it and drops this
        // task, and the generation leaves the group.
        self.report(DrainStep::Killed).await;
        // Its own session (spawn calls setsid): the group takes its workers along.
        let _ = killpg(pid, Signal::SIGKILL);
    }

    /// Polls the agent until the generation is idle twice in a row or `--drain-timeout`
    /// has passed; returns how it ended.
    async fn wait_idle(&self) -> DrainEnd {
        let started = Instant::now();
        let deadline = started + self.opts.drain_timeout;
        let mut client: Option<ControlClient> = None;
        let mut idle_before = false;
        let mut last: Option<u64> = None;
        loop {
            match self.in_flight(&mut client).await {
                Ok(Some(0)) if idle_before => return DrainEnd::Idle(started.elapsed()),
                Ok(Some(n)) => {
                    idle_before = n == 0;
                    last = Some(n);
                }
                Ok(None) => return DrainEnd::NoLiveFigures,
                Err(e) => {
                    // The agent may be restarting: ask again until the deadline.
                    if client.take().is_some() {
                        warn(format_args!(
                            "cannot ask the agent whether generation {} is idle: {e}",
                            self.generation
                        ));
                    }
                    idle_before = false;
                }
            }
            if Instant::now() + POLL > deadline {
                return DrainEnd::TimedOut {
                    in_flight: last,
                    timeout: self.opts.drain_timeout,
                };
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Connections in flight in the generation, in all its groups (`None`: the agent has no
    /// live figures for it in one of them).
    async fn in_flight(
        &self,
        client: &mut Option<ControlClient>,
    ) -> Result<Option<u64>, reuseport_client::ClientError> {
        let c = match client {
            Some(c) => c,
            None => client.insert(ControlClient::connect(&self.control).await?),
        };
        let mut total = 0;
        for group in &self.groups {
            let groups = c.status(Some(*group)).await?;
            match in_flight(&groups, self.generation) {
                Some(n) => total += n,
                None => return Ok(None),
            }
        }
        Ok(Some(total))
    }

    async fn report(&self, step: DrainStep) {
        let res = async {
            let mut client = ControlClient::connect(&self.control).await?;
            for group in &self.groups {
                client
                    .report_drain(*group, self.generation, step.clone())
                    .await?;
            }
            Ok::<_, reuseport_client::ClientError>(())
        }
        .await;
        if let Err(e) = res {
            warn(format_args!(
                "cannot report generation {}'s drain to the agent: {e}",
                self.generation
            ));
        }
    }
}

/// How the wait for a draining generation ended, just before its signal.
enum DrainEnd {
    /// `--immediate-signal`.
    Immediate,
    /// Idle after this long.
    Idle(Duration),
    NoLiveFigures,
    /// `--drain-timeout` passed; the last count seen, if any.
    TimedOut {
        in_flight: Option<u64>,
        timeout: Duration,
    },
}

impl DrainEnd {
    fn reason(&self) -> SignalReason {
        match self {
            Self::Immediate => SignalReason::Immediate,
            Self::Idle(_) => SignalReason::Idle,
            Self::NoLiveFigures => SignalReason::NoLiveFigures,
            Self::TimedOut { .. } => SignalReason::DrainTimeout,
        }
    }

    fn in_flight(&self) -> Option<u64> {
        match self {
            Self::Idle(_) => Some(0),
            Self::TimedOut { in_flight, .. } => *in_flight,
            Self::Immediate | Self::NoLiveFigures => None,
        }
    }
}

/// What the text line says after "generation N of GROUP".
impl std::fmt::Display for DrainEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Immediate => f.write_str("is draining"),
            Self::Idle(after) => write!(f, "is idle after {:.1}s of draining", after.as_secs_f64()),
            Self::NoLiveFigures => f.write_str(
                "is draining (the agent reports no live figures for it, so it cannot be \
                 waited for)",
            ),
            Self::TimedOut { in_flight, timeout } => {
                let left = in_flight.map_or("an unknown number of".into(), |n| n.to_string());
                write!(
                    f,
                    "still has {left} connections in flight after {timeout:?} (--drain-timeout)"
                )
            }
        }
    }
}

/// The generation's connections in flight, if the group reports live figures for it.
fn in_flight(groups: &[GroupStatus], generation: u32) -> Option<u64> {
    groups
        .iter()
        .flat_map(|g| &g.generations)
        .find(|g| g.generation == generation)?
        .live
        .map(|l| l.in_flight())
}
