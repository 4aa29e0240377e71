//! `health`: a supervisor (`supervise --health`) reports what its checks see of a
//! generation (up, down, checking; the rise/fall counts; the last check), so that `status`,
//! `/metrics` and the status page show it. The agent only keeps the last report.

use std::collections::HashSet;

use crate::{
    agent::{Agent, Peer},
    registry::Refusal,
};
use reuseport_proto::{
    addr::GroupAddr,
    message::{GenerationHealth, Reply},
};

impl Agent {
    /// From a supervisor: the health of one of its generations, for `status` and `/metrics`.
    pub fn report_health(
        &self,
        peer: Peer,
        wanted: &GroupAddr,
        generation: u32,
        health: GenerationHealth,
    ) -> Result<Reply, Refusal> {
        let mut state = self.lock();
        let live: HashSet<_> = state.subscribers.keys().copied().collect();
        let group = state.find(wanted)?;
        self.access.may_change(
            &peer,
            &group.key(),
            group.owner_uid(),
            "reporting a generation's health",
        )?;
        group.set_health(generation, health)?;
        Ok(Reply::Changed {
            group: self.group_status(group, &live),
            others: Vec::new(),
        })
    }
}
