//! Outlier detection: passive health from the responses themselves.
//!
//! Each endpoint counts consecutive 5xx and consecutive gateway errors
//! (502/503/504, which includes the sidecar's own connect failures). When
//! a counter reaches its threshold the endpoint is ejected for
//! `base_ejection × n`, n being how often it has been ejected (capped at
//! [`MAX_EJECTION_FACTOR`]), unless that would take more than
//! `max_ejection_percent` of the upstream's endpoints out. The balancer
//! skips ejected endpoints; once the time is up they get traffic again.
//!
//! Counters are not reset by an ejection: an endpoint that comes back and
//! still fails is ejected again on its first failure, for longer (the
//! count carries). Any success resets the counters.
//!
//! Latency outliers ([`latency`]) are judged by a periodic sweep instead,
//! since slowness is a comparison with peers, not a property of one
//! answer: an endpoint whose recent latency stays well above its peers'
//! median is ejected the same way, within the same `max_ejection_percent`.
//!
//! The state lives in an `Arc<Outlier>` the proxy keeps per endpoint id,
//! like [`EndpointLoad`](super::EndpointLoad), so endpoint-set and policy
//! changes do not forget ejections. Atomics only: the balancer reads
//! `is_ejected` on every pick.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub mod latency;

/// The longest ejection, in multiples of the base time.
pub const MAX_EJECTION_FACTOR: u32 = 10;

/// What outlier detection does for one upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutlierConfig {
    /// 0: 5xx are not counted on their own.
    pub consecutive_5xx: u32,
    /// 0: gateway errors are not counted on their own.
    pub consecutive_gateway_errors: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    /// Latency outliers: above this many times the peers' median; 0: off.
    pub latency_factor: f64,
    /// No endpoint is a latency outlier below this average.
    pub latency_min: Duration,
    /// Sweeps in a row an endpoint must be slow before it is ejected.
    pub latency_intervals: u32,
    /// Time between latency sweeps.
    pub interval: Duration,
}

impl Default for OutlierConfig {
    /// Linkerd/Istio-like defaults: five gateway errors in a row eject an
    /// endpoint for 30 s, never more than half the endpoints at once.
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
            latency_factor: 0.0,
            latency_min: latency::DEFAULT_MIN,
            latency_intervals: latency::DEFAULT_INTERVALS,
            interval: latency::DEFAULT_INTERVAL,
        }
    }
}

/// How a response went, as outlier detection sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx other than 502/503/504.
    ServerError,
    /// 502, 503, 504 or a connection failure.
    GatewayError,
}

impl Outcome {
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Success,
        }
    }
}

/// Why an endpoint was last ejected: what an operator asks first of an
/// endpoint out of the balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Consecutive 5xx or gateway errors reached their threshold.
    Errors,
    /// Its latency stayed well above its peers' median.
    Latency,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Errors => "errors",
            Cause::Latency => "latency",
        }
    }
}

/// One endpoint's outlier state.
#[derive(Debug)]
pub struct Outlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejections: AtomicU32,
    /// Latency sweeps in a row that found the endpoint slow.
    slow_sweeps: AtomicU32,
    /// Nanoseconds since `epoch` until which the endpoint is ejected.
    ejected_until_ns: AtomicU64,
    /// The last ejection's [`Cause`]: 0 none yet, 1 errors, 2 latency.
    last_cause: AtomicU8,
    epoch: Instant,
}

// === impl Outlier ===

impl Outlier {
    pub fn new() -> Arc<Self> {
        Arc::new(Outlier {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            slow_sweeps: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            last_cause: AtomicU8::new(0),
            epoch: Instant::now(),
        })
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(Instant::now())
    }

    pub fn is_ejected_at(&self, now: Instant) -> bool {
        self.ejected_until_ns.load(Ordering::Relaxed) > self.nanos(now)
    }

    /// Times this endpoint has been ejected.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Why it was last ejected; None if it never was.
    pub fn last_cause(&self) -> Option<Cause> {
        match self.last_cause.load(Ordering::Relaxed) {
            1 => Some(Cause::Errors),
            2 => Some(Cause::Latency),
            _ => None,
        }
    }

    /// Counts one outcome; true when a counter has reached its threshold
    /// and the caller should try to [`eject`] the endpoint.
    pub fn record(&self, outcome: Outcome, cfg: &OutlierConfig) -> bool {
        let reached = |n: u32, limit: u32| limit > 0 && n >= limit;
        match outcome {
            Outcome::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                false
            }
            Outcome::ServerError => {
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                let n = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                reached(n, cfg.consecutive_5xx)
            }
            Outcome::GatewayError => {
                let n5 = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                let ng = self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
                reached(n5, cfg.consecutive_5xx) || reached(ng, cfg.consecutive_gateway_errors)
            }
        }
    }
}

/// Ejects `victim` (one of `all`, an upstream's endpoints) for `cause` if
/// it is not ejected already and the upstream can spare it. Returns the
/// ejection's length when it happened.
pub fn eject(
    all: &[&Outlier],
    victim: &Outlier,
    cause: Cause,
    cfg: &OutlierConfig,
    now: Instant,
) -> Option<Duration> {
    if victim.is_ejected_at(now) || all.is_empty() {
        return None;
    }
    let ejected = all.iter().filter(|o| o.is_ejected_at(now)).count();
    if (ejected + 1) * 100 > cfg.max_ejection_percent as usize * all.len() {
        return None;
    }
    let n = victim.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let length = cfg.base_ejection * n.min(MAX_EJECTION_FACTOR);
    victim
        .ejected_until_ns
        .store(victim.nanos(now + length), Ordering::Relaxed);
    let code = match cause {
        Cause::Errors => 1,
        Cause::Latency => 2,
    };
    victim.last_cause.store(code, Ordering::Relaxed);
    Some(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
            ..OutlierConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_grows_and_ends() {
        let (a, b, c) = (Outlier::new(), Outlier::new(), Outlier::new());
        let all = [&*a, &*b, &*c];
        let cfg = cfg();
        assert!(!a.record(Outcome::GatewayError, &cfg));
        assert!(!a.record(Outcome::Success, &cfg), "success resets");
        assert!(!a.record(Outcome::GatewayError, &cfg));
        assert!(!a.record(Outcome::GatewayError, &cfg));
        assert!(a.record(Outcome::GatewayError, &cfg));
        assert_eq!(
            eject(&all, &a, Cause::Errors, &cfg, Instant::now()),
            Some(Duration::from_secs(10))
        );
        assert!(a.is_ejected());
        assert_eq!(a.last_cause(), Some(Cause::Errors));
        assert_eq!(b.last_cause(), None, "never ejected");
        assert_eq!(
            eject(&all, &a, Cause::Errors, &cfg, Instant::now()),
            None,
            "already out"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!a.is_ejected(), "back after its time");
        // Still failing: the counter carries, so the first failure ejects
        // it again, for twice as long.
        assert!(a.record(Outcome::GatewayError, &cfg));
        assert_eq!(
            eject(&all, &a, Cause::Errors, &cfg, Instant::now()),
            Some(Duration::from_secs(20))
        );
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(a.is_ejected());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!a.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_max_percent() {
        let (a, b, c) = (Outlier::new(), Outlier::new(), Outlier::new());
        let all = [&*a, &*b, &*c];
        let cfg = cfg();
        assert!(eject(&all, &a, Cause::Errors, &cfg, Instant::now()).is_some());
        assert_eq!(
            eject(&all, &b, Cause::Errors, &cfg, Instant::now()),
            None,
            "2 of 3 > 50%"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(eject(&all, &b, Cause::Errors, &cfg, Instant::now()).is_some());
    }

    #[test]
    fn five_xx_counts_every_server_error() {
        let o = Outlier::new();
        let cfg = OutlierConfig {
            consecutive_5xx: 2,
            consecutive_gateway_errors: 0,
            ..cfg()
        };
        assert!(!o.record(Outcome::ServerError, &cfg));
        assert!(o.record(Outcome::GatewayError, &cfg));
        assert_eq!(Outcome::of_status(503), Outcome::GatewayError);
        assert_eq!(Outcome::of_status(500), Outcome::ServerError);
        assert_eq!(Outcome::of_status(404), Outcome::Success);
    }
}
