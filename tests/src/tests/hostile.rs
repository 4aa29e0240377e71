//! Hostile clients of the control socket: whatever a client that can connect sends, the agent
//! keeps none of its resources (descriptors) and stays as it was.

use std::{
    io::IoSlice,
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use crate::harness::{ServerKind, TestEnv, load_size, local, tally, wait_until};

/// How long the agent may take to notice closed connections and let their descriptors go.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Descriptors the agent's process holds open now.
fn agent_fds(env: &TestEnv) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", env.agent_pid()))
        .expect("list the agent's descriptors")
        .count()
}

#[test]
fn descriptors_beyond_what_a_frame_holds_are_closed_not_leaked() {
    const PORT: u16 = 9101;
    let env = TestEnv::new("descriptors_beyond_what_a_frame_holds_are_closed_not_leaked");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let before = agent_fds(&env);
    let rounds = load_size("connections sending 5 descriptors each", 500, 100);
    let null = std::fs::File::open("/dev/null").expect("open /dev/null");
    let five = [null.as_raw_fd(); 5];
    for i in 0..rounds {
        let s = UnixStream::connect(env.control_path())
            .unwrap_or_else(|e| panic!("control connection {i} should connect: {e}"));
        // One byte of a frame, with one descriptor more than a frame may carry: the kernel
        // installs what fits in the agent's buffer and truncates the rest.
        sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(&[0])],
            &[ControlMessage::ScmRights(&five)],
            MsgFlags::empty(),
            None,
        )
        .unwrap_or_else(|e| panic!("connection {i} should send its descriptors: {e}"));
    }
    println!("agent descriptors: {before} before the {rounds} connections");
    // Every connection is closed now (dropped above); their descriptors must go with them.
    wait_until(
        "the agent holds no descriptor a closed connection sent it",
        SETTLE_TIMEOUT,
        || agent_fds(&env) <= before + 4,
    );
    println!("agent descriptors after: {}", agent_fds(&env));
    let t = tally(local(PORT), 20);
    assert_eq!(t.of(1), 20, "the group should keep steering: {t}");
}
