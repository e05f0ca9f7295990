//! Smooth weighted round robin (nginx's algorithm), precomputed.
//!
//! nginx mutates a vector of "current weights" on every pick, which needs a
//! lock on the hot path. The sequence it produces depends only on the
//! weights and repeats every `sum(weights)` picks, so instead we run it once
//! when the endpoint set changes, store the schedule, and walk it with an
//! atomic cursor: `pick` is one `fetch_add` and one load.
//!
//! The schedule is bounded to [`MAX_SCHEDULE`] entries (weights are first
//! divided by their gcd; if their sum is still too large they are scaled
//! down proportionally, each kept at least 1). Beyond that, shares are
//! approximate to about `endpoints / MAX_SCHEDULE`. Building costs
//! `O(schedule × endpoints)`, paid only on endpoint-set changes.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest schedule kept (4 bytes per entry).
pub const MAX_SCHEDULE: usize = 10_000;

/// A precomputed smooth-WRR schedule and its cursor.
#[derive(Debug)]
pub(crate) struct Weighted {
    schedule: Box<[u32]>,
    cursor: AtomicUsize,
}

// === impl Weighted ===

impl Weighted {
    /// `weights` must be non-empty and each at least 1.
    pub(crate) fn new(weights: &[u32], start: usize) -> Self {
        let weights = reduce(weights);
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += w;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            schedule.push(best as u32);
        }
        let len = schedule.len();
        Self {
            schedule: schedule.into_boxed_slice(),
            cursor: AtomicUsize::new(start % len.max(1)),
        }
    }

    pub(crate) fn pick(&self) -> usize {
        let at = self.cursor.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.schedule[at] as usize
    }
}

/// Divides by the gcd, then scales down to fit [`MAX_SCHEDULE`].
fn reduce(weights: &[u32]) -> Vec<i64> {
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w.max(1))));
    let mut reduced: Vec<i64> = weights
        .iter()
        .map(|&w| (u64::from(w.max(1)) / g) as i64)
        .collect();
    let total: i64 = reduced.iter().sum();
    let cap = MAX_SCHEDULE.max(weights.len()) as i64;
    if total > cap {
        for w in &mut reduced {
            *w = ((*w as f64 * cap as f64 / total as f64).round() as i64).max(1);
        }
    }
    reduced
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::super::{Algorithm, Balancer, EndpointLoad};
    use super::*;

    fn picks(weights: &[u32], n: usize) -> Vec<usize> {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| EndpointLoad::new(format!("e{i}"), w))
            .collect();
        let balancer = Balancer::with_seed(Algorithm::WeightedRoundRobin, endpoints, 3);
        (0..n).map(|_| balancer.pick(None).unwrap()).collect()
    }

    #[test]
    fn shares_follow_weights() {
        let weights = [1, 2, 7];
        let seq = picks(&weights, 10_000);
        for (i, &w) in weights.iter().enumerate() {
            let share = seq.iter().filter(|&&p| p == i).count() as f64 / 10_000.0;
            let want = f64::from(w) / 10.0;
            assert!(
                (share - want).abs() <= 0.01,
                "endpoint {i}: {share} vs {want}"
            );
        }
    }

    #[test]
    fn smooth_no_endpoint_runs_longer_than_its_weight() {
        let weights = [1, 2, 7];
        let seq = picks(&weights, 10_000);
        let mut longest = [0usize; 3];
        let mut run = 0;
        for (k, &p) in seq.iter().enumerate() {
            run = if k > 0 && seq[k - 1] == p { run + 1 } else { 1 };
            longest[p] = longest[p].max(run);
        }
        assert_eq!(longest[0], 1, "{longest:?}");
        assert_eq!(longest[1], 1, "{longest:?}");
        // nginx spreads the heavy endpoint too: never more than 3 in a row here.
        assert!(longest[2] <= 3, "{longest:?}");
    }

    #[test]
    fn large_weights_are_bounded_and_keep_ratios() {
        assert_eq!(reduce(&[300, 600, 2100]), vec![1, 2, 7]);
        let big = Weighted::new(&[u32::MAX, u32::MAX / 2, 1], 0);
        assert!(big.schedule.len() <= MAX_SCHEDULE + 2);
        let counts = |i| big.schedule.iter().filter(|&&p| p == i).count();
        assert!(counts(2) >= 1, "every endpoint stays in the schedule");
        let ratio = counts(0) as f64 / counts(1) as f64;
        assert!((ratio - 2.0).abs() < 0.01, "{ratio}");
    }
}
