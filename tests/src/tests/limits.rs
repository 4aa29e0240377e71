//! Every reply the agent can produce is delivered at its configured limits: `status` of the
//! largest number of groups, one of them with the most generations and the longest names.

use reuseport_agent::protocol::MAX_NAME_LEN;

use crate::harness::{TestEnv, group, load_size};

#[test]
fn status_is_delivered_at_the_limits() {
    const PORT: u16 = 10001;
    const BIG: u16 = 10900;
    // NB: every group loads a program: 50 ms on the host, seconds in an emulated guest.
    let groups = load_size("groups (the agent's --max-groups)", 256, 8) as u16;
    let env = TestEnv::with_agent(
        "status_is_delivered_at_the_limits",
        &["--max-groups", &groups.to_string()],
        &[],
    );
    let sockets = reuseport_common::MAX_SLOTS;
    // One group with every generation, each one socket and the longest name.
    let mut kept = Vec::new();
    for generation in 1..=sockets {
        let listener = env.listen(BIG);
        let mut opts = env.register_options(BIG, generation, false);
        opts.name = Some(format!("{generation:0>width$}", width = MAX_NAME_LEN));
        let registration = env
            .block_on(reuseport_agent::client::register(
                std::os::fd::AsFd::as_fd(&listener),
                &opts,
            ))
            .unwrap_or_else(|e| panic!("generation {generation} of the big group: {e}"));
        kept.push((listener, registration));
    }
    // Every other group the agent may hold, one socket each.
    for i in 0..groups - 1 {
        let listener = env.listen(PORT + i);
        let registration = env.register(&listener, PORT + i, 1, false);
        kept.push((listener, registration));
    }
    let all = env.statuses();
    assert_eq!(
        all.len(),
        usize::from(groups),
        "status should list every group"
    );
    let big = all
        .iter()
        .find(|g| g.group.addr == group(BIG).addr)
        .expect("the big group");
    assert_eq!(big.generations.len(), sockets as usize);
    let bytes = serde_json::to_vec(&all).expect("encode").len();
    println!("status of {groups} groups ({sockets} generations in one): {bytes} bytes of JSON");
    let out = env.ctl(&["status"]);
    assert!(
        out.status.success(),
        "reuseportctl status should print every group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let changed = env.activate(BIG, sockets);
    assert_eq!(changed.active, Some(sockets));
}
