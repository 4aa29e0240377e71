//! `--metrics-listen`: `/metrics` for Prometheus and a status page, on one HTTP listener of
//! the agent's own runtime (see `docs/metrics.md`).
//!
//! - [`sample`]: one look at every group (state lock taken group by group); [`history`]: the
//!   page's chart data, from one sample a second; [`events`]: flips and refusals, which
//!   `status` does not count.
//! - [`exposition`]: the Prometheus text format; [`export`]: the page's data, as JSON and
//!   CSV; [`page`]: the page itself (HTML, inline SVG); [`http`]: the listener.
//!
//! What a request costs the control plane: nothing under the state lock. A sampler takes the
//! counters of every group once a second ([`SAMPLE_INTERVAL`]); every request is answered
//! from the latest sample. The live figures (sock_diag and the process walk: 1-10 ms per
//! group) are read only when a request wants them and the last ones are older than
//! [`LiveCache::max_age`]: at least a second, and ten times what reading them last cost, so
//! scrapes and page views together never spend more than a tenth of a core on them however
//! many groups there are. Requests that find them stale while another reads them wait for
//! that read instead of starting their own.

pub mod events;
mod export;
mod exposition;
mod history;
mod http;
mod page;
mod sample;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::agent::Agent;
use history::History;
use sample::Sample;

pub use http::start;

/// How often the sampler reads every group's counters (the chart's resolution).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Where `--metrics-listen` serves. A loopback address unless the operator said otherwise
/// (`--metrics-allow-remote`): the page and `/metrics` show every group's address, pids and
/// generation names to whoever connects, without authentication.
#[derive(Clone, Copy, Debug)]
pub struct Listen(SocketAddr);

impl Listen {
    pub fn new(addr: SocketAddr, allow_remote: bool) -> Result<Self, String> {
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(format!(
                "--metrics-listen {addr} is not a loopback address: whoever connects sees every \
                 group, pid and generation name; add --metrics-allow-remote to serve them there"
            ));
        }
        Ok(Self(addr))
    }

    pub fn addr(self) -> SocketAddr {
        self.0
    }
}

/// What the metrics listener shares between the sampler and its requests.
pub struct Metrics {
    agent: Arc<Agent>,
    /// The sampler's latest sample (counters, no live figures).
    latest: Mutex<Arc<Sample>>,
    history: Mutex<History>,
    live: tokio::sync::Mutex<LiveCache>,
}

/// The live figures last read, and what reading them cost.
#[derive(Default)]
struct LiveCache {
    read: Option<(Instant, Arc<Sample>)>,
}

impl LiveCache {
    /// Live figures younger than this are served as they are.
    fn max_age(&self) -> Duration {
        let cost = self.read.as_ref().map_or(Duration::ZERO, |(_, s)| s.took);
        (cost * 10).max(Duration::from_secs(1))
    }

    fn fresh(&self) -> Option<Arc<Sample>> {
        self.read
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.max_age())
            .map(|(_, s)| s.clone())
    }
}

/// What a request is answered from: the latest counters with the live figures on them.
pub struct View {
    pub sample: Sample,
    /// How old the live figures are, if any were read.
    pub live_age: Option<Duration>,
    /// What reading the live figures last cost, and the last counter sample.
    pub live_cost: Option<Duration>,
    pub sample_cost: Duration,
    pub refusals: Vec<(reuseport_proto::message::ErrorKind, u64)>,
    pub limits: reuseport_proto::message::Limits,
    pub mode: &'static str,
}

impl Metrics {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self {
            agent,
            latest: Mutex::new(Arc::new(Sample::empty())),
            history: Mutex::new(History::default()),
            live: tokio::sync::Mutex::new(LiveCache::default()),
        }
    }

    /// Takes a sample now and every [`SAMPLE_INTERVAL`], for as long as the runtime runs.
    pub async fn sample_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            let sampled = tokio::task::spawn_blocking(move || {
                let sample = Arc::new(Sample::take(&me.agent, false));
                lock(&me.history).record(&sample);
                *lock(&me.latest) = sample;
            })
            .await;
            if let Err(e) = sampled {
                tracing::warn!(error = %e, "metrics: taking a sample failed");
            }
        }
    }

    /// The latest sample with live figures no older than [`LiveCache::max_age`].
    pub async fn view(&self) -> View {
        let live = self.live_figures().await;
        let latest = lock(&self.latest).clone();
        let live_age = live.as_ref().map(|l| l.at.elapsed().unwrap_or_default());
        let sample = match &live {
            Some(l) => (*latest).clone().with_live_of(l),
            None => (*latest).clone(),
        };
        View {
            sample_cost: latest.took,
            live_cost: live.as_ref().map(|l| l.took),
            live_age,
            sample,
            refusals: self.agent.refusals.snapshot(),
            limits: self.agent.limits(),
            mode: self.agent.mode.as_str(),
        }
    }

    /// The chart data of every group of `view`, in its order.
    pub fn charts(&self, view: &View) -> Vec<history::GroupChart> {
        let history = lock(&self.history);
        view.sample
            .groups
            .iter()
            .map(|g| history.chart(&g.key))
            .collect()
    }

    async fn live_figures(&self) -> Option<Arc<Sample>> {
        let mut cache = self.live.lock().await;
        if let Some(fresh) = cache.fresh() {
            return Some(fresh);
        }
        let agent = self.agent.clone();
        match tokio::task::spawn_blocking(move || Sample::take(&agent, true)).await {
            Ok(sample) => {
                let sample = Arc::new(sample);
                cache.read = Some((Instant::now(), sample.clone()));
                Some(sample)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: reading the live figures failed");
                cache.read.as_ref().map(|(_, s)| s.clone())
            }
        }
    }
}

/// NB: a panic aborts the agent (see its panic hook), so a poisoned lock is never seen.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("metrics state poisoned")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_without_asking() {
        let listen = |a: &str, remote| Listen::new(a.parse().unwrap(), remote).map(Listen::addr);
        assert!(listen("127.0.0.1:9464", false).is_ok());
        assert!(listen("[::1]:9464", false).is_ok());
        let refused = listen("0.0.0.0:9464", false).unwrap_err();
        assert!(
            refused.contains("--metrics-allow-remote"),
            "the refusal says how: {refused}"
        );
        assert!(listen("0.0.0.0:9464", true).is_ok());
        assert!(listen("[::]:9464", true).is_ok());
    }

    #[test]
    fn live_figures_are_reused_for_ten_times_their_cost() {
        let mut cache = LiveCache::default();
        assert_eq!(cache.max_age(), Duration::from_secs(1), "at least a second");
        let sample = |took| {
            Arc::new(Sample {
                took,
                ..Sample::empty()
            })
        };
        cache.read = Some((Instant::now(), sample(Duration::from_millis(500))));
        assert_eq!(cache.max_age(), Duration::from_secs(5));
        assert!(cache.fresh().is_some());
        cache.read = Some((
            Instant::now() - Duration::from_secs(6),
            sample(Duration::from_millis(500)),
        ));
        assert!(cache.fresh().is_none(), "older than ten times its cost");
    }
}
