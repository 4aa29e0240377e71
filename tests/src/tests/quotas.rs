//! One user cannot take the control plane: per-uid quotas on control connections and groups,
//! a share of each table kept for root, and a group whose program load is slow stalls
//! nobody else.
//!
//! The users are plain uids without an account: a thread of the test switches its own
//! credentials (see [`User`]), so these tests need no `useradd` and run in the guests too.

use std::{
    net::TcpListener,
    os::{
        fd::AsFd as _,
        unix::{fs::PermissionsExt as _, net::UnixStream},
    },
    path::PathBuf,
    time::Duration,
};

use reuseport_client::{self as client, ControlClient};
use reuseport_proto::{
    ErrorKind, GroupAddr, GroupStatus, Op, Register, Reply, Request, frame::Conn,
};

use crate::harness::{ServerKind, TestEnv, group, load_size, local, wait_until};

/// How long the agent may take to answer a request it can serve.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A uid without an account. The sockets and control connections it makes are created on a
/// thread whose own credentials are that uid, so the kernel and the agent see that user.
#[derive(Clone, Copy)]
struct User(u32);

impl User {
    /// Runs `f` as this user, on a thread of its own (the test's other threads stay root).
    fn run<T: Send>(self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(move || {
                let uid = self.0 as libc::c_long;
                // SAFETY: plain system calls on this thread's credentials.
                // NB: raw system calls: glibc's setresuid() would change every thread of
                // the process.
                let switched = unsafe {
                    libc::syscall(libc::SYS_setresgid, uid, uid, uid) == 0
                        && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
                };
                assert!(
                    switched,
                    "switching a thread to uid {uid}: {}",
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .expect("the user's thread")
        })
    }

    /// A listener of this user on `127.0.0.1:port` and a control connection of this user.
    fn listener_and_connection(self, env: &TestEnv, port: u16) -> (TcpListener, UnixStream) {
        let control = env.control_path().to_path_buf();
        self.run(move || {
            let listener = client::reuseport_listener(local(port))
                .unwrap_or_else(|e| panic!("uid {}: listen on port {port}: {e}", self.0));
            let stream = UnixStream::connect(&control)
                .unwrap_or_else(|e| panic!("uid {}: connect to the agent: {e}", self.0));
            (listener, stream)
        })
    }
}

/// Lets users without the control group reach the control socket, as an administrator who
/// opens it to everyone would.
fn open_to_users(env: &TestEnv) {
    let mode = |m| std::fs::Permissions::from_mode(m);
    std::fs::set_permissions(env.dir(), mode(0o755)).expect("chmod the test's temp dir");
    std::fs::set_permissions(env.control_path(), mode(0o666)).expect("chmod the control socket");
}

/// Sends `register` for `listener` (generation 1 of `group`) on `stream`; the open
/// registration, or the agent's refusal.
fn register(
    env: &TestEnv,
    stream: UnixStream,
    listener: &TcpListener,
    group: GroupAddr,
) -> Result<Conn, (ErrorKind, String)> {
    env.block_on(async {
        let mut conn = send_register(stream, listener, group).await;
        match tokio::time::timeout(ANSWER_TIMEOUT, conn.recv_msg::<Reply>()).await {
            Ok(Ok(Some((Reply::Registered { .. }, _)))) => Ok(conn),
            Ok(Ok(Some((Reply::Error { kind, message }, _)))) => Err((kind, message)),
            other => panic!("register in {group}: no answer: {other:?}"),
        }
    })
}

/// Sends `register` without waiting for the answer.
async fn send_register(stream: UnixStream, listener: &TcpListener, group: GroupAddr) -> Conn {
    stream.set_nonblocking(true).expect("non-blocking");
    let conn = Conn::new(tokio::net::UnixStream::from_std(stream).expect("tokio stream"));
    let op = Op::Register(Register {
        group,
        generation: 1,
        name: None,
        activate: false,
        supervised: false,
        server_pid: None,
    });
    // NB: a connection the agent refused at once may be closed already: its refusal is
    // still there to read.
    let _ = conn.send(&Request::new(op), Some(listener.as_fd())).await;
    conn
}

/// `status` of every group, failing the test if the agent does not answer in time.
fn status_in_time(env: &TestEnv, when: &str) -> Vec<GroupStatus> {
    env.block_on(async {
        tokio::time::timeout(ANSWER_TIMEOUT, async {
            let mut c = ControlClient::connect(env.control_path()).await?;
            c.status(None).await
        })
        .await
    })
    .unwrap_or_else(|_| panic!("root's status should be answered {when}"))
    .unwrap_or_else(|e| panic!("root's status should be served {when}: {e}"))
}

#[test]
fn users_filling_the_connection_table_leave_room_for_root() {
    const PORT: u16 = 9801;
    const LIMIT: u32 = 64;
    let env = TestEnv::with_agent(
        "users_filling_the_connection_table_leave_room_for_root",
        &["--max-connections", &LIMIT.to_string()],
        &[],
    );
    open_to_users(&env);
    // Each user registers sockets of its own group until the agent refuses.
    let mut held = Vec::new();
    let mut taken = Vec::new();
    for (i, user) in (60001..=60004).map(User).enumerate() {
        let port = PORT + i as u16;
        let mut count = 0;
        let refusal = loop {
            assert!(
                count <= LIMIT,
                "uid {} registered {count} sockets: more than the agent's connections",
                user.0
            );
            let (listener, stream) = user.listener_and_connection(&env, port);
            match register(&env, stream, &listener, group(port)) {
                Ok(conn) => held.push((listener, conn)),
                Err(refusal) => break refusal,
            }
            count += 1;
        };
        println!("uid {}: {count} registrations, then: {}", user.0, refusal.1);
        assert_eq!(refusal.0, ErrorKind::Limit, "{}", refusal.1);
        taken.push((count, refusal.1));
    }
    let quota = LIMIT / 4;
    assert_eq!(
        taken[0].0, quota,
        "one uid should hold at most its quota, a quarter of the connections"
    );
    assert!(
        taken[0].1.contains("--max-connections-per-uid"),
        "the refusal should name the quota: {}",
        taken[0].1
    );
    let users: u32 = taken.iter().map(|(n, _)| n).sum();
    let reserve = LIMIT / 16;
    assert_eq!(
        users,
        LIMIT - reserve,
        "users together should stop short of root's share"
    );
    assert!(
        taken[3].1.contains("kept for root"),
        "the last user should be told the rest is root's: {}",
        taken[3].1
    );

    // Root: status, a flip of a user's group, a registration of its own.
    let all = status_in_time(&env, "with every other connection registered by users");
    let limits = all[0].limits.expect("status should report the limits");
    assert_eq!(
        (
            limits.control_connections_per_uid,
            limits.control_connections_reserved_for_root
        ),
        (Some(quota), Some(reserve)),
        "status should report the quota and root's share"
    );
    env.activate(PORT, 1);
    let _root = env.serve(PORT + 10, 1, ServerKind::Tokio, false);
    assert_eq!(env.status(PORT + 10).active, Some(1));
    drop(held);
}

#[test]
fn users_filling_the_group_table_leave_room_for_root() {
    const PORT: u16 = 9821;
    // 4 groups: 1 per uid, the last one kept for root.
    let env = TestEnv::with_agent(
        "users_filling_the_group_table_leave_room_for_root",
        &["--max-groups", "4"],
        &[],
    );
    open_to_users(&env);
    let mut held = Vec::new();
    let mut attempt = |user: User, port: u16| {
        let (listener, stream) = user.listener_and_connection(&env, port);
        let result = register(&env, stream, &listener, group(port));
        match result {
            Ok(conn) => {
                held.push((listener, conn));
                None
            }
            Err((kind, message)) => {
                println!("uid {}, group on port {port}: {message}", user.0);
                assert_eq!(kind, ErrorKind::Limit, "{message}");
                Some(message)
            }
        }
    };
    let (a, b, c, d) = (User(60011), User(60012), User(60013), User(60014));
    assert_eq!(attempt(a, PORT), None, "a user's first group");
    let second = attempt(a, PORT + 1).expect("a second group of one uid should be refused");
    assert!(second.contains("--max-groups-per-uid"), "{second}");
    assert_eq!(attempt(b, PORT + 2), None, "another user's group");
    assert_eq!(attempt(c, PORT + 3), None, "a third user's group");
    let last = attempt(d, PORT + 4).expect("the last group should be kept for root");
    assert!(last.contains("kept for root"), "{last}");
    let _root = env.serve(PORT + 5, 1, ServerKind::Tokio, false);
    let all = env.statuses();
    assert_eq!(all.len(), 4, "three users' groups and root's");
    let limits = all[0].limits.expect("limits");
    assert_eq!(
        (limits.groups_per_uid, limits.groups_reserved_for_root),
        (Some(1), Some(1))
    );
    drop(held);
}

/// A file the agent waits for at its held fault point (see `fault::hold`), in a directory
/// of its own that goes with it.
struct Release {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Release {
    fn new(test: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("reuseport-release-{test}-"))
            .tempdir()
            .expect("create the release file's directory");
        Self {
            path: dir.path().join("release"),
            _dir: dir,
        }
    }

    fn now(&self) {
        std::fs::write(&self.path, b"").expect("create the release file");
    }
}

#[test]
fn a_slow_group_creation_stalls_nobody_else() {
    const PORT: u16 = 9841;
    const BURST_PORT: u16 = 20000;
    let release = Release::new("a_slow_group_creation_stalls_nobody_else");
    let release_path = release.path.to_string_lossy().into_owned();
    // The second program load (the first is the group of port PORT) waits until released,
    // as a verifier run that takes minutes would.
    let env = TestEnv::with_agent(
        "a_slow_group_creation_stalls_nobody_else",
        &[],
        &[
            ("REUSEPORT_FAULT_HOLD", "group.load:2"),
            ("REUSEPORT_FAULT_RELEASE", &release_path),
            ("REUSEPORT_MAX_GROUPS_PER_UID", "2"),
        ],
    );
    open_to_users(&env);
    let g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);

    let (slow, creator) = (User(60021), User(60022));
    let (slow_listener, stream) = slow.listener_and_connection(&env, PORT + 1);
    let mut slow_conn = env.block_on(send_register(stream, &slow_listener, group(PORT + 1)));
    wait_until(
        "the agent holds the slow group's program load",
        ANSWER_TIMEOUT,
        || {
            env.agent_log()
                .contains("fault injection: holding at group.load")
        },
    );
    // The same user asks for many more new groups meanwhile.
    let burst = load_size("registrations for new groups during the slow load", 600, 50) as u16;
    let mut pending = Vec::new();
    for i in 0..burst {
        let (listener, stream) = slow.listener_and_connection(&env, BURST_PORT + i);
        let conn = env.block_on(send_register(stream, &listener, group(BURST_PORT + i)));
        pending.push((listener, conn));
    }

    let all = status_in_time(&env, "while a group's program load is held");
    assert_eq!(all.len(), 1, "only the group on port {PORT} exists yet");
    let listener = env.listen(PORT + 2);
    let opts = env.register_options(PORT + 2, 1, false);
    let root_group = env
        .block_on(async {
            tokio::time::timeout(ANSWER_TIMEOUT, client::register(listener.as_fd(), &opts)).await
        })
        .expect("root's new group should not wait for another user's program load")
        .expect("root's new group should be created");
    let (other_listener, stream) = creator.listener_and_connection(&env, PORT + 3);
    let other = register(&env, stream, &other_listener, group(PORT + 3))
        .expect("another user's new group should not wait for the slow one");
    let changed = env
        .block_on(async {
            tokio::time::timeout(ANSWER_TIMEOUT, async {
                let mut c = ControlClient::connect(env.control_path()).await?;
                c.activate(group(PORT), 2).await
            })
            .await
        })
        .expect("a flip should be answered while a program load is held")
        .expect("the flip should succeed");
    assert_eq!(changed.active, Some(2));
    drop(g1);
    wait_until(
        "the closed registration left its group",
        ANSWER_TIMEOUT,
        || {
            status_in_time(&env, "after an unregistration")
                .iter()
                .any(|g| {
                    g.group.addr == local(PORT) && g.generations.iter().all(|g| g.generation == 2)
                })
        },
    );

    release.now();
    let answer = env.block_on(async {
        tokio::time::timeout(ANSWER_TIMEOUT, slow_conn.recv_msg::<Reply>()).await
    });
    match answer {
        Ok(Ok(Some((Reply::Registered { .. }, _)))) => {}
        other => panic!("the slow group should be created once its load finishes: {other:?}"),
    }
    drop((root_group, listener, other, other_listener, pending));
}
