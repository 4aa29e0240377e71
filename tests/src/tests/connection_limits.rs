//! The control connection limit and descriptor exhaustion: at the limit the longest-idle
//! connection makes room, never a registration, and an agent out of descriptors keeps
//! answering instead of spinning.

use std::{
    io::{self},
    os::unix::net::UnixStream,
    time::Instant,
};

use reuseport_proto::{ErrorKind, Op, Reply, Request};

use crate::harness::{ServerKind, TestEnv, generation_status, local, tally, wait_until};

use crate::harness::control::{ANSWER_TIMEOUT, Conn, read_reply, timed_status};

#[test]
fn connection_limit_closes_the_longest_idle_never_a_registration() {
    const PORT: u16 = 8301;
    const LIMIT: usize = 50;
    let env = TestEnv::with_agent(
        "connection_limit_closes_the_longest_idle_never_a_registration",
        &["--max-connections", &LIMIT.to_string()],
        &[],
    );
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let limits = env
        .status(PORT)
        .limits
        .expect("status should report the limits");
    assert_eq!(
        limits.control_connections as usize, LIMIT,
        "status should report --max-connections"
    );

    // Fill every place, and some more: the oldest idle connections make room.
    let mut idle: Vec<Conn> = (0..LIMIT + 10)
        .map(|i| {
            let mut c = Conn::connect(env.control_path())
                .unwrap_or_else(|e| panic!("control connection {i} should connect: {e}"));
            // NB: each must be accepted (and so waiting) before the next one arrives, or the
            // eviction order is the accept order, not the connect order.
            ping(&mut c, i);
            c
        })
        .collect();
    let status = timed_status(&env, PORT, &format!("at the connection limit ({LIMIT})"));
    assert_eq!(
        generation_status(&status, 1).sockets.len(),
        1,
        "the registration should survive the limit: {status:?}"
    );
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "generation 1 should keep getting connections: {t}"
    );

    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let first = read_reply(&mut idle[0], deadline)
        .expect("the longest-idle connection should be told why it is closed");
    match first {
        Some(Reply::Error { kind, message }) => {
            println!("evicted: {message}");
            assert_eq!(
                kind,
                ErrorKind::Limit,
                "eviction should be a limit error: {message}"
            );
            assert!(
                message.contains(&format!("maximum of {LIMIT}")),
                "eviction should name the limit: {message}"
            );
        }
        other => panic!("the longest-idle connection should be evicted, got {other:?}"),
    }
    let newest = idle.last_mut().expect("connections");
    ping(newest, LIMIT + 10);
}

/// One `status` round trip on `conn`: proves the agent accepted it and it now waits.
fn ping(conn: &mut Conn, i: usize) {
    let status = Request::new(Op::Status {
        group: None,
        live: Some(true),
    });
    conn.send(&status, None)
        .unwrap_or_else(|e| panic!("connection {i} should send: {e}"));
    match read_reply(conn, Instant::now() + ANSWER_TIMEOUT) {
        Ok(Some(Reply::Status { .. })) => {}
        other => panic!("connection {i} should get a status reply, got {other:?}"),
    }
}

#[test]
fn accept_survives_running_out_of_descriptors() {
    const PORT: u16 = 8401;
    const NOFILE: u32 = 128;
    let env = TestEnv::new("accept_survives_running_out_of_descriptors");
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let limit = libc::rlimit {
        rlim_cur: NOFILE.into(),
        rlim_max: NOFILE.into(),
    };
    // SAFETY: prlimit on the agent we started, with a struct we own.
    let res = unsafe {
        libc::prlimit(
            env.agent_pid().as_raw(),
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        res,
        0,
        "lowering the agent's RLIMIT_NOFILE: {}",
        io::Error::last_os_error()
    );

    // More connections than the agent has descriptors: accept() fails with EMFILE.
    let idle: Vec<UnixStream> = (0..2 * NOFILE)
        .map(|i| {
            UnixStream::connect(env.control_path())
                .unwrap_or_else(|e| panic!("control connection {i} should connect: {e}"))
        })
        .collect();
    wait_until(
        "the agent logs that accept() ran out of descriptors",
        ANSWER_TIMEOUT,
        // NB: EMFILE by number: glibc says "Too many open files", musl (the VM guests'
        // static binaries) "No file descriptors available".
        || env.agent_log().contains("(os error 24)"),
    );
    let cpu_before = agent_cpu_ticks(&env);
    let asked = Instant::now();
    let status = timed_status(&env, PORT, "with the agent out of descriptors");
    assert_eq!(
        status.active,
        Some(1),
        "status should still answer, with the group intact"
    );
    let t = tally(local(PORT), 20);
    assert_eq!(
        t.of(1),
        20,
        "generation 1 should keep getting connections: {t}"
    );
    println!(
        "agent CPU while saturated: {} ticks over {:?}",
        agent_cpu_ticks(&env) - cpu_before,
        asked.elapsed()
    );
    drop(idle);
}

/// utime + stime of the agent, in clock ticks.
fn agent_cpu_ticks(env: &TestEnv) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", env.agent_pid()))
        .expect("read the agent's /proc stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of proc_pid_stat(5); `after_comm` starts at field 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}
