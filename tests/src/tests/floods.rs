//! Floods of control connections: idle ones and ones that send garbage do not stop anyone
//! else's `status` or flip, nor steering.

use std::{os::unix::net::UnixStream, time::Instant};

use reuseport_proto::{ErrorKind, MAX_FRAME, Op, Reply, Request, frame};

use crate::harness::{
    ServerKind, TestEnv,
    control::{ANSWER_TIMEOUT, Conn, read_reply, timed_status},
    local, raise_nofile, tally,
};

#[test]
fn idle_and_garbage_connections_do_not_stop_status_or_steering() {
    const PORT: u16 = 8201;
    const IDLE: usize = 1000;
    const GARBAGE: usize = 100;
    // The agent starts with the soft descriptor limit most systems give it (1024), which a
    // thousand idle clients would exhaust unless it raises the limit. This process needs more.
    raise_nofile(4 * (IDLE + GARBAGE) as u64);
    let env = with_soft_nofile(1024, || {
        TestEnv::new("idle_and_garbage_connections_do_not_stop_status_or_steering")
    });
    let (soft, hard) = agent_nofile(&env);
    assert_eq!(
        soft, hard,
        "the agent should raise its soft descriptor limit to the hard limit"
    );
    let _g1 = env.serve(PORT, 1, ServerKind::Tokio, false);
    let _g2 = env.serve(PORT, 2, ServerKind::Tokio, false);

    let started = Instant::now();
    let idle: Vec<UnixStream> = (0..IDLE)
        .map(|i| {
            UnixStream::connect(env.control_path())
                .unwrap_or_else(|e| panic!("idle control connection {i} should connect: {e}"))
        })
        .collect();
    let mut garbage: Vec<(Garbage, Conn)> = (0..GARBAGE)
        .map(|i| {
            let kind = Garbage::ALL[i % Garbage::ALL.len()];
            let conn = Conn::connect(env.control_path())
                .unwrap_or_else(|e| panic!("garbage connection {i} should connect: {e}"));
            conn.send_raw(&kind.bytes(i), None)
                .unwrap_or_else(|e| panic!("garbage connection {i} should send: {e}"));
            (kind, conn)
        })
        .collect();
    println!(
        "opened {IDLE} idle and {GARBAGE} garbage-sending control connections in {:?}",
        started.elapsed()
    );

    let status = timed_status(
        &env,
        PORT,
        &format!("with {IDLE} idle and {GARBAGE} garbage control connections open"),
    );
    let out = env.ctl(&["status"]);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        status.active,
        Some(1),
        "generation 1 should still be active"
    );
    // NB: where the hard descriptor limit is low (4096 in the VM guests), the agent caps
    // connections below 1,100 and the oldest idle ones make room: status answers either way.
    println!(
        "the agent's connection limit: {:?}",
        status.limits.map(|l| l.control_connections)
    );

    let t = tally(local(PORT), 200);
    assert_eq!(
        t.of(1),
        200,
        "the group should keep steering to generation 1: {t}"
    );
    env.activate(PORT, 2);
    let t = tally(local(PORT), 200);
    assert_eq!(
        t.of(2),
        200,
        "after a flip under the flood, new connections should reach generation 2: {t}"
    );

    // Every garbage sender is answered with an error and closed; the half-frames after the
    // frame time-out (a few seconds).
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    for (i, (kind, conn)) in garbage.iter_mut().enumerate() {
        let reply = read_reply(conn, deadline).unwrap_or_else(|e| {
            panic!("garbage connection {i} ({kind:?}) should get an error: {e}")
        });
        match reply {
            Some(Reply::Error { kind: got, message }) => {
                assert_eq!(
                    got,
                    ErrorKind::BadRequest,
                    "garbage connection {i} ({kind:?}): {message}"
                );
                if i < Garbage::ALL.len() {
                    println!("{kind:?}: {message}");
                }
            }
            other => panic!("garbage connection {i} ({kind:?}) should get an error, got {other:?}"),
        }
        if kind.closes() {
            assert!(
                matches!(read_reply(conn, deadline), Ok(None)),
                "garbage connection {i} ({kind:?}) should be closed after its error"
            );
        }
    }
    println!(
        "every garbage sender had its error {:?} after the flood started",
        started.elapsed()
    );
    drop(idle);
}

/// Runs `f` (which starts the agent) with this process's soft RLIMIT_NOFILE at `soft`, so
/// that the agent inherits it; restores the limit afterwards.
fn with_soft_nofile<T>(soft: u64, f: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on structs we own.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut old),
            0,
            "getrlimit"
        );
        let lowered = libc::rlimit {
            rlim_cur: soft.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &lowered),
            0,
            "setrlimit"
        );
    }
    let out = f();
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &old),
            0,
            "restore RLIMIT_NOFILE"
        );
    }
    out
}

/// The agent's (soft, hard) "Max open files" from /proc/PID/limits.
fn agent_nofile(env: &TestEnv) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", env.agent_pid()))
        .expect("read the agent's /proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().expect("soft limit").to_string();
    let hard = fields.next().expect("hard limit").to_string();
    println!("agent's descriptor limit: soft {soft}, hard {hard}");
    (soft, hard)
}

/// What a garbage-sending connection sends.
#[derive(Clone, Copy, Debug)]
enum Garbage {
    /// A length prefix above MAX_FRAME.
    Oversized,
    /// The first half of a valid request, then nothing.
    HalfFrame,
    /// A well-framed body that is not JSON.
    NotJson,
    /// Bytes from a counter: a random-looking length prefix and body.
    Noise,
}

impl Garbage {
    const ALL: [Self; 4] = [Self::Oversized, Self::HalfFrame, Self::NotJson, Self::Noise];

    fn bytes(self, i: usize) -> Vec<u8> {
        match self {
            Self::Oversized => ((MAX_FRAME + 1 + i) as u32).to_be_bytes().to_vec(),
            Self::HalfFrame => {
                let body = serde_json::to_vec(&Request::new(Op::Status {
                    group: None,
                    live: Some(true),
                }))
                .expect("encode status");
                let mut f = frame::encode_body(&body).expect("frame");
                f.truncate(f.len() / 2);
                f
            }
            Self::NotJson => {
                frame::encode_body(format!("\u{1}garbage {i}\u{ff}").as_bytes()).expect("frame")
            }
            Self::Noise => (0..64u32)
                .map(|b| (b.wrapping_mul(2_654_435_761).wrapping_add(i as u32) >> 13) as u8 | 0x80)
                .collect(),
        }
    }

    /// The stream cannot be resynchronised: the agent closes it after the error.
    fn closes(self) -> bool {
        !matches!(self, Self::NotJson)
    }
}
