//! Test servers: an accept loop that answers `req <n>` with `gen <G> <n+1>`, either with
//! blocking `accept()` on a thread or as a tokio (epoll) task. Each accepted connection is
//! served on its own thread/task, so held-open clients never stall the accept loop.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// How long a server connection waits for the next request line before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// A thread blocked in `accept()`.
    Blocking,
    /// A tokio task (epoll readiness).
    Tokio,
}

#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    served: AtomicU64,
    requests: AtomicU64,
    running: AtomicBool,
}

enum Inner {
    Blocking {
        listener: Arc<TcpListener>,
        stopping: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    },
    Tokio {
        task: tokio::task::JoinHandle<()>,
    },
}

/// A running accept loop for one generation. Dropping it closes the listener.
pub struct Server {
    generation: u32,
    stats: Arc<Stats>,
    inner: Inner,
}

impl Server {
    /// Starts serving on `listener` (blocking or not, it is switched as `kind` needs).
    pub fn start(
        kind: ServerKind,
        listener: TcpListener,
        generation: u32,
        rt: &tokio::runtime::Handle,
    ) -> Self {
        let stats = Arc::new(Stats::default());
        stats.running.store(true, Ordering::SeqCst);
        let inner = match kind {
            ServerKind::Blocking => {
                listener
                    .set_nonblocking(false)
                    .expect("make listener blocking");
                let listener = Arc::new(listener);
                let stopping = Arc::new(AtomicBool::new(false));
                let thread = std::thread::Builder::new()
                    .name(format!("gen{generation}-accept"))
                    .spawn({
                        let (listener, stopping, stats) =
                            (listener.clone(), stopping.clone(), stats.clone());
                        move || blocking_accept_loop(&listener, generation, &stopping, &stats)
                    })
                    .expect("spawn accept thread");
                Inner::Blocking {
                    listener,
                    stopping,
                    thread: Some(thread),
                }
            }
            ServerKind::Tokio => {
                listener
                    .set_nonblocking(true)
                    .expect("make listener non-blocking");
                let _guard = rt.enter();
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("register with tokio");
                let task = rt.spawn(tokio_accept_loop(listener, generation, stats.clone()));
                Inner::Tokio { task }
            }
        };
        Self {
            generation,
            stats,
            inner,
        }
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Connections accepted, including ones that sent nothing (such as the agent's wake-up).
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Connections that carried at least one request.
    pub fn served(&self) -> u64 {
        self.stats.served.load(Ordering::SeqCst)
    }

    /// Requests answered, over all connections.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::SeqCst)
    }

    /// True while the accept loop runs (it ends only when the listener fails or is closed).
    pub fn is_accepting(&self) -> bool {
        self.stats.running.load(Ordering::SeqCst)
            && match &self.inner {
                Inner::Blocking { thread, .. } => thread.as_ref().is_some_and(|t| !t.is_finished()),
                Inner::Tokio { task } => !task.is_finished(),
            }
    }

    /// Whether the listening socket is still in LISTEN state (SO_ACCEPTCONN). Blocking
    /// servers only: a tokio server's listener is owned by its task.
    pub fn is_listening(&self) -> bool {
        match &self.inner {
            Inner::Blocking { listener, .. } => socket2::SockRef::from(&**listener)
                .is_listener()
                .expect("getsockopt(SO_ACCEPTCONN)"),
            Inner::Tokio { .. } => panic!("is_listening() is only available for blocking servers"),
        }
    }

    /// Closes the listener and ends the accept loop; served connections finish on their own.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.inner {
            Inner::Blocking {
                listener,
                stopping,
                thread,
            } => {
                stopping.store(true, Ordering::SeqCst);
                // NB: shutdown() on a listening socket wakes a thread blocked in accept()
                // (which then fails with EINVAL); closing the fd alone would not.
                let _ = socket2::SockRef::from(&**listener).shutdown(Shutdown::Both);
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
            Inner::Tokio { task } => task.abort(),
        }
    }
}

fn blocking_accept_loop(
    listener: &TcpListener,
    generation: u32,
    stopping: &AtomicBool,
    stats: &Arc<Stats>,
) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stats.accepted.fetch_add(1, Ordering::SeqCst);
                let stats = stats.clone();
                std::thread::spawn(move || {
                    let _ = serve_blocking(stream, generation, &stats);
                });
            }
            Err(_) if stopping.load(Ordering::SeqCst) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                eprintln!("gen {generation}: accept failed: {e}");
                break;
            }
        }
    }
    stats.running.store(false, Ordering::SeqCst);
}

fn serve_blocking(stream: TcpStream, generation: u32, stats: &Stats) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nonblocking(false)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = answer(generation, &line);
        if first {
            stats.served.fetch_add(1, Ordering::SeqCst);
            first = false;
        }
        stats.requests.fetch_add(1, Ordering::SeqCst);
        writer.write_all(answer.as_bytes())?;
    }
}

async fn tokio_accept_loop(listener: tokio::net::TcpListener, generation: u32, stats: Arc<Stats>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                stats.accepted.fetch_add(1, Ordering::SeqCst);
                let stats = stats.clone();
                tokio::spawn(async move {
                    let _ = serve_tokio(stream, generation, &stats).await;
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                eprintln!("gen {generation}: accept failed: {e}");
                break;
            }
        }
    }
    stats.running.store(false, Ordering::SeqCst);
}

async fn serve_tokio(
    stream: tokio::net::TcpStream,
    generation: u32,
    stats: &Stats,
) -> io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        let n = tokio::time::timeout(IDLE_TIMEOUT, reader.read_line(&mut line))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        let answer = answer(generation, &line);
        if first {
            stats.served.fetch_add(1, Ordering::SeqCst);
            first = false;
        }
        stats.requests.fetch_add(1, Ordering::SeqCst);
        writer.write_all(answer.as_bytes()).await?;
    }
}

/// `req <n>` → `gen <G> <n+1>`; anything else → `error <line>`.
pub(super) fn answer(generation: u32, line: &str) -> String {
    match line
        .trim_end()
        .strip_prefix("req ")
        .and_then(|n| n.parse::<u64>().ok())
    {
        Some(n) => format!("gen {generation} {}\n", n + 1),
        None => format!("error bad request {:?}\n", line.trim_end()),
    }
}

/// Connections waiting in a listener's accept queue: for a listening socket TCP_INFO reports
/// `sk_ack_backlog` in `tcpi_unacked`.
pub fn accept_queue_len(listener: &TcpListener) -> u32 {
    // SAFETY: getsockopt fills the zeroed tcp_info we own, up to `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let res = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(
        res,
        0,
        "getsockopt(TCP_INFO): {}",
        io::Error::last_os_error()
    );
    info.tcpi_unacked
}
