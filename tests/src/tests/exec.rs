//! `reuseportctl exec` runs an unmodified LISTEN_FDS server (systemd socket activation
//! conventions) as a generation; activation flips it end to end and `--on-drain` signals it.
//!
//! The server is the suite's own (`supervise::listen_fds_server`): it checks fd 3 the way
//! systemd hands it over (listening, blocking, LISTEN_PID its own) and knows nothing else.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use serde_json::{Value, json};

use super::supervise::{Load, MARKER_DIR_ENV, SERVER_ENV, SERVER_TEST, TERM_EXIT_ENV};
use crate::harness::{
    TestEnv, assert_event_sequence, bin_path, helper_args, launcher_events, local, patience, tally,
    wait_until,
};

/// Exit status of the server on SIGTERM: proves the launcher passes the child's status on.
const TERM_EXIT: i32 = 42;
/// A step of a deploy: registration, the flip, the old generation's drain and exit.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn exec_runs_listen_fds_server_and_flips_end_to_end() {
    const NAME: &str = "exec_runs_listen_fds_server_and_flips_end_to_end";
    const PORT: u16 = 7701;
    let env = TestEnv::new(NAME);
    let markers = env.dir().join("markers");
    std::fs::create_dir_all(&markers).expect("create the marker dir");
    let marker1 = markers.join("sigterm-1");
    let marker2 = markers.join("sigterm-2");

    let mut launcher1 = Launcher::spawn(&env, PORT, 1, false, &markers, None);
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

    let mut launcher2 = Launcher::spawn(&env, PORT, 2, true, &markers, None);
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

/// `exec --json` under load: each launcher's stdout is its events alone (the server's own
/// output goes to stderr), from the start to the exit of its server, with the generation's
/// numbers, and the deploy loses no request.
#[test]
fn exec_json_reports_each_step_of_a_deploy_under_load() {
    const NAME: &str = "exec_json_reports_each_step_of_a_deploy_under_load";
    const PORT: u16 = 7702;
    let env = TestEnv::new(NAME);
    let markers = env.dir().join("markers");
    std::fs::create_dir_all(&markers).expect("create the marker dir");
    let events = |generation: u32| env.dir().join(format!("events-{generation}.jsonl"));

    let mut launcher1 = Launcher::spawn(&env, PORT, 1, false, &markers, Some(&events(1)));
    wait_until("generation 1 is active", patience(STEP_TIMEOUT), || {
        launcher1.assert_running();
        env.try_status(PORT).is_some_and(|s| s.active == Some(1))
    });
    let load = Load::start(PORT, 4);
    wait_until("generation 1 answers", patience(STEP_TIMEOUT), || {
        load.snapshot().of(1) > 0
    });

    let mut launcher2 = Launcher::spawn(&env, PORT, 2, true, &markers, Some(&events(2)));
    let status = launcher1
        .wait_exit(patience(STEP_TIMEOUT))
        .unwrap_or_else(|| {
            panic!(
                "generation 1 should drain and exit; log:\n{}",
                launcher1.log()
            )
        });
    assert_eq!(status.code(), Some(TERM_EXIT), "{}", launcher1.log());
    wait_until("generation 2 answers", patience(STEP_TIMEOUT), || {
        launcher2.assert_running();
        load.snapshot().of(2) > 0
    });
    let t = load.stop();
    println!("{NAME}: {t}");
    assert_eq!(t.failed, 0, "no request may fail through the deploy: {t}");

    let first = launcher_events(&events(1));
    let steps = assert_event_sequence(
        &first,
        &[
            json!({"event": "started", "generation": 1, "state": "active"}),
            json!({"event": "state", "generation": 1, "state": "draining"}),
            json!({"event": "signalled", "generation": 1, "signal": "SIGTERM", "reason": "idle", "in_flight": 0}),
            json!({"event": "exited", "generation": 1, "status": TERM_EXIT, "code": TERM_EXIT, "signal": null, "phase": "draining"}),
        ],
    );
    let group = steps[0]["groups"][0].as_str().unwrap_or_default();
    assert!(
        group.starts_with(&format!("tcp://{}@", local(PORT))),
        "started should name the group by its full key: {}",
        steps[0]
    );
    // started, signalled and exited name the server.
    let pids: Vec<&Value> = [0, 2, 3].iter().map(|&i| &steps[i]["pid"]).collect();
    assert!(
        pids.iter().all(|p| p.is_i64() && *p == pids[0]),
        "every event should name generation 1's server: {pids:?}"
    );
    assert_eq!(
        first.last(),
        Some(steps[3]),
        "the server's exit should be the launcher's last event"
    );

    let status = launcher2.stop(Signal::SIGTERM, patience(STEP_TIMEOUT));
    assert_eq!(status.code(), Some(TERM_EXIT), "{}", launcher2.log());
    assert_event_sequence(
        &launcher_events(&events(2)),
        &[
            json!({"event": "started", "generation": 2, "state": "active"}),
            json!({"event": "exited", "generation": 2, "status": TERM_EXIT, "phase": "active"}),
        ],
    );
    assert!(
        launcher1.log().contains("running 1 test"),
        "the server's own stdout should reach the launcher's stderr: {}",
        launcher1.log()
    );
}

/// A launcher under `--json` that fails reports it as one `error` event with the exit
/// status it exits with, and nothing on stderr.
#[test]
fn exec_json_reports_a_failure_as_one_error_event() {
    const NAME: &str = "exec_json_reports_a_failure_as_one_error_event";
    let _env = TestEnv::new(NAME);
    let out = Command::new(bin_path("reuseportctl"))
        .args(["--control", "/nonexistent/agent.sock"])
        .args([
            "exec",
            "--json",
            "--listen",
            "127.0.0.1:7703",
            "-g",
            "1",
            "--",
        ])
        // Any program that exists: the failure must be the agent's absence.
        .arg(std::env::current_exe().expect("current_exe"))
        .output()
        .expect("run reuseportctl exec");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "agent not running: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one event: {stdout}");
    let event: Value = serde_json::from_str(lines[0]).expect("the error event is JSON");
    assert_eq!(event["event"], "error", "{event}");
    assert_eq!(event["exit_status"], 3, "{event}");
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("/nonexistent/agent.sock")),
        "the message should say which control socket: {event}"
    );
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr under --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `reuseportctl exec … -- <the suite's LISTEN_FDS server>`, in its own process group.
struct Launcher {
    child: Option<Child>,
    generation: u32,
    log: PathBuf,
}

impl Launcher {
    /// With `events`, the launcher runs with `--json` and its stdout goes there.
    fn spawn(
        env: &TestEnv,
        port: u16,
        generation: u32,
        activate: bool,
        markers: &Path,
        events: Option<&Path>,
    ) -> Self {
        let log_path = env.dir().join(format!("exec-gen{generation}.log"));
        let log = File::create(&log_path).expect("launcher log");
        let stdout = match events {
            Some(path) => File::create(path).expect("launcher events"),
            None => log.try_clone().expect("dup log"),
        };
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
        if events.is_some() {
            cmd.arg("--json");
        }
        let child = cmd
            .arg("--")
            .arg(std::env::current_exe().expect("current_exe"))
            .args(helper_args(SERVER_TEST))
            .env(SERVER_ENV, "1")
            .env("REUSEPORT_GENERATION", generation.to_string())
            .env(MARKER_DIR_ENV, markers)
            .env(TERM_EXIT_ENV, TERM_EXIT.to_string())
            .stdout(stdout)
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

    /// Sends `sig` to the launcher and waits for it to exit.
    fn stop(&mut self, sig: Signal, timeout: Duration) -> ExitStatus {
        let pid = Pid::from_raw(self.child.as_ref().expect("launcher").id() as i32);
        kill(pid, sig).expect("signal the launcher");
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "the launcher should exit within {timeout:?} of {sig}; log:\n{}",
                self.log()
            )
        })
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
