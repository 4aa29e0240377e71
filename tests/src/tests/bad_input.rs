//! Bad input gets a clear error, and the agent keeps serving the groups it has.

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    process::Command,
    time::Duration,
};

use reuseport_proto::{
    ErrorKind, MAX_FRAME, Op, PROTOCOL_VERSION, Register, Reply, Request,
    frame::{self, Conn},
};
use socket2::{Domain, Socket, Type};

use crate::harness::{ServerKind, TestEnv, bin_path, group, local, one_line_error, tally};

const PORT: u16 = 7801;
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn bad_protocol_input_gets_clear_errors_and_agent_keeps_serving() {
    let env = TestEnv::new("bad_protocol_input_gets_clear_errors_and_agent_keeps_serving");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    still_serving(&env, "before any bad input");

    let register = |port: u16, generation: u32| {
        serde_json::to_vec(&Request::new(Op::Register(Register {
            group: group(port),
            generation,
            name: None,
            activate: false,
            supervised: false,
            server_pid: None,
        })))
        .expect("encode register")
    };

    // Frames that are not valid requests.
    let cases: [(&str, Vec<u8>, ErrorKind); 4] = [
        (
            "malformed JSON",
            frame(br#"{"v":1,"op":"status""#),
            ErrorKind::BadRequest,
        ),
        (
            "unknown op",
            frame(br#"{"v":1,"op":"frobnicate"}"#),
            ErrorKind::BadRequest,
        ),
        (
            "wrong protocol version",
            frame(format!(r#"{{"v":{},"op":"status"}}"#, PROTOCOL_VERSION + 1000).as_bytes()),
            ErrorKind::UnsupportedVersion,
        ),
        (
            "oversized frame (length prefix above 64 KiB)",
            ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec(),
            ErrorKind::BadRequest,
        ),
    ];
    for (what, bytes, kind) in cases {
        expect_error(&env, what, &bytes, None, kind);
        still_serving(&env, what);
    }

    expect_error(
        &env,
        "register without a socket",
        &frame(&register(PORT, 9)),
        None,
        ErrorKind::BadRequest,
    );
    still_serving(&env, "register without a socket");

    let file = std::fs::File::create(env.dir().join("not-a-socket")).expect("create file");
    expect_error(
        &env,
        "register with a regular file",
        &frame(&register(PORT, 9)),
        Some(file.as_fd()),
        ErrorKind::InvalidSocket,
    );
    still_serving(&env, "register with a regular file");

    let (pipe_r, _pipe_w) = std::io::pipe().expect("pipe");
    expect_error(
        &env,
        "register with a pipe",
        &frame(&register(PORT, 9)),
        Some(pipe_r.as_fd()),
        ErrorKind::InvalidSocket,
    );
    still_serving(&env, "register with a pipe");

    // A listening TCP socket without SO_REUSEPORT cannot share PORT: it gets its own port
    // and is registered for that port's (new) group.
    let no_reuseport = tcp_socket(local(PORT + 10), false, true);
    expect_error(
        &env,
        "register a TCP socket without SO_REUSEPORT",
        &frame(&register(PORT + 10, 1)),
        Some(no_reuseport.as_fd()),
        ErrorKind::InvalidSocket,
    );
    still_serving(&env, "register a TCP socket without SO_REUSEPORT");

    let udp = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("udp socket");
    udp.set_reuse_port(true).expect("SO_REUSEPORT");
    udp.bind(&local(PORT).into()).expect("bind udp");
    expect_error(
        &env,
        "register a UDP socket",
        &frame(&register(PORT, 9)),
        Some(udp.as_fd()),
        ErrorKind::InvalidSocket,
    );
    still_serving(&env, "register a UDP socket");

    let other_port = tcp_socket(local(PORT + 1), true, true);
    expect_error(
        &env,
        "register a socket bound to another port",
        &frame(&register(PORT, 9)),
        Some(other_port.as_fd()),
        ErrorKind::InvalidSocket,
    );
    still_serving(&env, "register a socket bound to another port");

    let not_listening = tcp_socket(local(PORT), true, false);
    expect_error(
        &env,
        "register a bound socket that is not listening",
        &frame(&register(PORT, 9)),
        Some(not_listening.as_fd()),
        ErrorKind::InvalidSocket,
    );
    still_serving(&env, "register a bound socket that is not listening");

    // Valid requests the group's state refuses.
    let drain_active = serde_json::to_vec(&Request::new(Op::Drain {
        group: group(PORT),
        generation: 1,
    }))
    .unwrap();
    expect_error(
        &env,
        "drain the active generation",
        &frame(&drain_active),
        None,
        ErrorKind::Conflict,
    );
    still_serving(&env, "drain the active generation");

    let activate_unknown = serde_json::to_vec(&Request::new(Op::Activate {
        group: group(PORT),
        generation: 77,
    }))
    .unwrap();
    let message = expect_error(
        &env,
        "activate an unknown generation",
        &frame(&activate_unknown),
        None,
        ErrorKind::UnknownGeneration,
    );
    assert!(
        message.contains("77") && message.ends_with("registered generations are 1"),
        "the error should name the generation and list the ones that exist: {message}"
    );
    still_serving(&env, "activate an unknown generation");

    let status = env.status(PORT);
    assert_eq!(
        status
            .generations
            .iter()
            .map(|g| g.generation)
            .collect::<Vec<_>>(),
        [1],
        "no bad registration should have added a generation: {status:?}"
    );
}

#[test]
fn cli_errors_are_one_clear_line() {
    let env = TestEnv::new("cli_errors_are_one_clear_line");
    let _g1 = env.serve(PORT, 1, ServerKind::Blocking, false);

    let out = env.ctl(&["activate", "tcp://127.0.0.1:1", "9"]);
    let err = one_line_error("reuseportctl activate tcp://127.0.0.1:1 9", &out);
    let lower = err.to_lowercase();
    assert!(
        lower.contains("unknown group") && err.contains("127.0.0.1:1"),
        "activating a group that does not exist should say the group is unknown and name it: {err:?}"
    );
    assert!(
        err.contains(&format!("manages tcp://127.0.0.1:{PORT}")),
        "the error should list the groups the agent manages: {err:?}"
    );
    still_serving(&env, "reuseportctl activate of an unknown group");

    let out = Command::new(bin_path("reuseportctl"))
        .args(["--control", "/nonexistent", "status"])
        .output()
        .expect("run reuseportctl");
    let err = one_line_error("reuseportctl --control /nonexistent status", &out);
    assert!(
        err.contains("/nonexistent") && err.to_lowercase().contains("not running"),
        "a missing control socket should say the agent is not running and name the path: {err:?}"
    );

    let out = env.ctl(&["activate", "notanaddress", "1"]);
    let err = one_line_error("reuseportctl activate notanaddress 1", &out);
    assert!(
        err.to_lowercase().contains("bad address") && err.contains("notanaddress"),
        "a malformed group address should be reported as a bad address, quoting it: {err:?}"
    );
    still_serving(&env, "reuseportctl activate with a bad address");

    let out = env.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status --json should succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let groups: Vec<reuseport_proto::GroupStatus> = serde_json::from_slice(&out.stdout)
        .expect("status --json should print a list of GroupStatus");
    assert_eq!(
        groups.len(),
        1,
        "status --json should list the one group: {groups:?}"
    );
    assert_eq!(
        groups[0].active,
        Some(1),
        "status --json should show generation 1 active: {groups:?}"
    );
}

/// The group keeps steering to generation 1 and the agent still answers status.
fn still_serving(env: &TestEnv, after: &str) {
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "after {after}: new connections should still reach active generation 1: {t}"
    );
    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(1),
        "after {after}: status should still show generation 1 active: {status:?}"
    );
}

/// `body` framed as it is: these tests send bodies that are not requests on purpose.
fn frame(body: &[u8]) -> Vec<u8> {
    frame::encode_body(body).expect("a body within the message limit")
}

/// Sends `bytes` (with `fd`) on a fresh control connection and checks the error reply;
/// returns its message.
fn expect_error(
    env: &TestEnv,
    what: &str,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    kind: ErrorKind,
) -> String {
    let reply = exchange(env.control_path(), env, bytes, fd)
        .unwrap_or_else(|e| panic!("{what}: the agent should answer with an error, but {e}"));
    match reply {
        Reply::Error { kind: got, message } => {
            println!("{what}: {got:?}: {message}");
            assert_eq!(
                got, kind,
                "{what}: error kind should be {kind:?} (message: {message:?})"
            );
            assert!(
                !message.trim().is_empty(),
                "{what}: the error should carry a message"
            );
            message
        }
        other => panic!("{what}: expected an error of kind {kind:?}, got {other:?}"),
    }
}

fn exchange(
    control: &Path,
    env: &TestEnv,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<Reply, String> {
    env.block_on(async {
        let stream = tokio::net::UnixStream::connect(control)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut conn = Conn::new(stream);
        conn.send_raw(bytes, fd)
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        match tokio::time::timeout(REPLY_TIMEOUT, conn.recv_msg::<Reply>()).await {
            Err(_) => Err(format!("no reply within {REPLY_TIMEOUT:?}")),
            Ok(Err(e)) => Err(format!("receiving the reply failed: {e}")),
            Ok(Ok(None)) => Err("the agent closed the connection without a reply".into()),
            Ok(Ok(Some((reply, _)))) => Ok(reply),
        }
    })
}

fn tcp_socket(addr: SocketAddr, reuseport: bool, listen: bool) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("tcp socket");
    s.set_reuse_port(reuseport).expect("SO_REUSEPORT");
    s.bind(&addr.into()).expect("bind");
    if listen {
        s.listen(128).expect("listen");
    }
    s
}
