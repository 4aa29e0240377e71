//! Hostile clients of the control socket: whatever a client that can connect sends, the agent
//! keeps none of its resources (descriptors) and stays as it was.

use std::{
    io::IoSlice,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::net::UnixStream,
    },
    time::Duration,
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use reuseport_proto::{ErrorKind, MAX_ERROR_LEN, Op, Reply, Request, RestartOutcome, frame::Conn};

use crate::harness::{
    ServerKind, TestEnv, control::register_supervised, group, load_size, local, tally, wait_until,
};

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

/// One request on a fresh control connection; its reply.
fn request(env: &TestEnv, op: Op) -> Reply {
    env.block_on(async {
        let stream = tokio::net::UnixStream::connect(env.control_path())
            .await
            .expect("connect to the agent");
        let mut conn = Conn::new(stream);
        conn.send(&Request::new(op), None).await.expect("send");
        let (reply, _) = tokio::time::timeout(SETTLE_TIMEOUT, conn.recv_msg::<Reply>())
            .await
            .expect("a reply in time")
            .expect("a readable reply")
            .expect("a reply before the close");
        reply
    })
}

fn expect_refusal(what: &str, reply: Reply, kind: ErrorKind) -> String {
    match reply {
        Reply::Error { kind: got, message } => {
            println!("{what}: {message}");
            assert_eq!(got, kind, "{what}: {message}");
            message
        }
        other => panic!("{what} should be refused ({kind:?}), got {other:?}"),
    }
}

#[test]
fn only_a_groups_supervisor_reports_its_restarts_in_bounded_escaped_text() {
    const PORT: u16 = 9111;
    let env = TestEnv::new("only_a_groups_supervisor_reports_its_restarts");
    let supervised = env.listen(PORT);
    let _supervisor = register_supervised(&env, &supervised, group(PORT));
    let _victim = env.serve(PORT + 1, 1, ServerKind::Tokio, false);

    // A supervisor of one group reports a "restart" of another group.
    let injected = RestartOutcome::Failed {
        error: "\u{1b}[2J\u{1b}[31mgeneration 9 exploded".into(),
    };
    let reply = request(
        &env,
        Op::RestartResult {
            group: group(PORT + 1),
            id: 0,
            outcome: injected.clone(),
        },
    );
    let message = expect_refusal(
        "a restart result for a group the sender does not supervise",
        reply,
        ErrorKind::PermissionDenied,
    );
    assert!(message.contains("does not supervise"), "{message}");
    assert_eq!(
        env.status(PORT + 1).last_restart,
        None,
        "the other group's status should not show the injected result"
    );

    // Text longer than the cap is refused, whoever sends it.
    let reply = request(
        &env,
        Op::RestartResult {
            group: group(PORT),
            id: 0,
            outcome: RestartOutcome::Failed {
                error: "x".repeat(40_000),
            },
        },
    );
    let message = expect_refusal("a 40,000-byte error text", reply, ErrorKind::BadRequest);
    assert!(
        message.contains(&format!("at most {MAX_ERROR_LEN}")),
        "the refusal should state the cap: {message}"
    );

    // The group's own supervisor may report, and what it says reaches the terminal escaped.
    let reply = request(
        &env,
        Op::RestartResult {
            group: group(PORT),
            id: 0,
            outcome: injected.clone(),
        },
    );
    assert!(
        matches!(reply, Reply::RestartResult { .. }),
        "the group's supervisor should be allowed to report: {reply:?}"
    );
    assert_eq!(env.status(PORT).last_restart, Some(injected));
    let out = env.ctl(&["status"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    println!("{printed}");
    assert!(
        !printed.contains('\u{1b}'),
        "status should print no raw escape character: {printed:?}"
    );
    assert!(
        printed.contains("\\u{1b}[2J"),
        "the escape character should be shown escaped: {printed:?}"
    );
    env.activate(PORT, 1);

    // Names: capped, and no bidirectional override.
    let listener = env.listen(PORT + 2);
    let named = |name: &str| {
        env.block_on(async {
            let mut opts = env.register_options(PORT + 2, 1, false);
            opts.request.name = Some(name.into());
            reuseport_client::register(listener.as_fd(), &opts)
                .await
                .map(drop)
        })
    };
    for bad in ["evil\u{202E}txt.exe", "clear\u{1b}[2J"] {
        let err = named(bad).expect_err("an unprintable name should be refused");
        println!("name {bad:?}: {err}");
        assert_eq!(err.agent_kind(), Some(ErrorKind::BadRequest), "{err}");
    }
}

/// Threads of the agent's process now: all of them, and those running wake-ups.
fn agent_threads(env: &TestEnv) -> (usize, usize) {
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", env.agent_pid()))
        .expect("list the agent's threads")
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default())
        .collect();
    let waking = tasks.iter().filter(|c| c.trim() == "wake-up").count();
    (tasks.len(), waking)
}

#[test]
fn closing_listeners_in_a_loop_costs_the_agent_no_threads() {
    const PORT: u16 = 9121;
    let env = TestEnv::new("closing_listeners_in_a_loop_costs_no_threads");
    let groups = load_size("groups whose listeners close in a loop", 20, 5) as u16;
    let cycles = load_size("close cycles", 10, 3);
    let _active: Vec<_> = (0..groups)
        .map(|i| env.serve(PORT + i, 1, ServerKind::Tokio, false))
        .collect();
    let mut most = 0;
    for cycle in 0..cycles {
        // A standby listener per group, closed while its registration stays open: each
        // close is one the agent answers with wake-up connections.
        let registrations: Vec<_> = (0..groups)
            .map(|i| {
                let listener = env.listen(PORT + i);
                let registration = env.register(&listener, PORT + i, 2, false);
                drop(listener);
                registration
            })
            .collect();
        wait_until(
            "the agent saw every standby listener close",
            SETTLE_TIMEOUT,
            || {
                env.statuses()
                    .iter()
                    .flat_map(|g| &g.generations)
                    .flat_map(|g| &g.sockets)
                    .filter(|s| !s.listening)
                    .count()
                    == usize::from(groups)
            },
        );
        let (threads, waking) = agent_threads(&env);
        most = most.max(waking);
        println!("cycle {cycle}: {threads} agent threads, {waking} of them for wake-ups");
        drop(registrations);
    }
    assert!(
        most <= 1,
        "closing {groups} listeners per cycle should cost no thread beyond the one wake-up \
         worker: {most} wake-up threads at once"
    );
}
