//! Launchers name their group by its full key (`@NETNS`): the same ip:port registered from
//! another network namespace (a container on the same port, `unshare -rn`) changes nothing for
//! `supervise` in this one.

use std::time::Duration;

use nix::sys::signal::Signal;
use reuseport_proto::GroupAddr;

use super::supervise::Supervisor;
use crate::harness::{NetNs, TestEnv, current_netns_inode, local, wait_until};

#[test]
fn supervise_ignores_the_same_address_in_another_namespace() {
    const PORT: u16 = 9501;
    let env = TestEnv::new("supervise_ignores_the_same_address_elsewhere");
    // Another namespace's group on the same address, at generation 1.
    let other = NetNs::new();
    let other_listener = other.run(|| env.listen(PORT));
    let other_group = GroupAddr {
        addr: local(PORT),
        netns: Some(other.inode()),
    };
    let _other = env.register_to(&other_listener, other_group, 1, false);

    let ours = GroupAddr {
        addr: local(PORT),
        netns: Some(current_netns_inode()),
    };
    // NB: status shows our own namespace's group without @NETNS.
    let active = |env: &TestEnv, generation: u32| {
        env.statuses()
            .iter()
            .find(|g| {
                g.group.addr == ours.addr && g.group.netns.is_none_or(|n| Some(n) == ours.netns)
            })
            .is_some_and(|g| g.active == Some(generation))
    };
    let mut sup = Supervisor::spawn(&env, PORT, &["--ready", "delay=100ms"], None);
    wait_until(
        "the supervisor's first generation (1: its group is new) is active",
        Duration::from_secs(15),
        || {
            sup.assert_running();
            active(&env, 1)
        },
    );
    sup.signal(Signal::SIGHUP);
    wait_until(
        "generation 2 is active after SIGHUP",
        Duration::from_secs(15),
        || {
            sup.assert_running();
            active(&env, 2)
        },
    );
    let log = sup.log();
    assert!(
        !log.contains("several network namespaces"),
        "the supervisor should never name its group ambiguously; log:\n{log}"
    );
    assert_eq!(
        env.status_of(other_group).active,
        Some(1),
        "the other namespace's group should be untouched"
    );
}
