//! `server_pid`: a launcher names the server it started, so `status` shows the server's pid;
//! no registering process can put another process's pid there.

use std::{net::TcpListener, process::Command};

use reuseport_proto::{ErrorKind, Register, Reply, frame::Conn};

use crate::harness::{TestEnv, control::register_raw, group};

/// Registers `listener` (generation 1 of `127.0.0.1:port`) naming `server_pid`.
fn register_for(
    env: &TestEnv,
    listener: &TcpListener,
    port: u16,
    server_pid: i32,
) -> (Reply, Conn) {
    let register = Register {
        group: group(port),
        generation: 1,
        name: None,
        activate: false,
        supervised: false,
        server_pid: Some(server_pid),
    };
    register_raw(env, listener, register)
}

#[test]
fn server_pid_is_the_registering_process_or_one_of_its_descendants() {
    const PORT: u16 = 9951;
    let env = TestEnv::new("server_pid_is_the_registering_process_or_one_of_its_descendants");
    let listener = env.listen(PORT);

    // pid 1 is nobody's server but init's.
    let (reply, _) = register_for(&env, &listener, PORT, 1);
    match reply {
        Reply::Error { kind, message } => {
            println!("server_pid 1: {message}");
            assert_eq!(kind, ErrorKind::PermissionDenied, "{message}");
            assert!(message.contains("server_pid 1"), "{message}");
        }
        other => panic!(
            "a registration naming pid 1 (not a descendant of the registering process) as its \
             server should be refused, got {other:?}"
        ),
    }
    assert!(
        env.try_status(PORT).is_none(),
        "the refused registration should leave no group"
    );

    // A child of the registering process (this one) is its server.
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .arg("--list")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start a child");
    let pid = child.id() as i32;
    let (reply, registration) = register_for(&env, &listener, PORT, pid);
    assert!(
        matches!(reply, Reply::Registered { .. }),
        "a child of the registering process may be named as its server: {reply:?}"
    );
    let status = env.status(PORT);
    let shown = status.generations[0].sockets[0].pid;
    assert_eq!(shown, pid, "status should show the server's pid");
    let _ = child.wait();
    drop(registration);
}
