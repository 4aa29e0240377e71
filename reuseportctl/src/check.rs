//! `reuseportctl status --check`: the problems a monitoring check should raise, one line
//! each. A group is healthy when it has an active generation with a listening socket, its
//! supervisor's last restart did not fail, and no listener dropped connections because its
//! accept queue was full since it registered.

use reuseport_client::proto::{GroupStatus, RestartOutcome};

/// Exit status of `status --check` when it found problems; a check that could not be made
/// exits with its failure's status (3: no agent, …; see [`crate::exit`]).
pub const PROBLEMS_EXIT: u8 = 2;

/// One line per problem, in group order; empty when every group is healthy.
pub fn problems(groups: &[GroupStatus]) -> Vec<String> {
    let mut out = Vec::new();
    for g in groups {
        let name = &g.group;
        match g.active {
            None => out.push(format!(
                "{name}: no active generation: new connections fall back to draining or \
                 standby ones; activate one (reuseportctl activate {name} GEN)"
            )),
            Some(active) if g.falling_back => out.push(format!(
                "{name}: falling back: active generation {active} has no listening socket; \
                 activate a live generation"
            )),
            Some(_) => {}
        }
        if let Some(RestartOutcome::Failed { error }) = &g.last_restart {
            out.push(format!("{name}: last restart failed: {error}"));
        }
        for generation in &g.generations {
            for s in &generation.sockets {
                let Some(live) = s.live.filter(|l| l.drops > 0) else {
                    continue;
                };
                out.push(format!(
                    "{name}: accept queue overflowed: the listener of generation {} in slot \
                     {} (pid {}) dropped {} connection attempts since it registered \
                     (backlog {}): accept faster, or raise the listen backlog and \
                     net.core.somaxconn",
                    generation.generation, s.slot, s.pid, live.drops, live.backlog
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reuseport_client::proto::{
        Counters, GenState, GenerationStatus, ListenerLive, SocketStatus,
    };

    fn group(active: Option<u32>, falling_back: bool, drops: u32) -> GroupStatus {
        GroupStatus {
            group: "tcp://127.0.0.1:80".parse().unwrap(),
            mode: "select-or-migrate".into(),
            active,
            falling_back,
            generations: vec![GenerationStatus {
                generation: 1,
                name: None,
                state: GenState::Active,
                sockets: vec![SocketStatus {
                    slot: 4,
                    pid: 42,
                    uid: 0,
                    cookie: 1,
                    listening: true,
                    registered: true,
                    live: Some(ListenerLive {
                        queued: 0,
                        backlog: 8,
                        drops,
                    }),
                }],
                counters: Counters::default(),
                live: None,
                drain: None,
                also_in: Vec::new(),
                weight: None,
                health: None,
            }],
            unsteered: 0,
            limits: None,
            last_restart: None,
            live: None,
        }
    }

    #[test]
    fn a_healthy_group_has_no_problem() {
        assert!(problems(&[group(Some(1), false, 0)]).is_empty());
        assert!(problems(&[]).is_empty());
    }

    #[test]
    fn each_problem_is_one_line() {
        let mut failed = group(Some(1), false, 0);
        failed.last_restart = Some(RestartOutcome::Failed {
            error: "generation 2 exited with status 1 before it was ready".into(),
        });
        let found = problems(&[
            group(None, true, 0),
            group(Some(1), true, 0),
            failed,
            group(Some(1), false, 3),
        ]);
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found[0].contains("no active generation"), "{found:#?}");
        assert!(found[1].contains("falling back"), "{found:#?}");
        assert!(
            found[2].contains("last restart failed: generation 2"),
            "{found:#?}"
        );
        assert!(
            found[3].contains("slot 4 (pid 42) dropped 3 connection attempts"),
            "{found:#?}"
        );
        assert!(found.iter().all(|l| !l.contains('\n')), "{found:#?}");
    }
}
