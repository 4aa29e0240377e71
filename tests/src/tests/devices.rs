//! Sockets bound to a device (`SO_BINDTODEVICE`, a VRF): the kernel groups them apart from
//! sockets on the same address bound to another device or to none, so the agent never lets
//! them join one group.

use std::{net::TcpListener, os::fd::AsFd as _};

use reuseport_client as client;
use reuseport_proto::ErrorKind;
use socket2::{Domain, Protocol, Socket, Type};

use crate::harness::{ServerKind, TestEnv, group, local, tally};

/// A listening SO_REUSEPORT socket on `127.0.0.1:port`, bound to `device`.
fn listen_on_device(port: u16, device: &str) -> TcpListener {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket
        .bind_device(Some(device.as_bytes()))
        .unwrap_or_else(|e| panic!("SO_BINDTODEVICE {device}: {e}"));
    socket.set_nonblocking(true).expect("non-blocking");
    socket
        .bind(&local(port).into())
        .unwrap_or_else(|e| panic!("bind to port {port} on {device}: {e}"));
    socket.listen(128).expect("listen");
    socket.into()
}

#[test]
fn a_socket_bound_to_another_device_than_its_group_is_refused() {
    const PORT: u16 = 9901;
    let env = TestEnv::new("a_socket_bound_to_another_device_than_its_group_is_refused");

    // A group of sockets bound to no device; one bound to lo on the same address.
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let on_lo = listen_on_device(PORT, "lo");
    let err = env
        .block_on(client::register(
            on_lo.as_fd(),
            &env.register_options(PORT, 2, true),
        ))
        .map(drop)
        .expect_err(
            "a socket bound to lo should be refused in a group of sockets bound to no device: \
             the kernel steers it in a reuseport group of its own",
        );
    println!("bound to lo, group bound to none: {err}");
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidSocket), "{err}");
    assert!(
        err.to_string().contains("SO_BINDTODEVICE"),
        "the refusal should name the option: {err}"
    );
    let status = env.status(PORT);
    assert_eq!(
        (status.active, status.generations.len()),
        (Some(1), 1),
        "the group should be as it was: {status:?}"
    );
    drop(on_lo);
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "generation 1 should keep every connection: {t}"
    );

    // The other way round: a group bound to lo takes sockets bound to lo only.
    let port = PORT + 1;
    let _lo1 = env.serve_listener(
        listen_on_device(port, "lo"),
        group(port),
        1,
        ServerKind::Tokio,
        false,
    );
    let unbound = env.listen(port);
    let err = env
        .block_on(client::register(
            unbound.as_fd(),
            &env.register_options(port, 2, false),
        ))
        .map(drop)
        .expect_err("a socket bound to no device should be refused in a group bound to lo");
    assert_eq!(err.agent_kind(), Some(ErrorKind::InvalidSocket), "{err}");
    let _lo2 = env.serve_listener(
        listen_on_device(port, "lo"),
        group(port),
        2,
        ServerKind::Tokio,
        true,
    );
    let t = tally(local(port), 20);
    assert_eq!(
        t.of(2),
        20,
        "a second socket bound to lo joins and is steered: {t}"
    );
}
