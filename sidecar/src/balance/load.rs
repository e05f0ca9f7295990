//! Per-endpoint load: requests in flight and a peak-sensitive EWMA of
//! latency (the finagle/linkerd "peak EWMA").
//!
//! The state lives in an `Arc<EndpointLoad>` that the proxy keeps per
//! endpoint id across endpoint-set changes, so a rebuild of the balancer
//! does not forget which endpoints are slow or busy. Everything is atomics:
//! readers (`pick`) never block writers (guards being dropped).
//!
//! Two atomics hold the estimate (value and time of the last update); a
//! reader may see one updated and not the other. That skews one cost by at
//! most one sample's worth, which a load heuristic tolerates, and buys a
//! lock-free hot path.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::load_aware::Recent;

/// The EWMA's time constant: a sample's weight falls to 1/e after this long.
/// Long enough to smooth noise, short enough that a recovered endpoint is
/// trusted again within tens of seconds.
pub const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint with no samples yet. Low, so new
/// endpoints are tried (the `in_flight + 1` factor limits how many requests
/// they attract before the first answers arrive).
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// The least latency a failed request records: a fast failure (connection
/// refused, an immediate 503) must not make a broken endpoint look like the
/// fastest one.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Floor of the estimate used in costs, so an estimate decayed to ~0 still
/// lets `in_flight` tell endpoints apart.
const MIN_COST_NS: f64 = 1_000.0;

/// One endpoint as the balancer sees it.
pub struct EndpointLoad {
    id: String,
    /// Relative share of traffic, at least 1. The control plane pushes a
    /// new one whenever the endpoint's load moves, and the state is kept
    /// across pushes, so it is updated in place ([`set_weight`](Self::set_weight)).
    weight: AtomicU32,
    in_flight: AtomicU64,
    /// The latency estimate in nanoseconds, as `f64` bits; NaN until the first sample.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, in nanoseconds since `epoch`.
    updated_ns: AtomicU64,
    /// Origin of `updated_ns`, so a timestamp fits an atomic.
    epoch: Instant,
    /// The short-memory average and last pick that `load_aware` reads.
    recent: Recent,
}

// === impl EndpointLoad ===

impl EndpointLoad {
    /// A new endpoint with nothing in flight and no latency samples. A
    /// weight of 0 is treated as 1: the caller filters out endpoints that
    /// should get no traffic.
    pub fn new(id: impl Into<String>, weight: u32) -> Arc<Self> {
        Arc::new(Self {
            id: id.into(),
            weight: AtomicU32::new(weight.max(1)),
            in_flight: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(f64::NAN.to_bits()),
            updated_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            recent: Recent::new(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The weight in force from now on (0 is treated as 1). Balancers that
    /// read the weight per pick follow at once; those that precompute from
    /// weights (the weighted round-robin schedule, random by weight, ring
    /// hash, Maglev) are rebuilt by the caller with the endpoint set.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// Requests (HTTP) or connections (TCP) currently open to this endpoint.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request started; the guard ends it on drop and records the
    /// time in between as a latency sample.
    pub fn start(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        self.recent.picked(self.nanos_since_epoch(now));
        LoadGuard {
            load: Arc::clone(self),
            started: Some(now),
            failed: false,
        }
    }

    /// Like [`start`](Self::start) but records no latency on drop: for TCP
    /// connections, whose lifetime says nothing about the endpoint's speed
    /// (record the connect time with [`record_latency`](Self::record_latency)).
    pub fn start_untimed(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.recent.picked(self.nanos_since_epoch(Instant::now()));
        LoadGuard {
            load: Arc::clone(self),
            started: None,
            failed: false,
        }
    }

    /// Feeds one latency sample into the EWMA. A sample above the current
    /// estimate replaces it at once (peak sensitivity: react to an endpoint
    /// getting slow within one request); lower samples pull it down with
    /// the time-based decay.
    pub fn record_latency(&self, latency: Duration) {
        self.record_at(latency, Instant::now());
    }

    fn record_at(&self, latency: Duration, now: Instant) {
        let sample = latency.as_nanos() as f64;
        let now_ns = self.nanos_since_epoch(now);
        self.recent.record(sample, now_ns);
        let elapsed = now_ns.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        let decay = (-elapsed / DECAY.as_nanos() as f64).exp();
        let _ = self
            .ewma_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let current = f64::from_bits(bits);
                let next = if current.is_nan() || sample >= current {
                    sample
                } else {
                    current * decay + sample * (1.0 - decay)
                };
                Some(next.to_bits())
            });
        self.updated_ns.fetch_max(now_ns, Ordering::Relaxed);
    }

    /// The latency estimate at `now` in nanoseconds: decayed towards zero
    /// over the time since the last sample (so an endpoint that looked slow
    /// and was then avoided gets retried), or [`DEFAULT_RTT`] without samples.
    pub(crate) fn latency_ns(&self, now: Instant) -> f64 {
        let current = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        if current.is_nan() {
            return DEFAULT_RTT.as_nanos() as f64;
        }
        let elapsed = self
            .nanos_since_epoch(now)
            .saturating_sub(self.updated_ns.load(Ordering::Relaxed));
        current * (-(elapsed as f64) / DECAY.as_nanos() as f64).exp()
    }

    /// The peak-EWMA cost: expected latency times the queue a new request
    /// would join, divided by weight so heavier endpoints take more.
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        let latency = self.latency_ns(now).max(MIN_COST_NS);
        latency * (self.in_flight() + 1) as f64 / f64::from(self.weight())
    }

    /// The short-memory latency average `load_aware` balances on.
    pub(crate) fn recent(&self) -> &Recent {
        &self.recent
    }

    /// The recent latency average, `None` before the first sample.
    pub fn recent_latency(&self) -> Option<Duration> {
        self.recent
            .average_ns()
            .map(|ns| Duration::from_nanos(ns as u64))
    }

    pub(crate) fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl fmt::Debug for EndpointLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointLoad")
            .field("id", &self.id)
            .field("weight", &self.weight)
            .field("in_flight", &self.in_flight())
            .field(
                "latency",
                &Duration::from_nanos(self.latency_ns(Instant::now()) as u64),
            )
            .finish()
    }
}

/// One request (or connection) in flight on an endpoint; dropping it ends it.
#[derive(Debug)]
#[must_use = "dropping the guard ends the request at once"]
pub struct LoadGuard {
    load: Arc<EndpointLoad>,
    /// When the request started; `None` for untimed guards.
    started: Option<Instant>,
    failed: bool,
}

// === impl LoadGuard ===

impl LoadGuard {
    /// Ends the request as failed: its latency counts as at least
    /// [`FAILURE_PENALTY`], steering traffic away from an endpoint that
    /// fails fast. An untimed guard records the penalty alone.
    pub fn failed(mut self) {
        self.failed = true;
    }

    pub fn endpoint(&self) -> &Arc<EndpointLoad> {
        &self.load
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        let observed = self.started.map(|s| now.saturating_duration_since(s));
        let sample = match (observed, self.failed) {
            (Some(observed), false) => observed,
            (observed, true) => observed.unwrap_or_default().max(FAILURE_PENALTY),
            (None, false) => return,
        };
        self.load.record_at(sample, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ns: f64) -> f64 {
        ns / 1e6
    }

    #[tokio::test(start_paused = true)]
    async fn guards_count_in_flight_and_record_latency() {
        let ep = EndpointLoad::new("a", 1);
        assert_eq!(ms(ep.latency_ns(Instant::now())), 1.0, "default RTT");
        let guard = ep.start();
        let untimed = ep.start_untimed();
        assert_eq!(ep.in_flight(), 2);
        tokio::time::advance(Duration::from_millis(50)).await;
        drop(guard);
        drop(untimed);
        assert_eq!(ep.in_flight(), 0);
        assert_eq!(ms(ep.latency_ns(Instant::now())), 50.0);
    }

    #[tokio::test(start_paused = true)]
    async fn peaks_replace_and_lows_decay() {
        let ep = EndpointLoad::new("a", 1);
        ep.record_latency(Duration::from_millis(10));
        ep.record_latency(Duration::from_millis(100));
        assert_eq!(
            ms(ep.latency_ns(Instant::now())),
            100.0,
            "a peak replaces at once"
        );
        // A low sample right after barely moves the estimate...
        ep.record_latency(Duration::from_millis(1));
        assert!(ms(ep.latency_ns(Instant::now())) > 99.0);
        // ...and idle time decays it by 1/e per time constant.
        tokio::time::advance(DECAY).await;
        let decayed = ms(ep.latency_ns(Instant::now()));
        assert!(
            (decayed - 100.0 / std::f64::consts::E).abs() < 0.5,
            "{decayed}"
        );
        // A low sample after a long gap mostly replaces the estimate.
        tokio::time::advance(DECAY * 3).await;
        ep.record_latency(Duration::from_millis(2));
        let next = ms(ep.latency_ns(Instant::now()));
        assert!((2.0..8.0).contains(&next), "{next}");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_record_at_least_the_penalty() {
        let ep = EndpointLoad::new("a", 0);
        assert_eq!(ep.weight(), 1);
        ep.start().failed();
        assert_eq!(ep.in_flight(), 0);
        assert_eq!(ms(ep.latency_ns(Instant::now())), 1000.0);
    }

    #[test]
    fn cost_grows_with_in_flight_and_shrinks_with_weight() {
        let light = EndpointLoad::new("a", 1);
        let heavy = EndpointLoad::new("b", 4);
        let now = Instant::now();
        assert!(heavy.cost(now) < light.cost(now));
        let before = light.cost(now);
        let _guards: Vec<_> = (0..3).map(|_| light.start()).collect();
        assert_eq!(light.cost(now), before * 4.0);
    }
}
