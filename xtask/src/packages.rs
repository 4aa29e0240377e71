//! Debian packages the tasks need at run time, installed on first use: a fresh CI machine has
//! none of them, and nothing installed on a machine by hand survives to the next one.

use std::process::Command;

use anyhow::Context as _;

use crate::vm::cmd::run_quiet;

/// A program looked for on PATH and the Debian package that provides it.
pub type Tool = (&'static str, &'static str);

/// Real clients and servers the integration tests drive (each test that needs one fails, not
/// skips, on the host when it is missing: `cargo xtask test` installs them first).
pub const TEST_TOOLS: &[Tool] = &[
    ("ab", "apache2-utils"),
    ("wrk", "wrk"),
    ("python3", "python3"),
    ("ss", "iproute2"),
    // The systemd test builds a Debian root file system and boots it (tests/src/harness/
    // rootfs.rs, nspawn.rs).
    ("debootstrap", "debootstrap"),
    ("systemd-nspawn", "systemd-container"),
    ("nsenter", "util-linux"),
    // A real server that binds its own SO_REUSEPORT sockets (tests/src/tests/running_servers.rs).
    ("nginx", "nginx-light"),
    // The metrics tests scrape the agent with a real Prometheus and load its status page in a
    // real browser (tests/src/tests/metrics.rs).
    ("prometheus", "prometheus"),
    ("chromium", "chromium"),
];

/// Installs the packages of every tool in `tools` that is not on PATH (`who` names the task in
/// the message); a no-op when all are present.
pub fn ensure(who: &str, tools: &[Tool]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    install(who, &missing)
}

/// NB: another run on the machine may be installing at the same time; apt-get refuses at once
/// when dpkg's lock is taken unless told to wait.
const WAIT_FOR_LOCK: [&str; 2] = ["-o", "DPkg::Lock::Timeout=600"];

/// `apt-get install` of `packages` (nothing when empty), with one `apt-get update` first if the
/// package lists do not know them yet.
pub fn install(who: &str, packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!("{who}: installing {}", packages.join(" "));
    let install = || {
        run_quiet(
            Command::new("apt-get")
                .args(WAIT_FOR_LOCK)
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // NB: a machine that never ran `apt-get update` has no package lists: retry after one.
    install()
        .or_else(|_| {
            run_quiet(
                Command::new("apt-get")
                    .args(WAIT_FOR_LOCK)
                    .args(["update", "-q"]),
            )?;
            install()
        })
        .with_context(|| format!("installing {}", packages.join(" ")))
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
