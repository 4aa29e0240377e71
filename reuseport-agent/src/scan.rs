//! The periodic scan of every group: listeners that closed since the last one (an epoll
//! server needs a wake-up for the connections migrated to it, see [`wake`]), adopted sockets
//! whose client never came back, groups left stale by a failed publish, and restarts whose
//! supervisor never answered.

use std::{sync::Arc, time::Duration};

use crate::{
    agent::{Agent, State},
    kernel::Mode,
    wake,
};

/// How often registered slots are checked for listeners that closed.
const SCAN_INTERVAL: Duration = Duration::from_millis(50);

pub(crate) async fn scan_loop(agent: Arc<Agent>, waker: wake::Waker) {
    let mut tick = tokio::time::interval(SCAN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = agent.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            a.expire_restarts();
            a.scan_closed()
        });
        match scanned.await {
            Ok(wakeups) => wakeups.into_iter().for_each(|w| waker.push(w)),
            Err(e) => tracing::error!(error = %e, "slot scan failed"),
        }
    }
}

impl Agent {
    /// Looks for registered listeners that closed since the last scan; returns the wake-ups
    /// their groups need (see [`wake`]).
    pub(crate) fn scan_closed(&self) -> Vec<wake::WakeUp> {
        let mut state = self.lock();
        let mut out = Vec::new();
        let State {
            groups,
            subscribers,
            ..
        } = &mut *state;
        let mut emptied = Vec::new();
        for group in groups.values_mut() {
            let scan = group.scan(|reg| subscribers.contains_key(&reg), &self.grace);
            if group.is_empty() {
                emptied.push(group.key());
                continue;
            }
            if scan.newly_closed
                && scan.active_sockets > 0
                && self.mode == Mode::SelectOrMigrate
                && self.wake_ups
            {
                let key = group.key();
                match group.netns() {
                    Some(Ok(netns)) => out.push(wake::WakeUp {
                        group: (key.netns, key.addr),
                        target: wake::target_for(key.addr),
                        netns,
                        connections: scan.active_sockets + 1,
                    }),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "wake-up: cannot duplicate the netns descriptor")
                    }
                    None => {}
                }
            }
        }
        state.remove_groups(&emptied);
        out
    }
}
