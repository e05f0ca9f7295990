//! Power of two random choices: least request and peak EWMA.
//!
//! Comparing every endpoint on each pick is `O(n)` and makes every proxy
//! herd onto the same "best" endpoint between load updates. Sampling two
//! distinct endpoints and taking the cheaper one is `O(1)`, avoids the herd,
//! and still gets exponentially better tail load than random (Mitzenmacher).
//! Only the two sampled endpoints' atomics are read.

use std::cmp::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::EndpointLoad;
use super::rng::Rng;

/// Least request: the endpoint with fewer requests in flight per unit of
/// weight, counting the request being placed, `(in_flight + 1) / weight`;
/// the `+ 1` lets weights decide between idle endpoints. Ties go to the
/// first sample, itself random.
pub(crate) fn least_request(endpoints: &[Arc<EndpointLoad>], rng: &Rng) -> usize {
    p2c(endpoints, rng, |a, b| {
        let load = |e: &EndpointLoad, other: &EndpointLoad| {
            u128::from(e.in_flight() + 1) * u128::from(other.weight())
        };
        load(a, b).cmp(&load(b, a))
    })
}

/// Peak EWMA: the endpoint with the lower `latency × (in_flight + 1) / weight`
/// (see [`EndpointLoad`] for the estimate).
pub(crate) fn peak_ewma(endpoints: &[Arc<EndpointLoad>], rng: &Rng) -> usize {
    let now = Instant::now();
    p2c(endpoints, rng, |a, b| a.cost(now).total_cmp(&b.cost(now)))
}

/// Samples two distinct endpoints and returns the one `cmp` orders first
/// (`a` on ties). `endpoints` must be non-empty.
fn p2c(
    endpoints: &[Arc<EndpointLoad>],
    rng: &Rng,
    cmp: impl Fn(&EndpointLoad, &EndpointLoad) -> Ordering,
) -> usize {
    if endpoints.len() == 1 {
        return 0;
    }
    let (a, b) = rng.two_below(endpoints.len());
    match cmp(&endpoints[a], &endpoints[b]) {
        Ordering::Greater => b,
        Ordering::Less | Ordering::Equal => a,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{Algorithm, Balancer};
    use super::*;

    fn endpoints(weights: &[u32]) -> Vec<Arc<EndpointLoad>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| EndpointLoad::new(format!("e{i}"), w))
            .collect()
    }

    fn counts(balancer: &Balancer, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; balancer.endpoints().len()];
        for _ in 0..picks {
            counts[balancer.pick(None).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn least_request_avoids_the_loaded_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        let _busy: Vec<_> = (0..10).map(|_| eps[1].start()).collect();
        let balancer = Balancer::with_seed(Algorithm::LeastRequest, eps, 9);
        let c = counts(&balancer, 1000);
        assert!(c[1] < 50, "{c:?}");
        assert!(c[0] > 400 && c[2] > 400, "idle ones share the rest: {c:?}");
    }

    #[test]
    fn least_request_spreads_idle_endpoints_by_weight() {
        let balancer = Balancer::with_seed(Algorithm::LeastRequest, endpoints(&[1, 1, 4]), 5);
        let c = counts(&balancer, 3000);
        // The weight-4 endpoint wins every comparison it is sampled in: 2/3.
        assert!((1800..2200).contains(&c[2]), "{c:?}");
    }

    #[test]
    fn least_request_follows_guards_as_they_end() {
        let eps = endpoints(&[1, 1]);
        let balancer = Balancer::with_seed(Algorithm::LeastRequest, eps.clone(), 1);
        let guard = eps[0].start();
        assert!((0..20).all(|_| balancer.pick(None) == Some(1)));
        drop(guard);
        let _other = eps[1].start();
        assert!((0..20).all(|_| balancer.pick(None) == Some(0)));
    }

    #[test]
    fn peak_ewma_avoids_the_slow_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        eps[0].record_latency(Duration::from_millis(50));
        eps[1].record_latency(Duration::from_millis(1));
        eps[2].record_latency(Duration::from_millis(1));
        let balancer = Balancer::with_seed(Algorithm::PeakEwma, eps, 11);
        let c = counts(&balancer, 1000);
        assert!(c[0] < 100, "{c:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_learns_from_guards_and_weighs_queues() {
        let eps = endpoints(&[1, 1, 1]);
        let slow = eps[2].start();
        let fast: Vec<_> = eps[..2].iter().map(|e| e.start()).collect();
        tokio::time::advance(Duration::from_millis(1)).await;
        drop(fast);
        tokio::time::advance(Duration::from_millis(49)).await;
        drop(slow);
        let balancer = Balancer::with_seed(Algorithm::PeakEwma, eps.clone(), 2);
        let c = counts(&balancer, 1000);
        assert!(c[2] < 100, "{c:?}");
        // A fast endpoint with a deep queue costs more than the slow one.
        let _queue: Vec<_> = (0..100).map(|_| eps[0].start()).collect();
        let c = counts(&balancer, 1000);
        assert!(c[0] < 100, "{c:?}");
    }

    #[test]
    fn unsampled_endpoints_are_tried() {
        let eps = endpoints(&[1, 1]);
        eps[0].record_latency(Duration::from_millis(20));
        let balancer = Balancer::with_seed(Algorithm::PeakEwma, eps, 4);
        assert!((0..50).all(|_| balancer.pick(None) == Some(1)));
    }
}
