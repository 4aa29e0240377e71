//! The control socket's file: created without a window, never through a symbolic link, a
//! dead agent's replaced and a live agent's left alone.

use std::{
    io::{self, Read},
    os::unix::{
        fs::{FileTypeExt as _, PermissionsExt as _},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{TestEnv, bin_path, one_line_error, wait_until};

use crate::harness::control::ANSWER_TIMEOUT;

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
