//! Ring hash (Ketama-like consistent hashing).
//!
//! Each endpoint owns virtual nodes at `xxh3(id, seed = i)` on a 64-bit
//! ring; a key goes to the first node at or after its hash. Positions depend
//! only on the endpoint's id, so removing an endpoint moves only the keys it
//! owned (plus any change in the others' node counts, see below).
//!
//! Node counts: each endpoint gets `scale × weight` nodes, where `scale`
//! starts at 128 (about the usual 100, but a power of two) and is doubled
//! while the ring is smaller than [`MIN_RING`] and halved while it is
//! larger than [`MAX_RING`]. Keeping `scale` a power of two means adding or
//! removing an endpoint rarely changes the other endpoints' node counts;
//! a change there would move keys between surviving endpoints (with
//! `total / n` nodes each, removing one of 10 endpoints would move ~20% of
//! keys instead of ~10%). With ~128 nodes per endpoint, shares deviate
//! from fair by about ±9% (one standard deviation).

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::EndpointLoad;
use super::rng::mix;

/// Smallest ring built (nodes).
pub const MIN_RING: usize = 1024;
/// Largest ring built (nodes; 16 bytes each, so 1 MiB).
pub const MAX_RING: usize = 65_536;
/// Virtual nodes per unit of weight before bounding.
const BASE_SCALE: f64 = 128.0;

/// A built ring: node hashes sorted ascending, each with its endpoint index.
#[derive(Debug)]
pub(crate) struct RingHash {
    ring: Box<[(u64, u32)]>,
}

// === impl RingHash ===

impl RingHash {
    /// `endpoints` must be non-empty.
    pub(crate) fn new(endpoints: &[Arc<EndpointLoad>]) -> Self {
        let total_weight: f64 = endpoints.iter().map(|e| f64::from(e.weight())).sum();
        let mut scale = BASE_SCALE;
        while scale * total_weight < MIN_RING as f64 {
            scale *= 2.0;
        }
        while scale * total_weight > MAX_RING as f64
            && scale * total_weight > endpoints.len() as f64
        {
            scale /= 2.0;
        }
        let mut ring = Vec::with_capacity((scale * total_weight) as usize + endpoints.len());
        for (index, endpoint) in endpoints.iter().enumerate() {
            let nodes = ((scale * f64::from(endpoint.weight())).round() as u64).max(1);
            for i in 0..nodes {
                ring.push((xxh3_64_with_seed(endpoint.id().as_bytes(), i), index as u32));
            }
        }
        // Ties (vanishingly rare) resolve by index, so the ring is deterministic.
        ring.sort_unstable();
        Self {
            ring: ring.into_boxed_slice(),
        }
    }

    /// The endpoint owning `hash`: binary search, wrapping past the top.
    pub(crate) fn pick(&self, hash: u64) -> usize {
        let key = mix(hash);
        let at = self.ring.partition_point(|&(node, _)| node < key);
        let (_, index) = self.ring[if at == self.ring.len() { 0 } else { at }];
        index as usize
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{consistent_hash_checks, endpoints};
    use super::super::{Algorithm, Balancer};
    use super::*;

    #[test]
    fn consistent_and_minimal_disruption() {
        // Spread within ±30% of the fair share, at most 13% of keys moved.
        consistent_hash_checks(Algorithm::RingHash, 0.30, 0.13);
    }

    #[test]
    fn ring_size_is_bounded_and_stable_under_removal() {
        assert_eq!(RingHash::new(&endpoints(10)).len(), 1280);
        assert_eq!(RingHash::new(&endpoints(9)).len(), 1152, "same scale");
        assert_eq!(RingHash::new(&endpoints(1)).len(), 1024);
        assert!(RingHash::new(&endpoints(2000)).len() <= MAX_RING);
        let heavy = vec![EndpointLoad::new("a", u32::MAX), EndpointLoad::new("b", 1)];
        let ring = RingHash::new(&heavy);
        assert!(ring.len() <= MAX_RING + 1, "{}", ring.len());
        assert!(
            ring.ring.iter().any(|&(_, i)| i == 1),
            "light endpoint kept"
        );
    }

    #[test]
    fn weights_shift_shares() {
        let eps = vec![EndpointLoad::new("a", 1), EndpointLoad::new("b", 3)];
        let balancer = Balancer::with_seed(Algorithm::RingHash, eps, 0);
        let b = (0..10_000u64)
            .filter(|&k| balancer.pick(Some(k)) == Some(1))
            .count();
        assert!((6500..8500).contains(&b), "{b}");
    }
}
