//! Deploys as they are asked for (SIGHUP, or `reuseportctl restart` forwarded by the agent)
//! and how their outcome is reported back: to the requests waiting for it, each for the group
//! it named, and to the service manager.

use tokio::sync::mpsc;

use super::machine::Supervisor;
use crate::{
    events::{self, Via, warn},
    listeners::RestartRequest,
};
use reuseport_client::{
    ClientError, ControlClient,
    proto::{RestartOutcome, UNREQUESTED_RESTART},
};

impl Supervisor {
    /// Logs why `generation` (or, with `None`, the next one) did not take over, and tells
    /// the restart requests waiting for it.
    pub(super) fn restart_failed(
        &mut self,
        generation: Option<u32>,
        what: std::fmt::Arguments<'_>,
    ) {
        let verb = if self.current.is_some() {
            "restart"
        } else {
            "start"
        };
        let error = what.to_string();
        let why = format!("{error}{}", self.stays_active());
        events::Event::DeployFailed {
            generation,
            error,
            active: self.current,
        }
        .report(format_args!("{verb} failed: {why}"));
        self.service.failed(&why);
        let ids = match generation {
            Some(n) => self.waiters.remove(&n).unwrap_or_default(),
            None => std::mem::take(&mut self.unattached),
        };
        self.report(ids, RestartOutcome::Failed { error: why });
    }

    /// Reports the outcome of a restart to the agent, in the background (the loop must not
    /// wait on the agent): to the requests waiting for it, or, for a SIGHUP, just for
    /// `status`.
    pub(super) fn report(&self, requests: Vec<RestartRequest>, outcome: RestartOutcome) {
        // A SIGHUP's outcome goes to the first listener's group, for its `status`.
        let requests = if requests.is_empty() {
            vec![RestartRequest {
                group: self.args.listen[0].group,
                id: UNREQUESTED_RESTART,
            }]
        } else {
            requests
        };
        let control = self.control.clone();
        tokio::spawn(async move {
            let res = async {
                let mut client = ControlClient::connect(&control).await?;
                for r in requests {
                    client
                        .report_restart(r.group, r.id, outcome.clone())
                        .await?;
                }
                Ok::<_, ClientError>(())
            }
            .await;
            if let Err(e) = res {
                warn(format_args!(
                    "cannot report a restart's outcome to the agent: {e}"
                ));
            }
        });
    }

    pub(super) async fn restart(&mut self) {
        self.service.reloading();
        if let Some(starting) = self.starting() {
            self.restart_pending = true;
            events::Event::ReloadDeferred { starting }.report(format_args!(
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
                    crate::one_line(&e)
                ),
            ),
        }
    }

    pub(super) async fn on_hangup(&mut self) {
        if self.shutdown.is_some() {
            events::Event::ReloadIgnored { via: Via::Sighup }
                .report(format_args!("SIGHUP ignored: stopping"));
            return;
        }
        events::Event::Reload {
            via: Via::Sighup,
            group: None,
        }
        .report_json_only();
        self.restart().await;
    }
}

pub(super) async fn recv_restart(
    restarts: Option<&mut mpsc::UnboundedReceiver<RestartRequest>>,
) -> Option<RestartRequest> {
    match restarts {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}
