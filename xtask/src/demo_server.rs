//! The demo's server: an ordinary LISTEN_FDS server that knows nothing about reuseport.
//! Answers `req N` with `gen G N+1`. On SIGTERM it closes its listener (queued connections
//! then migrate to the active generation), finishes the requests in flight and exits.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};

#[derive(clap::Args, Debug)]
pub struct ServerOpts {
    #[arg(long)]
    pub generation: u32,
}

pub fn serve(opts: &ServerOpts) -> anyhow::Result<()> {
    let fds: u32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pid: u32 = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if fds != 1 || pid != std::process::id() {
        bail!(
            "demo-server expects one socket from systemd-style activation (LISTEN_FDS=1, LISTEN_PID)"
        );
    }
    // SAFETY: LISTEN_FDS=1 for this pid: fd 3 is ours.
    let listener = std::net::TcpListener::from(unsafe { OwnedFd::from_raw_fd(3) });
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(listener, opts.generation))
}

async fn run(listener: std::net::TcpListener, generation: u32) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(listener).context("registering the listener")?;
    let mut term = signal(SignalKind::terminate())?;
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                conns.spawn(answer(stream, generation));
            }
            _ = term.recv() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

async fn answer(stream: tokio::net::TcpStream, generation: u32) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(rd).read_line(&mut line).await.is_err() {
        return;
    }
    let Some(n) = line
        .strip_prefix("req ")
        .and_then(|n| n.trim().parse::<u64>().ok())
    else {
        return; // e.g. the agent's wake-up connections, which send nothing
    };
    let _ = wr
        .write_all(format!("gen {generation} {}\n", n + 1).as_bytes())
        .await;
}
