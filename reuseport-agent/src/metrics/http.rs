//! The metrics listener: HTTP/1 (hyper) on the agent's runtime, `GET` only, five paths. It
//! cannot take what the control plane needs: at most [`MAX_CONNECTIONS`] connections at once
//! (more wait in the kernel's backlog), a request head must arrive within
//! [`HEADER_TIMEOUT`], and a connection lives at most [`CONNECTION_LIFETIME`] (a client that
//! stops reading gives its place back).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

use super::{Listen, Metrics, export::Status, exposition, page};
use crate::agent::Agent;

pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `listen`, starts the sampler and serves; returns the bound address.
pub async fn start(agent: Arc<Agent>, listen: Listen) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen.addr())
        .await
        .with_context(|| format!("--metrics-listen {}", listen.addr()))?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::new(agent));
    tokio::spawn(metrics.clone().sample_loop());
    tokio::spawn(accept_loop(listener, metrics));
    tracing::info!(
        "metrics: /metrics and the status page on http://{addr}/ (status.json, status.csv, \
         history.csv)"
    );
    Ok(addr)
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut failing = false;
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                stream
            }
            Err(e) => {
                // NB: out of descriptors, accept fails at once every time: pause, log once.
                if !failing {
                    tracing::warn!(error = %e, "metrics: accepting a connection");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| answer(metrics.clone(), req));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

type Answer = Response<Full<Bytes>>;

async fn answer(metrics: Arc<Metrics>, req: Request<Incoming>) -> Result<Answer, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut a = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here\n".into(),
        );
        a.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(a);
    }
    let path = req.uri().path();
    let Some(form) = Form::of(path) else {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            format!(
                "no page at {path}: this agent serves /, /metrics, /status.json, /status.csv \
                 and /history.csv\n"
            ),
        ));
    };
    let view = metrics.view().await;
    // NB: encoding every group is CPU work (milliseconds at hundreds of groups): off the
    // runtime's two worker threads, which serve the control socket.
    let body = tokio::task::spawn_blocking(move || form.render(&metrics, view)).await;
    Ok(match body {
        Ok(body) => {
            let mut a = Response::new(Full::new(Bytes::from(body)));
            let h = a.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(form.content_type()),
            );
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            a
        }
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the answer failed: {e}\n"),
        ),
    })
}

/// What a path serves.
#[derive(Clone, Copy)]
enum Form {
    Metrics,
    Page,
    Json,
    Csv,
    HistoryCsv,
}

impl Form {
    fn of(path: &str) -> Option<Self> {
        Some(match path {
            "/metrics" => Self::Metrics,
            "/" => Self::Page,
            "/status.json" => Self::Json,
            "/status.csv" => Self::Csv,
            "/history.csv" => Self::HistoryCsv,
            _ => return None,
        })
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Metrics => exposition::CONTENT_TYPE,
            Self::Page => "text/html; charset=utf-8",
            Self::Json => "application/json",
            Self::Csv | Self::HistoryCsv => "text/csv; charset=utf-8",
        }
    }

    fn render(self, metrics: &Metrics, view: super::View) -> String {
        let view = Arc::new(view);
        let status = || Status::of(&view, metrics.charts(&view));
        match self {
            Self::Metrics => exposition::render(view.clone()),
            Self::Page => page::render(&status()),
            Self::Json => serde_json::to_string_pretty(&status()).expect("the status serializes"),
            Self::Csv => status().csv(),
            Self::HistoryCsv => status().history_csv(),
        }
    }
}

fn plain(status: StatusCode, text: String) -> Answer {
    let mut a = Response::new(Full::new(Bytes::from(text)));
    *a.status_mut() = status;
    a.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    a
}
