//! Access control: who may steer a group and who may join it (SO_PEERCRED, the control
//! group, the owner of a group's sockets).
use std::{
    io::{self},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        io::{AsRawFd as _, RawFd},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use reuseport_proto::{GenState, GroupStatus, Register};

use crate::harness::{
    ServerKind, TestEnv, bin_path, control::ANSWER_TIMEOUT, helper_args, local, one_line_error,
    tally, wait_until,
};

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
    assert_eq!(
        out.status.code(),
        Some(4),
        "refused at the socket: the exit status for permission denied ({err})"
    );
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
        ("activate", &["activate", port.as_str(), "2"][..]),
        ("drain", &["drain", port.as_str(), "2"]),
        ("rollback", &["rollback", port.as_str()]),
    ] {
        let out = users.outsider.ctl(&env, args);
        let err = one_line_error(&format!("{what} by uid {}", users.outsider.uid), &out);
        assert_eq!(
            out.status.code(),
            Some(4),
            "refused by the agent: the exit status for permission denied ({err})"
        );
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
        cmd.args(helper_args(REGISTER_CHILD_TEST))
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
    let opts = reuseport_client::RegisterOptions {
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
    match rt.block_on(reuseport_client::register(socket, &opts)) {
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
