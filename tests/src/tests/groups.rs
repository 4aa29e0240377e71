//! Group identity beyond `127.0.0.1`: an IPv6 group steers like an IPv4 one, and the same
//! ip:port in two network namespaces is two groups that flip independently.

use std::net::{Ipv6Addr, SocketAddr};

use reuseport_client as client;
use reuseport_proto::{GroupAddr, GroupStatus};

use crate::harness::{
    NetNs, ServerKind, TestEnv, current_netns_inode, generation_status, local, skip, tally,
};

/// Connections per measurement.
const CONNECTIONS: u64 = 200;

#[test]
fn ipv6_group_steers_like_ipv4() {
    const NAME: &str = "ipv6_group_steers_like_ipv4";
    const PORT: u16 = 7801;
    let env = TestEnv::new(NAME);
    let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, PORT));
    let group = GroupAddr { addr, netns: None };
    let listener = |what: &str| match client::reuseport_listener(addr) {
        Ok(l) => Some(l),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
            ) =>
        {
            None
        }
        Err(e) => panic!("{NAME}: listen on {addr} for {what}: {e}"),
    };
    let Some(l1) = listener("generation 1") else {
        return skip(NAME, "no IPv6 on this kernel (::1 cannot be bound)");
    };
    let l2 = listener("generation 2").expect("IPv6 worked for generation 1");
    let g1 = env.serve_listener(l1, group, 1, ServerKind::Blocking, false);
    let g2 = env.serve_listener(l2, group, 2, ServerKind::Blocking, false);

    let status = env.status_of(group);
    assert_eq!(
        status.group.to_string(),
        format!("tcp://[::1]:{PORT}"),
        "the agent should name the IPv6 group tcp://[::1]:{PORT}: {status:?}"
    );
    assert_eq!(
        status.active,
        Some(1),
        "the first generation registered in the IPv6 group should be active: {status:?}"
    );

    let t = tally(addr, CONNECTIONS);
    println!("{CONNECTIONS} connections to {addr}, generation 1 active: {t}");
    assert_eq!(t.failed, 0, "every IPv6 connection should be answered: {t}");
    assert_eq!(
        t.of(1),
        CONNECTIONS,
        "active generation 1 should answer all {CONNECTIONS} IPv6 connections: {t}"
    );
    assert_eq!(
        g2.server.accepted(),
        0,
        "standby generation 2 should accept no IPv6 connection"
    );

    let changed = env.activate_group(group, 2);
    assert_eq!(
        changed.active,
        Some(2),
        "activate should make generation 2 active: {changed:?}"
    );
    let t = tally(addr, CONNECTIONS);
    println!("{CONNECTIONS} connections to {addr} after activate 2: {t}");
    assert_eq!(t.failed, 0, "every IPv6 connection should be answered: {t}");
    assert_eq!(
        t.of(2),
        CONNECTIONS,
        "after activate 2, generation 2 should answer all {CONNECTIONS} IPv6 connections: {t}"
    );
    assert_eq!(
        g1.server.served(),
        CONNECTIONS,
        "draining generation 1 should get nothing after the flip"
    );

    let status = env.status_of(group);
    assert_eq!(
        generation_status(&status, 1).counters.selected,
        CONNECTIONS,
        "the program should count {CONNECTIONS} selections for generation 1: {status:?}"
    );
    assert_eq!(
        generation_status(&status, 2).counters.selected,
        CONNECTIONS,
        "the program should count {CONNECTIONS} selections for generation 2: {status:?}"
    );
    assert_eq!(
        status.unsteered, 0,
        "nothing should be unsteered: {status:?}"
    );

    let out = env.ctl(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("tcp://[::1]:{PORT} ")),
        "reuseportctl status should show the group as tcp://[::1]:{PORT}: {}{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn same_address_in_two_namespaces_is_two_groups() {
    const NAME: &str = "same_address_in_two_namespaces_is_two_groups";
    const PORT: u16 = 7901;
    let env = TestEnv::new(NAME);
    // The test's thread and the agent live in namespace A (TestEnv); B is a second one.
    let ns_a = current_netns_inode();
    let ns_b = NetNs::new();
    assert_ne!(
        ns_a,
        ns_b.inode(),
        "the second namespace should be a new one"
    );
    let typed = GroupAddr {
        addr: local(PORT),
        netns: None,
    };
    let in_a = GroupAddr {
        netns: Some(ns_a),
        ..typed
    };
    let in_b = GroupAddr {
        netns: Some(ns_b.inode()),
        ..typed
    };

    let listen = || {
        client::reuseport_listener(local(PORT))
            .unwrap_or_else(|e| panic!("{NAME}: listen on 127.0.0.1:{PORT}: {e}"))
    };
    let a1 = env.serve_listener(listen(), typed, 1, ServerKind::Blocking, false);
    let a2 = env.serve_listener(listen(), typed, 2, ServerKind::Blocking, false);
    // NB: the sockets are created in B; registering and serving them works from any thread.
    let (lb1, lb2) = ns_b.run(|| (listen(), listen()));
    let b1 = env.serve_listener(lb1, typed, 1, ServerKind::Blocking, false);
    let b2 = env.serve_listener(lb2, typed, 2, ServerKind::Blocking, false);

    let groups = env.statuses();
    let names: Vec<String> = groups.iter().map(|g| g.group.to_string()).collect();
    assert_eq!(
        groups.len(),
        2,
        "127.0.0.1:{PORT} in two namespaces should be two groups: {names:?}"
    );
    let find = |groups: &[GroupStatus], netns: Option<u64>| -> GroupStatus {
        groups
            .iter()
            .find(|g| g.group.addr == local(PORT) && g.group.netns == netns)
            .cloned()
            .unwrap_or_else(|| {
                panic!("status should list 127.0.0.1:{PORT} with netns {netns:?}: {groups:?}")
            })
    };
    let a = find(&groups, None);
    let b = find(&groups, Some(ns_b.inode()));
    assert_eq!(
        a.group.to_string(),
        format!("tcp://127.0.0.1:{PORT}"),
        "the group in the agent's own namespace should be shown without @NETNS"
    );
    assert_eq!(
        b.group.to_string(),
        format!("tcp://127.0.0.1:{PORT}@{}", ns_b.inode()),
        "the group in the other namespace should be shown with @NETNS"
    );
    assert_eq!(
        a.active,
        Some(1),
        "generation 1 should be active in A: {a:?}"
    );
    assert_eq!(
        b.active,
        Some(1),
        "generation 1 should be active in B: {b:?}"
    );

    let refused = env
        .try_activate_group(typed, 2)
        .expect_err("activate without @NETNS should be refused: the address is ambiguous");
    assert!(
        refused.to_string().contains("several network namespaces"),
        "the refusal should say the address exists in several namespaces: {refused}"
    );

    let changed = env.activate_group(in_a, 2);
    assert_eq!(
        changed.active,
        Some(2),
        "activate in A should make generation 2 active there: {changed:?}"
    );
    let b = env.status_of(in_b);
    assert_eq!(
        b.active,
        Some(1),
        "activating generation 2 in A should not change B: {b:?}"
    );

    let t_a = tally(local(PORT), CONNECTIONS);
    let t_b = ns_b.run(|| tally(local(PORT), CONNECTIONS));
    println!("after activate 2 in A: A {t_a}; B {t_b}");
    assert_eq!(
        (t_a.failed, t_a.of(2)),
        (0, CONNECTIONS),
        "in A, generation 2 should answer every connection after the flip: {t_a}"
    );
    assert_eq!(
        (t_b.failed, t_b.of(1)),
        (0, CONNECTIONS),
        "in B, generation 1 should still answer every connection: {t_b}"
    );
    for (what, g, served) in [
        ("A's generation 1", &a1, 0),
        ("A's generation 2", &a2, CONNECTIONS),
        ("B's generation 1", &b1, CONNECTIONS),
        ("B's generation 2", &b2, 0),
    ] {
        assert_eq!(
            g.server.served(),
            served,
            "{what} should have served {served} connections: each namespace's connections \
             reach only its own listeners"
        );
    }

    let changed = env.activate_group(in_b, 2);
    assert_eq!(changed.active, Some(2), "activate in B: {changed:?}");
    let t_b = ns_b.run(|| tally(local(PORT), CONNECTIONS));
    assert_eq!(
        (t_b.failed, t_b.of(2)),
        (0, CONNECTIONS),
        "after activate 2 in B, B's generation 2 should answer every connection: {t_b}"
    );
}
