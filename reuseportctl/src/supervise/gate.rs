//! What stands between a ready generation and its activation: with `--health`, it is
//! checked through probe connections (see [`super::health`]) until it is up (`--rise`
//! successes in a row: activated) or down (`--fall` failures in a row: killed, the previous
//! generation stays active). `--ready-timeout` bounds readiness and checks together.
//!
//! With `--canary P:DURATION` an up generation first gets P % of new connections (the
//! agent's weighted split) while the checks go on: down during that time, it is rolled back
//! (the previous generation gets everything again, the canary drains and is signalled like
//! any draining generation); still up after DURATION, it is promoted (activated, the
//! previous one drains).

use anyhow::Context as _;
use tokio::{task::JoinHandle, time::Instant};

use super::{
    health::{self, RiseFall, Verdict},
    machine::{Phase, Supervisor},
};
use crate::launch::note;
use reuseport_client::ControlClient;

/// A generation under health checks.
pub(super) struct Checking {
    pub(super) task: JoinHandle<()>,
    pub(super) count: RiseFall,
}

impl Supervisor {
    /// `generation` is ready (READY=1, or its `--ready delay` passed).
    pub(super) async fn on_ready(&mut self, generation: u32) {
        let Some(check) = self.args.health.health.clone() else {
            return self.activate(generation).await;
        };
        let opts = self.args.health.clone();
        let target = self.args.listen[0].group.addr;
        let events = self.events.clone();
        let Some(g) = self.gens.get_mut(&generation) else {
            return;
        };
        if g.health.is_some() {
            return;
        }
        if let Phase::Starting { give_up_at, .. } = g.phase {
            // NB: no `ready_at` any more, or the timers would find it ready again and again.
            g.phase = Phase::Starting {
                ready_at: None,
                give_up_at,
            };
        }
        g.health = Some(Checking {
            task: health::spawn(check, target, &opts, generation, events),
            count: RiseFall::new(&opts),
        });
        note(format_args!(
            "generation {generation} is ready; health-checking it through {} from probe ports \
             (up after {} successes in a row, down after {} failures)",
            reuseport_client::probe::probe_target(target),
            opts.rise,
            opts.fall
        ));
    }

    pub(super) async fn on_health(&mut self, generation: u32, result: Result<(), String>) {
        let Some(g) = self.gens.get_mut(&generation) else {
            return;
        };
        let phase = g.phase;
        let Some(checking) = g.health.as_mut() else {
            return;
        };
        let verdict = checking.count.record(result);
        report_health(
            self.control.clone(),
            generation,
            checking.count.report(),
            g.groups.clone(),
        );
        if self.shutdown.is_some() {
            return;
        }
        if let Phase::Canary { primary, .. } = phase {
            if verdict == Some(Verdict::Down) {
                checking.task.abort();
                let last = checking.count.last_error.clone().unwrap_or_default();
                self.roll_back(generation, primary, &last).await;
            }
            return;
        }
        if !matches!(phase, Phase::Starting { .. }) {
            return;
        }
        match verdict {
            Some(Verdict::Up) => {
                note(format_args!(
                    "generation {generation} is up: {} health checks passed in a row",
                    self.args.health.rise
                ));
                match (self.args.health.canary, self.current) {
                    (Some(canary), Some(primary)) => {
                        self.start_canary(generation, primary, canary).await;
                    }
                    _ => {
                        checking.task.abort();
                        self.activate(generation).await;
                    }
                }
            }
            Some(Verdict::Down) => {
                checking.task.abort();
                let last = checking.count.last_error.clone().unwrap_or_default();
                let fall = self.args.health.fall;
                self.restart_failed(
                    Some(generation),
                    format_args!(
                        "generation {generation} is down: {fall} health checks failed in a row \
                         (last: {last})"
                    ),
                );
                self.give_up(generation);
            }
            None => {}
        }
    }
}

impl Supervisor {
    /// `generation` is up: P % of new connections for it, the rest for `primary`.
    async fn start_canary(&mut self, generation: u32, primary: u32, canary: super::health::Canary) {
        let Some(g) = self.gens.get(&generation) else {
            return;
        };
        let group = g.groups[0];
        let split = async {
            let mut client = ControlClient::connect(&self.control).await?;
            client.split_all(group, generation, canary.weight).await
        }
        .await;
        match split {
            Ok(_) => {
                if let Some(g) = self.gens.get_mut(&generation) {
                    g.phase = Phase::Canary {
                        until: Instant::now() + canary.duration,
                        primary,
                    };
                }
                note(format_args!(
                    "generation {generation} is a canary: {} % of new connections for {:?}, \
                     the rest to generation {primary}",
                    canary.weight, canary.duration
                ));
            }
            Err(e) => {
                self.restart_failed(
                    Some(generation),
                    format_args!("cannot start the canary of generation {generation}: {e}"),
                );
                self.give_up(generation);
            }
        }
    }

    /// The canary `generation` went down: `primary` gets every new connection again; the
    /// canary drains (the agent pushes it) and is signalled once idle.
    async fn roll_back(&mut self, generation: u32, primary: u32, why: &str) {
        let group = match self.gens.get(&primary) {
            Some(g) => g.groups[0],
            None => self.args.listen[0].group,
        };
        let back = async {
            let mut client = ControlClient::connect(&self.control).await?;
            client
                .activate_all(group, primary)
                .await
                .with_context(|| format!("activating generation {primary} again"))
        }
        .await;
        if let Err(e) = back {
            note(format_args!(
                "warning: generation {generation} is down during its canary but cannot be \
                 rolled back: {}",
                crate::one_line(&e)
            ));
            return;
        }
        self.current = Some(primary);
        // NB: draining from now on, not when the agent's push arrives: its exit meanwhile is
        // a drained generation's, not the active one's. No --rollback-window: it failed.
        if let Some(g) = self.gens.get_mut(&generation) {
            g.phase = Phase::Draining {
                since: Instant::now(),
            };
        }
        self.start_drain(generation);
        let fall = self.args.health.fall;
        self.restart_failed(
            Some(generation),
            format_args!(
                "generation {generation} went down during its canary ({fall} health checks \
                 failed in a row, last: {why}) and was rolled back: it drains and stops"
            ),
        );
    }

    /// Promotes every canary whose time is up: it gets every new connection.
    pub(super) async fn promote_canaries(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .gens
            .iter()
            .filter(|(_, g)| matches!(g.phase, Phase::Canary { until, .. } if until <= now))
            .map(|(n, _)| *n)
            .collect();
        for generation in due {
            if let Some(h) = self.gens.get(&generation).and_then(|g| g.health.as_ref()) {
                h.task.abort();
            }
            note(format_args!(
                "generation {generation} stayed up through its canary: promoting it to 100 %"
            ));
            self.activate(generation).await;
        }
    }
}

/// Tells the agent `generation`'s health in each of its groups, in the background (the loop
/// must not wait on the agent). A report that fails is only logged.
fn report_health(
    control: std::path::PathBuf,
    generation: u32,
    health: reuseport_client::proto::GenerationHealth,
    groups: Vec<reuseport_client::GroupAddr>,
) {
    tokio::spawn(async move {
        let res = async {
            let mut client = ControlClient::connect(&control).await?;
            for group in groups {
                client
                    .report_health(group, generation, health.clone())
                    .await?;
            }
            Ok::<_, reuseport_client::ClientError>(())
        }
        .await;
        if let Err(e) = res {
            note(format_args!(
                "warning: cannot report generation {generation}'s health to the agent: {e}"
            ));
        }
    });
}
