//! Test clients: one request per connection ([`request_once`], [`tally`]) or a held-open
//! connection that sends several requests ([`ClientConn`]).
//!
//! A request that got its answer still counts as failed ([`Slow`]) when its connection
//! retransmitted anything, or when its connect or answer took longer than [`slow_bound`]:
//! a SYN the kernel dropped is retransmitted 1 s later and would otherwise pass for a
//! success, and so would a generation that was activated before its server accepted (its
//! requests just wait in the queue). The retransmission count (`TCP_INFO`) tells a dropped
//! SYN or request exactly, however slow the machine; the time bound is for the queue.

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use super::in_vm;

/// Bound on connect and on waiting for a reply before the client gives up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects or answers slower than this are failures: on the host, half of the 1 s initial
/// retransmission timeout of a dropped SYN. A VM guest runs clients, servers and agent on one
/// emulated vCPU (TCG) that pauses for over a second when the host is busy (a correct answer
/// took 1.41 s there), so its bound is 3 s: dropped segments are caught there by the
/// retransmission count, which does not depend on time.
const SLOW: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(3));

/// See [`SLOW`].
pub fn slow_bound() -> Duration {
    if in_vm() { SLOW.1 } else { SLOW.0 }
}

/// A request that got its answer, but too late to count (see the module doc): the error
/// payload of the [`io::Error`] that [`request_once`] returns then.
#[derive(Debug)]
pub struct Slow {
    pub connect: Duration,
    pub answer: Duration,
    /// Segments the client retransmitted (`tcpi_total_retrans`): a dropped SYN or request.
    pub retransmits: u32,
    pub generation: u32,
}

impl fmt::Display for Slow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "slow: connect took {:?}, answer {:?}, {} segment(s) retransmitted \
             (bound {:?} and no retransmission; generation {} answered)",
            self.connect,
            self.answer,
            self.retransmits,
            slow_bound(),
            self.generation
        )
    }
}

impl std::error::Error for Slow {}

fn is_slow(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Slow>())
}

/// Parses `gen <G> <n+1>` and checks it answers request `n`; returns G.
pub fn parse_reply(line: &str, n: u64) -> io::Result<u32> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply {line:?} to req {n}"),
        )
    };
    let mut parts = line.split_whitespace();
    if parts.next() != Some("gen") {
        return Err(bad());
    }
    let generation = parts
        .next()
        .and_then(|g| g.parse::<u32>().ok())
        .ok_or_else(bad)?;
    let echoed = parts
        .next()
        .and_then(|m| m.parse::<u64>().ok())
        .ok_or_else(bad)?;
    if echoed != n + 1 || parts.next().is_some() {
        return Err(bad());
    }
    Ok(generation)
}

/// A connection that can carry several requests.
pub struct ClientConn {
    reader: BufReader<TcpStream>,
    next: u64,
}

impl ClientConn {
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
            next: 0,
        })
    }

    /// [`ClientConn::connect`] from the local address `source` (a probe port, see
    /// `reuseport_common::PROBE_PORTS`).
    pub fn connect_from(addr: SocketAddr, source: SocketAddr) -> io::Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        // NB: a source port reused within TIME-WAIT of its last connection.
        socket.set_reuse_address(true)?;
        socket.bind(&source.into())?;
        socket.connect_timeout(&addr.into(), CLIENT_TIMEOUT)?;
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
            next: 0,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// Sends `req <n>` without waiting for the answer.
    pub fn send(&mut self, n: u64) -> io::Result<()> {
        self.next = n;
        self.reader
            .get_mut()
            .write_all(format!("req {n}\n").as_bytes())
    }

    /// Waits for the answer to the last [`send`](Self::send); returns the generation.
    pub fn recv(&mut self) -> io::Result<u32> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed without a reply",
            ));
        }
        parse_reply(&line, self.next)
    }

    /// One request and its answer; returns the generation that answered.
    pub fn request(&mut self) -> io::Result<u32> {
        let n = self.next + 1;
        self.send(n)?;
        self.recv()
    }
}

/// connect → `req n` → reply → close; returns the generation that answered, or an error
/// carrying [`Slow`] when the connection retransmitted a segment or the connect or the
/// answer took longer than [`slow_bound`].
pub fn request_once(addr: SocketAddr, n: u64) -> io::Result<u32> {
    let started = Instant::now();
    let mut c = ClientConn::connect(addr)?;
    let connect = started.elapsed();
    c.send(n)?;
    let generation = c.recv()?;
    let answer = started.elapsed() - connect;
    let retransmits = retransmits(c.stream())?;
    if retransmits > 0 || connect > slow_bound() || answer > slow_bound() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            Slow {
                connect,
                answer,
                retransmits,
                generation,
            },
        ));
    }
    Ok(generation)
}

/// Segments `stream` has retransmitted so far, its SYN included (`tcpi_total_retrans`).
pub fn retransmits(stream: &TcpStream) -> io::Result<u32> {
    // SAFETY: `tcp_info` is plain integers, valid zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a live socket, and a buffer of `len` bytes the kernel fills at most.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_total_retrans)
}

/// Which generations answered, and what failed.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub by_generation: BTreeMap<u32, u64>,
    /// Every request that was not answered in time by a generation, slow ones included.
    pub failed: u64,
    /// Of `failed`: answered, but slower than [`slow_bound`].
    pub slow: u64,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
}

impl Tally {
    pub fn record(&mut self, result: io::Result<u32>) {
        match result {
            Ok(g) => *self.by_generation.entry(g).or_default() += 1,
            Err(e) => {
                self.failed += 1;
                self.slow += u64::from(is_slow(&e));
                if self.errors.len() < 5 {
                    self.errors.push(e.to_string());
                }
            }
        }
    }

    /// Connections answered by `generation`.
    pub fn of(&self, generation: u32) -> u64 {
        self.by_generation.get(&generation).copied().unwrap_or(0)
    }

    pub fn answered(&self) -> u64 {
        self.by_generation.values().sum()
    }

    pub fn merge(&mut self, other: &Tally) {
        for (g, n) in &other.by_generation {
            *self.by_generation.entry(*g).or_default() += n;
        }
        self.failed += other.failed;
        self.slow += other.slow;
        for e in &other.errors {
            if self.errors.len() < 5 {
                self.errors.push(e.clone());
            }
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "answered by generation {:?}, failed {} (of which slow {})",
            self.by_generation, self.failed, self.slow
        )?;
        if !self.errors.is_empty() {
            write!(f, " (first errors: {:?})", self.errors)?;
        }
        Ok(())
    }
}

/// `count` sequential one-request connections to `addr`.
pub fn tally(addr: SocketAddr, count: u64) -> Tally {
    let mut t = Tally::default();
    for n in 0..count {
        t.record(request_once(addr, n));
    }
    t
}
