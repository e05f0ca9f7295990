//! Round robin: an atomic cursor over the endpoints, ignoring weights.
//!
//! The cursor starts at a random offset so that sidecars that rebuild their
//! balancers at the same moment (one xDS push reaches all of them) do not
//! all send their next request to the first endpoint.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The cursor of a round-robin balancer.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    cursor: AtomicUsize,
}

// === impl RoundRobin ===

impl RoundRobin {
    pub(crate) fn new(start: usize) -> Self {
        Self {
            cursor: AtomicUsize::new(start),
        }
    }

    /// The next index in `0..len`; `len > 0`.
    pub(crate) fn pick(&self, len: usize) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed) % len
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Algorithm, Balancer, EndpointLoad};

    #[test]
    fn exactly_even_over_three_endpoints() {
        let endpoints = (0..3)
            .map(|i| EndpointLoad::new(format!("e{i}"), 1))
            .collect();
        let balancer = Balancer::with_seed(Algorithm::RoundRobin, endpoints, 42);
        let mut counts = [0; 3];
        let mut last = None;
        for _ in 0..3000 {
            let i = balancer.pick(None).unwrap();
            assert_ne!(Some(i), last, "never the same endpoint twice in a row");
            last = Some(i);
            counts[i] += 1;
        }
        assert_eq!(counts, [1000, 1000, 1000]);
    }

    #[test]
    fn wraps_without_panicking() {
        let rr = super::RoundRobin::new(usize::MAX);
        assert_eq!(rr.pick(3), usize::MAX % 3);
        assert_eq!(rr.pick(3), 0);
    }
}
