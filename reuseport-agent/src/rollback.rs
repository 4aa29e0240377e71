//! `rollback`: the newest draining generation that still listens becomes the active one
//! again, exactly as `activate` of it would (one flip, in every group it spans or in none).
//!
//! "Still listens" is read from the kernel's socket array (a listener that closed has left
//! it), in every group the generation spans: a generation brought back where it no longer
//! listens would leave that group falling back. "Newest" is the highest generation number,
//! the order the fallback tier uses.

use reuseport_proto::{
    addr::GroupAddr,
    message::{ErrorKind, GenState, Reply},
};

use crate::{
    agent::{Agent, Peer},
    registry::Refusal,
    span::Choice,
};

impl Agent {
    pub fn rollback(&self, peer: Peer, group: &GroupAddr) -> Result<Reply, Refusal> {
        self.change_chosen(peer, group, choose, |r, g| r.activate(g), "rollback")
    }
}

/// The generation to bring back, or why there is none.
fn choose(c: &Choice<'_>) -> Result<u32, Refusal> {
    let group = &c.state.groups[&c.group];
    let draining: Vec<u32> = group
        .generation_states()
        .filter(|(_, s)| *s == GenState::Draining)
        .map(|(n, _)| n)
        .collect();
    let listens_everywhere = |generation: u32| {
        c.span(generation).iter().all(|key| {
            c.state
                .groups
                .get(key)
                .is_some_and(|g| g.listens(generation))
        })
    };
    if let Some(generation) = draining
        .iter()
        .rev()
        .copied()
        .find(|g| listens_everywhere(*g))
    {
        return Ok(generation);
    }
    let addr = group.addr(c.own_netns);
    let why = if draining.is_empty() {
        "no generation is draining".to_owned()
    } else {
        let closed: Vec<String> = draining.iter().map(u32::to_string).collect();
        format!(
            "the draining generation(s) {} closed their listeners",
            closed.join(", ")
        )
    };
    Err(Refusal::new(
        ErrorKind::Conflict,
        format!(
            "nothing to roll back to in {addr}: {why}; start the previous release again and \
             activate it (reuseportctl activate GROUP GEN)"
        ),
    ))
}
