//! What the outbound side sent to each upstream since the sidecar
//! started: requests, 5xx answers and a latency histogram per upstream,
//! for the session's traffic reports (`session::traffic`) and through
//! them the dashboard's topology graph. Kept beside the Prometheus
//! families because those do not expose their buckets; recorded on the
//! same path (`proxy::observe`), with atomics only.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use isdp_core::metrics::LATENCY_BUCKETS;

/// Upstreams tracked; past it new upstreams are not (the configuration
/// names far fewer).
pub const MAX_UPSTREAMS: usize = 256;

/// One upstream's counters.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Per bucket, not cumulative; the last is past every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

impl Counters {
    /// A finished request: `error` for a 5xx answer.
    pub fn record(&self, error: bool, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// One upstream's counters as read: cumulative buckets in milliseconds,
/// the last bound 0 for +Inf (the report's convention).
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamTotals {
    pub upstream: String,
    pub requests: u64,
    pub errors: u64,
    pub bounds_ms: Vec<f64>,
    pub counts: Vec<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct OutboundTraffic {
    by_upstream: Arc<Mutex<BTreeMap<String, Arc<Counters>>>>,
}

impl OutboundTraffic {
    /// The counters of `upstream`, created on first use; `None` past
    /// [`MAX_UPSTREAMS`].
    pub fn counters(&self, upstream: &str) -> Option<Arc<Counters>> {
        let mut map = self.by_upstream.lock().expect("traffic lock");
        if let Some(c) = map.get(upstream) {
            return Some(c.clone());
        }
        if map.len() >= MAX_UPSTREAMS {
            return None;
        }
        let c = Arc::new(Counters::default());
        map.insert(upstream.to_owned(), c.clone());
        Some(c)
    }

    /// Every upstream's totals, by name.
    pub fn totals(&self) -> Vec<UpstreamTotals> {
        let map = self.by_upstream.lock().expect("traffic lock");
        map.iter()
            .map(|(upstream, c)| {
                let mut sum = 0;
                let counts = c
                    .buckets
                    .iter()
                    .map(|b| {
                        sum += b.load(Ordering::Relaxed);
                        sum
                    })
                    .collect();
                // Read after the buckets: a request recorded between the
                // reads is in the buckets first, so requests never fall
                // below the last bucket's count by more than the races in
                // flight.
                let requests = c.requests.load(Ordering::Relaxed).max(sum);
                UpstreamTotals {
                    upstream: upstream.clone(),
                    requests,
                    // An error recorded after `requests` was read would
                    // count one the report does not: the control plane
                    // refuses errors above requests.
                    errors: c.errors.load(Ordering::Relaxed).min(requests),
                    bounds_ms: LATENCY_BUCKETS
                        .iter()
                        .map(|b| b * 1000.0)
                        .chain([0.0])
                        .collect(),
                    counts,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_cumulative_per_upstream() {
        let t = OutboundTraffic::default();
        let api = t.counters("api").unwrap();
        api.record(false, Duration::from_millis(1));
        api.record(true, Duration::from_millis(40));
        api.record(false, Duration::from_secs(60));
        assert!(Arc::ptr_eq(&api, &t.counters("api").unwrap()));
        let totals = t.totals();
        assert_eq!(totals.len(), 1);
        let a = &totals[0];
        assert_eq!((a.requests, a.errors), (3, 1));
        assert_eq!(a.bounds_ms.len(), a.counts.len());
        assert_eq!(*a.bounds_ms.last().unwrap(), 0.0, "+Inf last");
        assert_eq!(a.bounds_ms[1], 1.0);
        assert_eq!(a.counts[1], 1, "1 ms is within the 1 ms bound");
        assert_eq!(a.counts[a.counts.len() - 2], 2, "60 s is past 10 s");
        assert_eq!(*a.counts.last().unwrap(), 3);
        assert!(a.counts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn upstreams_are_bounded() {
        let t = OutboundTraffic::default();
        for i in 0..MAX_UPSTREAMS {
            assert!(t.counters(&format!("s{i}")).is_some());
        }
        assert!(t.counters("one-more").is_none());
        assert!(t.counters("s0").is_some(), "known ones still count");
    }
}
