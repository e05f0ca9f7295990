//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each endpoint has a pseudo-random permutation of the table's slots,
//! `(offset + j × skip) mod M` from two hashes of its id; endpoints take
//! turns claiming their next unclaimed preferred slot until the table is
//! full. Lookup is `table[hash mod M]`: one load, no search. Compared with
//! a ring, shares are near-exact and lookups are faster; removing an
//! endpoint moves its keys plus a small extra fraction.
//!
//! `M` is fixed at [`TABLE_SIZE`] = 65537 (prime, as the permutation needs)
//! regardless of the endpoint count: a table size that changed with the
//! endpoint set would remap every key. The table costs 256 KiB per
//! balancer; the paper recommends `M ≥ 100 × endpoints`, true up to 655.
//!
//! Weights: per turn, each endpoint earns `weight / max_weight` credits and
//! claims a slot per whole credit, so slot counts follow weights.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::EndpointLoad;
use super::rng::mix;

/// Lookup-table size (prime).
pub const TABLE_SIZE: usize = 65_537;

/// A built Maglev lookup table.
#[derive(Debug)]
pub(crate) struct Maglev {
    table: Box<[u32]>,
}

// === impl Maglev ===

impl Maglev {
    /// `endpoints` must be non-empty.
    pub(crate) fn new(endpoints: &[Arc<EndpointLoad>]) -> Self {
        Self::with_size(endpoints, TABLE_SIZE)
    }

    /// `size` must be prime for every permutation to cover the table.
    fn with_size(endpoints: &[Arc<EndpointLoad>], size: usize) -> Self {
        let m = size as u64;
        let max_weight = endpoints.iter().map(|e| e.weight()).max().unwrap_or(1);
        let mut state: Vec<Permutation> = endpoints
            .iter()
            .map(|e| {
                let id = e.id().as_bytes();
                Permutation {
                    offset: xxh3_64_with_seed(id, 0xa5a5) % m,
                    skip: xxh3_64_with_seed(id, 0x5a5a) % (m - 1) + 1,
                    next: 0,
                    share: f64::from(e.weight()) / f64::from(max_weight),
                    credit: 0.0,
                }
            })
            .collect();
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (index, p) in state.iter_mut().enumerate() {
                p.credit += p.share;
                while p.credit >= 1.0 {
                    p.credit -= 1.0;
                    let slot = loop {
                        let slot = ((p.offset + p.next * p.skip) % m) as usize;
                        p.next += 1;
                        if table[slot] == u32::MAX {
                            break slot;
                        }
                    };
                    table[slot] = index as u32;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Self {
            table: table.into_boxed_slice(),
        }
    }

    pub(crate) fn pick(&self, hash: u64) -> usize {
        self.table[(mix(hash) % self.table.len() as u64) as usize] as usize
    }
}

/// One endpoint's walk through its preference list while filling.
struct Permutation {
    offset: u64,
    skip: u64,
    /// How many preferences have been tried.
    next: u64,
    /// Slots earned per turn, `weight / max_weight` (the heaviest earns 1).
    share: f64,
    credit: f64,
}

#[cfg(test)]
mod tests {
    use super::super::Algorithm;
    use super::super::tests::{consistent_hash_checks, endpoints};
    use super::*;

    #[test]
    fn consistent_and_minimal_disruption() {
        // Spread within ±10% of the fair share, at most 13% of keys moved.
        consistent_hash_checks(Algorithm::Maglev, 0.10, 0.13);
    }

    #[test]
    fn table_is_full_and_near_even() {
        let maglev = Maglev::with_size(&endpoints(7), 5003);
        let mut counts = [0usize; 7];
        for &i in maglev.table.iter() {
            counts[i as usize] += 1;
        }
        let fair = 5003 / 7;
        assert!(counts.iter().all(|&c| c.abs_diff(fair) <= 1), "{counts:?}");
    }

    #[test]
    fn slots_follow_weights() {
        let eps = vec![EndpointLoad::new("a", 1), EndpointLoad::new("b", 3)];
        let maglev = Maglev::with_size(&eps, 5003);
        let b = maglev.table.iter().filter(|&&i| i == 1).count();
        assert!(b.abs_diff(5003 * 3 / 4) <= 2, "{b}");
    }
}
