//! Exponential backoff with full jitter, for reconnecting to the control plane.
//!
//! The n-th consecutive failure waits a uniformly random time in
//! `[0, min(cap, base * factor^n)]` ("full jitter"), so a fleet of sidecars
//! that lost the same control plane does not reconnect in lockstep. A
//! connection that stayed up for `stable_after` resets the sequence, so a
//! control-plane restart after a long uptime is retried almost at once.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;

/// Default first ceiling.
pub const BASE: Duration = Duration::from_millis(100);
/// Default growth of the ceiling per failure.
pub const FACTOR: u32 = 2;
/// Default largest ceiling.
pub const CAP: Duration = Duration::from_secs(5);
/// Default uptime after which a connection counts as healthy again.
pub const STABLE_AFTER: Duration = Duration::from_secs(5);

/// Backoff state for one reconnecting task.
#[derive(Debug)]
pub struct Backoff {
    /// Ceiling of the first delay.
    base: Duration,
    /// Ceiling multiplier per consecutive failure.
    factor: u32,
    /// Largest ceiling, so a long outage is retried at a bounded rate.
    cap: Duration,
    /// How long a connection must stay up before failures are forgotten.
    stable_after: Duration,
    /// Consecutive failures since the last reset.
    attempt: u32,
    /// When the current connection came up, if it is up.
    connected_at: Option<Instant>,
    /// Jitter source; seedable so tests are deterministic.
    rng: StdRng,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BASE, FACTOR, CAP, STABLE_AFTER)
    }
}

// === impl Backoff ===

impl Backoff {
    /// A backoff with the given parameters and an OS-seeded jitter source.
    pub fn new(base: Duration, factor: u32, cap: Duration, stable_after: Duration) -> Self {
        Self {
            base,
            factor: factor.max(1),
            cap,
            stable_after,
            attempt: 0,
            connected_at: None,
            rng: StdRng::from_os_rng(),
        }
    }

    /// Replaces the jitter source with a seeded one (for tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = StdRng::seed_from_u64(seed);
        self
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let mult = self
            .factor
            .checked_pow(self.attempt.min(31))
            .unwrap_or(u32::MAX);
        self.base
            .checked_mul(mult)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The next delay: uniform in `[0, ceiling]`; advances the sequence.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Records that a connection came up.
    pub fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
    }

    /// Records that the connection went down; resets if it had been stable.
    pub fn disconnected(&mut self) {
        if let Some(at) = self.connected_at.take()
            && at.elapsed() >= self.stable_after
        {
            self.reset();
        }
    }

    /// Sleeps for the next delay. Returns false if `shutdown` fired first
    /// (or its sender is gone), true once the delay elapsed.
    pub async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::default().with_seed(7)
    }

    #[test]
    fn ceiling_doubles_up_to_cap() {
        let mut b = backoff();
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(*ceilings.last().unwrap() as u64));
        }
        assert_eq!(
            ceilings,
            vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        // No overflow after very many failures.
        for _ in 0..100 {
            assert!(b.next_delay() <= CAP);
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = backoff();
        for _ in 0..6 {
            b.next_delay();
        }
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 10, "{delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn resets_only_after_a_stable_connection() {
        let mut b = backoff();
        for _ in 0..4 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_millis(1600));

        // A connection that drops quickly keeps the backoff growing.
        b.connected();
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.disconnected();
        assert_eq!(b.ceiling(), Duration::from_millis(1600));

        // One that stayed up resets it.
        b.connected();
        tokio::time::sleep(STABLE_AFTER).await;
        b.disconnected();
        assert_eq!(b.ceiling(), BASE);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_at_most_the_ceiling_and_stops_on_shutdown() {
        let (tx, mut rx) = watch::channel(false);
        let mut b = backoff();
        for expected_max in [100u64, 200, 400, 800] {
            let start = Instant::now();
            assert!(b.wait(&mut rx).await);
            assert!(start.elapsed() <= Duration::from_millis(expected_max));
        }
        for _ in 0..10 {
            b.next_delay();
        }
        let start = Instant::now();
        let waiter = tokio::spawn(async move { b.wait(&mut rx).await });
        tx.send(true).unwrap();
        assert!(!waiter.await.unwrap());
        assert!(start.elapsed() < Duration::from_millis(5));
    }
}
