//! Probe connections: from a loopback address and a source port in
//! `reuseport_common::PROBE_PORTS`, the program sends a connection to the newest generation
//! whatever its state, so a standby generation is checked through the real port and program
//! while every other client still reaches the active one only.

use std::net::{Ipv6Addr, SocketAddr};

use reuseport_client as client;
use reuseport_common::PROBE_PORTS;
use reuseport_proto::{GenState, GroupAddr};

use crate::harness::{ClientConn, ServerKind, TestEnv, generation_status, local, tally};

/// One request on a connection from probe port `from`; the generation that answered.
fn probe(port: u16, from: u16) -> u32 {
    let mut c = ClientConn::connect_from(local(port), SocketAddr::from(([127, 0, 0, 1], from)))
        .unwrap_or_else(|e| panic!("connect from probe port {from}: {e}"));
    c.request()
        .unwrap_or_else(|e| panic!("request from probe port {from}: {e}"))
}

#[test]
fn a_standby_generation_answers_probes_while_clients_reach_only_the_active_one() {
    const PORT: u16 = 6301;
    let env =
        TestEnv::new("a_standby_generation_answers_probes_while_clients_reach_only_the_active_one");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let g2 = env.serve(PORT, 2, ServerKind::Tokio, false);

    let probes: Vec<u16> = PROBE_PORTS.collect();
    for (i, from) in probes.iter().enumerate() {
        assert_eq!(
            probe(PORT, *from),
            2,
            "probe {i} (from 127.0.0.1:{from}) should reach standby generation 2"
        );
        let t = tally(local(PORT), 50);
        assert_eq!(
            (t.of(1), t.failed),
            (50, 0),
            "ordinary clients should still reach only active generation 1: {t}"
        );
    }
    assert_eq!(
        g2.server.served(),
        probes.len() as u64,
        "standby generation 2 should have served the probes and nothing else"
    );
    let status = env.status(PORT);
    assert_eq!(
        (
            generation_status(&status, 2).state,
            generation_status(&status, 2).counters.selected
        ),
        (GenState::Standby, probes.len() as u64),
        "generation 2 stays standby; the program counts each probe for it: {status:?}"
    );

    // Once generation 2 is active and a third one registers, probes go to the third.
    env.activate(PORT, 2);
    let _g3 = env.serve(PORT, 3, ServerKind::Tokio, false);
    assert_eq!(
        probe(PORT, *PROBE_PORTS.start()),
        3,
        "probes should follow the newest generation"
    );
    let t = tally(local(PORT), 50);
    assert_eq!(
        (t.of(2), t.failed),
        (50, 0),
        "ordinary clients should reach only active generation 2: {t}"
    );
}

#[test]
fn probes_over_ipv6_loopback_reach_the_standby_generation_too() {
    const PORT: u16 = 6311;
    let env = TestEnv::new("probes_over_ipv6_loopback_reach_the_standby_generation_too");
    let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, PORT));
    let group = GroupAddr { addr, netns: None };
    let listener = || {
        client::reuseport_listener(addr)
            .unwrap_or_else(|e| panic!("listen on {addr} (IPv6 works in every column): {e}"))
    };
    let _g1 = env.serve_listener(listener(), group, 1, ServerKind::Tokio, false);
    let _g2 = env.serve_listener(listener(), group, 2, ServerKind::Tokio, false);
    let from = SocketAddr::from((Ipv6Addr::LOCALHOST, *PROBE_PORTS.end()));
    let answered = ClientConn::connect_from(addr, from)
        .and_then(|mut c| c.request())
        .unwrap_or_else(|e| panic!("probe from {from}: {e}"));
    assert_eq!(
        answered, 2,
        "a probe from {from} should reach standby generation 2"
    );
    let t = tally(addr, 50);
    assert_eq!(
        (t.of(1), t.failed),
        (50, 0),
        "ordinary IPv6 clients should reach only active generation 1: {t}"
    );
}
