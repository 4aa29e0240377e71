//! The suite's own clients must see what they are there to see: a SYN the kernel dropped
//! costs a retransmission (1 s) and must count as a failed request, not as a slow success.
//! Every zero-loss test relies on that.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use crate::harness::{
    Slow, Tally, TestEnv, accept_queue_len, local, patience, request_once, slow_bound, wait_until,
};

/// A listener whose accept queue is full drops every SYN (the client retransmits it 1 s
/// later): the request gets its answer, late, and the client counts it as failed.
#[test]
fn a_request_whose_syn_was_dropped_counts_as_failed() {
    const PORT: u16 = 8901;
    let _env = TestEnv::new("a_request_whose_syn_was_dropped_counts_as_failed");
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.bind(&local(PORT).into()).expect("bind");
    // NB: backlog 0 holds one connection; the queue is full from the first one on.
    socket.listen(0).expect("listen");
    let listener: std::net::TcpListener = socket.into();
    let first = TcpStream::connect(local(PORT)).expect("the first connection fills the queue");
    wait_until(
        "the first connection waits in the accept queue",
        patience(Duration::from_secs(5)),
        || accept_queue_len(&listener) == 1,
    );

    let overflows = listen_overflows();
    let client = std::thread::spawn(move || request_once(local(PORT), 7));
    wait_until(
        "the kernel dropped the client's SYN (the accept queue is full)",
        patience(Duration::from_secs(5)),
        || listen_overflows() > overflows,
    );
    // Room again, and answers from now on: the retransmitted SYN gets through.
    let server = std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let mut stream = stream.expect("accept");
            let mut line = String::new();
            if BufReader::new(&stream)
                .read_line(&mut line)
                .is_ok_and(|n| n > 0)
            {
                let n: u64 = line
                    .trim()
                    .trim_start_matches("req ")
                    .parse()
                    .expect("req N");
                let _ = stream.write_all(format!("gen 1 {}\n", n + 1).as_bytes());
            }
        }
    });
    drop(first);

    let result = client.join().expect("client thread");
    let retransmits = result
        .as_ref()
        .err()
        .and_then(|e| e.get_ref())
        .and_then(|e| e.downcast_ref::<Slow>())
        .map(|slow| slow.retransmits);
    let mut t = Tally::default();
    t.record(result);
    println!("a request whose SYN was dropped: {t}");
    assert_eq!(
        (t.failed, t.slow, t.answered()),
        (1, 1, 0),
        "the request should count as failed although it got its answer: {t}"
    );
    assert!(
        retransmits.is_some_and(|n| n >= 1),
        "the failure should count the retransmitted SYN ({retransmits:?}), whatever the \
         bound ({:?}): {t}",
        slow_bound()
    );
    server.join().expect("server thread");
}

/// `TcpExt: ListenOverflows` of the calling thread's network namespace: SYNs dropped because
/// an accept queue was full.
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")
        .expect("read /proc/thread-self/net/netstat");
    let mut tcp_ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (
        tcp_ext.next().expect("TcpExt names"),
        tcp_ext.next().expect("TcpExt values"),
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .expect("a ListenOverflows counter")
}
