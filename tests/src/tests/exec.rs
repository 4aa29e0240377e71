//! `reuseportctl exec` runs an unmodified LISTEN_FDS server (systemd socket activation
//! conventions) as a generation; activation flips it end to end and `--on-drain` signals it.
//!
//! The server is the suite's own (`supervise::listen_fds_server`): it checks fd 3 the way
//! systemd hands it over (listening, blocking, LISTEN_PID its own) and knows nothing else.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use super::supervise::{MARKER_DIR_ENV, SERVER_ENV, SERVER_TEST, TERM_EXIT_ENV};
use crate::harness::{TestEnv, helper_args, local, patience, tally, wait_until};

/// Exit status of the server on SIGTERM: proves the launcher passes the child's status on.
const TERM_EXIT: i32 = 42;

#[test]
fn exec_runs_listen_fds_server_and_flips_end_to_end() {
    const NAME: &str = "exec_runs_listen_fds_server_and_flips_end_to_end";
    const PORT: u16 = 7701;
    let env = TestEnv::new(NAME);
    let markers = env.dir().join("markers");
    std::fs::create_dir_all(&markers).expect("create the marker dir");
    let marker1 = markers.join("sigterm-1");
    let marker2 = markers.join("sigterm-2");

    let mut launcher1 = Launcher::spawn(&env, PORT, 1, false, &markers);
    wait_until(
        "generation 1 is registered by reuseportctl exec",
        patience(Duration::from_secs(15)),
        || {
            launcher1.assert_running();
            env.try_status(PORT).is_some_and(|s| s.active == Some(1))
        },
    );
    let t = tally(local(PORT), 50);
    assert_eq!(
        t.of(1),
        50,
        "before the flip, new connections should reach generation 1: {t}"
    );

    let mut launcher2 = Launcher::spawn(&env, PORT, 2, true, &markers);
    wait_until(
        "generation 2 is registered and active",
        patience(Duration::from_secs(15)),
        || {
            launcher2.assert_running();
            env.try_status(PORT).is_some_and(|s| s.active == Some(2))
        },
    );
    let t = tally(local(PORT), 50);
    assert_eq!(
        t.failed, 0,
        "every connection should be answered after the flip: {t}"
    );
    assert_eq!(
        t.of(2),
        50,
        "after --activate, new connections should reach generation 2: {t}"
    );

    let status = launcher1.wait_exit(patience(Duration::from_secs(15))).unwrap_or_else(|| {
        panic!(
            "generation 1's launcher should exit once its server got SIGTERM (--on-drain TERM); log:\n{}",
            launcher1.log()
        )
    });
    assert!(
        marker1.exists(),
        "generation 1's server should have received SIGTERM when it started draining; log:\n{}",
        launcher1.log()
    );
    assert_eq!(
        status.code(),
        Some(TERM_EXIT),
        "the launcher should exit with its child's status ({TERM_EXIT}), got {status}; log:\n{}",
        launcher1.log()
    );
    assert!(
        !marker2.exists(),
        "active generation 2 should not be signalled"
    );

    let t = tally(local(PORT), 50);
    assert_eq!(
        t.of(2),
        50,
        "generation 2 should keep serving after generation 1 exited: {t}"
    );
    launcher2.assert_running();
}

/// `reuseportctl exec … -- <the suite's LISTEN_FDS server>`, in its own process group.
struct Launcher {
    child: Option<Child>,
    generation: u32,
    log: PathBuf,
}

impl Launcher {
    fn spawn(env: &TestEnv, port: u16, generation: u32, activate: bool, markers: &Path) -> Self {
        let log_path = env.dir().join(format!("exec-gen{generation}.log"));
        let log = File::create(&log_path).expect("launcher log");
        let mut cmd = env.ctl_command();
        cmd.args([
            "exec",
            "--listen",
            &local(port).to_string(),
            "--generation",
            &generation.to_string(),
        ])
        .args(["--name", &format!("fds{generation}"), "--on-drain", "TERM"]);
        if activate {
            cmd.arg("--activate");
        }
        let child = cmd
            .arg("--")
            .arg(std::env::current_exe().expect("current_exe"))
            .args(helper_args(SERVER_TEST))
            .env(SERVER_ENV, "1")
            .env("REUSEPORT_GENERATION", generation.to_string())
            .env(MARKER_DIR_ENV, markers)
            .env(TERM_EXIT_ENV, TERM_EXIT.to_string())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn reuseportctl exec");
        Self {
            child: Some(child),
            generation,
            log: log_path,
        }
    }

    /// What the launcher and its server wrote.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
        {
            panic!(
                "reuseportctl exec for generation {} exited early ({status}); log:\n{}",
                self.generation,
                self.log()
            );
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The whole group: the launcher and the server it started.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- reuseportctl exec, generation {} ---\n{}",
                self.generation,
                self.log()
            );
        }
    }
}
