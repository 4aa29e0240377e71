//! The product the way operators run it: a Debian 12 whose PID 1 is a real systemd (booted
//! under systemd-nspawn, see [`BootedSystem`]), the agent as `reuseport-agent.service`, a
//! server as `reuseport-supervise@demo.service` (the units of `packaging/`, as installed),
//! and under ApacheBench load: `systemctl reload` deploys a new generation and `systemctl
//! restart reuseport-agent` restarts the agent, each without a failed request.
//!
//! The server is this test executable again (the drain tests' HTTP server: 50 ms per request
//! and no SIGTERM handler, so every flip has requests in flight and a server signalled before
//! it is idle loses them). It runs as `nobody` with the control group `reuseport` as a
//! supplementary group: the agent must read a process of another uid for its live figures,
//! with no more capabilities than its unit keeps.
//!
//! Host only: the guests of the kernel matrix have no systemd and no Debian root file system.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::mount::{MsFlags, mount};
use serde_json::Value;

use super::drain::{SERVER_ENV, SERVER_TEST};
use crate::harness::{
    ApacheBench, BootedSystem, bin_path, debian_rootfs, helper_args, in_vm, local, one_at_a_time,
    skip, wait_until_every,
};

const PORT: u16 = 8080;
/// What a step may take: a deploy (readiness, flip, the old generation's drain and exit), the
/// agent's restart and its clients' return.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests a generation answers (our counters in the kernel) before the next step, so each
/// step happens under load.
const REQUESTS_PER_STEP: u64 = 50;
/// How often a step's state is polled (each poll runs `reuseportctl` in the container).
const POLL: Duration = Duration::from_millis(50);
/// Where the test executable is bound in the container.
const SERVER_EXE: &str = "/usr/local/lib/reuseport-tests/server";

#[test]
fn systemd_reload_and_agent_restart_under_load_lose_nothing() {
    const NAME: &str = "systemd_reload_and_agent_restart_under_load_lose_nothing";
    if in_vm() {
        skip(
            NAME,
            "the VM guests have no systemd and no Debian root file system",
        );
        return;
    }
    let rootfs = debian_rootfs();
    let _one = one_at_a_time();
    let system = BootedSystem::boot(NAME, &rootfs, install);
    // What the package's maintainer scripts do.
    system.ok(&["systemd-sysusers", "reuseport.conf"]);
    system.ok(&["systemctl", "daemon-reload"]);

    system.ok(&["systemctl", "start", "reuseport-agent.service"]);
    wait_until_every("the agent answers status", STEP_TIMEOUT, POLL, || {
        system.exec(&["reuseportctl", "status"]).status.success()
    });
    system.ok(&["systemctl", "start", "reuseport-supervise@demo.service"]);
    wait_for_generation(&system, 1);

    let mut ab = ApacheBench::start_with(local(PORT), 8, |cmd| system.in_network(cmd));
    wait_selected(&system, &mut ab, 1, REQUESTS_PER_STEP);

    system.ok(&["systemctl", "reload", "reuseport-supervise@demo.service"]);
    wait_for_generation(&system, 2);
    wait_selected(&system, &mut ab, 2, REQUESTS_PER_STEP);

    let before = selected(&status(&system), 2);
    system.ok(&["systemctl", "restart", "reuseport-agent.service"]);
    wait_until_every(
        "the restarted agent adopted the group and supervise registered again",
        STEP_TIMEOUT,
        POLL,
        || {
            let out = system.exec(&["reuseportctl", "status", "--json"]);
            out.status.success() && {
                let groups: Value = serde_json::from_slice(&out.stdout).expect("status --json");
                let sockets: Vec<&Value> = sockets(&groups);
                !sockets.is_empty() && sockets.iter().all(|s| s["registered"] != false)
            }
        },
    );
    wait_selected(&system, &mut ab, 2, before + REQUESTS_PER_STEP);

    let result = ab.stop();
    println!("{NAME}: {result}");
    assert!(result.complete > 0, "ab should have completed requests");
    assert_eq!(
        result.failures(),
        0,
        "no request may fail through systemctl reload and systemctl restart of the agent: \
         {result}\n{}",
        system.sh("journalctl --no-pager -n 60 -u reuseport-agent -u 'reuseport-supervise@*'")
    );

    // Nothing the agent does may be refused for want of a capability or by the sandbox.
    let log = system.ok(&[
        "journalctl",
        "--no-pager",
        "--output=cat",
        "-u",
        "reuseport-agent",
    ]);
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        warnings.is_empty(),
        "the agent should run without warnings under its unit's sandbox:\n{}",
        warnings.join("\n")
    );

    let agent = system_status(&system, "reuseport-agent.service");
    assert!(
        agent.contains("Active: active (running)"),
        "the agent's unit should be running after its restart:\n{agent}"
    );
    assert!(
        agent.contains("adopted=1"),
        "the restarted agent should say it adopted the group:\n{agent}"
    );
    let demo = system_status(&system, "reuseport-supervise@demo.service");
    assert!(
        demo.contains("Active: active (running)"),
        "the server's unit should be running after its reload:\n{demo}"
    );
    assert!(
        demo.contains("generation 2 is ready and active"),
        "the server's unit should show the deploy of generation 2:\n{demo}"
    );
    println!("{NAME}: systemctl status:\n{agent}\n{demo}");
}

/// What the package installs, from the tree and the binaries under test; the executables are
/// bound, not copied (debug builds are large).
fn install(root: &Path) {
    let packaging = workspace().join("packaging");
    bind_file(
        &bin_path("reuseport-agent"),
        &root.join("usr/sbin/reuseport-agent"),
    );
    bind_file(
        &bin_path("reuseportctl"),
        &root.join("usr/bin/reuseportctl"),
    );
    let exe = std::env::current_exe().expect("current_exe");
    bind_file(&exe, &root.join(SERVER_EXE.trim_start_matches('/')));
    for unit in ["reuseport-agent.service", "reuseport-supervise@.service"] {
        copy(
            &packaging.join("systemd").join(unit),
            &root.join("usr/lib/systemd/system").join(unit),
        );
    }
    copy(
        &packaging.join("default/reuseport-agent"),
        &root.join("etc/default/reuseport-agent"),
    );
    copy(
        &packaging.join("sysusers/reuseport.conf"),
        &root.join("usr/lib/sysusers.d/reuseport.conf"),
    );
    write(
        &root.join("etc/reuseport/supervise/demo.env"),
        &format!(
            "SUPERVISE_OPTS=--listen 127.0.0.1:{PORT} --ready notify\n\
             SERVER={SERVER_EXE} {}\n\
             {SERVER_ENV}=1\n",
            helper_args(SERVER_TEST).join(" ")
        ),
    );
    // The server as a user of its own, allowed on the control socket by the control group.
    write(
        &root.join("etc/systemd/system/reuseport-supervise@demo.service.d/user.conf"),
        "[Service]\nUser=nobody\nSupplementaryGroups=reuseport\n",
    );
    // NB: until the agent and supervise speak sd_notify, their units are started as
    // Type=exec and the test waits for the control socket and the status instead.
    for unit in [
        "reuseport-agent.service",
        "reuseport-supervise@demo.service",
    ] {
        write(
            &root.join(format!("etc/systemd/system/{unit}.d/type.conf")),
            "[Service]\nType=exec\n",
        );
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

fn bind_file(from: &Path, to: &Path) {
    write(to, "");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .unwrap_or_else(|e| panic!("bind {} on {}: {e}", from.display(), to.display()));
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("a parent")).expect("create a directory");
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

fn write(to: &Path, text: &str) {
    std::fs::create_dir_all(to.parent().expect("a parent")).expect("create a directory");
    std::fs::write(to, text).unwrap_or_else(|e| panic!("write {}: {e}", to.display()));
}

/// `reuseportctl status --json` in the container.
fn status(system: &BootedSystem) -> Value {
    let out = system.ok(&["reuseportctl", "status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

fn sockets(groups: &Value) -> Vec<&Value> {
    groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["generations"].as_array().into_iter().flatten())
        .flat_map(|g| g["sockets"].as_array().into_iter().flatten())
        .collect()
}

/// The `selected` counter of `generation` in the only group.
fn selected(groups: &Value, generation: u64) -> u64 {
    groups[0]["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["generation"] == generation)
        .and_then(|g| g["counters"]["selected"].as_u64())
        .unwrap_or(0)
}

/// Until `generation` is the only one left in the group, and active.
fn wait_for_generation(system: &BootedSystem, generation: u64) {
    wait_until_every(
        &format!("generation {generation} is active and alone in the group"),
        STEP_TIMEOUT,
        POLL,
        || {
            let groups = status(system);
            let generations = groups[0]["generations"].as_array().cloned();
            groups[0]["active"] == generation
                && generations.is_some_and(|g| g.len() == 1 && g[0]["generation"] == generation)
        },
    );
}

fn wait_selected(system: &BootedSystem, ab: &mut ApacheBench, generation: u64, at_least: u64) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        ab.assert_running();
        let groups = status(system);
        if selected(&groups, generation) >= at_least {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {STEP_TIMEOUT:?} waiting until generation {generation} was \
                 selected for {at_least} connections; status:\n{groups:#}\nsockets:\n{}\n\
                 processes:\n{}\n{}\nnetwork namespaces: {}",
                system.sh("ss -tanpe"),
                system.sh("ps -eo pid,user,stat,wchan:20,args"),
                ab.describe(),
                system.describe_namespaces(),
            );
        }
        std::thread::sleep(POLL);
    }
}

/// `systemctl status UNIT` (its state and last log lines).
fn system_status(system: &BootedSystem, unit: &str) -> String {
    // NB: exit status 3 means "not running": the text says what we check.
    let out = system.exec(&["systemctl", "status", "--no-pager", "--lines=15", unit]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
