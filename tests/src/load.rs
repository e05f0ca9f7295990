//! Steady concurrent load through a sidecar, recorded per request: a
//! closed loop of `workers` callers on one keep-alive HTTP/1.1 client,
//! each sending its next request as soon as its last one is answered (as
//! a busy service calls a dependency). Every answer is kept with the time
//! it ended, the instance that served it (`x-instance-id`), its status
//! and its latency, so tests count shares over requests in a window and
//! benches read percentiles, never timing a test on wall clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// One request may take this long before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One answered (or failed) request.
#[derive(Clone, Debug)]
pub struct Sample {
    /// When the answer ended.
    pub at: Instant,
    /// `x-instance-id`; empty when absent (a sidecar's own answer).
    pub instance: String,
    /// The status; 0 when the request failed without one.
    pub status: u16,
    pub latency: Duration,
}

/// A running load; stops when dropped.
pub struct Load {
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: JoinSet<()>,
}

// === impl Load ===

impl Load {
    /// `workers` callers sending `GET http://{addr}{path}` in a loop.
    pub fn start(addr: &str, path: &str, workers: usize) -> Self {
        Self::start_polite(addr, path, workers, Duration::ZERO)
    }

    /// As [`Load::start`], but a caller whose request failed waits `pause`
    /// before its next one, as a client that backs off when shed does
    /// (rather than spinning on instant refusals).
    pub fn start_polite(addr: &str, path: &str, workers: usize, pause: Duration) -> Self {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let url: http::Uri = format!("http://{addr}{path}").parse().expect("load URL");
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            let (client, url, samples) = (client.clone(), url.clone(), samples.clone());
            tasks.spawn(async move {
                loop {
                    let sample = once(&client, &url).await;
                    let failed = !(200..300).contains(&sample.status);
                    samples.lock().expect("samples lock").push(sample);
                    if failed && !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            });
        }
        Load { samples, tasks }
    }

    /// The requests that ended in `from..to`.
    pub fn window(&self, from: Instant, to: Instant) -> Window {
        let samples = self.samples.lock().expect("samples lock");
        Window(
            samples
                .iter()
                .filter(|s| s.at >= from && s.at < to)
                .cloned()
                .collect(),
        )
    }

    /// The requests that ended `from..to` after `start`, once that window
    /// is over (waits for its end).
    pub async fn window_after(&self, start: Instant, from: Duration, to: Duration) -> Window {
        tokio::time::sleep_until(start + to).await;
        self.window(start + from, start + to)
    }

    /// Stops every caller.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn once(client: &Client<HttpConnector, Empty<Bytes>>, url: &http::Uri) -> Sample {
    let start = Instant::now();
    let req = http::Request::get(url.clone())
        .body(Empty::new())
        .expect("request");
    let answer = tokio::time::timeout(TIMEOUT, async {
        let resp = client.request(req).await.ok()?;
        let (parts, body) = resp.into_parts();
        body.collect().await.ok()?;
        let instance = parts
            .headers
            .get("x-instance-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Some((parts.status.as_u16(), instance))
    })
    .await
    .ok()
    .flatten();
    let (status, instance) = answer.unwrap_or_default();
    Sample {
        at: Instant::now(),
        instance,
        status,
        latency: start.elapsed(),
    }
}

mod catalog;

pub use catalog::{
    CatalogMesh, PATH, Place, SERVICE, SETUP, SLOW_DELAY_MS, WORKERS, assert_none_failed,
    first_window, share_where,
};

/// The requests of one time window.
#[derive(Debug)]
pub struct Window(pub Vec<Sample>);

// === impl Window ===

impl Window {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The share of requests `instance` served (0 for an empty window).
    pub fn share(&self, instance: &str) -> f64 {
        let n = self.0.iter().filter(|s| s.instance == instance).count();
        n as f64 / self.0.len().max(1) as f64
    }

    /// The requests that ended in a 2xx.
    pub fn served(&self) -> Window {
        Window(
            self.0
                .iter()
                .filter(|s| (200..300).contains(&s.status))
                .cloned()
                .collect(),
        )
    }

    /// Requests that did not end in a 2xx.
    pub fn failed(&self) -> usize {
        self.0
            .iter()
            .filter(|s| !(200..300).contains(&s.status))
            .count()
    }

    /// The `q` quantile (0..=1) of the latencies; zero for an empty window.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut l: Vec<Duration> = self.0.iter().map(|s| s.latency).collect();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort_unstable();
        let at = ((l.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        l[at]
    }

    /// Counts, failures, p50, p99 and the shares of `cat-0..n`, for logs.
    pub fn describe(&self, n: usize) -> String {
        let shares: Vec<String> = (0..n)
            .map(|i| format!("cat-{i} {:.1}%", 100.0 * self.share(&format!("cat-{i}"))))
            .collect();
        format!(
            "{} requests, {} failed, p50 {:?}, p99 {:?}; {}",
            self.len(),
            self.failed(),
            self.quantile(0.5),
            self.quantile(0.99),
            shares.join(", ")
        )
    }
}
