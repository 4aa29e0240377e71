//! The product the way operators run it: a Debian whose PID 1 is a real systemd (booted
//! under systemd-nspawn, see [`BootedSystem`]), the agent as `reuseport-agent.service`, a
//! server as `reuseport-supervise@demo.service` (the units of `packaging/`, as installed),
//! and under ApacheBench load: `systemctl reload` deploys a new generation and `systemctl
//! restart reuseport-agent` restarts the agent, each without a failed request. Both units are
//! `Type=notify`: `systemctl start` returns once the agent answers and the first generation is
//! active, `systemctl reload` once the new generation is active. Debian 12 (systemd 252)
//! reloads through the template's `ExecReload=reuseportctl restart`; Debian 13 (systemd 257)
//! through the package's `Type=notify-reload` drop-in, which makes systemd send the SIGHUP
//! itself and wait for supervise's `RELOADING=1` and `READY=1`.
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
    ApacheBench, BootedSystem, Release, bin_path, debian_rootfs, helper_args, in_vm, local,
    one_at_a_time, skip, wait_until_every,
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
/// The `.deb` of `cargo xtask package`, installed in the container when set (`cargo xtask
/// test` sets it); otherwise the files of the tree and the binaries under test are.
const DEB_ENV: &str = "REUSEPORT_DEB";
const DEB_IN_CONTAINER: &str = "/var/cache/reuseport.deb";
/// The package's `Type=notify-reload` drop-in, and where the demo unit's drop-ins go.
const NOTIFY_RELOAD_DROPIN: &str = "/usr/share/reuseport/supervise-notify-reload.conf";
const DEMO_DROPINS: &str = "/etc/systemd/system/reuseport-supervise@demo.service.d";

#[test]
fn systemd_reload_and_agent_restart_under_load_lose_nothing() {
    const NAME: &str = "systemd_reload_and_agent_restart_under_load_lose_nothing";
    let Some((system, mut ab)) = boot_and_serve(NAME, Release::Bookworm, Reload::ExecReload) else {
        return;
    };
    reload_under_load(&system, &mut ab);

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
    assert_nothing_failed(NAME, &system, ab);

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
    assert!(
        agent.contains("Status: \"1 group"),
        "the agent's unit should show what it manages (STATUS=):\n{agent}"
    );
    let demo = assert_demo_deployed(&system);
    println!("{NAME}: systemctl status:\n{agent}\n{demo}");
}

/// systemd 253+ (Debian 13's 257): the template unit with the package's `Type=notify-reload`
/// drop-in. `systemctl reload` sends SIGHUP to supervise and waits for its `RELOADING=1` and
/// `READY=1`: it returns once generation 2 serves, and no request fails.
#[test]
fn systemd_notify_reload_unit_deploys_under_load_losing_nothing() {
    const NAME: &str = "systemd_notify_reload_unit_deploys_under_load_losing_nothing";
    let Some((system, mut ab)) = boot_and_serve(NAME, Release::Trixie, Reload::NotifyReload) else {
        return;
    };
    reload_under_load(&system, &mut ab);
    assert_nothing_failed(NAME, &system, ab);
    let demo = assert_demo_deployed(&system);
    let log = system.ok(&[
        "journalctl",
        "--no-pager",
        "--output=cat",
        "-u",
        "reuseport-supervise@demo.service",
    ]);
    assert!(
        !log.contains("requested through the agent"),
        "the reload should be supervise's SIGHUP, not `reuseportctl restart`:\n{log}"
    );
    println!("{NAME}: systemctl status:\n{demo}");
}

/// How the demo unit deploys on `systemctl reload`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reload {
    /// The template as it is: `Type=notify`, `ExecReload=reuseportctl restart`.
    ExecReload,
    /// With the package's `Type=notify-reload` drop-in (systemd 253+).
    NotifyReload,
}

/// Boots `release`, installs the package (or the tree's files), starts the agent and the
/// demo unit with `systemctl`, and puts it under ApacheBench's load until generation 1 has
/// answered; `None` in the VM guests (the test is skipped).
fn boot_and_serve(
    name: &'static str,
    release: Release,
    reload: Reload,
) -> Option<(BootedSystem, ApacheBench)> {
    if in_vm() {
        skip(
            name,
            "the VM guests have no systemd and no Debian root file system",
        );
        return None;
    }
    let rootfs = debian_rootfs(release);
    let _one = one_at_a_time();
    let deb = std::env::var_os(DEB_ENV).map(PathBuf::from);
    let system = BootedSystem::boot(name, &rootfs, |root| install(root, deb.as_deref()));
    println!(
        "{name}: booted {release:?}: {}, kernel {}; /sys/fs/cgroup and its unified/: {}",
        system
            .ok(&["systemctl", "--version"])
            .lines()
            .next()
            .unwrap_or_default(),
        system.ok(&["uname", "-r"]).trim(),
        system.sh("stat -fc %T /sys/fs/cgroup /sys/fs/cgroup/unified 2>&1 | tr '\\n' ' '")
    );
    if deb.is_some() {
        // Its maintainer scripts create the control group, enable and start the agent.
        system.ok(&["dpkg", "--install", DEB_IN_CONTAINER]);
        let listed = system.ok(&["dpkg-query", "--listfiles", "reuseport"]);
        for file in [
            "/usr/share/man/man8/reuseport-agent.8.gz",
            "/usr/share/bash-completion/completions/reuseportctl",
            NOTIFY_RELOAD_DROPIN,
        ] {
            assert!(
                listed.lines().any(|l| l == file),
                "the package should install {file}:\n{listed}"
            );
        }
        assert_eq!(
            system
                .ok(&["systemctl", "is-enabled", "reuseport-agent.service"])
                .trim(),
            "enabled",
            "the package should enable the agent's unit"
        );
    } else {
        println!("{name}: {DEB_ENV} unset: the files of the tree are installed, not the .deb");
        // What the package's maintainer scripts do.
        system.ok(&["systemd-sysusers", "reuseport.conf"]);
        system.ok(&["systemctl", "daemon-reload"]);
    }
    if reload == Reload::NotifyReload {
        // As docs/operations.md says to.
        system.sh(&format!(
            "mkdir -p {DEMO_DROPINS} && ln -s {NOTIFY_RELOAD_DROPIN} {DEMO_DROPINS}/ && \
             systemctl daemon-reload"
        ));
        let unit = system.ok(&[
            "systemctl",
            "show",
            "--property=Type,ExecReload",
            "reuseport-supervise@demo.service",
        ]);
        assert!(
            unit.lines().any(|l| l == "Type=notify-reload")
                && !unit.contains("reuseportctl restart"),
            "the drop-in should make the unit Type=notify-reload without ExecReload=:\n{unit}"
        );
    }

    // Type=notify: each systemctl returns once the unit said READY=1, so what it promises
    // holds as soon as it returns, without waiting.
    system.ok(&["systemctl", "start", "reuseport-agent.service"]);
    let out = system.exec(&["reuseportctl", "status"]);
    assert!(
        out.status.success(),
        "the agent should answer once systemctl start returns (READY=1 after the control \
         socket listens): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    system.ok(&["systemctl", "start", "reuseport-supervise@demo.service"]);
    assert_active(&system, 1, "systemctl start");

    let mut ab = ApacheBench::start_with(local(PORT), 8, |cmd| system.in_network(cmd));
    wait_selected(&system, &mut ab, 1, REQUESTS_PER_STEP);
    Some((system, ab))
}

/// `systemctl reload` of the demo unit under load: it returns once generation 2 serves,
/// which then is alone in the group and answers.
fn reload_under_load(system: &BootedSystem, ab: &mut ApacheBench) {
    system.ok(&["systemctl", "reload", "reuseport-supervise@demo.service"]);
    assert_active(system, 2, "systemctl reload");
    wait_for_generation(system, 2);
    wait_selected(system, ab, 2, REQUESTS_PER_STEP);
}

/// Stops the load; not one request may have failed.
fn assert_nothing_failed(name: &str, system: &BootedSystem, ab: ApacheBench) {
    let result = ab.stop();
    println!("{name}: {result}");
    assert!(result.complete > 0, "ab should have completed requests");
    assert_eq!(
        result.failures(),
        0,
        "no request may fail through the unit's reload (and the agent's restart): \
         {result}\n{}",
        system.sh("journalctl --no-pager -n 60 -u reuseport-agent -u 'reuseport-supervise@*'")
    );
}

/// `systemctl status` of the demo unit after its reload: running, generation 2 in its
/// `STATUS=` line and the deploy in its log. Returns the text.
fn assert_demo_deployed(system: &BootedSystem) -> String {
    let demo = system_status(system, "reuseport-supervise@demo.service");
    assert!(
        demo.contains("Active: active (running)"),
        "the server's unit should be running after its reload:\n{demo}"
    );
    assert!(
        demo.contains("Status: \"generation 2 active"),
        "the server's unit should show the generation that serves (STATUS=):\n{demo}"
    );
    assert!(
        demo.contains("generation 2 is ready and active"),
        "the server's unit should show the deploy of generation 2:\n{demo}"
    );
    demo
}

/// The package, or what it installs from the tree and the binaries under test (the
/// executables are bound, not copied: debug builds are large); the demo server either way.
fn install(root: &Path, deb: Option<&Path>) {
    let exe = std::env::current_exe().expect("current_exe");
    bind_file(&exe, &root.join(SERVER_EXE.trim_start_matches('/')));
    demo_unit(root);
    if let Some(deb) = deb {
        copy(deb, &root.join(DEB_IN_CONTAINER.trim_start_matches('/')));
        return;
    }
    let packaging = workspace().join("packaging");
    bind_file(
        &bin_path("reuseport-agent"),
        &root.join("usr/sbin/reuseport-agent"),
    );
    bind_file(
        &bin_path("reuseportctl"),
        &root.join("usr/bin/reuseportctl"),
    );
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
    copy(
        &packaging.join("dropins/supervise-notify-reload.conf"),
        &root.join(NOTIFY_RELOAD_DROPIN.trim_start_matches('/')),
    );
}

/// The demo server's instance of the template unit.
fn demo_unit(root: &Path) {
    write(
        &root.join("etc/reuseport/supervise/demo.env"),
        &format!(
            "LISTEN=127.0.0.1:{PORT}\nSUPERVISE_OPTS=--ready notify\n\
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

/// `generation` serves, in the agent's view and in the unit's `STATUS=` line, right after
/// `what` returned.
fn assert_active(system: &BootedSystem, generation: u64, what: &str) {
    let groups = status(system);
    assert_eq!(
        groups[0]["active"], generation,
        "generation {generation} should be active once {what} returns: {groups}"
    );
    let text = system.ok(&[
        "systemctl",
        "show",
        "--property=StatusText",
        "--value",
        "reuseport-supervise@demo.service",
    ]);
    assert!(
        text.contains(&format!("generation {generation} active")),
        "the unit's status should say generation {generation} is active once {what} returns: \
         {text}"
    );
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
