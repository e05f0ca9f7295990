//! The balancer's random source: splitmix64 over one atomic counter.
//!
//! `pick` runs on every request from every worker thread, so the source must
//! be lock-free and allocation-free; a `fetch_add` plus a few multiplies is
//! both. Seedable, so the statistical tests are deterministic. The stream is
//! not cryptographic, and it need not be: it only spreads load.

use std::sync::atomic::{AtomicU64, Ordering};

/// The splitmix64 increment (2^64 / golden ratio).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A shared, lock-free pseudo-random source.
#[derive(Debug)]
pub(crate) struct Rng(AtomicU64);

// === impl Rng ===

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }

    pub(crate) fn next_u64(&self) -> u64 {
        let state = self
            .0
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        mix(state)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift, no division); `n > 0`.
    pub(crate) fn below(&self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Two distinct uniform indices in `0..n`, for power-of-two-choices; `n >= 2`.
    pub(crate) fn two_below(&self, n: usize) -> (usize, usize) {
        debug_assert!(n >= 2);
        let a = self.below(n);
        let b = (a + 1 + self.below(n - 1)) % n;
        (a, b)
    }
}

/// The splitmix64 finaliser: a bijective avalanche of 64 bits. Also used to
/// re-spread caller-supplied hashes, so a weak key hash (say, sequential
/// ids) still lands uniformly on a ring or table.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_covers_it() {
        let rng = Rng::new(7);
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[rng.below(5)] += 1;
        }
        assert!(seen.iter().all(|&c| (900..1100).contains(&c)), "{seen:?}");
    }

    #[test]
    fn two_below_never_repeats() {
        let rng = Rng::new(1);
        for n in 2..10 {
            for _ in 0..200 {
                let (a, b) = rng.two_below(n);
                assert!(a < n && b < n && a != b);
            }
        }
    }
}
