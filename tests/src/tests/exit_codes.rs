//! `reuseportctl`'s exit statuses tell failures apart (agent not running 3, permission
//! denied 4 — asserted in `access.rs`, not found 5, refused 6, a wait that timed out 124, a
//! bad command line 2), `--json` on the verbs that answer, and `version`.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::supervise::{READY_DELAY_ENV, SERVER_ENV, SERVER_TEST, Supervisor};
use crate::harness::{ServerKind, TestEnv, bin_path, one_line_error};

/// `args`' exit status, checked to be `code`, with the one error line it printed.
fn fails_with(what: &str, out: &Output, code: i32) -> String {
    let err = one_line_error(what, out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what} should exit with {code}: {err}"
    );
    err
}

fn json(what: &str, out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{what} should succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} should print JSON: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn cli_exit_statuses_tell_failures_apart() {
    const NAME: &str = "cli_exit_statuses_tell_failures_apart";
    const PORT: u16 = 7941;
    let env = TestEnv::new(NAME);
    let group = format!("127.0.0.1:{PORT}");

    let nowhere = env.dir().join("no-agent.sock");
    let no_agent = |args: &[&str]| {
        Command::new(bin_path("reuseportctl"))
            .arg("--control")
            .arg(&nowhere)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run reuseportctl")
    };
    let err = fails_with("status without an agent", &no_agent(&["status"]), 3);
    assert!(err.contains("agent not running"), "{err}");
    let out = no_agent(&["version"]);
    fails_with("version without an agent", &out, 3);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("reuseportctl "),
        "version should print the CLI's own line without an agent: {out:?}"
    );

    let err = fails_with(
        "activate of a group the agent does not know",
        &env.ctl(&["activate", &group, "1"]),
        5,
    );
    assert!(err.contains("unknown group"), "{err}");

    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, true);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);
    let _g3 = env.serve(PORT, 3, ServerKind::Tokio, false);
    fails_with(
        "activate of a generation the group does not have",
        &env.ctl(&["activate", &group, "9"]),
        5,
    );
    fails_with(
        "drain of the active generation",
        &env.ctl(&["drain", &group, "1"]),
        6,
    );
    fails_with(
        "activate with a bad address",
        &env.ctl(&["activate", "not-an-address", "2"]),
        2,
    );

    let changed = json(
        "activate --json",
        &env.ctl(&["activate", "--json", &group, "2"]),
    );
    assert_eq!(changed["active"], 2, "activate --json: {changed}");
    let changed = json("drain --json", &env.ctl(&["drain", "--json", &group, "3"]));
    let third = changed["generations"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["generation"] == 3))
        .unwrap_or_else(|| panic!("drain --json should list generation 3: {changed}"));
    assert_eq!(third["state"], "draining", "drain --json: {changed}");

    let version = json("version --json", &env.ctl(&["version", "--json"]));
    assert_eq!(
        version["cli"]["version"], version["agent"]["version"],
        "the agent under test is built from the same tree: {version}"
    );
    assert_eq!(
        version["agent"]["abi"],
        reuseport_common::ABI_VERSION,
        "version --json: {version}"
    );
    let out = env.ctl(&["version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.lines().count() == 2 && text.contains("reuseport-agent "),
        "version should print the CLI's and the agent's line: {text}"
    );
}

/// `restart --timeout` gives up with 124 while the new generation is still not ready (it
/// never will be within the test: its server waits ten minutes before READY=1).
#[test]
fn restart_that_times_out_exits_124() {
    const NAME: &str = "restart_that_times_out_exits_124";
    const PORT: u16 = 7942;
    let env = TestEnv::new(NAME);
    let mut sup = Supervisor::spawn_server(
        &env,
        PORT,
        &["--ready", "notify", "--ready-timeout", "20m"],
        SERVER_TEST,
        (SERVER_ENV, "1"),
        |cmd| {
            cmd.env(READY_DELAY_ENV, "2:600000");
        },
    );
    sup.wait_active(&env, PORT, 1);
    let group = format!("127.0.0.1:{PORT}");
    let err = fails_with(
        "restart whose generation is not ready in time",
        &env.ctl(&["restart", "--timeout", "200ms", &group]),
        124,
    );
    assert!(err.contains("no outcome from the supervisor"), "{err}");
}
