//! Control connections a test drives by hand, on the protocol crate's blocking framing: the
//! tests that play an idle, flooding or waiting client need the connection itself, not the
//! client library.

use std::{
    io,
    net::TcpListener,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use reuseport_client::ControlClient;
use reuseport_proto::{GroupAddr, GroupStatus, Op, Register, Reply, Request, frame::FrameError};

use super::{TestEnv, group};

pub use reuseport_proto::frame::blocking::Conn;

/// How long the agent may take to answer anything in the tests of access and of control
/// connections (they measure, not assert, how long it really took).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one reply; `None` when the agent closed the connection first.
pub fn read_reply(conn: &mut Conn, deadline: Instant) -> Result<Option<Reply>, String> {
    let timeout = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or("no reply before the deadline")?;
    conn.stream()
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    match conn.recv_msg::<Reply>() {
        Ok(reply) => Ok(reply.map(|(reply, _fds)| reply)),
        // NB: the agent closing a connection it has not read everything from resets it.
        Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(None),
        Err(FrameError::Decode(e)) => Err(format!("decoding the reply: {e}")),
        Err(e) => Err(format!("reading the reply: {e}")),
    }
}

/// `status` of the group on `port` on a fresh control connection; fails (instead of hanging)
/// when the agent does not answer within [`ANSWER_TIMEOUT`]. Prints how long it took.
pub fn timed_status(env: &TestEnv, port: u16, when: &str) -> GroupStatus {
    let asked = Instant::now();
    let groups = env
        .block_on(async {
            tokio::time::timeout(ANSWER_TIMEOUT, async {
                let mut c = ControlClient::connect(env.control_path()).await?;
                c.status(Some(group(port))).await
            })
            .await
        })
        .unwrap_or_else(|_| panic!("{when}: status should answer within {ANSWER_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{when}: status should succeed: {e}"));
    println!(
        "{when}: status answered in {:.1} ms",
        asked.elapsed().as_secs_f64() * 1e3
    );
    groups
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{when}: status should list the group on port {port}"))
}

/// Registers `listener` with `register` on a control connection of its own, the way a launcher
/// does: the agent's answer, and the connection (the registration, if it succeeded), which
/// nothing reads until the test does.
pub fn register_raw(
    env: &TestEnv,
    listener: &TcpListener,
    register: Register,
) -> (Reply, reuseport_proto::frame::Conn) {
    env.block_on(async {
        let stream = tokio::net::UnixStream::connect(env.control_path())
            .await
            .expect("connect to the agent");
        let mut conn = reuseport_proto::frame::Conn::new(stream);
        conn.send(
            &Request::new(Op::Register(register)),
            Some(listener.as_fd()),
        )
        .await
        .expect("send register");
        let (reply, _) = conn
            .recv_msg::<Reply>()
            .await
            .expect("a readable answer")
            .expect("an answer");
        (reply, conn)
    })
}

/// Registers `listener` as generation 1 of `group` as `reuseportctl supervise` does
/// (`supervised: true`): the returned connection is the registration.
pub fn register_supervised(
    env: &TestEnv,
    listener: &TcpListener,
    group: GroupAddr,
) -> reuseport_proto::frame::Conn {
    let register = Register {
        group,
        generation: 1,
        name: None,
        activate: false,
        supervised: true,
        server_pid: None,
    };
    match register_raw(env, listener, register) {
        (Reply::Registered { .. }, conn) => conn,
        (other, _) => panic!("the supervised registration should succeed: {other:?}"),
    }
}
