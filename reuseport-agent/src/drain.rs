//! `drain_progress`: launchers (`exec --on-drain`, `supervise`) tell the agent what they did
//! to the server of a draining generation (signalled it, killed it), so that `status` shows
//! where each drain is. Whether a draining generation is still serving or idle, the agent
//! reads from the kernel itself (see [`live`](super::live)).

use crate::{
    agent::{Agent, Peer},
    registry::Refusal,
};
use reuseport_proto::{
    addr::GroupAddr,
    message::{DrainStep, Reply},
};

impl Agent {
    /// Records `step` for the draining `generation`; answers with the group as it is now.
    /// Permission: as for `drain`.
    pub fn drain_progress(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        generation: u32,
        step: DrainStep,
    ) -> Result<Reply, Refusal> {
        self.launcher_report(&peer, wanted, "reporting a drain step", |group| {
            // Pinned with the rest, so that `status` still shows it after an agent restart.
            group.set_drain_step(generation, step.clone())?;
            tracing::info!(group = %group.key(), generation, ?step, "drain step reported");
            Ok(())
        })
    }
}
