//! What stands between a ready generation and its activation: with `--health`, it is
//! checked through probe connections (see [`super::health`]) until it is up (`--rise`
//! successes in a row: activated) or down (`--fall` failures in a row: killed, the previous
//! generation stays active). `--ready-timeout` bounds readiness and checks together.

use tokio::task::JoinHandle;

use super::{
    health::{self, RiseFall, Verdict},
    machine::{Phase, Supervisor},
};
use crate::launch::note;

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
            task: health::spawn(check, target, opts.health_interval, generation, events),
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
        let starting = matches!(g.phase, Phase::Starting { .. });
        let Some(checking) = g.health.as_mut() else {
            return;
        };
        let verdict = checking.count.record(result);
        if !starting || self.shutdown.is_some() {
            return;
        }
        match verdict {
            Some(Verdict::Up) => {
                checking.task.abort();
                note(format_args!(
                    "generation {generation} is up: {} health checks passed in a row",
                    self.args.health.rise
                ));
                self.activate(generation).await;
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
