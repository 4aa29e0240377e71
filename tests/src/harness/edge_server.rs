//! [`EdgeServer`]: an accept loop that accepts only when epoll reports its listener readable,
//! edge-triggered (as tokio, nginx and Go do), and that can be made deaf for a while: every
//! readiness event in that time is read and thrown away.
//!
//! That makes a kernel's own wake-up for connections migrated at close irrelevant: the test
//! deafens the server, closes the draining listener (the migration and any wake-up the kernel
//! gives happen inside that `close`), then lets the server hear only events that come after.
//! Whatever gets the migrated connections accepted from then on is a NEW connection to the
//! group: what the agent's wake-up makes.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::server::answer;

const LISTENING: u8 = 0;
const DEAF_ASKED: u8 = 1;
const DEAF: u8 = 2;
const FLUSH_ASKED: u8 = 3;

/// How long a phase change may take to be taken up by the accept thread.
const PHASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept thread looks at its phase while no event arrives. NB: a timeout is
/// never a reason to call accept(): only an event is.
const TICK: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Stats {
    accepted: AtomicU64,
    served: AtomicU64,
}

/// A generation's edge-triggered accept loop (see the module doc). Dropping it closes the
/// listener.
pub struct EdgeServer {
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    thread: Option<JoinHandle<()>>,
}

impl EdgeServer {
    pub fn start(listener: TcpListener, generation: u32) -> Self {
        listener
            .set_nonblocking(true)
            .expect("make listener non-blocking");
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll_create");
        epoll
            .add(
                listener.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0),
            )
            .expect("epoll_ctl(ADD) of the listener, edge-triggered");
        let phase = Arc::new(AtomicU8::new(LISTENING));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let thread = std::thread::Builder::new()
            .name(format!("gen{generation}-edge"))
            .spawn({
                let (phase, stop, stats) = (phase.clone(), stop.clone(), stats.clone());
                move || accept_loop(&listener, &epoll, generation, &phase, &stop, &stats)
            })
            .expect("spawn the edge-triggered accept thread");
        Self {
            phase,
            stop,
            stats,
            thread: Some(thread),
        }
    }

    /// From now on every readiness event is read and discarded; returns once the accept
    /// thread has taken that up.
    pub fn deafen(&self) {
        self.change_phase(DEAF_ASKED, DEAF, "the server turned deaf");
    }

    /// Throws away every event that arrived so far, then accepts again on each new one;
    /// returns once the old events are gone.
    pub fn hear_only_new_events(&self) {
        self.change_phase(
            FLUSH_ASKED,
            LISTENING,
            "the server discarded its old events",
        );
    }

    fn change_phase(&self, ask: u8, done: u8, what: &str) {
        self.phase.store(ask, Ordering::SeqCst);
        super::wait_until(what, PHASE_TIMEOUT, || {
            self.phase.load(Ordering::SeqCst) == done
        });
    }

    /// Connections accepted, including ones that sent nothing (the agent's wake-ups).
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Connections that carried at least one request.
    pub fn served(&self) -> u64 {
        self.stats.served.load(Ordering::SeqCst)
    }
}

impl Drop for EdgeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    epoll: &Epoll,
    generation: u32,
    phase: &AtomicU8,
    stop: &AtomicBool,
    stats: &Arc<Stats>,
) {
    let mut events = [EpollEvent::empty(); 8];
    let tick = EpollTimeout::try_from(TICK).expect("a small timeout");
    while !stop.load(Ordering::SeqCst) {
        let n = match epoll.wait(&mut events, tick) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("gen {generation}: epoll_wait failed: {e}");
                return;
            }
        };
        match phase.load(Ordering::SeqCst) {
            DEAF_ASKED => phase.store(DEAF, Ordering::SeqCst),
            DEAF => {}
            FLUSH_ASKED => {
                // NB: the events of everything that happened before the call are on the
                // ready list by now (a wake-up is queued inside the syscall that causes it).
                while epoll
                    .wait(&mut events, EpollTimeout::ZERO)
                    .is_ok_and(|n| n > 0)
                {}
                phase.store(LISTENING, Ordering::SeqCst);
            }
            _ if n > 0 => accept_all(listener, generation, stats),
            _ => {}
        }
    }
}

/// Edge-triggered: one event means "something arrived"; accept until the queue is empty.
fn accept_all(listener: &TcpListener, generation: u32, stats: &Arc<Stats>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stats.accepted.fetch_add(1, Ordering::SeqCst);
                let stats = stats.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, generation, &stats);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                eprintln!("gen {generation}: accept failed: {e}");
                return;
            }
        }
    }
}

fn serve(stream: TcpStream, generation: u32, stats: &Stats) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    stats.served.fetch_add(1, Ordering::SeqCst);
    writer.write_all(answer(generation, &line).as_bytes())
}
