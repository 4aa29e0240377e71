//! The agent's bpffs is its own: mounted 0700 when the agent mounts it, its directory 0700 and
//! refused when another user owns it, and no symbolic link under it is ever followed.

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
    // NB: this test's own mount namespace: the host's bpffs (if any) is not touched.
    umount2("/sys/fs/bpf", MntFlags::MNT_DETACH).expect("unmount the test's bpffs");
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
