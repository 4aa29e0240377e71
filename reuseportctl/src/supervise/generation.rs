//! Starting a generation (as `exec` starts a server, registered as standby) and making it
//! the active one once it is ready.

use std::ffi::CString;

use anyhow::Context as _;
use nix::sys::signal::{Signal, killpg};
use tokio::time::Instant;

use super::{
    GENERATION_VAR, Ready,
    deploys::recv_restart,
    machine::{Event, Gen, Phase, Supervisor},
};
use crate::events::{self, warn};
use crate::launch::{self, DEFAULT_FD_NAME};
use crate::listeners::{fd_names, groups_named};
use crate::spawn;
use reuseport_client::{
    ControlClient,
    proto::{GenState, RestartOutcome},
};

impl Supervisor {
    pub(super) fn child_env(&self, generation: u32) -> Vec<CString> {
        // NB: an inherited NOTIFY_SOCKET (the supervisor runs under systemd) would let the
        // server tell systemd it is ready, which systemd refuses from a pid it did not start.
        let inherited =
            std::env::vars_os().filter(|(key, _)| key != "NOTIFY_SOCKET" && key != GENERATION_VAR);
        let names = fd_names(
            &self.args.listen,
            self.args.name.as_deref().unwrap_or(DEFAULT_FD_NAME),
        );
        let listeners: Vec<_> = self
            .args
            .listen
            .iter()
            .map(|l| l.group.addr)
            .zip(names)
            .collect();
        let mut env = spawn::child_env(inherited, &listeners);
        env.push(CString::new(format!("{GENERATION_VAR}={generation}")).expect("no NUL"));
        if let Some(socket) = &self.notify_socket {
            env.push(CString::new(format!("NOTIFY_SOCKET={socket}")).expect("no NUL"));
        }
        env
    }

    /// Starts COMMAND as the next generation, registered as standby (active if the group is
    /// new).
    pub(super) async fn start_generation(&mut self) -> anyhow::Result<()> {
        let generation = self.next_generation;
        self.next_generation = generation
            .checked_add(1)
            .context("no generation number left")?;
        let bound = launch::bind_for(
            &self.control,
            &self.args.listen,
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
        let groups = registration.groups();
        let group = groups_named(&groups);
        let started = events::Event::Started {
            generation,
            pid: pid.as_raw(),
            groups: groups.clone(),
            state: initial,
        };
        self.gens.insert(
            generation,
            Gen {
                pid,
                groups,
                phase,
                drain: None,
                forwarder,
                hold_until: None,
                health: None,
                _registrations: registration,
            },
        );
        if initial == GenState::Active {
            // The group was new: the agent made the first generation active at once.
            started.report(format_args!(
                "generation {generation} of {group} started (pid {pid}) and is active"
            ));
        } else {
            let waiting = match self.args.ready {
                Ready::Notify => "READY=1".to_string(),
                Ready::Delay(delay) => format!("{delay:?}"),
            };
            started.report(format_args!(
                "generation {generation} of {group} started (pid {pid}) as standby; \
                 waiting for {waiting} before activating it"
            ));
        }
        self.on_state(generation, initial);
        Ok(())
    }

    /// A new generation is ready: make it the active one. The previous one drains (and is
    /// signalled when the agent pushes that state).
    pub(super) async fn activate(&mut self, generation: u32) {
        let Some(gen_) = self.gens.get(&generation) else {
            return;
        };
        let (groups, pid) = (gen_.groups.clone(), gen_.pid);
        // NB: its SIGCHLD may still be queued: activating a generation that just died would
        // drain the one that serves and leave the group falling back.
        match self.reaper.try_reap(pid) {
            Ok(Some(status)) => return self.on_exit(generation, status),
            Ok(None) => {}
            Err(e) => warn(format_args!("{}", crate::one_line(&e))),
        }
        events::Event::Ready { generation }.report_json_only();
        // One request: the agent switches the generation in every group it spans (all its
        // listeners were registered with this server's pid), or in none.
        let changed = async {
            let mut client = ControlClient::connect(&self.control).await?;
            let switched = client.activate_all(groups[0], generation).await?;
            // NB: an agent that predates generations across groups switches one group.
            for group in groups.iter().skip(1) {
                if !switched.iter().any(|s| s.group.addr == group.addr) {
                    client.activate(*group, generation).await?;
                }
            }
            Ok::<_, reuseport_client::ClientError>(())
        }
        .await;
        match changed {
            Ok(_) => {
                let waiting = self.waiters.remove(&generation).unwrap_or_default();
                // NB: the report goes out once the loop yields, after it told systemd
                // (current-thread runtime): a `systemctl reload` that waits for this outcome
                // finds the unit's STATUS= up to date.
                self.report(waiting, RestartOutcome::Active { generation });
                self.service.succeeded();
                let previous = self.current.replace(generation);
                if let Some(g) = self.gens.get_mut(&generation) {
                    g.phase = Phase::Active;
                }
                let activated = events::Event::Activated {
                    generation,
                    previous,
                };
                match previous {
                    Some(p) => activated.report(format_args!(
                        "generation {generation} is ready and active; generation {p} drains"
                    )),
                    None => activated
                        .report(format_args!("generation {generation} is ready and active")),
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
    pub(super) fn give_up(&mut self, generation: u32) {
        if let Some(g) = self.gens.get_mut(&generation) {
            g.phase = Phase::Failed;
            // Its own session (spawn calls setsid): the group takes its workers along.
            let _ = killpg(g.pid, Signal::SIGKILL);
        }
    }
}
