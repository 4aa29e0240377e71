//! The benchmark's fleet: listeners bound and listening in this process, each registered over
//! a control connection of its own (held open: closing it unregisters the socket), and served
//! in-process with the demo server's line protocol (`req N` → `gen G N+1`), so that
//! [`crate::load`] can drive any group and tell which generation answered.
//!
//! One process holding every listener keeps 8,192 of them within a 2-core machine: a process
//! per listener would measure the scheduler, not the agent.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd as _, FromRawFd as _, IntoRawFd as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::stack::Control;

/// A listener in `addr`'s SO_REUSEPORT group, listening.
pub fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    // SAFETY: the descriptor is ours (into_raw_fd gives up tokio's ownership).
    let listener = unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) };
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) } < 0 {
        bail!("listen {addr}: {}", std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// Registers `listener` as `generation` of `group`; the returned connection is the
/// registration (dropping it unregisters the socket). An error carries the agent's answer.
pub fn register(
    control: &Path,
    listener: &TcpListener,
    group: &str,
    generation: u32,
) -> anyhow::Result<Control> {
    let mut conn = Control::connect(control).context("connecting to the agent")?;
    let request = serde_json::json!({
        "v": 1, "op": "register", "group": group, "generation": generation
    });
    let answer: serde_json::Value = conn
        .round_trip(&request, Some(listener.as_fd()))?
        .context("the agent closed the registration without answering")?;
    if answer["type"] != "registered" {
        bail!(
            "{} ({})",
            answer["message"].as_str().unwrap_or("refused"),
            answer["kind"].as_str().unwrap_or("?")
        );
    }
    Ok(conn)
}

/// Serves listeners on a runtime of its own (one thread), each until its [`Served`] handle
/// drops. The thread lives as long as the process: the benchmark ends with it.
pub struct Server {
    handle: tokio::runtime::Handle,
}

/// A listener being served; dropping it closes the listener.
pub struct Served(tokio::task::JoinHandle<()>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Server {
    pub fn start() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the in-process server")?;
        let handle = rt.handle().clone();
        std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
        Ok(Self { handle })
    }

    /// Accepts on `listener` and answers as `generation`.
    pub fn serve(&self, listener: TcpListener, generation: u32) -> anyhow::Result<Served> {
        listener.set_nonblocking(true)?;
        let _guard = self.handle.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        Ok(Served(self.handle.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, generation));
            }
        })))
    }
}

async fn answer(stream: tokio::net::TcpStream, generation: u32) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(rd).read_line(&mut line).await.is_err() {
        return;
    }
    // The agent's wake-up connections send nothing.
    if let Some(n) = line
        .strip_prefix("req ")
        .and_then(|n| n.trim().parse::<u64>().ok())
    {
        let _ = wr
            .write_all(format!("gen {generation} {}\n", n + 1).as_bytes())
            .await;
    }
}

/// One registered, served socket of the fleet.
pub struct Member {
    _served: Served,
    _registration: Control,
}

impl Member {
    pub fn new(served: Served, registration: Control) -> Self {
        Self {
            _served: served,
            _registration: registration,
        }
    }
}

/// Raises RLIMIT_NOFILE to `n`: the hard limit too where this process may (root, up to
/// `fs.nr_open`), else the soft one up to the hard limit; returns the soft limit set.
/// NB: the agent inherits the hard limit and raises its own as its `--max-groups` needs
/// (see its `admission` module); the bench's listeners and registrations need this one.
pub fn raise_nofile(n: u64) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("reading RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        }
        let both = libc::rlimit {
            rlim_cur: n.max(lim.rlim_cur),
            rlim_max: n.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &both) == 0 {
            return Ok(both.rlim_cur);
        }
        lim.rlim_cur = n.min(lim.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!(
                "raising RLIMIT_NOFILE to {}: {}",
                lim.rlim_cur,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(lim.rlim_cur)
}
