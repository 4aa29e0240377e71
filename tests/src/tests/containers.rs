//! The container recipes of docs/operations.md, with the namespaces a container runtime sets
//! up (see [`Container`]): the server's container has its own user, mount and PID
//! namespaces, its root is an unprivileged uid of the host, `reuseportctl exec` is its PID 1,
//! and it reaches the agent through the control directory bind-mounted at `/run/reuseport`.
//!
//! - With the host's network namespace (`docker run --net=host`): generations in two
//!   containers replace each other under load without a failed request; PID 1 reaps the
//!   orphans its server leaves behind and forwards `docker stop`'s SIGTERM to the server,
//!   whose exit status becomes the container's.
//! - With a network namespace of their own that the generations share (a pod, or
//!   `docker run --network container:…`): the agent steers the group by its `@NETNS` key, and
//!   the operator flips it from the host with that key.
//!
//! The agent's control group is the containers' host gid: their root may connect, and owns
//! the groups its sockets are in.

use std::{fs::File, io::Write as _, time::Duration};

use nix::sys::signal::Signal;
use reuseport_proto::addr::GroupAddr;

use super::supervise::{Load, SERVER_ENV, SERVER_TEST, TERM_EXIT_ENV};
use crate::harness::{
    CONTAINER_GID, CONTAINER_UID, Container, NetNs, TestEnv, generation_status, helper_args, local,
    patience, shared_fifo, wait_until,
};

/// The server's exit status after SIGTERM, which the container must exit with.
const TERM_EXIT: i32 = 42;
const TIMEOUT: Duration = Duration::from_secs(20);

fn timeout() -> Duration {
    patience(TIMEOUT)
}

/// An agent whose control group is the containers' host gid.
fn agent(name: &'static str) -> TestEnv {
    TestEnv::with_agent(name, &["--control-group", &CONTAINER_GID.to_string()], &[])
}

/// `reuseportctl exec` as PID 1 of a container, running the suite's LISTEN_FDS server as
/// `generation`; `orphan_fifo`: the server first leaves behind a process that waits for a line
/// on that fifo (its parent exits at once, so PID 1 inherits it).
fn exec_container(
    env: &TestEnv,
    port: u16,
    generation: u32,
    activate: bool,
    netns: Option<&File>,
    orphan_fifo: Option<&str>,
) -> Container {
    let exe = std::env::current_exe().expect("current_exe");
    let listen = local(port).to_string();
    let generation_arg = generation.to_string();
    let mut command = vec![
        // NB: from PATH inside: the container sees the host's files (a bind of the binary in
        // a real image).
        crate::harness::bin_path("reuseportctl")
            .to_string_lossy()
            .into_owned(),
        "exec".into(),
        "--listen".into(),
        listen,
        "--generation".into(),
        generation_arg,
        "--on-drain".into(),
        "TERM".into(),
    ];
    if activate {
        command.push("--activate".into());
    }
    command.push("--".into());
    if let Some(fifo) = orphan_fifo {
        command.extend(
            ["sh", "-c", r#"(read line < "$0" &); exec "$@""#, fifo]
                .iter()
                .map(|s| s.to_string()),
        );
    }
    command.push(exe.to_string_lossy().into_owned());
    command.extend(helper_args(SERVER_TEST).iter().map(|s| s.to_string()));
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    Container::start(
        &format!("gen{generation}"),
        env.dir(),
        env.dir(),
        netns,
        &[
            (SERVER_ENV, "1".into()),
            ("REUSEPORT_GENERATION", generation.to_string()),
            (TERM_EXIT_ENV, TERM_EXIT.to_string()),
        ],
        &command,
    )
}

/// Until generation `generation` of `group` is registered in state `state`, checked against
/// the container: its socket belongs to the container's host uid and its server is a child of
/// the container's PID 1.
fn wait_registered(
    env: &TestEnv,
    group: GroupAddr,
    generation: u32,
    state: &str,
    container: &mut Container,
) {
    wait_until(
        &format!("generation {generation} is registered from its container as {state}"),
        timeout(),
        || {
            container.assert_running();
            env.statuses().iter().any(|g| {
                g.group.addr == group.addr
                    && g.group.netns.is_none_or(|n| Some(n) == group.netns)
                    && g.generations
                        .iter()
                        .any(|s| s.generation == generation && s.state.to_string() == state)
            })
        },
    );
    let status = env
        .statuses()
        .into_iter()
        .find(|g| g.group.addr == group.addr)
        .expect("listed above");
    let socket = &generation_status(&status, generation).sockets[0];
    assert_eq!(
        socket.uid, CONTAINER_UID,
        "the socket should belong to the container's root, uid {CONTAINER_UID} on the host"
    );
    let children: Vec<i32> = container
        .children_of_init()
        .iter()
        .map(|(pid, _)| pid.as_raw())
        .collect();
    assert!(
        children.contains(&socket.pid),
        "status should show the server by its host pid, a child of the container's PID 1 \
         (pid {}): shows {}, children {children:?}",
        container.init(),
        socket.pid
    );
}

#[test]
fn containers_on_the_host_network_replace_each_other_with_exec_as_pid_1() {
    const NAME: &str = "containers_on_the_host_network_replace_each_other";
    const PORT: u16 = 9601;
    let env = agent(NAME);
    let group = GroupAddr {
        addr: local(PORT),
        netns: None,
    };
    let mut gen1 = exec_container(&env, PORT, 1, false, None, None);
    wait_registered(&env, group, 1, "active", &mut gen1);
    let load = Load::start(PORT, 2);
    wait_until("generation 1 answers", timeout(), || {
        load.snapshot().of(1) > 0
    });

    let fifo = shared_fifo(&env.dir().join("orphan.fifo"));
    let fifo = fifo.to_string_lossy().into_owned();
    let mut gen2 = exec_container(&env, PORT, 2, true, None, Some(&fifo));
    wait_registered(&env, group, 2, "active", &mut gen2);
    wait_until("generation 2 answers", timeout(), || {
        load.snapshot().of(2) > 0
    });
    let status = gen1.wait_exit(timeout()).unwrap_or_else(|| {
        panic!(
            "generation 1's container should end once its server drained and got SIGTERM:\n{}",
            gen1.log()
        )
    });
    assert_eq!(
        status.code(),
        Some(TERM_EXIT),
        "generation 1's container should exit with its server's status; log:\n{}",
        gen1.log()
    );
    let tally = load.stop();
    println!("{NAME}: {tally}");
    assert_eq!(
        tally.failed, 0,
        "no request may fail while the containers replace each other: {tally}"
    );

    // The orphan: a child of PID 1 while it runs, reaped (gone, not a zombie) once it exits.
    let mut orphan = None;
    wait_until(
        "the server's orphan is handed to the container's PID 1",
        timeout(),
        || {
            orphan = gen2
                .children_of_init()
                .into_iter()
                .find(|(_, comm)| comm == "sh")
                .map(|(pid, _)| pid);
            orphan.is_some()
        },
    );
    let orphan = orphan.expect("found above");
    writeln!(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the fifo"),
        "exit"
    )
    .expect("release the orphan");
    wait_until(
        &format!("the container's PID 1 reaped its orphan (host pid {orphan})"),
        timeout(),
        || {
            gen2.assert_running();
            !std::path::Path::new(&format!("/proc/{orphan}")).exists()
        },
    );

    // `docker stop`: SIGTERM to PID 1, forwarded to the server.
    gen2.signal(Signal::SIGTERM);
    let status = gen2
        .wait_exit(timeout())
        .unwrap_or_else(|| panic!("SIGTERM to PID 1 should end the container:\n{}", gen2.log()));
    assert_eq!(
        status.code(),
        Some(TERM_EXIT),
        "PID 1 should forward SIGTERM to the server and exit with its status; log:\n{}",
        gen2.log()
    );
    println!(
        "{NAME}: {} and {} replaced each other; PID 1 reaped pid {orphan} and forwarded SIGTERM",
        gen1.name(),
        gen2.name()
    );
}

#[test]
fn containers_sharing_a_network_namespace_are_steered_by_their_netns_key() {
    const NAME: &str = "containers_sharing_a_network_namespace";
    const PORT: u16 = 9602;
    let env = agent(NAME);
    let pod = NetNs::new();
    let group = GroupAddr {
        addr: local(PORT),
        netns: Some(pod.inode()),
    };
    let mut gen1 = exec_container(&env, PORT, 1, false, Some(pod.file()), None);
    wait_registered(&env, group, 1, "active", &mut gen1);
    let load = pod.run(|| Load::start(PORT, 2));
    wait_until("generation 1 answers in the pod", timeout(), || {
        load.snapshot().of(1) > 0
    });

    let mut gen2 = exec_container(&env, PORT, 2, false, Some(pod.file()), None);
    wait_registered(&env, group, 2, "standby", &mut gen2);
    // The operator, on the host: the group by its full key.
    let key = format!("tcp://{}@{}", local(PORT), pod.inode());
    let out = env.ctl(&["activate", &key, "2"]);
    assert!(
        out.status.success(),
        "reuseportctl activate {key} 2 should succeed from the host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("generation 2 answers in the pod", timeout(), || {
        load.snapshot().of(2) > 0
    });
    let status = gen1.wait_exit(timeout()).unwrap_or_else(|| {
        panic!(
            "generation 1's container should end once drained:\n{}",
            gen1.log()
        )
    });
    assert_eq!(status.code(), Some(TERM_EXIT), "log:\n{}", gen1.log());
    let tally = load.stop();
    println!("{NAME}: {key}: {tally}");
    assert_eq!(
        tally.failed, 0,
        "no request may fail in the pod's namespace: {tally}"
    );
    let status = env.status_of(group);
    assert_eq!(
        status.group.netns,
        Some(pod.inode()),
        "status should name the pod's group by its namespace: {status:?}"
    );
    gen2.assert_running();
}
