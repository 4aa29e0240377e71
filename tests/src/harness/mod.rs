//! What every test needs: an isolated environment with a running agent ([`TestEnv`]),
//! servers that answer with their generation ([`Server`]), clients that tally who answered
//! ([`tally`], [`ClientConn`]), server processes ([`ChildServer`]) and the real tools tests
//! compare against ([`ApacheBench`], [`ss`]).
//!
//! The wire protocol between test clients and test servers is one line each way:
//! the client sends `req <n>\n`, the server answers `gen <G> <n+1>\n`.

pub mod bpf_prog;
mod cgroup;
mod child;
mod chromium;
mod container;
pub mod control;
mod edge_server;
mod env;
mod events;
mod http_get;
mod namespaces;
mod netns;
mod nspawn;
mod prometheus;
mod rootfs;
mod server;
mod tools;
mod traffic;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

pub use child::{CHILD_SERVER_ENV, ChildServer, child_server_main};
pub use chromium::Chromium;
pub use container::{CONTAINER_GID, CONTAINER_UID, Container, shared_fifo};
pub use edge_server::EdgeServer;
pub use env::{
    Generation, SELECT_ONLY, SELECT_OR_MIGRATE, TestEnv, bin_path, expected_mode,
    expects_migration, in_vm, one_at_a_time, patience, select_only_env,
};
pub use events::{assert_event_sequence, has_event, launcher_events};
pub use http_get::{HttpAnswer, http_get};
pub use netns::{NetNs, current_netns_inode};
pub use nspawn::BootedSystem;
pub use prometheus::{PromSample, Prometheus, SCRAPE_INTERVAL};
pub use rootfs::{Release, debian_rootfs};
pub use server::{Server, ServerKind, accept_queue_len};
pub use tools::{AbResult, ApacheBench, SsSocket, ss, tool_missing};
pub use traffic::{ClientConn, Slow, Tally, parse_reply, request_once, slow_bound, tally};

use reuseport_proto::{GenerationStatus, GroupAddr, GroupStatus};

/// Checks a failed CLI run: non-zero exit, exactly one line on stderr; returns that line.
pub fn one_line_error(what: &str, out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} should fail, got {} (stderr {stderr:?})",
        out.status
    );
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what} should print exactly one line on stderr: {stderr:?}"
    );
    println!("{what}: {}", lines[0]);
    lines[0].to_string()
}

/// `target/` of the build under test (the test executable is `target/<profile>/deps/…`):
/// where tests keep what a person may want to look at afterwards (screenshots).
pub fn target_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("the test executable lies under target/<profile>/deps/")
        .to_path_buf()
}

/// Prints the line the VM runner looks for and lets the caller return.
pub fn skip(test: &str, reason: &str) {
    println!("SKIP: {test}: {reason}");
}

/// The size of a test's load: `host` on the host, `vm` inside a VM guest (see [`in_vm`]).
/// Prints the size used, as one line (`flips: 1000 (reduced in VM)`).
pub fn load_size(what: &str, host: u64, vm: u64) -> u64 {
    if in_vm() {
        println!("{what}: {vm} (reduced in VM; {host} on the host)");
        vm
    } else {
        println!("{what}: {host}");
        host
    }
}

/// Raises this process's RLIMIT_NOFILE (soft and, as root may, hard) to at least `n`, so
/// that a test and the agents it starts afterwards (they inherit it) hold `n` descriptors.
pub fn raise_nofile(n: u64) {
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
        lim.rlim_cur = lim.rlim_cur.max(n);
        lim.rlim_max = lim.rlim_max.max(n);
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            0,
            "raising RLIMIT_NOFILE to {n}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The group address of `127.0.0.1:port`, in the caller's namespace.
pub fn group(port: u16) -> GroupAddr {
    GroupAddr {
        addr: local(port),
        netns: None,
    }
}

/// The arguments that make this test executable run only `test`, one of its `#[ignore]`d
/// helpers (the entry point of a server or client process the tests start), with its output.
pub fn helper_args(test: &str) -> [&str; 5] {
    [
        "--exact",
        test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]
}

/// Polls `cond` every few milliseconds until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    wait_until_every(what, timeout, Duration::from_millis(5), cond);
}

/// [`wait_until`] polling every `interval`: for conditions that cost a process or two each.
pub fn wait_until_every(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(interval);
    }
}

/// Generation `generation` in `status`; panics if the agent does not list it.
pub fn generation_status(status: &GroupStatus, generation: u32) -> &GenerationStatus {
    status
        .generations
        .iter()
        .find(|g| g.generation == generation)
        .unwrap_or_else(|| panic!("status should list generation {generation}: {status:?}"))
}
