//! [`ChildServer`]: a generation served by another process, so a test can SIGKILL it.
//!
//! The child is this same test executable, re-run with a filter that selects only the
//! ignored test `tests::child_process::serve_generation` and [`CHILD_SERVER_ENV`] set: that
//! keeps the test suite ONE executable (the VM runner ships nothing else). The child binds and
//! registers through the client library, prints `READY slot=<n>` and serves until killed.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use reuseport_client::{self as client, Register, RegisterOptions};

use super::{Server, ServerKind, TestEnv, group, helper_args, patience};

/// `<port> <generation> <activate: 0|1> <control path>`.
pub const CHILD_SERVER_ENV: &str = "REUSEPORT_TEST_CHILD_SERVER";

const CHILD_TEST: &str = "tests::child_process::serve_generation";
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A server process for one generation, in its own process group (killed on drop).
pub struct ChildServer {
    child: Option<Child>,
    pub slot: u32,
}

impl ChildServer {
    pub fn spawn(env: &TestEnv, port: u16, generation: u32, activate: bool) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let log =
            File::create(env.dir().join(format!("child-gen{generation}.log"))).expect("child log");
        let mut child = Command::new(exe)
            .args(helper_args(CHILD_TEST))
            .env(
                CHILD_SERVER_ENV,
                format!(
                    "{port} {generation} {} {}",
                    u8::from(activate),
                    env.control_path().display()
                ),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn child server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut this = Self {
            child: Some(child),
            slot: 0,
        };
        loop {
            match rx.recv_timeout(patience(CHILD_READY_TIMEOUT)) {
                Ok(line) => {
                    // NB: libtest prints "test … ... " before the test's own output, on the same line.
                    if let Some((_, slot)) = line.split_once("READY slot=") {
                        this.slot = slot.trim().parse().expect("slot number");
                        return this;
                    }
                }
                Err(e) => panic!(
                    "child server for generation {generation} did not get ready ({e}); its log:\n{}",
                    std::fs::read_to_string(env.dir().join(format!("child-gen{generation}.log")))
                        .unwrap_or_default()
                ),
            }
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("child").id() as i32)
    }

    /// SIGKILLs the child and reaps it: once this returns, its sockets are closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Body of the child process (see the module doc). Returns only if [`CHILD_SERVER_ENV`] is
/// unset, i.e. when the ignored test is run by hand.
pub fn child_server_main() {
    let Ok(spec) = std::env::var(CHILD_SERVER_ENV) else {
        return;
    };
    let mut parts = spec.splitn(4, ' ');
    let mut next = || parts.next().expect("malformed child spec");
    let port: u16 = next().parse().expect("port");
    let generation: u32 = next().parse().expect("generation");
    let activate = next() == "1";
    let control = next().into();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opts = RegisterOptions {
        control,
        request: Register {
            name: Some(format!("child-gen{generation}")),
            activate,
            ..Register::new(group(port), generation)
        },
        reconnect: true,
    };
    let (listener, registration) = rt
        .block_on(client::bind_and_register(&opts))
        .expect("child: bind and register");
    let listener = listener.into_std().expect("into_std");
    let _server = Server::start(ServerKind::Tokio, listener, generation, rt.handle());
    println!("READY slot={}", registration.slot());
    loop {
        std::thread::park();
    }
}
