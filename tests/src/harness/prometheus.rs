//! A real Prometheus server (Debian's `prometheus`) scraping one target on loopback, in the
//! test's network namespace, with a config and a TSDB of its own in the test's temp dir; read
//! back through its HTTP query API.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{
    http_get::{http_get, url_encode},
    local, patience, wait_until_every,
};

/// Prometheus's own port (its default), in the test's namespace.
const PORT: u16 = 9090;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often Prometheus scrapes the target: short, so a flip shows within seconds.
pub const SCRAPE_INTERVAL: Duration = Duration::from_millis(500);

/// One series of an instant query's answer.
#[derive(Clone, Debug)]
pub struct PromSample {
    pub labels: BTreeMap<String, String>,
    /// Unix time of the sample, seconds.
    pub at: f64,
    pub value: f64,
}

pub struct Prometheus {
    child: Child,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus on `127.0.0.1:9090` scraping `target` (`/metrics`) every
    /// [`SCRAPE_INTERVAL`]; returns once it reports itself ready.
    pub fn start(dir: &Path, target: SocketAddr) -> Self {
        let config = dir.join("prometheus.yml");
        let ms = SCRAPE_INTERVAL.as_millis();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {ms}ms\n  scrape_timeout: {ms}ms\n\
                 scrape_configs:\n  - job_name: reuseport\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address={}", local(PORT)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create prometheus.log"))
            .spawn()
            .expect("start prometheus");
        let mut p = Self { child, log };
        wait_until_every(
            "Prometheus answers /-/ready",
            patience(READY_TIMEOUT),
            Duration::from_millis(50),
            || {
                if let Some(status) = p.child.try_wait().expect("wait for prometheus") {
                    panic!("prometheus exited ({status}):\n{}", p.log());
                }
                http_get(local(PORT), "/-/ready").is_ok_and(|a| a.status == 200)
            },
        );
        p
    }

    /// What Prometheus logged (printed when a test fails).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The vector an instant query of `promql` evaluates to now; panics on an error answer.
    pub fn query(&self, promql: &str) -> Vec<PromSample> {
        let answer = http_get(
            local(PORT),
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )
        .unwrap_or_else(|e| panic!("querying Prometheus for {promql}: {e}"));
        let json: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_else(|e| {
            panic!("Prometheus answered {promql} with no JSON ({e}): {answer:?}")
        });
        assert_eq!(
            json["status"], "success",
            "Prometheus should evaluate {promql}: {json}"
        );
        json["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{promql} should evaluate to a vector: {json}"))
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let at = r["value"][0].as_f64().expect("sample time");
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("sample value");
                PromSample { labels, at, value }
            })
            .collect()
    }

    /// The value of the one series `promql` evaluates to, if it evaluates to one.
    pub fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).as_slice() {
            [] => None,
            [one] => Some(one.value),
            many => panic!("{promql} should select one series, got {many:?}"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus.log ---\n{}", self.log());
        }
    }
}
