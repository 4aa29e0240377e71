//! `reuseportctl supervise` as a systemd unit's main process speaks sd_notify to the
//! `NOTIFY_SOCKET` it was given: the test plays the service manager. `READY=1` comes once
//! generation 1 is active; a SIGHUP (what `systemctl reload` sends under `Type=notify-reload`)
//! brings `RELOADING=1` with a `MONOTONIC_USEC` taken after it, then `READY=1` once the new
//! generation is active, or once it has failed, with the failure in `STATUS=`; SIGTERM brings
//! `STOPPING=1`. Every message comes from supervise itself: its servers never get the
//! manager's socket (under `NotifyAccess=all` their `READY=1` would end a reload early).
//!
//! The systemd test (`systemd.rs`) runs the same under a real systemd, on the host only.

use std::{
    io::IoSliceMut,
    os::{fd::AsRawFd, unix::net::UnixDatagram},
    path::Path,
    time::Duration,
};

use nix::{
    cmsg_space,
    sys::{
        signal::Signal,
        socket::{
            ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials, recvmsg, setsockopt,
            sockopt::PassCred,
        },
        time::TimeSpec,
    },
    time::{ClockId, clock_gettime},
};

use super::supervise::{FAIL_GENERATION_ENV, SERVER_ENV, SERVER_TEST, Supervisor};
use crate::harness::{TestEnv, patience};

/// How long one step may take (a generation's start, readiness and activation).
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn supervise_tells_the_service_manager_ready_reloading_and_stopping() {
    const NAME: &str = "supervise_tells_the_service_manager_ready_reloading_and_stopping";
    const PORT: u16 = 7831;
    let env = TestEnv::new(NAME);
    let manager = Manager::bind(&env.dir().join("notify.sock"));
    let socket = manager.path.clone();
    let mut sup = Supervisor::spawn_server(
        &env,
        PORT,
        &["--ready", "notify"],
        SERVER_TEST,
        (SERVER_ENV, "1"),
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &socket)
                .env(FAIL_GENERATION_ENV, "3");
        },
    );
    let pid = sup.pid().as_raw();

    let ready = manager.until(pid, "READY=1", &sup);
    assert_eq!(
        env.status(PORT).active,
        Some(1),
        "READY=1 should come once generation 1 is active: {ready:?}"
    );
    assert_status(&ready, "generation 1 active");

    // A deploy that works.
    let before = monotonic_usec();
    sup.signal(Signal::SIGHUP);
    let reloading = manager.until(pid, "RELOADING=1", &sup);
    assert_reloading(&reloading, before);
    let ready = manager.until(pid, "READY=1", &sup);
    assert_eq!(
        env.status(PORT).active,
        Some(2),
        "READY=1 after RELOADING=1 should come once generation 2 is active: {ready:?}"
    );
    assert_status(&ready, "generation 2 active");

    // A deploy that fails: generation 3 exits before it is ready. The reload is over all the
    // same, generation 2 serves on, and the status line says why.
    let before = monotonic_usec();
    sup.signal(Signal::SIGHUP);
    let reloading = manager.until(pid, "RELOADING=1", &sup);
    assert_reloading(&reloading, before);
    let ready = manager.until(pid, "READY=1", &sup);
    assert_eq!(
        env.status(PORT).active,
        Some(2),
        "generation 2 should serve on after generation 3 failed: {ready:?}"
    );
    assert_status(&ready, "generation 2 active");
    assert_status(
        &ready,
        "last restart failed: generation 3 exited with status 1",
    );

    sup.signal(Signal::SIGTERM);
    manager.until(pid, "STOPPING=1", &sup);
    let status = sup.stop(Signal::SIGTERM, patience(STEP_TIMEOUT));
    assert_eq!(status.code(), Some(0), "log:\n{}", sup.log());
}

/// The service manager's end of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Manager {
    fn bind(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind the notification socket");
        // The sender's pid comes with each message, as systemd checks NotifyAccess=main.
        setsockopt(&socket, PassCred, &true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(patience(STEP_TIMEOUT)))
            .expect("a read time-out");
        Self {
            socket,
            path: path.to_owned(),
        }
    }

    /// The next message, checked to come from `pid`.
    fn next(&self, pid: i32, sup: &Supervisor) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = cmsg_space!(UnixCredentials);
        let msg = recvmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap_or_else(|e| {
            panic!(
                "no sd_notify message within {:?}: {e}; log:\n{}",
                patience(STEP_TIMEOUT),
                sup.log()
            )
        });
        let sender = msg
            .cmsgs()
            .expect("control messages")
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid()),
                _ => None,
            });
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        assert_eq!(
            sender,
            Some(pid),
            "only supervise (pid {pid}) should use the manager's socket, not its servers: \
             {text:?}"
        );
        text.lines().map(str::to_owned).collect()
    }

    /// Messages until one holds the line `wanted`; that one. Only `STATUS=` updates may come
    /// before it (a `READY=1` would end a reload, or say ready while stopping).
    fn until(&self, pid: i32, wanted: &str, sup: &Supervisor) -> Vec<String> {
        loop {
            let message = self.next(pid, sup);
            if message.iter().any(|l| l == wanted) {
                return message;
            }
            assert!(
                message.iter().all(|l| l.starts_with("STATUS=")),
                "only STATUS= updates should come before {wanted}: {message:?}"
            );
        }
    }
}

fn monotonic_usec() -> u64 {
    let now: TimeSpec = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
}

/// `RELOADING=1` with the time it began: after the SIGHUP (systemd 253+ takes it as the
/// answer to its signal only then).
fn assert_reloading(message: &[String], before_usec: u64) {
    let at: u64 = message
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 should come with MONOTONIC_USEC: {message:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        at >= before_usec,
        "MONOTONIC_USEC ({at}) should be taken after the SIGHUP (sent at {before_usec})"
    );
}

fn assert_status(message: &[String], wanted: &str) {
    assert!(
        message
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains(wanted)),
        "the message should have a STATUS= line with {wanted:?}: {message:?}"
    );
}
