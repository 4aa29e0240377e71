//! The demo's server: an ordinary LISTEN_FDS server that knows nothing about reuseport.
//! Answers `req N` with `gen G N+1`; with `--http`, answers `GET /` with `200 OK`, the body
//! `gen G` and `Connection: close` (for HTTP load generators such as wrk), and `GET /?n=N`
//! with the body `gen G N+1` (the counter check of our own load generator). On SIGTERM it
//! closes its listener (queued connections then migrate to the active generation), finishes
//! the requests in flight and exits; with `--abrupt` it has no SIGTERM handler and dies on
//! the signal with whatever it holds, as a plain Python server does.

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
    /// The generation this server names in its answers (`reuseportctl supervise` sets
    /// REUSEPORT_GENERATION).
    #[arg(long, env = "REUSEPORT_GENERATION")]
    pub generation: u32,
    /// Speak HTTP/1.1: `GET /` → `200 OK`, body `gen G` (`GET /?n=N`: `gen G N+1`), then
    /// close the connection.
    #[arg(long)]
    pub http: bool,
    /// Take this long over each request before answering.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// No SIGTERM handler: the signal's default action ends the process at once.
    #[arg(long)]
    pub abrupt: bool,
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
    rt.block_on(run(listener, opts))
}

async fn run(listener: std::net::TcpListener, opts: &ServerOpts) -> anyhow::Result<()> {
    let (generation, http) = (opts.generation, opts.http);
    let delay = std::time::Duration::from_millis(opts.delay_ms);
    let listener = TcpListener::from_std(listener).context("registering the listener")?;
    let mut term = if opts.abrupt {
        None
    } else {
        Some(signal(SignalKind::terminate())?)
    };
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                if http {
                    conns.spawn(answer_http(stream, generation, delay));
                } else {
                    conns.spawn(answer(stream, generation, delay));
                }
            }
            _ = recv_term(term.as_mut()) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    Ok(())
}

async fn recv_term(term: Option<&mut tokio::signal::unix::Signal>) {
    match term {
        Some(t) => {
            t.recv().await;
        }
        None => std::future::pending().await,
    }
}

async fn answer(stream: tokio::net::TcpStream, generation: u32, delay: std::time::Duration) {
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
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let _ = wr
        .write_all(format!("gen {generation} {}\n", n + 1).as_bytes())
        .await;
}

/// One HTTP/1.1 request, one answer, then the connection is closed (whatever the client
/// asked for: every request of a load generator is then a new connection).
async fn answer_http(stream: tokio::net::TcpStream, generation: u32, delay: std::time::Duration) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut request_line = String::new();
    match rd.read_line(&mut request_line).await {
        Ok(0) | Err(_) => return, // e.g. the agent's wake-up connections
        Ok(_) => {}
    }
    // The headers, up to the empty line: read them all so that closing the socket does not
    // reset the connection because of unread data.
    let mut header = String::new();
    let mut total = request_line.len();
    loop {
        header.clear();
        match rd.read_line(&mut header).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
        if header == "\r\n" || header == "\n" {
            break;
        }
        if total > 16 * 1024 {
            return;
        }
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut words = request_line.split_whitespace();
    let (status, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/")) => ("200 OK", format!("gen {generation}\n")),
        (Some("GET"), Some(path)) if let Some(n) = counter(path) => (
            "200 OK",
            format!("gen {generation} {}\n", n.wrapping_add(1)),
        ),
        (Some("GET"), _) => ("404 Not Found", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET only\n".to_owned()),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    if wr.write_all(answer.as_bytes()).await.is_ok() {
        let _ = wr.shutdown().await;
    }
}

/// N of `/?n=N`.
fn counter(path: &str) -> Option<u64> {
    path.strip_prefix("/?n=")?.parse().ok()
}
