//! `reuseportctl exec` runs an unmodified LISTEN_FDS server (systemd socket activation
//! conventions) as a generation; activation flips it end to end and `--on-drain` signals it.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::harness::{TestEnv, local, skip, tally, wait_until};

/// A server that knows nothing about reuseport: it takes fd 3 as systemd would hand it over.
const SERVER_PY: &str = r#"
import fcntl, os, signal, socket, sys

generation, marker = sys.argv[1], sys.argv[2]
assert os.environ.get("LISTEN_FDS") == "1", "LISTEN_FDS=%r" % os.environ.get("LISTEN_FDS")
assert int(os.environ.get("LISTEN_PID", "0")) == os.getpid(), "LISTEN_PID=%r, pid %d" % (
    os.environ.get("LISTEN_PID"), os.getpid())

def on_term(signum, frame):
    with open(marker, "w") as f:
        f.write("SIGTERM\n")
    os._exit(42)

signal.signal(signal.SIGTERM, on_term)
# NB: systemd hands listeners over blocking (unless NonBlocking=true): servers rely on it.
assert not fcntl.fcntl(3, fcntl.F_GETFL) & os.O_NONBLOCK, "fd 3 is O_NONBLOCK; a LISTEN_FDS server expects a blocking listener"
listener = socket.socket(fileno=3)
assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1, "fd 3 is not listening"
print("generation %s serving on %r" % (generation, listener.getsockname()), file=sys.stderr, flush=True)
while True:
    conn, _ = listener.accept()
    with conn, conn.makefile("rwb") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0] == b"req":
                f.write(b"gen %s %d\n" % (generation.encode(), int(parts[1]) + 1))
                f.flush()
"#;

/// Exit status of the server on SIGTERM: proves the launcher passes the child's status on.
const TERM_EXIT: i32 = 42;

#[test]
fn exec_runs_listen_fds_server_and_flips_end_to_end() {
    const NAME: &str = "exec_runs_listen_fds_server_and_flips_end_to_end";
    const PORT: u16 = 7701;
    if !python3_available() {
        return skip(NAME, "python3 not available");
    }
    let env = TestEnv::new(NAME);
    let script = env.dir().join("server.py");
    std::fs::write(&script, SERVER_PY).expect("write server.py");
    let marker1 = env.dir().join("gen1.sigterm");
    let marker2 = env.dir().join("gen2.sigterm");

    let mut launcher1 = Launcher::spawn(&env, PORT, 1, false, &script, &marker1);
    wait_until(
        "generation 1 is registered by reuseportctl exec",
        Duration::from_secs(15),
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

    let mut launcher2 = Launcher::spawn(&env, PORT, 2, true, &script, &marker2);
    wait_until(
        "generation 2 is registered and active",
        Duration::from_secs(15),
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

    let status = launcher1.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| {
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

fn python3_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `reuseportctl exec … -- python3 server.py GEN MARKER`, in its own process group.
struct Launcher {
    child: Option<Child>,
    generation: u32,
    log: PathBuf,
}

impl Launcher {
    fn spawn(
        env: &TestEnv,
        port: u16,
        generation: u32,
        activate: bool,
        script: &Path,
        marker: &Path,
    ) -> Self {
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
        .args(["--name", &format!("py{generation}"), "--on-drain", "TERM"]);
        if activate {
            cmd.arg("--activate");
        }
        let child = cmd
            .arg("--")
            .arg("python3")
            .arg(script)
            .arg(generation.to_string())
            .arg(marker)
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
            // The whole group: the launcher and the Python server it started.
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
