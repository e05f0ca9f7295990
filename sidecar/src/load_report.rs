//! What the inbound side measures of each local instance, for load reports:
//! requests and errors (5xx) counted, requests in flight and a recent
//! latency average (to the response head), the latest ORCA report its
//! application added to a response's head or trailers (`orca`, read and
//! stripped), and the
//! host's CPU and memory utilisation (`host`).
//!
//! [`LocalLoad`] is written by the inbound `Deliver` layer, lock-free but
//! for the short section that keeps the latest ORCA report; [`Meter`]
//! turns its counters into rates at each report (the session sends one
//! every [`REPORT_INTERVAL`]).

pub mod host;
pub mod orca;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Response};
use tokio::time::Instant;

use crate::balance::{EndpointLoad, LoadGuard};
pub use orca::Orca;

/// How often the session reports load.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// An application's ORCA report older than this is not reported.
pub const ORCA_TTL: Duration = Duration::from_secs(10);

/// One local instance's load, shared by its inbound stack and the session.
#[derive(Debug)]
pub struct LocalLoad {
    requests: AtomicU64,
    errors: AtomicU64,
    /// In flight and the recent latency average, as the balancer keeps them.
    load: Arc<EndpointLoad>,
    orca: Mutex<Option<(Orca, Instant)>>,
}

// === impl LocalLoad ===

impl LocalLoad {
    pub fn new(service: &str) -> Arc<Self> {
        Arc::new(LocalLoad {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            load: EndpointLoad::new(service, 1),
            orca: Mutex::new(None),
        })
    }

    /// A request is handed to the instance.
    pub fn start(&self) -> LoadGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.load.start()
    }

    /// The instance answered: counts a 5xx as an error, reads and strips
    /// its ORCA header, ends the request's latency.
    pub fn finish<B>(&self, guard: LoadGuard, resp: &mut Response<B>) {
        if resp.status().is_server_error() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.strip_orca(resp.headers_mut());
        drop(guard);
    }

    /// The trailers that end an answer's body: where a gRPC server puts
    /// its ORCA report (gRFC A51), read and stripped as in the head.
    pub fn finish_trailers(&self, trailers: &mut HeaderMap) {
        self.strip_orca(trailers);
    }

    fn strip_orca(&self, headers: &mut HeaderMap) {
        headers.remove(orca::BIN_HEADER);
        let Some(value) = headers.remove(orca::HEADER) else {
            return;
        };
        match value.to_str().map(orca::parse) {
            Ok(Ok(report)) => {
                *self.orca.lock().expect("orca lock") = Some((report, Instant::now()));
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "endpoint-load-metrics not read"),
            Err(_) => tracing::debug!("endpoint-load-metrics is not text"),
        }
    }

    /// The latest ORCA report, unless older than [`ORCA_TTL`].
    pub fn orca(&self) -> Option<Orca> {
        let guard = self.orca.lock().expect("orca lock");
        let (report, at) = guard.as_ref()?;
        (at.elapsed() <= ORCA_TTL).then(|| report.clone())
    }

    pub fn in_flight(&self) -> u64 {
        self.load.in_flight()
    }

    pub fn latency(&self) -> Option<Duration> {
        self.load.recent_latency()
    }
}

/// One instance's figures at a report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub rps: f64,
    pub eps: f64,
    pub latency_ms: f64,
    pub in_flight: u64,
    pub orca: Option<Orca>,
}

/// Host-wide figures at a report; absent where `/proc` is not.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostFigures {
    pub cpu_utilization: Option<f64>,
    pub mem_utilization: Option<f64>,
}

/// Turns counters into rates between reports (the session's own state).
#[derive(Debug)]
pub struct Meter {
    last: Vec<(u64, u64)>,
    at: Instant,
    cpu: Option<host::CpuTimes>,
}

// === impl Meter ===

impl Meter {
    pub fn new(loads: &[Arc<LocalLoad>]) -> Self {
        Meter {
            last: loads.iter().map(counts).collect(),
            at: Instant::now(),
            cpu: host::cpu_times(),
        }
    }

    /// The figures since the last call (or since `new`).
    pub fn sample(&mut self, loads: &[Arc<LocalLoad>]) -> (Vec<Figures>, HostFigures) {
        let now = Instant::now();
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let figures = loads
            .iter()
            .zip(self.last.iter_mut())
            .map(|(l, last)| {
                let (r, e) = counts(l);
                let rate = |n: u64, was: u64| {
                    if secs > 0.0 {
                        n.saturating_sub(was) as f64 / secs
                    } else {
                        0.0
                    }
                };
                let f = Figures {
                    rps: rate(r, last.0),
                    eps: rate(e, last.1),
                    latency_ms: l.latency().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
                    in_flight: l.in_flight(),
                    orca: l.orca(),
                };
                *last = (r, e);
                f
            })
            .collect();
        let cpu = host::cpu_times();
        let host = HostFigures {
            cpu_utilization: self
                .cpu
                .zip(cpu)
                .and_then(|(a, b)| host::cpu_utilization(a, b)),
            mem_utilization: host::mem_utilization(),
        };
        self.cpu = cpu;
        (figures, host)
    }
}

fn counts(l: &Arc<LocalLoad>) -> (u64, u64) {
    (
        l.requests.load(Ordering::Relaxed),
        l.errors.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, orca: Option<&str>) -> Response<()> {
        let mut b = Response::builder().status(status);
        if let Some(v) = orca {
            b = b.header(orca::HEADER, v);
        }
        b.body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn rates_latency_and_orca_between_reports() {
        let load = LocalLoad::new("web");
        let loads = vec![load.clone()];
        let mut meter = Meter::new(&loads);
        for status in [200, 200, 503, 200] {
            let guard = load.start();
            tokio::time::advance(Duration::from_millis(25)).await;
            let mut resp = response(status, Some("TEXT application_utilization=0.7"));
            load.finish(guard, &mut resp);
            assert!(resp.headers().get(orca::HEADER).is_none(), "stripped");
        }
        let held = load.start();
        tokio::time::advance(Duration::from_millis(1900)).await;
        let (figures, _) = meter.sample(&loads);
        let f = &figures[0];
        // 5 requests (one still in flight) and 1 error over 2 s.
        assert_eq!((f.rps, f.eps, f.in_flight), (2.5, 0.5, 1));
        assert!((f.latency_ms - 25.0).abs() < 0.01, "{f:?}");
        assert_eq!(f.orca.as_ref().unwrap().application_utilization, Some(0.7));
        drop(held);
        // Nothing new: zero rates; the ORCA report ages out.
        tokio::time::advance(ORCA_TTL).await;
        let (figures, _) = meter.sample(&loads);
        assert_eq!((figures[0].rps, figures[0].eps), (0.0, 0.0));
        assert_eq!(figures[0].orca, None);
    }

    #[test]
    fn a_report_in_trailers_is_read_and_stripped() {
        let load = LocalLoad::new("web");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert(orca::HEADER, "TEXT cpu_utilization=0.4".parse().unwrap());
        trailers.insert(orca::BIN_HEADER, "CgQIARAB".parse().unwrap());
        load.finish_trailers(&mut trailers);
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(load.orca().unwrap().cpu_utilization, Some(0.4));
    }

    #[test]
    fn an_unreadable_orca_header_is_stripped_and_ignored() {
        let load = LocalLoad::new("web");
        let mut resp = response(200, Some("JSON {\"cpu_utilization\": 1}"));
        resp.headers_mut()
            .insert(orca::BIN_HEADER, "CgQIARAB".parse().unwrap());
        load.finish(load.start(), &mut resp);
        assert!(resp.headers().get(orca::HEADER).is_none());
        assert!(resp.headers().get(orca::BIN_HEADER).is_none());
        assert_eq!(load.orca(), None);
        // Out of the report's bounds: not kept, so the session's report
        // stays one the control plane takes.
        let mut resp = response(200, Some("TEXT application_utilization=101"));
        load.finish(load.start(), &mut resp);
        assert_eq!(load.orca(), None);
    }
}
