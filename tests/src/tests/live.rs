//! Live figures in `status`, read from the kernel: they equal what `ss` lists for the same
//! port; `status --check` turns them (and the group's state) into one line per problem;
//! `status --watch` redraws them in place.

use std::{
    io::Read as _,
    net::TcpStream,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use reuseport_agent::{addr::GroupAddr, client, protocol::GroupStatus};
use socket2::{Domain, Protocol, Socket, Type};

use crate::harness::{
    ChildServer, ClientConn, NetNs, ServerKind, TestEnv, current_netns_inode, generation_status,
    local, skip, ss, tool_missing, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(15);

/// `n` connections to `port`, each answered once by `generation` and then held open.
fn held(port: u16, n: usize, generation: u32) -> Vec<ClientConn> {
    (0..n)
        .map(|_| {
            let mut c = ClientConn::connect(local(port)).expect("connect");
            assert_eq!(c.request().expect("answer"), generation);
            c
        })
        .collect()
}

fn status_json(env: &TestEnv, port: u16) -> GroupStatus {
    let out = env.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let groups: Vec<GroupStatus> = serde_json::from_slice(&out.stdout).expect("status JSON");
    groups
        .into_iter()
        .find(|g| g.group.addr == local(port))
        .expect("the group is listed")
}

/// Three generations: 1 (draining, another process) holds 5 connections, 2 (draining,
/// another process) holds 3, 3 (active, registered here, never accepts) has 4 queued.
/// `status --json`, taken between two identical `ss` listings, reports exactly what `ss`
/// shows: connections on the port, per owning process, and each listener's queue and
/// backlog matched by socket cookie.
#[test]
fn status_live_counts_match_ss() {
    const NAME: &str = "status_live_counts_match_ss";
    const PORT: u16 = 7821;
    if let Some(reason) = tool_missing("ss") {
        return skip(NAME, &reason);
    }
    let env = TestEnv::new(NAME);
    let gen1 = ChildServer::spawn(&env, PORT, 1, false);
    let _c1 = held(PORT, 5, 1);
    let gen2 = ChildServer::spawn(&env, PORT, 2, true);
    let _c2 = held(PORT, 3, 2);
    let listener3 = env.listen(PORT);
    let _r3 = env.register(&listener3, PORT, 3, true);
    let _queued: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(local(PORT)).expect("connect"))
        .collect();
    wait_until(
        "4 connections wait in generation 3's queue",
        TIMEOUT,
        || {
            generation_status(&env.status(PORT), 3)
                .live
                .is_some_and(|l| l.queued == 4)
        },
    );

    let (connected, listeners) = (ss(PORT, false), ss(PORT, true));
    let status = status_json(&env, PORT);
    assert_eq!(
        (ss(PORT, false), ss(PORT, true)),
        (connected.clone(), listeners.clone()),
        "nothing may change between the two ss listings around status"
    );
    println!(
        "{NAME}: ss lists {} connected sockets and {} listeners",
        connected.len(),
        listeners.len()
    );
    assert_eq!(
        status.live.map(|l| l.connections),
        Some(connected.len() as u64),
        "connections on the port, as ss -tn counts them: {status:?}\n{connected:#?}"
    );
    let held_by = |pid: i32| connected.iter().filter(|s| s.pids.contains(&pid)).count() as u64;
    let me = std::process::id() as i32;
    for (generation, pid, expected) in [
        (1, gen1.pid().as_raw(), 5),
        (2, gen2.pid().as_raw(), 3),
        (3, me, 0),
    ] {
        let live = generation_status(&status, generation)
            .live
            .expect("live figures");
        assert_eq!(
            (live.connections, held_by(pid)),
            (expected, expected),
            "generation {generation} (pid {pid}): connections held, as ss -tnp attributes them"
        );
    }
    let unowned = connected.iter().filter(|s| s.pids.is_empty()).count() as u64;
    assert_eq!(
        generation_status(&status, 3).live.map(|l| l.queued),
        Some(unowned),
        "queued connections are the ones no process holds yet: {connected:#?}"
    );
    for g in &status.generations {
        for s in &g.sockets {
            let listed = listeners
                .iter()
                .find(|l| l.cookie == Some(s.cookie))
                .unwrap_or_else(|| {
                    panic!("ss should list slot {}'s listener: {listeners:#?}", s.slot)
                });
            let live = s.live.expect("live figures of a listening socket");
            assert_eq!(
                (u64::from(live.queued), u64::from(live.backlog)),
                (listed.recv_q, listed.send_q),
                "generation {}'s listener: accept queue and backlog as ss -ltn shows them",
                g.generation
            );
        }
    }
}

/// The same address in two network namespaces: each group's figures come from its own
/// namespace (the agent queries the other one from a thread that entered it).
#[test]
fn live_figures_come_from_the_groups_own_namespace() {
    const NAME: &str = "live_figures_come_from_the_groups_own_namespace";
    const PORT: u16 = 7824;
    let env = TestEnv::new(NAME);
    let ns_b = NetNs::new();
    let typed = GroupAddr {
        addr: local(PORT),
        netns: None,
    };
    let _a = env.serve_listener(env.listen(PORT), typed, 1, ServerKind::Blocking, false);
    let lb = ns_b.run(|| client::reuseport_listener(local(PORT)).expect("listen in B"));
    let _b = env.serve_listener(lb, typed, 1, ServerKind::Blocking, false);
    let _in_a = held(PORT, 1, 1);
    let _in_b = ns_b.run(|| held(PORT, 2, 1));
    let in_b = GroupAddr {
        netns: Some(ns_b.inode()),
        ..typed
    };
    wait_until("both groups count their connections", TIMEOUT, || {
        let live = |g: &GroupStatus| generation_status(g, 1).live.map(|l| l.connections);
        live(&env.status_of(GroupAddr {
            netns: Some(current_netns_inode()),
            ..typed
        })) == Some(1)
            && live(&env.status_of(in_b)) == Some(2)
    });
    let b = env.status_of(in_b);
    assert_eq!(
        b.live.map(|l| l.connections),
        Some(2),
        "the group in the other namespace counts only its own connections: {b:?}"
    );
}

/// A listener of `port` with a backlog of `backlog`, SO_REUSEPORT, never accepting.
fn small_listener(port: u16, backlog: i32) -> std::net::TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    s.set_reuse_port(true).expect("SO_REUSEPORT");
    s.bind(&local(port).into()).expect("bind");
    s.listen(backlog).expect("listen");
    s.into()
}

/// `status --check`: exit 0 with one line when healthy; exit 2 and one line per problem for
/// an overflowed accept queue and for a group left without an active generation.
#[test]
fn status_check_reports_each_problem() {
    const NAME: &str = "status_check_reports_each_problem";
    const PORT: u16 = 7822;
    let env = TestEnv::new(NAME);
    let _gen1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let out = env.ctl(&["status", "--check"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "a healthy group passes: {stdout}"
    );
    assert!(stdout.starts_with("ok: 1 group"), "{stdout}");

    let listener2 = small_listener(PORT, 1);
    let reg2 = env.register(&listener2, PORT, 2, true);
    // Non-blocking connects: once the queue is full the kernel drops the SYNs.
    let _pending: Vec<Socket> = (0..6)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&local(PORT).into());
            s
        })
        .collect();
    wait_until("generation 2's listener drops connections", TIMEOUT, || {
        generation_status(&env.status(PORT), 2).sockets[0]
            .live
            .is_some_and(|l| l.drops > 0)
    });
    let out = env.ctl(&["status", "--check"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an overflow is a problem: {stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line per problem: {stdout}");
    assert!(
        lines[0].contains("accept queue overflowed: the listener of generation 2")
            && lines[0].contains("since it registered (backlog 1)"),
        "{stdout}"
    );

    drop(reg2);
    drop(listener2);
    wait_until("generation 2 has left the group", TIMEOUT, || {
        env.status(PORT).active.is_none()
    });
    let out = env.ctl(&["status", "--check"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("tcp://127.0.0.1:7822: no active generation"),
        "{stdout}"
    );
}

/// `status --watch 100ms` redraws the table in place (cursor home, lines cleared, rest of the
/// screen cleared) and shows a change on a later frame.
#[test]
fn status_watch_redraws_in_place() {
    const NAME: &str = "status_watch_redraws_in_place";
    const PORT: u16 = 7823;
    let env = TestEnv::new(NAME);
    let _gen1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let mut watch: Child = env
        .ctl_command()
        .args(["status", "--watch", "100ms"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start status --watch");
    let output = Arc::new(Mutex::new(String::new()));
    let mut stdout = watch.stdout.take().expect("piped");
    let sink = output.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let last_frame = |output: &Mutex<String>| {
        let text = output.lock().unwrap();
        text.rsplit("\x1b[H").next().unwrap_or_default().to_string()
    };
    wait_until("a frame shows generation 1 active", TIMEOUT, || {
        last_frame(&output).contains("active 1")
    });
    let _gen2 = env.serve(PORT, 2, ServerKind::Tokio, true);
    wait_until("a later frame shows generation 2 active", TIMEOUT, || {
        last_frame(&output).contains("active 2")
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = watch.wait();
    reader.join().expect("reader");
    let text = output.lock().unwrap().clone();
    let frames: Vec<&str> = text.split("\x1b[H").skip(1).collect();
    assert!(frames.len() >= 2, "several frames: {text:?}");
    // NB: the last frame may have been cut short by the SIGTERM that ended the watch.
    let complete = &frames[..frames.len() - 1];
    assert!(
        complete.iter().all(|f| f.ends_with("\x1b[J")),
        "each frame clears what the previous one left below it: {text:?}"
    );
    assert!(
        frames[0].contains("active 1") && frames[0].contains("LIVE"),
        "{:?}",
        frames[0]
    );
}
