//! Client load: C threads, a NEW TCP connection per request (the case that exposes resets),
//! each request carrying a counter the server echoes incremented, checked by the client.
//! Over the demo server's line protocol (`req N` → `gen G N+1`) or over HTTP/1.1
//! (`GET /?n=N`, `Connection: close` → `200 OK`, body `gen G N+1`).

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

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Tally {
    pub by_generation: BTreeMap<u32, u64>,
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub wrong: u64,
}

impl Tally {
    pub fn requests(&self) -> u64 {
        self.by_generation.values().sum::<u64>() + self.failures()
    }

    pub fn failures(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.wrong
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
            "failed: {} (refused {}, reset {}, timeout {}, wrong answer {})",
            self.failures(),
            self.refused,
            self.reset,
            self.timeout,
            self.wrong
        )
    }
}

/// When a request started and which generation answered it.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub start: Instant,
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
        let mut t = tally.lock().expect("tally lock");
        match res {
            Ok(generation) => {
                *t.by_generation.entry(generation).or_default() += 1;
                if record {
                    records.push(Record { start, generation });
                }
            }
            Err(Failure::Refused) => t.refused += 1,
            Err(Failure::Reset) => t.reset += 1,
            Err(Failure::Timeout) => t.timeout += 1,
            Err(Failure::Wrong) => t.wrong += 1,
        }
    }
    records
}

enum Failure {
    Refused,
    Reset,
    Timeout,
    Wrong,
}

fn classify(e: std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Reset,
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
        _ if answer.is_empty() => Err(Failure::Reset),
        _ => Err(Failure::Wrong),
    }
}

/// `GET /?n=N` → `200 OK` with the body `gen G N+1`, on a new connection the server closes.
fn request_http(addr: SocketAddr, n: u64) -> Result<u32, Failure> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(classify)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(classify)?;
    s.write_all(
        format!("GET /?n={n} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(classify)?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).map_err(classify)?;
    if response.is_empty() {
        return Err(Failure::Reset);
    }
    let response = String::from_utf8_lossy(&response);
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Err(Failure::Wrong);
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(Failure::Wrong);
    }
    check_answer(body, n)
}

/// `req N` → `gen G N+1` on a new connection.
fn request(addr: SocketAddr, n: u64) -> Result<u32, Failure> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(classify)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(classify)?;
    s.write_all(format!("req {n}\n").as_bytes())
        .map_err(classify)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(classify)?;
    check_answer(&line, n)
}
