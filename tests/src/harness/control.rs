//! Control connections a test drives by hand, on the protocol crate's blocking framing: the
//! tests that play an idle, flooding or waiting client need the connection itself, not the
//! client library.

use std::{
    io,
    time::{Duration, Instant},
};

use reuseport_client::ControlClient;
use reuseport_proto::{GroupStatus, Reply, frame::FrameError};

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
