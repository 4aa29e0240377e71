//! Registering a socket the group already holds (docs/protocol.md, "Registering again"): a
//! socket registers once; after an agent restart it gets its slot back, as the generation it
//! was registered as, in its current state; until then status shows it "not re-registered"
//! and it is steered all the same. And one agent per bpffs directory.

use std::{
    os::fd::AsFd as _,
    process::{Command, Stdio},
};

use reuseport_client::{self as client, ClientError, RegisterOptions, Registration};
use reuseport_proto::{ErrorKind, GenState};

use crate::harness::{
    Server, ServerKind, TestEnv, bin_path, generation_status, local, one_line_error, tally,
};

/// Registration options for `generation` of `port` without reconnecting: the test decides
/// when the socket registers again.
fn once(env: &TestEnv, port: u16, generation: u32, activate: bool) -> RegisterOptions {
    RegisterOptions {
        reconnect: false,
        ..env.register_options(port, generation, activate)
    }
}

fn register(
    env: &TestEnv,
    listener: &std::net::TcpListener,
    opts: &RegisterOptions,
) -> Result<Registration, ClientError> {
    env.block_on(client::register(listener.as_fd(), opts))
}

fn expect_conflict(result: Result<Registration, ClientError>, what: &str, says: &str) {
    let err = result.map(drop).expect_err(what);
    println!("{what}: {err}");
    assert_eq!(
        err.agent_kind(),
        Some(ErrorKind::Conflict),
        "{what}: should be a conflict: {err}"
    );
    assert!(err.to_string().contains(says), "{what}: {err}");
}

#[test]
fn registering_again_gives_the_slot_back_only_to_its_own_generation() {
    const PORT: u16 = 8801;
    let mut env = TestEnv::new("registering_again_gives_the_slot_back_only_to_its_own_generation");
    let l1 = env.listen(PORT);
    let r1 = register(&env, &l1, &once(&env, PORT, 1, false)).expect("register generation 1");
    let slot1 = r1.slot();
    let l2 = env.listen(PORT);
    let r2 = register(&env, &l2, &once(&env, PORT, 2, false)).expect("register generation 2");
    let g2 = Server::start(
        ServerKind::Tokio,
        l2.try_clone().expect("dup"),
        2,
        env.rt().handle(),
    );
    env.activate(PORT, 2);

    expect_conflict(
        register(&env, &l1, &once(&env, PORT, 1, false)),
        "registering a socket whose registration is open",
        "a socket registers once",
    );

    env.kill_agent();
    env.restart_agent(&[]);
    drop((r1, r2)); // their connections died with the agent; they do not reconnect

    let status = env.status(PORT);
    let sockets: Vec<bool> = status
        .generations
        .iter()
        .flat_map(|g| g.sockets.iter().map(|s| s.registered))
        .collect();
    assert_eq!(
        sockets,
        [false, false],
        "after the restart both sockets should be adopted, not registered again yet: {status:?}"
    );
    let out = env.ctl(&["status"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    println!("{shown}");
    assert_eq!(
        shown.matches("(1 not re-registered)").count(),
        2,
        "`reuseportctl status` should show each socket as not re-registered:\n{shown}"
    );
    let t = tally(local(PORT), 50);
    assert_eq!(
        (t.of(2), t.failed),
        (50, 0),
        "sockets not registered again should be steered as before: {t}"
    );

    expect_conflict(
        register(&env, &l1, &once(&env, PORT, 3, false)),
        "registering the socket again as another generation",
        "register it again as generation 1",
    );
    let mut renamed = once(&env, PORT, 1, true);
    renamed.request.name = Some("renamed".into());
    let back = register(&env, &l1, &renamed)
        .expect("the socket should get its slot back as its own generation");
    assert_eq!(
        (back.slot(), *back.state().borrow()),
        (slot1, GenState::Draining),
        "the socket should get its old slot back, in its generation's current state (activate \
         is ignored)"
    );
    let status = env.status(PORT);
    let g1 = generation_status(&status, 1);
    assert_eq!(
        (status.active, g1.name.as_deref(), g1.sockets[0].registered),
        (Some(2), Some("gen1"), true),
        "registering again should change neither the active generation nor the name: {status:?}"
    );
    drop((back, g2, l1, l2));
}

#[test]
fn a_second_agent_on_the_same_bpffs_directory_is_refused() {
    let env = TestEnv::new("a_second_agent_on_the_same_bpffs_directory_is_refused");
    let _g1 = env.serve(8802, 1, ServerKind::Tokio, false);
    let out = Command::new(bin_path("reuseport-agent"))
        .arg("--control")
        .arg(env.dir().join("second.sock"))
        .arg("--bpffs")
        .arg(env.bpffs_path())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .expect("run a second reuseport-agent");
    let err = one_line_error("a second agent on the same bpffs directory", &out);
    assert!(
        err.contains(&format!(
            "another reuseport-agent already manages {}",
            env.bpffs_path().display()
        )),
        "the second agent should say another one manages the directory: {err}"
    );
    let t = tally(local(8802), 20);
    assert_eq!(
        (t.of(1), t.failed),
        (20, 0),
        "the first agent's group should be untouched: {t}"
    );
    assert!(
        env.status(8802).active == Some(1),
        "the first agent should keep serving"
    );
}
