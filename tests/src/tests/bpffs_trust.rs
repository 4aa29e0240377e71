//! The agent's bpffs is its own: mounted 0700 when the agent mounts it, its directory 0700 and
//! refused when another user owns it, no symbolic link under it is ever followed, and of two
//! agents started on it, the one that does not get its lock touches nothing of the other's.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use nix::mount::{MntFlags, umount2};

use crate::harness::{ServerKind, TestEnv, bin_path, local, tally, wait_until};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs an agent of its own on `control` and `bpffs` until it is ready (or exits).
fn start_agent(control: &Path, bpffs: &Path) -> std::process::Child {
    Command::new(bin_path("reuseport-agent"))
        .arg("--control")
        .arg(control)
        .arg("--bpffs")
        .arg(bpffs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reuseport-agent")
}

#[test]
fn an_agent_mounting_bpffs_mounts_it_private() {
    let env = TestEnv::new("an_agent_mounting_bpffs_mounts_it_private");
    // NB: this test's own mount namespace: the host's bpffs (if any) is not touched. Every
    // bpffs stacked there goes: a VM guest's init mounts one below the test's own.
    while nix::sys::statfs::statfs("/sys/fs/bpf")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    {
        umount2("/sys/fs/bpf", MntFlags::MNT_DETACH).expect("unmount a bpffs");
    }
    let control = env.dir().join("own.sock");
    let bpffs = Path::new("/sys/fs/bpf/reuseport");
    let mut agent = start_agent(&control, bpffs);
    wait_until(
        "the second agent accepts on its control socket",
        Duration::from_secs(15),
        || {
            assert!(
                agent.try_wait().expect("try_wait").is_none(),
                "the agent should start"
            );
            std::os::unix::net::UnixStream::connect(&control).is_ok()
        },
    );
    let root_mode = mode(Path::new("/sys/fs/bpf"));
    let dir_mode = mode(bpffs);
    let _ = agent.kill();
    let _ = agent.wait();
    println!("bpffs root mode {root_mode:o}, agent directory mode {dir_mode:o}");
    // NB: bpffs always adds the sticky bit to its root.
    assert_eq!(
        root_mode & 0o777,
        0o700,
        "bpffs mounted by the agent should be mode 0700"
    );
    assert_eq!(dir_mode, 0o700, "the agent's directory should be mode 0700");
}

#[test]
fn an_agent_refuses_a_bpffs_directory_of_another_user() {
    let env = TestEnv::new("an_agent_refuses_a_bpffs_directory_of_another_user");
    let theirs = env.bpffs_path().parent().expect("parent").join("theirs");
    std::fs::create_dir(&theirs).expect("create a directory");
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(4242)), None).expect("chown");
    let mut agent = start_agent(&env.dir().join("theirs.sock"), &theirs);
    let exited = (0..1500).find_map(|_| {
        let status = agent.try_wait().expect("try_wait");
        if status.is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    });
    if exited.is_none() {
        let _ = agent.kill();
    }
    let out = agent.wait_with_output().expect("agent output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(
        exited.is_some_and(|s| !s.success()) && stderr.contains("belongs to uid 4242"),
        "an agent should refuse a bpffs directory owned by another user: {stderr}"
    );
}

#[test]
fn a_symlink_named_after_a_group_is_never_followed() {
    const PORT: u16 = 9601;
    let mut env = TestEnv::new("a_symlink_named_after_a_group_is_never_followed");
    let _victim = env.serve(PORT, 1, ServerKind::Tokio, false);
    let bpffs = env.bpffs_path().to_path_buf();
    let victim_dir = std::fs::read_dir(&bpffs)
        .expect("list the agent's directory")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(&format!("_{PORT}_")))
        .expect("the victim group's pin directory");
    let pins_before: Vec<_> = std::fs::read_dir(&victim_dir)
        .expect("list the victim's pins")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    // A link named after the next group's pin directory, pointing at the victim's.
    let next = victim_dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .replace(&format!("_{PORT}_"), &format!("_{}_", PORT + 1));
    let link = bpffs.join(&next);
    std::os::unix::fs::symlink(&victim_dir, &link).expect("plant the link");
    let _next = env.serve(PORT + 1, 1, ServerKind::Tokio, false);
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("the new group's pin directory")
            .file_type()
            .is_dir(),
        "the new group's pins should be in a directory of its own, not behind the link"
    );
    let pins_after: Vec<_> = std::fs::read_dir(&victim_dir)
        .expect("list the victim's pins")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        pins_after.len(),
        pins_before.len(),
        "the victim's pins should be untouched"
    );
    // Its record too: an agent adopting the pins gets both groups back as they were.
    env.kill_agent();
    env.restart_agent(&[]);
    env.wait_all_registered(Duration::from_secs(15));
    for port in [PORT, PORT + 1] {
        assert_eq!(env.status(port).active, Some(1), "group on port {port}");
        let t = tally(local(port), 20);
        assert_eq!(t.of(1), 20, "port {port}: {t}");
    }
}

/// An agent process of the test's own on the environment's control socket and bpffs, its
/// stderr in `log`; killed on drop.
struct Contender {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Contender {
    fn start(env: &TestEnv, tag: &str, extra_env: &[(&str, &str)]) -> Self {
        let log = env.dir().join(format!("{tag}.log"));
        let child = Command::new(bin_path("reuseport-agent"))
            .arg("--control")
            .arg(env.control_path())
            .arg("--bpffs")
            .arg(env.bpffs_path())
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("spawn reuseport-agent");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_agent_that_loses_the_bpffs_lock_leaves_the_winners_control_socket_alone() {
    const PORT: u16 = 9611;
    const TIMEOUT: Duration = Duration::from_secs(30);
    let mut env = TestEnv::new("an_agent_that_loses_the_bpffs_lock_leaves_the_winners_socket");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    // A dead agent's socket file and pins: both agents below start over them.
    env.kill_agent();
    let release = env.dir().join("release");
    let release_path = release.to_string_lossy().into_owned();
    // The first agent stops right after it found the control socket stale, before it
    // removes it (as a slow start would); the second starts meanwhile.
    let mut first = Contender::start(
        &env,
        "first",
        &[
            ("REUSEPORT_FAULT_HOLD", "control.stale-found"),
            ("REUSEPORT_FAULT_RELEASE", &release_path),
        ],
    );
    wait_until(
        "the first agent holds at the stale control socket",
        TIMEOUT,
        || {
            first
                .log()
                .contains("fault injection: holding at control.stale-found")
        },
    );
    let mut second = Contender::start(&env, "second", &[]);
    let connects = || std::os::unix::net::UnixStream::connect(env.control_path()).is_ok();
    wait_until("the second agent gave up or listens", TIMEOUT, || {
        second.exited() || connects()
    });
    std::fs::write(&release, b"").expect("release the first agent");
    wait_until("the first agent gave up or listens", TIMEOUT, || {
        first.exited() || (second.exited() && connects())
    });
    let (winner, loser) = match (first.exited(), second.exited()) {
        (false, true) => (&first, &second),
        (true, false) => (&second, &first),
        other => panic!("exactly one agent should run, got (exited) {other:?}"),
    };
    println!("the loser: {}", loser.log().trim_end());
    assert!(
        loser
            .log()
            .contains("another reuseport-agent already manages"),
        "the loser should say another agent manages the directory: {}",
        loser.log()
    );
    let status = env.block_on(async {
        let mut c = reuseport_client::ControlClient::connect(env.control_path()).await?;
        c.status(None).await
    });
    let groups = status.unwrap_or_else(|e| {
        panic!(
            "the running agent's control socket should answer: the agent that lost the bpffs \
             lock must not have replaced it ({e}); the winner's log:\n{}",
            winner.log()
        )
    });
    assert_eq!(groups.len(), 1, "the winner adopted the group: {groups:?}");
    assert_eq!(groups[0].active, Some(1));
}
