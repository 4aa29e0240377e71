//! Access control and hostile clients: who may steer a group, what a flood of idle or
//! garbage control connections does, and how the control socket file is created.

use std::{
    io::{self, Read, Write},
    os::unix::{
        fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        io::{AsRawFd as _, RawFd},
        net::UnixStream,
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use reuseport_agent::{
    client::ControlClient,
    protocol::{ErrorKind, GenState, GroupStatus, MAX_FRAME, Op, Register, Reply, Request},
};

use crate::harness::{
    ServerKind, TestEnv, bin_path, generation_status, group, local, one_line_error, tally,
    wait_until,
};

/// How long the agent may take to answer anything in these tests (they measure, not assert,
/// how long it really took).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// A non-root user cannot steer or join groups it does not own.
// ---------------------------------------------------------------------------------------

#[test]
fn non_root_users_cannot_steer_or_join_groups_they_do_not_own() {
    const PORT: u16 = 8101;
    const TEST: &str = "non_root_users_cannot_steer_or_join_groups_they_do_not_own";
    let users = TestUsers::new();
    let env = TestEnv::with_agent(TEST, &["--control-group", &users.ops_group], &[]);

    // NB: the socket accepts as soon as it is bound, with mode 0600; group and 0660 follow.
    wait_until(
        "the control socket is mode 0660 and belongs to the --control-group",
        ANSWER_TIMEOUT,
        || {
            std::fs::symlink_metadata(env.control_path()).is_ok_and(|meta| {
                meta.permissions().mode() & 0o7777 == 0o660 && meta.gid() == users.ops_gid
            })
        },
    );

    // A root-owned group: generation 1 active, 2 standby.
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    // A second root-owned group whose only listener closed while its registration stays open:
    // its port is free to bind for anyone, the group still belongs to uid 0.
    let closed = env.listen(PORT + 1);
    let _closed_registration = env.register(&closed, PORT + 1, 1, false);
    drop(closed);
    let before = states(&env.statuses());

    // The file mode is the first gate: outside the control group, connect() itself fails.
    let out = users.outsider.ctl(&env, &["status"]);
    let err = one_line_error("status by a user outside the control group", &out);
    assert!(
        err.to_lowercase().contains("permission denied")
            && err.contains(&env.control_path().display().to_string()),
        "a user outside the control group should be refused at the socket, naming it: {err}"
    );

    // The agent's rule is the second gate: it holds even when an admin opens the socket to
    // every local user.
    std::fs::set_permissions(env.control_path(), std::fs::Permissions::from_mode(0o666))
        .expect("chmod 0666 the control socket");
    let out = users.outsider.ctl(&env, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status should be open to anyone who can connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = format!("127.0.0.1:{PORT}");
    for (what, args) in [
        ("activate", ["activate", port.as_str(), "2"]),
        ("drain", ["drain", port.as_str(), "2"]),
    ] {
        let out = users.outsider.ctl(&env, &args);
        let err = one_line_error(&format!("{what} by uid {}", users.outsider.uid), &out);
        assert!(
            err.contains("permission denied:")
                && err.contains(&format!("{what} of group"))
                && err.contains("owner uid 0")
                && err.contains(&users.ops_group),
            "{what} of a root-owned group by another user should be denied, saying who may: {err}"
        );
    }

    // Registering a socket that belongs to someone else (root's, inherited).
    let roots = env.listen(PORT);
    let verdict =
        users
            .outsider
            .register_inherited(&env, roots.as_raw_fd(), &format!("127.0.0.1:{PORT}"));
    println!(
        "registering root's socket as uid {}: {verdict}",
        users.outsider.uid
    );
    assert!(
        verdict.starts_with("REFUSED permission denied:")
            && verdict.contains("the socket belongs to uid 0"),
        "registering another user's socket should be denied, saying whose it is: {verdict}"
    );
    drop(roots);

    // Joining the root-owned group with a socket of its own: refused by the agent, which
    // says why, before the kernel would silently split the group.
    let join = format!("127.0.0.1:{}", PORT + 1);
    let out = users.outsider.ctl(
        &env,
        &[
            "exec",
            "--listen",
            join.as_str(),
            "--generation",
            "2",
            "--",
            "/bin/true",
        ],
    );
    let err = one_line_error("registering into another uid's group", &out);
    assert!(
        err.contains("permission denied:")
            && err.contains("belongs to uid 0")
            && err.contains("one owner uid per reuseport group"),
        "registering a socket into another uid's group should be denied, saying why: {err}"
    );

    assert_eq!(
        states(&env.statuses()),
        before,
        "refused requests should change nothing"
    );
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "generation 1 should still get every connection: {t}"
    );

    // A user steers a group of its own (its sockets, so its group).
    let own = format!("127.0.0.1:{}", PORT + 2);
    let _own_gens: Vec<Launched> = [1, 2]
        .into_iter()
        .map(|generation| {
            let generation = generation.to_string();
            users.outsider.launch(
                &env,
                &[
                    "exec",
                    "--listen",
                    own.as_str(),
                    "--generation",
                    generation.as_str(),
                    "--",
                    "sleep",
                    "60",
                ],
            )
        })
        .collect();
    wait_until(
        "the user's two generations are registered",
        ANSWER_TIMEOUT,
        || {
            env.try_status(PORT + 2)
                .is_some_and(|s| s.generations.len() == 2)
        },
    );
    let out = users.outsider.ctl(&env, &["activate", own.as_str(), "2"]);
    assert!(
        out.status.success(),
        "a user should be allowed to activate a group of its own sockets: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.status(PORT + 2).active,
        Some(2),
        "the owner's activate should take effect"
    );

    // A member of the control group (as a supplementary group) may steer any group.
    let out = users.member.ctl(&env, &["activate", port.as_str(), "2"]);
    assert!(
        out.status.success(),
        "a control-group member should be allowed to activate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = env.status(PORT);
    assert_eq!(
        status.active,
        Some(2),
        "the member's activate should take effect"
    );
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(2),
        20,
        "new connections should reach generation 2: {t}"
    );
}

/// `(group, active, [(generation, state, slots)])`: what a refused request must leave as it
/// was (counters aside).
type GroupState = (String, Option<u32>, Vec<(u32, GenState, Vec<u32>)>);

/// The [`GroupState`] of every group, in a stable order.
fn states(groups: &[GroupStatus]) -> Vec<GroupState> {
    let mut out: Vec<_> = groups
        .iter()
        .map(|g| {
            let mut gens: Vec<_> = g
                .generations
                .iter()
                .map(|gen_| {
                    (
                        gen_.generation,
                        gen_.state,
                        gen_.sockets.iter().map(|s| s.slot).collect::<Vec<_>>(),
                    )
                })
                .collect();
            gens.sort_by_key(|g| g.0);
            (g.group.to_string(), g.active, gens)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A copy of the binary `path` that any user can run: in the test's temp dir (0755 under
/// /tmp), not where it was built (a checkout may sit in a 0700 directory, e.g. one made by
/// `mktemp -d`).
fn copy_for_users(env: &TestEnv, path: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = env.dir().join("bin");
    std::fs::create_dir_all(&dir).expect("create the test's bin dir");
    std::fs::set_permissions(env.dir(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the test's temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    let copy = dir.join(path.file_name().expect("a file name"));
    if !copy.exists() {
        std::fs::copy(path, &copy).expect("copy the binary for the test users");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the copy");
    }
    copy
}

/// `reuseportctl --control <env's agent>` from a copy the test users can run.
fn ctl_command_for_users(env: &TestEnv) -> Command {
    let mut cmd = Command::new(copy_for_users(env, &bin_path("reuseportctl")));
    cmd.arg("--control")
        .arg(env.control_path())
        .stdin(Stdio::null());
    cmd
}

/// A user (and its own group) created for one test.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    /// Supplementary groups its processes get.
    groups: Vec<u32>,
}

impl TestUser {
    /// Runs `reuseportctl --control <env's agent> ARGS…` as this user (setgroups, setgid,
    /// setuid in the child), so the agent sees its real credentials.
    fn ctl(&self, env: &TestEnv, args: &[&str]) -> Output {
        let mut cmd = ctl_command_for_users(env);
        cmd.args(args);
        self.run_as(&mut cmd, None);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run reuseportctl as {}: {e}", self.name));
        println!(
            "as {} (uid {}): reuseportctl {}: {}{}",
            self.name,
            self.uid,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        );
        out
    }
}

impl TestUser {
    /// Makes `cmd` run as this user, with `fd3` (if any) as its descriptor 3.
    fn run_as(&self, cmd: &mut Command, fd3: Option<RawFd>) {
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if fd3.is_some_and(|fd| libc::dup2(fd, 3) != 3)
                    || libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Passes `socket` (another user's) to a child process of this user, which tries to
    /// register it in `group`; returns the child's verdict line.
    fn register_inherited(&self, env: &TestEnv, socket: RawFd, group: &str) -> String {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(copy_for_users(env, &exe));
        cmd.args([
            "--exact",
            REGISTER_CHILD_TEST,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            REGISTER_CHILD_ENV,
            format!("{group} {}", env.control_path().display()),
        )
        .stdin(Stdio::null());
        self.run_as(&mut cmd, Some(socket));
        let out = cmd.output().expect("run the registering child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            // NB: libtest prints the test's name on the same line, before the output.
            .find_map(|l| {
                l.find("REGISTERED")
                    .or_else(|| l.find("REFUSED"))
                    .map(|i| &l[i..])
            })
            .unwrap_or_else(|| {
                panic!(
                    "the registering child should print its verdict: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_string()
    }
}

/// A `reuseportctl exec` running as a test user; stopped on drop.
struct Launched(Child);

impl Drop for Launched {
    fn drop(&mut self) {
        // NB: SIGTERM, which exec forwards to its command and then waits for it: once this
        // returns no process of the user is left, so the user can be deleted.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while matches!(self.0.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                let _ = self.0.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.wait();
    }
}

impl TestUser {
    /// Starts `reuseportctl ARGS…` as this user in the background.
    fn launch(&self, env: &TestEnv, args: &[&str]) -> Launched {
        let mut cmd = ctl_command_for_users(env);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        self.run_as(&mut cmd, None);
        Launched(cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "start reuseportctl {} as {}: {e}",
                args.join(" "),
                self.name
            )
        }))
    }
}

/// `<group> <control path>` for [`register_inherited_socket`].
const REGISTER_CHILD_ENV: &str = "REUSEPORT_TEST_REGISTER_FD3";
const REGISTER_CHILD_TEST: &str = "tests::access::register_inherited_socket";

/// Not a test: run as another user by `TestUser::register_inherited`, registers the socket
/// it inherited as descriptor 3 and prints `REGISTERED` or `REFUSED <message>`.
#[test]
#[ignore = "helper: entry point of a child process of non_root_users_cannot_steer_or_join_groups_they_do_not_own"]
fn register_inherited_socket() {
    let Ok(spec) = std::env::var(REGISTER_CHILD_ENV) else {
        return;
    };
    let (group, control) = spec.split_once(' ').expect("<group> <control path>");
    let opts = reuseport_agent::client::RegisterOptions {
        control: control.into(),
        request: Register::new(group.parse().expect("group address"), 3),
        reconnect: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // SAFETY: descriptor 3 was set up by the parent for this process and stays open.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(3) };
    match rt.block_on(reuseport_agent::client::register(socket, &opts)) {
        Ok(_) => println!("REGISTERED"),
        Err(e) => println!("REFUSED {e}"),
    }
}

/// Two users and an operators' group, as raw ids that no user database needs to know (the
/// agent takes identities from the kernel, and the VM guests have no `useradd`). Derived
/// from this process's pid, far above the ids a system hands out, so they collide with
/// nothing.
struct TestUsers {
    /// `--control-group`, numeric.
    ops_group: String,
    ops_gid: u32,
    /// In no group of interest.
    outsider: TestUser,
    /// Has the operators' group as a supplementary group.
    member: TestUser,
}

impl TestUsers {
    fn new() -> Self {
        let base = 3_900_000_000 + (std::process::id() % 1_000_000) * 3;
        let user = |name: &str, id: u32, groups: Vec<u32>| TestUser {
            name: name.to_owned(),
            uid: id,
            gid: id,
            groups,
        };
        Self {
            ops_group: base.to_string(),
            ops_gid: base,
            outsider: user("outsider", base + 1, Vec::new()),
            member: user("member", base + 2, vec![base]),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Idle and garbage control connections do not stop anyone else.
// ---------------------------------------------------------------------------------------

#[test]
fn idle_and_garbage_connections_do_not_stop_status_or_steering() {
    const PORT: u16 = 8201;
    const IDLE: usize = 1000;
    const GARBAGE: usize = 100;
    // The agent starts with the soft descriptor limit most systems give it (1024), which a
    // thousand idle clients would exhaust unless it raises the limit. This process needs more.
    raise_own_nofile();
    let env = with_soft_nofile(1024, || {
        TestEnv::new("idle_and_garbage_connections_do_not_stop_status_or_steering")
    });
    let (soft, hard) = agent_nofile(&env);
    assert_eq!(
        soft, hard,
        "the agent should raise its soft descriptor limit to the hard limit"
    );
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);

    let started = Instant::now();
    let idle: Vec<UnixStream> = (0..IDLE)
        .map(|i| {
            UnixStream::connect(env.control_path())
                .unwrap_or_else(|e| panic!("idle control connection {i} should connect: {e}"))
        })
        .collect();
    let mut garbage: Vec<(Garbage, UnixStream)> = (0..GARBAGE)
        .map(|i| {
            let kind = Garbage::ALL[i % Garbage::ALL.len()];
            let mut s = UnixStream::connect(env.control_path())
                .unwrap_or_else(|e| panic!("garbage connection {i} should connect: {e}"));
            s.write_all(&kind.bytes(i))
                .unwrap_or_else(|e| panic!("garbage connection {i} should send: {e}"));
            (kind, s)
        })
        .collect();
    println!(
        "opened {IDLE} idle and {GARBAGE} garbage-sending control connections in {:?}",
        started.elapsed()
    );

    let status = timed_status(
        &env,
        PORT,
        &format!("with {IDLE} idle and {GARBAGE} garbage control connections open"),
    );
    let out = env.ctl(&["status"]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        status.active,
        Some(1),
        "generation 1 should still be active"
    );
    // NB: where the hard descriptor limit is low (4096 in the VM guests), the agent caps
    // connections below 1,100 and the oldest idle ones make room: status answers either way.
    println!(
        "the agent's connection limit: {:?}",
        status.limits.map(|l| l.control_connections)
    );

    let t = tally(local(PORT), 200);
    assert_eq!(
        t.of(1),
        200,
        "the group should keep steering to generation 1: {t}"
    );
    env.activate(PORT, 2);
    let t = tally(local(PORT), 200);
    assert_eq!(
        t.of(2),
        200,
        "after a flip under the flood, new connections should reach generation 2: {t}"
    );

    // Every garbage sender is answered with an error and closed; the half-frames after the
    // frame time-out (a few seconds).
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    for (i, (kind, stream)) in garbage.iter_mut().enumerate() {
        let reply = read_reply(stream, deadline).unwrap_or_else(|e| {
            panic!("garbage connection {i} ({kind:?}) should get an error: {e}")
        });
        match reply {
            Some(Reply::Error { kind: got, message }) => {
                assert_eq!(
                    got,
                    ErrorKind::BadRequest,
                    "garbage connection {i} ({kind:?}): {message}"
                );
                if i < Garbage::ALL.len() {
                    println!("{kind:?}: {message}");
                }
            }
            other => panic!("garbage connection {i} ({kind:?}) should get an error, got {other:?}"),
        }
        if kind.closes() {
            assert!(
                matches!(read_reply(stream, deadline), Ok(None)),
                "garbage connection {i} ({kind:?}) should be closed after its error"
            );
        }
    }
    println!(
        "every garbage sender had its error {:?} after the flood started",
        started.elapsed()
    );
    drop(idle);
}

/// `status` of the group on `port` on a fresh control connection; fails (instead of hanging)
/// when the agent does not answer within [`ANSWER_TIMEOUT`]. Prints how long it took.
fn timed_status(env: &TestEnv, port: u16, when: &str) -> GroupStatus {
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

/// Raises this process's soft RLIMIT_NOFILE to its hard limit.
fn raise_own_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
    }
}

/// Runs `f` (which starts the agent) with this process's soft RLIMIT_NOFILE at `soft`, so
/// that the agent inherits it; restores the limit afterwards.
fn with_soft_nofile<T>(soft: u64, f: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on structs we own.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut old),
            0,
            "getrlimit"
        );
        let lowered = libc::rlimit {
            rlim_cur: soft.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lowered),
            0,
            "setrlimit"
        );
    }
    let out = f();
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &old),
            0,
            "restore RLIMIT_NOFILE"
        );
    }
    out
}

/// The agent's (soft, hard) "Max open files" from /proc/PID/limits.
fn agent_nofile(env: &TestEnv) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", env.agent_pid()))
        .expect("read the agent's /proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().expect("soft limit").to_string();
    let hard = fields.next().expect("hard limit").to_string();
    println!("agent's descriptor limit: soft {soft}, hard {hard}");
    (soft, hard)
}

/// What a garbage-sending connection sends.
#[derive(Clone, Copy, Debug)]
enum Garbage {
    /// A length prefix above MAX_FRAME.
    Oversized,
    /// The first half of a valid request, then nothing.
    HalfFrame,
    /// A well-framed body that is not JSON.
    NotJson,
    /// Bytes from a counter: a random-looking length prefix and body.
    Noise,
}

impl Garbage {
    const ALL: [Self; 4] = [Self::Oversized, Self::HalfFrame, Self::NotJson, Self::Noise];

    fn bytes(self, i: usize) -> Vec<u8> {
        match self {
            Self::Oversized => ((MAX_FRAME + 1 + i) as u32).to_be_bytes().to_vec(),
            Self::HalfFrame => {
                let body = serde_json::to_vec(&Request::new(Op::Status {
                    group: None,
                    live: true,
                }))
                .expect("encode status");
                let mut f = frame(&body);
                f.truncate(f.len() / 2);
                f
            }
            Self::NotJson => frame(format!("\u{1}garbage {i}\u{ff}").as_bytes()),
            Self::Noise => (0..64u32)
                .map(|b| (b.wrapping_mul(2_654_435_761).wrapping_add(i as u32) >> 13) as u8 | 0x80)
                .collect(),
        }
    }

    /// The stream cannot be resynchronised: the agent closes it after the error.
    fn closes(self) -> bool {
        !matches!(self, Self::NotJson)
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Reads one reply frame; `None` when the agent closed the connection first.
fn read_reply(stream: &mut UnixStream, deadline: Instant) -> Result<Option<Reply>, String> {
    let mut len = [0u8; 4];
    let timeout = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or("no reply before the deadline")?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(format!("reading the reply: {e}")),
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("reading the reply body: {e}"))?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| format!("decoding the reply: {e}"))
}

// ---------------------------------------------------------------------------------------
// The connection limit and descriptor exhaustion.
// ---------------------------------------------------------------------------------------

#[test]
fn connection_limit_closes_the_longest_idle_never_a_registration() {
    const PORT: u16 = 8301;
    const LIMIT: usize = 50;
    let env = TestEnv::with_agent(
        "connection_limit_closes_the_longest_idle_never_a_registration",
        &["--max-connections", &LIMIT.to_string()],
        &[],
    );
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let limits = env
        .status(PORT)
        .limits
        .expect("status should report the limits");
    assert_eq!(
        limits.control_connections as usize, LIMIT,
        "status should report --max-connections"
    );

    // Fill every place, and some more: the oldest idle connections make room.
    let mut idle: Vec<UnixStream> = (0..LIMIT + 10)
        .map(|i| {
            let s = UnixStream::connect(env.control_path())
                .unwrap_or_else(|e| panic!("control connection {i} should connect: {e}"));
            // NB: each must be accepted (and so waiting) before the next one arrives, or the
            // eviction order is the accept order, not the connect order.
            let mut c = s.try_clone().expect("clone");
            ping(&mut c, i);
            s
        })
        .collect();
    let status = timed_status(&env, PORT, &format!("at the connection limit ({LIMIT})"));
    assert_eq!(
        generation_status(&status, 1).sockets.len(),
        1,
        "the registration should survive the limit: {status:?}"
    );
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "generation 1 should keep getting connections: {t}"
    );

    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let first = read_reply(&mut idle[0], deadline)
        .expect("the longest-idle connection should be told why it is closed");
    match first {
        Some(Reply::Error { kind, message }) => {
            println!("evicted: {message}");
            assert_eq!(
                kind,
                ErrorKind::Limit,
                "eviction should be a limit error: {message}"
            );
            assert!(
                message.contains(&format!("maximum of {LIMIT}")),
                "eviction should name the limit: {message}"
            );
        }
        other => panic!("the longest-idle connection should be evicted, got {other:?}"),
    }
    let newest = idle.last_mut().expect("connections");
    let mut c = newest.try_clone().expect("clone");
    ping(&mut c, LIMIT + 10);
}

/// One `status` round trip on `stream`: proves the agent accepted it and it now waits.
fn ping(stream: &mut UnixStream, i: usize) {
    let body = serde_json::to_vec(&Request::new(Op::Status {
        group: None,
        live: true,
    }))
    .expect("encode");
    stream
        .write_all(&frame(&body))
        .unwrap_or_else(|e| panic!("connection {i} should send: {e}"));
    match read_reply(stream, Instant::now() + ANSWER_TIMEOUT) {
        Ok(Some(Reply::Status { .. })) => {}
        other => panic!("connection {i} should get a status reply, got {other:?}"),
    }
}

#[test]
fn accept_survives_running_out_of_descriptors() {
    const PORT: u16 = 8401;
    const NOFILE: u32 = 128;
    let env = TestEnv::new("accept_survives_running_out_of_descriptors");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let limit = libc::rlimit {
        rlim_cur: NOFILE.into(),
        rlim_max: NOFILE.into(),
    };
    // SAFETY: prlimit on the agent we started, with a struct we own.
    let res = unsafe {
        libc::prlimit(
            env.agent_pid().as_raw(),
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        res,
        0,
        "lowering the agent's RLIMIT_NOFILE: {}",
        io::Error::last_os_error()
    );

    // More connections than the agent has descriptors: accept() fails with EMFILE.
    let idle: Vec<UnixStream> = (0..2 * NOFILE)
        .map(|i| {
            UnixStream::connect(env.control_path())
                .unwrap_or_else(|e| panic!("control connection {i} should connect: {e}"))
        })
        .collect();
    wait_until(
        "the agent logs that accept() ran out of descriptors",
        ANSWER_TIMEOUT,
        // NB: EMFILE by number: glibc says "Too many open files", musl (the VM guests'
        // static binaries) "No file descriptors available".
        || env.agent_log().contains("(os error 24)"),
    );
    let cpu_before = agent_cpu_ticks(&env);
    let asked = Instant::now();
    let status = timed_status(&env, PORT, "with the agent out of descriptors");
    assert_eq!(
        status.active,
        Some(1),
        "status should still answer, with the group intact"
    );
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "generation 1 should keep getting connections: {t}"
    );
    println!(
        "agent CPU while saturated: {} ticks over {:?}",
        agent_cpu_ticks(&env) - cpu_before,
        asked.elapsed()
    );
    drop(idle);
}

/// utime + stime of the agent, in clock ticks.
fn agent_cpu_ticks(env: &TestEnv) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", env.agent_pid()))
        .expect("read the agent's /proc stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of proc_pid_stat(5); `after_comm` starts at field 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

// ---------------------------------------------------------------------------------------
// The control socket file.
// ---------------------------------------------------------------------------------------

#[test]
fn control_socket_file_is_created_safely() {
    let env = TestEnv::new("control_socket_file_is_created_safely");

    // A second agent on a live agent's path is refused, and the live one keeps serving.
    let out = run_agent(&env, env.control_path(), "second");
    let err = one_line_error("a second agent on the same path", &out);
    assert!(
        err.contains("already listening")
            && err.contains(&env.control_path().display().to_string()),
        "a second agent on a live agent's socket should say another agent listens there: {err}"
    );
    assert!(
        UnixStream::connect(env.control_path()).is_ok(),
        "the first agent should still accept connections"
    );

    // A symbolic link at the control path is refused and its target left alone.
    let target = env.dir().join("target-file");
    std::fs::write(&target, b"not the agent's").expect("write the link target");
    let link = env.dir().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).expect("create the symlink");
    let out = run_agent(&env, &link, "link");
    let err = one_line_error("an agent on a symlinked path", &out);
    assert!(
        err.contains("symbolic link") && err.contains(&link.display().to_string()),
        "a symlink at the control path should be refused, naming it: {err}"
    );
    assert_eq!(
        std::fs::read(&target).expect("read the link target"),
        b"not the agent's",
        "the link's target should be untouched"
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("the link should still exist")
            .file_type()
            .is_symlink(),
        "the symlink itself should be left in place"
    );

    // A symlink to a live agent's socket is refused too (not reported as a live agent).
    let link_to_live = env.dir().join("link-to-live.sock");
    std::os::unix::fs::symlink(env.control_path(), &link_to_live).expect("create the symlink");
    let err = one_line_error(
        "an agent on a symlink to a live socket",
        &run_agent(&env, &link_to_live, "link-live"),
    );
    assert!(
        err.contains("symbolic link"),
        "a symlink to a live socket should be refused as a symlink: {err}"
    );

    // A stale socket file (its agent is gone) is replaced, mode 0660.
    let stale = env.dir().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind the stale socket"));
    assert_eq!(
        UnixStream::connect(&stale).map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::ConnectionRefused),
        "a socket file without a listener should refuse connections"
    );
    let mut agent = AgentProcess::start(&env, &stale, "stale");
    wait_until(
        "the agent replaces the stale socket",
        ANSWER_TIMEOUT,
        || {
            agent.check_alive();
            UnixStream::connect(&stale).is_ok()
        },
    );
    // NB: the socket accepts as soon as it is bound, with mode 0600; 0660 follows at once.
    wait_until(
        "the new control socket is a socket of mode 0660",
        ANSWER_TIMEOUT,
        || {
            std::fs::symlink_metadata(&stale).is_ok_and(|meta| {
                meta.file_type().is_socket() && meta.permissions().mode() & 0o7777 == 0o660
            })
        },
    );
    agent.stop();
    assert!(
        std::fs::symlink_metadata(&stale).is_err(),
        "the agent should remove its own socket file when it stops"
    );
}

/// Runs another agent on `control` (its own bpffs dir) until it exits; it must exit soon.
fn run_agent(env: &TestEnv, control: &Path, tag: &str) -> Output {
    let mut agent = AgentProcess::start(env, control, tag);
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        if let Some(status) = agent.child.try_wait().expect("wait for the agent") {
            let mut stderr = String::new();
            if let Some(mut e) = agent.child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            return Output {
                status,
                stdout: Vec::new(),
                stderr: stderr.into_bytes(),
            };
        }
        assert!(
            Instant::now() < deadline,
            "an agent on {} should refuse to start within {ANSWER_TIMEOUT:?}",
            control.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An extra agent process (besides the test environment's own); killed on drop.
struct AgentProcess {
    child: Child,
    bpffs: PathBuf,
}

impl AgentProcess {
    fn start(env: &TestEnv, control: &Path, tag: &str) -> Self {
        let bpffs = env.bpffs_path().join(tag);
        let child = Command::new(bin_path("reuseport-agent"))
            .arg("--control")
            .arg(control)
            .arg("--bpffs")
            .arg(&bpffs)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn reuseport-agent");
        Self { child, bpffs }
    }

    fn check_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait for the agent") {
            let mut stderr = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            panic!("the agent exited early ({status}): {stderr}");
        }
    }

    /// SIGTERM, and wait for the exit.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while self.child.try_wait().expect("wait for the agent").is_none() {
            assert!(
                Instant::now() < deadline,
                "the agent should exit on SIGTERM within {ANSWER_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

#[test]
fn group_limit_is_a_clear_error() {
    const PORT: u16 = 8501;
    let env = TestEnv::with_agent("group_limit_is_a_clear_error", &["--max-groups", "1"], &[]);
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let listener = env.listen(PORT + 1);
    let Err(err) = env.block_on(reuseport_agent::client::register(
        std::os::fd::AsFd::as_fd(&listener),
        &env.register_options(PORT + 1, 1, false),
    )) else {
        panic!("a second group beyond --max-groups 1 should be refused");
    };
    println!("second group: {err}");
    assert_eq!(
        err.agent_kind(),
        Some(ErrorKind::Limit),
        "exceeding the group limit should be a limit error: {err}"
    );
    assert!(
        err.to_string().contains("--max-groups"),
        "the message should say how to raise the limit: {err}"
    );
    let groups = env.statuses();
    assert_eq!(
        groups.len(),
        1,
        "no group should have been added: {groups:?}"
    );
    assert_eq!(
        groups[0].limits.map(|l| l.groups),
        Some(1),
        "status should report the group limit"
    );
    assert_eq!(
        env.status_of(group(PORT)).active,
        Some(1),
        "the existing group should be untouched"
    );
}
