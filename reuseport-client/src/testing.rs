//! Fixtures of the unit tests: a fake agent on a control socket of its own.

use std::{os::fd::OwnedFd, path::PathBuf, time::Duration};

use reuseport_proto::{
    Counters, GenState, GenerationStatus, GroupAddr, GroupStatus, Request, frame::Conn,
};
use tokio::net::UnixListener;

use crate::{RegisterOptions, reuseport_listener};

/// A directory of its own for each test's control socket.
pub(crate) fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("reuseport-client-test-")
        .tempdir()
        .expect("create temp dir")
}

/// The control socket's path in `dir`.
pub(crate) fn sock(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("agent.sock")
}

pub(crate) fn group(s: &str) -> GroupAddr {
    s.parse().expect("valid group address")
}

pub(crate) fn status_of(group: GroupAddr, active: u32) -> GroupStatus {
    GroupStatus {
        group,
        mode: "select-or-migrate".into(),
        active: Some(active),
        falling_back: false,
        generations: vec![GenerationStatus {
            generation: active,
            name: None,
            state: GenState::Active,
            sockets: vec![],
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

pub(crate) async fn accept(listener: &UnixListener) -> Conn {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("client should connect within 5 s")
        .expect("accept");
    Conn::new(stream)
}

pub(crate) async fn recv_request(conn: &mut Conn) -> (Request, Vec<OwnedFd>) {
    tokio::time::timeout(Duration::from_secs(5), conn.recv_msg::<Request>())
        .await
        .expect("client should send a request within 5 s")
        .expect("well-formed request")
        .expect("a request, not a close")
}

/// A fake agent's control socket, a listener on a free port, and options registering it
/// as `generation` through that socket. The TempDir must outlive the test.
pub(crate) fn registration_fixture(
    generation: u32,
) -> (
    tempfile::TempDir,
    UnixListener,
    std::net::TcpListener,
    GroupAddr,
    RegisterOptions,
) {
    let dir = tempdir();
    let listener = UnixListener::bind(sock(&dir)).expect("bind");
    // A port nobody else holds, then the group on it.
    let tcp = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let g = group(&format!("tcp://{}", tcp.local_addr().unwrap()));
    let mut opts = RegisterOptions::new(g, generation);
    opts.control = sock(&dir);
    (dir, listener, tcp, g, opts)
}
