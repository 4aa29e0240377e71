//! Client load: C threads, a NEW TCP connection per request (the case that exposes resets),
//! each request carrying a counter the server echoes incremented, checked by the client.
//! Over the demo server's line protocol (`req N` → `gen G N+1`) or over HTTP/1.1
//! (`GET /?n=N`, `Connection: close` → `200 OK`, body `gen G N+1`).
//!
//! Failures are counted by exact kind. A request whose connect or answer took longer than
//! [`SLOW`] is one of them: a SYN the kernel dropped is retransmitted after 1 s, and a
//! generation activated before its server accepts makes requests wait in its queue; both
//! would otherwise pass for successes.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Connects or answers slower than this are failures (half the 1 s retransmission timeout of
/// a dropped SYN).
pub const SLOW: Duration = Duration::from_millis(500);

/// Bound on connect and on each read before the client gives up (a timeout failure).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Tally {
    pub by_generation: BTreeMap<u32, u64>,
    /// Connect refused (ECONNREFUSED).
    pub refused: u64,
    /// Connection reset by the server (ECONNRESET, ECONNABORTED).
    pub reset: u64,
    /// Closed by the server without an answer (EOF, EPIPE).
    pub closed: u64,
    /// No connect or answer within [`CLIENT_TIMEOUT`].
    pub timeout: u64,
    /// Answered, but slower than [`SLOW`].
    pub slow: u64,
    /// An answer that does not answer the request.
    pub wrong: u64,
    /// Any other error.
    pub other: u64,
}

impl Tally {
    pub fn requests(&self) -> u64 {
        self.by_generation.values().sum::<u64>() + self.failures()
    }

    pub fn failures(&self) -> u64 {
        self.refused + self.reset + self.closed + self.timeout + self.slow + self.wrong + self.other
    }

    pub fn line(&self) -> String {
        let gens: Vec<String> = self
            .by_generation
            .iter()
            .map(|(g, n)| format!("gen{g} {n:>6}"))
            .collect();
        format!("{}   failed {}", gens.join("  "), self.failures())
    }

    pub fn failure_line(&self) -> String {
        format!(
            "failed: {} (refused {}, reset {}, closed {}, timeout {}, slow {}, wrong answer {}, \
             other {})",
            self.failures(),
            self.refused,
            self.reset,
            self.closed,
            self.timeout,
            self.slow,
            self.wrong,
            self.other
        )
    }
}

/// When a request started, when its connection was established, and which generation
/// answered it.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub start: Instant,
    pub connected: Instant,
    pub generation: u32,
}

/// What the clients speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Line,
    Http,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    /// Starts `clients` threads against `addr`; with `record`, every answered request is
    /// kept with its start time (for flip latency).
    pub fn start(addr: SocketAddr, clients: usize, record: bool) -> Self {
        Self::start_proto(addr, clients, record, Proto::Line)
    }

    /// [`Load::start`] speaking `proto`.
    pub fn start_proto(addr: SocketAddr, clients: usize, record: bool, proto: Proto) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, tally) = (stop.clone(), tally.clone());
                thread::spawn(move || client_loop(addr, proto, &tally, &stop, record))
            })
            .collect();
        Self {
            stop,
            tally,
            threads,
        }
    }

    pub fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().expect("tally lock")
    }

    pub fn stop(self) -> (Tally, Vec<Record>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut records = Vec::new();
        for t in self.threads {
            records.extend(t.join().unwrap_or_default());
        }
        let tally = self.tally.lock().expect("tally lock").clone();
        (tally, records)
    }
}

fn client_loop(
    addr: SocketAddr,
    proto: Proto,
    tally: &Mutex<Tally>,
    stop: &AtomicBool,
    record: bool,
) -> Vec<Record> {
    let mut n: u64 = 0;
    let mut records = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let start = Instant::now();
        let res = match proto {
            Proto::Line => request(addr, n),
            Proto::Http => request_http(addr, n),
        };
        let done = Instant::now();
        let mut t = tally.lock().expect("tally lock");
        match res {
            Ok((connected, _)) if connected - start > SLOW || done - connected > SLOW => {
                t.slow += 1;
            }
            Ok((connected, generation)) => {
                *t.by_generation.entry(generation).or_default() += 1;
                if record {
                    records.push(Record {
                        start,
                        connected,
                        generation,
                    });
                }
            }
            Err(Failure::Refused) => t.refused += 1,
            Err(Failure::Reset) => t.reset += 1,
            Err(Failure::Closed) => t.closed += 1,
            Err(Failure::Timeout) => t.timeout += 1,
            Err(Failure::Wrong) => t.wrong += 1,
            Err(Failure::Other) => t.other += 1,
        }
    }
    records
}

enum Failure {
    Refused,
    Reset,
    Closed,
    Timeout,
    Wrong,
    Other,
}

fn classify(e: std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Failure::Refused,
        K::ConnectionReset | K::ConnectionAborted => Failure::Reset,
        K::UnexpectedEof | K::BrokenPipe => Failure::Closed,
        K::TimedOut | K::WouldBlock => Failure::Timeout,
        _ => Failure::Other,
    }
}

/// `gen G M` with M = n + 1 → G.
fn check_answer(answer: &str, n: u64) -> Result<u32, Failure> {
    let mut parts = answer.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|g| g.parse().ok()),
        parts.next(),
    ) {
        (Some("gen"), Some(generation), Some(m)) if m == (n + 1).to_string() => Ok(generation),
        _ if answer.is_empty() => Err(Failure::Closed),
        _ => Err(Failure::Wrong),
    }
}

/// `GET /?n=N` → `200 OK` with the body `gen G N+1`, on a new connection the server closes.
/// Returns when the connection was established, and the generation.
fn request_http(addr: SocketAddr, n: u64) -> Result<(Instant, u32), Failure> {
    let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT).map_err(classify)?;
    let connected = Instant::now();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(classify)?;
    s.write_all(
        format!("GET /?n={n} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(classify)?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).map_err(classify)?;
    if response.is_empty() {
        return Err(Failure::Closed);
    }
    let response = String::from_utf8_lossy(&response);
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Err(Failure::Wrong);
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(Failure::Wrong);
    }
    check_answer(body, n).map(|g| (connected, g))
}

/// `req N` → `gen G N+1` on a new connection. Returns when the connection was established,
/// and the generation.
fn request(addr: SocketAddr, n: u64) -> Result<(Instant, u32), Failure> {
    let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT).map_err(classify)?;
    let connected = Instant::now();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(classify)?;
    s.write_all(format!("req {n}\n").as_bytes())
        .map_err(classify)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(classify)?;
    check_answer(&line, n).map(|g| (connected, g))
}
