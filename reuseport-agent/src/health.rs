//! `health`: a supervisor (`supervise --health`) reports what its checks see of a
//! generation (up, down, checking; the rise/fall counts; the last check), so that `status`,
//! `/metrics` and the status page show it. The agent only keeps the last report.

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
        self.launcher_report(&peer, wanted, "reporting a generation's health", |group| {
            group.set_health(generation, health)
        })
    }
}
