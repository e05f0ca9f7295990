//! The retry budget: retries may add at most `ratio` of the requests seen
//! over the last [`WINDOW`], plus `min_per_second` per second of it, so
//! retries cannot multiply load on an upstream that is already failing.
//! One budget per upstream, kept across endpoint and policy changes.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far back the budget looks.
pub const WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Whole seconds since the budget's epoch this bucket counts.
    second: u64,
    requests: u64,
    retries: u64,
}

/// Requests and retries per second over a sliding window of one-second
/// buckets. The lock is held for a few additions, never across an await.
#[derive(Debug)]
pub struct RetryBudget {
    buckets: Mutex<[Bucket; BUCKETS]>,
    epoch: Instant,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

// === impl RetryBudget ===

impl RetryBudget {
    pub fn new() -> Self {
        RetryBudget {
            buckets: Mutex::new([Bucket::default(); BUCKETS]),
            epoch: Instant::now(),
        }
    }

    fn second(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_secs()
    }

    fn with_current<T>(&self, f: impl FnOnce(&mut [Bucket; BUCKETS], usize, u64) -> T) -> T {
        let now = self.second();
        let i = (now % BUCKETS as u64) as usize;
        let mut b = self.buckets.lock().expect("budget lock");
        if b[i].second != now {
            b[i] = Bucket {
                second: now,
                ..Default::default()
            };
        }
        f(&mut b, i, now)
    }

    /// Counts a request that may be retried.
    pub fn request(&self) {
        self.with_current(|b, i, _| b[i].requests += 1);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self, ratio: f64, min_per_second: u32) -> bool {
        self.with_current(|b, i, now| {
            let live = b.iter().filter(|k| now - k.second < BUCKETS as u64);
            let (requests, retries) =
                live.fold((0, 0), |(q, r), k| (q + k.requests, r + k.retries));
            let allowed =
                ratio * requests as f64 + f64::from(min_per_second) * WINDOW.as_secs_f64();
            if (retries + 1) as f64 > allowed {
                return false;
            }
            b[i].retries += 1;
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ratio_plus_minimum_over_a_sliding_window() {
        let budget = RetryBudget::new();
        for _ in 0..100 {
            budget.request();
        }
        // 20% of 100 plus 1/s over 10 s: 30 retries.
        let granted = (0..50).filter(|_| budget.try_retry(0.2, 1)).count();
        assert_eq!(granted, 30);
        // Five seconds on, the same requests and retries still count.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!budget.try_retry(0.2, 1));
        // Past the window they have slid out; only the minimum is left.
        tokio::time::advance(Duration::from_secs(6)).await;
        let granted = (0..50).filter(|_| budget.try_retry(0.2, 1)).count();
        assert_eq!(granted, 10);
        assert!(!budget.try_retry(0.0, 0));
    }
}
