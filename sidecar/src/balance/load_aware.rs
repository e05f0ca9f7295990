//! Load aware: power of two choices on `latency² × (in_flight + 1) / weight`,
//! with a short-memory latency average and probes.
//!
//! Peak EWMA's cost, `latency × (in_flight + 1)`, equalises latency times
//! load, so an endpoint five times slower keeps a steady share once the
//! fast ones have a few requests queued: under steady concurrent load
//! that is a tenth of the traffic and the callers' p99 is the slow
//! endpoint's. Squaring the latency makes a slow endpoint lose every
//! comparison until the fast ones' queues are `(ratio² - 1)` requests
//! deeper than its own (24 for 5x), so it keeps traffic only when the
//! others are truly overloaded, while endpoints within a few percent of
//! each other still share by load (1.1x slower: 1.21 requests deeper).
//!
//! The latency is [`Recent`], a plain time-based EWMA with a one-second
//! time constant: it follows an endpoint that turns slow within a second
//! or two whatever the request rate, one slow request among many does not
//! shun an endpoint (no peak replacement), and it does not decay while
//! the endpoint is idle (a shunned endpoint would otherwise look fast
//! again after a while and be sent a burst). An endpoint nobody has
//! measured yet is compared on load alone, so a new one is neither
//! flooded nor starved.
//!
//! What is not sent traffic is not measured, so a shunned endpoint that
//! recovers would never be noticed. Each endpoint that had nothing in
//! flight and no request for [`PROBE_INTERVAL`] is sent the next request
//! that samples it (at most one such probe per interval, claimed by a
//! compare-and-swap): one request a second is what a shunned endpoint
//! costs, and a recovered one is back within a few seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::EndpointLoad;
use super::rng::Rng;

/// The time constant of [`Recent`]: a sample's weight falls to 1/e after
/// this long.
pub const RECENT_DECAY: Duration = Duration::from_secs(1);
/// An endpoint with nothing in flight that has not been picked for this
/// long is sent the next request that samples it.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A time-based EWMA of latency and the time of the last pick, in
/// nanoseconds since the owning [`EndpointLoad`]'s epoch. Atomics only.
#[derive(Debug)]
pub(crate) struct Recent {
    /// The average in nanoseconds as `f64` bits; NaN until the first sample.
    average_ns: AtomicU64,
    updated_ns: AtomicU64,
    /// When a request last started (or a probe was claimed).
    picked_ns: AtomicU64,
}

// === impl Recent ===

impl Recent {
    pub(crate) fn new() -> Self {
        Self {
            average_ns: AtomicU64::new(f64::NAN.to_bits()),
            updated_ns: AtomicU64::new(0),
            picked_ns: AtomicU64::new(0),
        }
    }

    /// Folds in one sample taken at `now_ns`: weighted by the time since
    /// the previous one, so the rate of samples does not change how fast
    /// the average moves.
    pub(crate) fn record(&self, sample_ns: f64, now_ns: u64) {
        let previous = self.updated_ns.swap(now_ns, Ordering::Relaxed);
        let elapsed = now_ns.saturating_sub(previous) as f64;
        let keep = (-elapsed / RECENT_DECAY.as_nanos() as f64).exp();
        let _ = self
            .average_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let current = f64::from_bits(bits);
                let next = if current.is_nan() {
                    sample_ns
                } else {
                    current * keep + sample_ns * (1.0 - keep)
                };
                Some(next.to_bits())
            });
    }

    /// The average in nanoseconds; `None` before the first sample.
    pub(crate) fn average_ns(&self) -> Option<f64> {
        let v = f64::from_bits(self.average_ns.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }

    /// Drops the average: the next sample starts it afresh.
    pub(crate) fn forget(&self) {
        self.average_ns.store(f64::NAN.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn picked(&self, now_ns: u64) {
        self.picked_ns.store(now_ns, Ordering::Relaxed);
    }

    /// True (once per interval) when the endpoint is due a probe.
    fn claim_probe(&self, in_flight: u64, now_ns: u64) -> bool {
        if in_flight > 0 {
            return false;
        }
        let last = self.picked_ns.load(Ordering::Relaxed);
        now_ns.saturating_sub(last) >= PROBE_INTERVAL.as_nanos() as u64
            && self
                .picked_ns
                .compare_exchange(last, now_ns, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Picks among `endpoints` (non-empty); see the module doc.
pub(crate) fn load_aware(endpoints: &[Arc<EndpointLoad>], rng: &Rng) -> usize {
    if endpoints.len() == 1 {
        return 0;
    }
    let now = Instant::now();
    let (a, b) = rng.two_below(endpoints.len());
    let (ea, eb) = (&endpoints[a], &endpoints[b]);
    for (i, e) in [(a, ea), (b, eb)] {
        if e.recent()
            .claim_probe(e.in_flight(), e.nanos_since_epoch(now))
        {
            return i;
        }
    }
    let queue = |e: &EndpointLoad| (e.in_flight() + 1) as f64 / f64::from(e.weight());
    let (ca, cb) = match (ea.recent().average_ns(), eb.recent().average_ns()) {
        (Some(la), Some(lb)) => {
            // Scaled by the pair's larger latency so the squares stay small.
            let scale = la.max(lb).max(1.0);
            let (ra, rb) = (la / scale, lb / scale);
            (ra * ra * queue(ea), rb * rb * queue(eb))
        }
        _ => (queue(ea), queue(eb)),
    };
    if cb < ca { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::super::{Algorithm, Balancer, LoadGuard};
    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<EndpointLoad>> {
        (0..n)
            .map(|i| EndpointLoad::new(format!("e{i}"), 1))
            .collect()
    }

    /// Runs `picks` requests from `workers` concurrent callers (each sends
    /// its next request as its last one ends) on paused time, a request on
    /// endpoint `i` taking `latency(i)`; returns the picks per endpoint.
    async fn simulate(
        balancer: &Balancer,
        workers: usize,
        picks: usize,
        latency: impl Fn(usize) -> Duration,
    ) -> Vec<usize> {
        let mut counts = vec![0; balancer.endpoints().len()];
        let mut open: Vec<(Instant, LoadGuard)> = Vec::new();
        let mut start = |open: &mut Vec<(Instant, LoadGuard)>| {
            let i = balancer.pick(None).unwrap();
            counts[i] += 1;
            open.push((Instant::now() + latency(i), balancer.endpoints()[i].start()));
        };
        for _ in 0..workers {
            start(&mut open);
        }
        for _ in workers..picks {
            let next = (0..open.len()).min_by_key(|&k| open[k].0).unwrap();
            let (at, guard) = open.swap_remove(next);
            tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
            drop(guard);
            start(&mut open);
        }
        counts
    }

    fn slow_first(slow_ms: u64) -> impl Fn(usize) -> Duration {
        move |i| Duration::from_millis(if i == 0 { slow_ms } else { 10 })
    }

    #[tokio::test(start_paused = true)]
    async fn the_average_follows_time_not_sample_count() {
        let ep = EndpointLoad::new("a", 1);
        assert_eq!(ep.recent().average_ns(), None);
        ep.record_latency(Duration::from_millis(10));
        assert_eq!(ep.recent().average_ns(), Some(10e6));
        // A thousand samples within a millisecond barely move it...
        for _ in 0..1000 {
            ep.record_latency(Duration::from_millis(50));
        }
        let now = ep.recent().average_ns().unwrap() / 1e6;
        assert!(now < 10.1, "{now}");
        // ...one after a time constant moves it by 1 - 1/e of the gap.
        tokio::time::advance(RECENT_DECAY).await;
        ep.record_latency(Duration::from_millis(50));
        let now = ep.recent().average_ns().unwrap() / 1e6;
        assert!(
            (now - (50.0 - 40.0 / std::f64::consts::E)).abs() < 0.1,
            "{now}"
        );
        // Idle time alone changes nothing.
        tokio::time::advance(RECENT_DECAY * 100).await;
        assert!((ep.recent().average_ns().unwrap() / 1e6 - now).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_five_times_slower_endpoint_is_shunned_but_probed() {
        let balancer = Balancer::with_seed(Algorithm::LoadAware, endpoints(3), 3);
        // Warm up: every endpoint measured.
        simulate(&balancer, 12, 1000, slow_first(50)).await;
        // 12 callers, 10 ms each: 12,000 picks take about 10 s.
        let counts = simulate(&balancer, 12, 12_000, slow_first(50)).await;
        let slow = counts[0] as f64 / 12_000.0;
        assert!(slow < 0.01, "slow share {slow}: {counts:?}");
        assert!(counts[0] >= 8, "probed about once a second: {counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_endpoint_gets_its_share_back() {
        let balancer = Balancer::with_seed(Algorithm::LoadAware, endpoints(3), 5);
        simulate(&balancer, 12, 6000, slow_first(50)).await;
        // Recovered: after 4 s (4,800 picks of 10 ms) it is back to about
        // a third.
        simulate(&balancer, 12, 4800, slow_first(10)).await;
        let counts = simulate(&balancer, 12, 3000, slow_first(10)).await;
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn similar_endpoints_share_by_load() {
        let eps = endpoints(2);
        eps[0].record_latency(Duration::from_millis(11));
        eps[1].record_latency(Duration::from_millis(10));
        let balancer = Balancer::with_seed(Algorithm::LoadAware, eps.clone(), 7);
        // Both picked recently: no probes.
        drop(eps[0].start());
        drop(eps[1].start());
        let _queue: Vec<_> = (0..3).map(|_| eps[1].start()).collect();
        // 11² × 1 < 10² × 4: the slightly slower idle one wins.
        assert!((0..20).all(|_| balancer.pick(None) == Some(0)));
    }

    #[test]
    fn unmeasured_endpoints_compete_on_load() {
        let eps = endpoints(2);
        eps[0].record_latency(Duration::from_millis(100));
        let balancer = Balancer::with_seed(Algorithm::LoadAware, eps.clone(), 1);
        // Both picked recently (no probes), only one measured.
        drop(eps[0].start_untimed());
        drop(eps[1].start_untimed());
        let _busy = eps[1].start();
        assert!((0..20).all(|_| balancer.pick(None) == Some(0)));
    }
}
