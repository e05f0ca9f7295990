//! Adaptive concurrency: a limit on one upstream's requests in flight
//! that follows the upstream's latency, so excess load is shed (503
//! `overload`, by `resilience::concurrency`) before queues grow at the
//! upstream rather than after.
//!
//! The rule is Envoy's gradient controller, measured on the calling side:
//!
//! - **min RTT.** The upstream's latency with no queue: measured with the
//!   limit pinned to `min_limit` until `min_rtt_requests` requests have
//!   been answered (their median), first when the limit is configured
//!   and then every `min_rtt_interval` (±10 %, so sidecars do not probe in
//!   step). Only requests that started during the probe count. A rule
//!   that never probes (Netflix's `Gradient2`) compares latency with its
//!   own moving average instead, which settles on whatever queue exists
//!   when it starts: under overload from the first request it sheds
//!   nothing.
//! - **Per window** (`window`, at least [`MIN_WINDOW_SAMPLES`] answers):
//!   `sample` is the window's median latency, and
//!   `gradient = clamp((min_rtt × (1 + buffer)) / sample, 0.5, 2)`,
//!   `limit ← gradient × limit + √limit`, within `min_limit..=max_limit`.
//!   While latency stays within `buffer` of the min RTT the limit grows
//!   (by about `1 + buffer` a window, latency being rarely below the min
//!   RTT); once a queue builds it shrinks (at most halving a window), and
//!   it settles where the upstream's queue is about `√limit` deep.
//!
//! After a probe the limit goes back to where it was. Time is passed in,
//! so every rule is tested without waiting.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use tokio::time::Instant;

/// A window is judged only with at least this many answers.
pub const MIN_WINDOW_SAMPLES: usize = 10;
/// Latency samples kept per window (or probe); later ones are ignored
/// until the window ends, which bounds the memory a busy upstream takes.
const MAX_SAMPLES: usize = 4096;

/// The knobs an operator sets in a policy's `adaptive_concurrency`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveConfig {
    pub min_limit: usize,
    pub max_limit: usize,
    /// How far above the min RTT latency may sit before the limit shrinks
    /// (0.25: 25 % above).
    pub buffer: f64,
    pub window: Duration,
    pub min_rtt_interval: Duration,
    pub min_rtt_requests: usize,
}

impl Default for AdaptiveConfig {
    /// Envoy's defaults, but for the window (Envoy requires one).
    fn default() -> Self {
        AdaptiveConfig {
            min_limit: 3,
            max_limit: 1000,
            buffer: 0.25,
            window: Duration::from_millis(100),
            min_rtt_interval: Duration::from_secs(60),
            min_rtt_requests: 50,
        }
    }
}

/// One upstream's limit and the requests in flight under it; the same
/// across the upstream's rebuilds, like its breaker.
#[derive(Debug)]
pub struct Adaptive {
    in_flight: AtomicUsize,
    /// The limit in force, read on every request without the lock;
    /// `usize::MAX` when off.
    limit: AtomicUsize,
    /// None while the upstream's policy sets no limit.
    state: Mutex<Option<State>>,
}

#[derive(Debug)]
struct State {
    cfg: AdaptiveConfig,
    /// The limit outside probes.
    limit: f64,
    min_rtt: Option<Duration>,
    /// Some while the min RTT is being measured: since when.
    probe: Option<Instant>,
    next_probe: Instant,
    window_start: Instant,
    samples: Vec<Duration>,
}

/// One request's place under the limit; given back when dropped (at the
/// end of the response body). [`AdaptivePermit::sample`] records its
/// latency when the response head arrives.
#[derive(Debug)]
pub struct AdaptivePermit {
    owner: Arc<Adaptive>,
    started: Instant,
}

impl Drop for AdaptivePermit {
    fn drop(&mut self) {
        self.owner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AdaptivePermit {
    pub fn sample(&self, now: Instant) {
        self.owner.sample(now, self.started);
    }
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(usize::MAX),
            state: Mutex::new(None),
        }
    }
}

// === impl Adaptive ===

impl Adaptive {
    /// Applies a policy's setting: None turns the limit off; a changed
    /// config starts over with a probe, the same one keeps what was
    /// learned.
    pub fn configure(&self, cfg: Option<AdaptiveConfig>, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match cfg {
            None => {
                *state = None;
                self.limit.store(usize::MAX, Ordering::Relaxed);
            }
            Some(cfg) if state.as_ref().is_some_and(|s| s.cfg == cfg) => {}
            Some(cfg) => {
                *state = Some(State {
                    cfg,
                    limit: cfg.min_limit as f64,
                    min_rtt: None,
                    probe: Some(now),
                    next_probe: now,
                    window_start: now,
                    samples: Vec::new(),
                });
                self.limit.store(cfg.min_limit, Ordering::Relaxed);
            }
        }
    }

    /// A place for one request, or None when the limit is reached.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Option<AdaptivePermit> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        // Dropped (and so given back) when over the limit.
        let permit = AdaptivePermit {
            owner: self.clone(),
            started: now,
        };
        (before < limit).then_some(permit)
    }

    /// The limit in force; None when the policy sets none.
    pub fn limit(&self) -> Option<usize> {
        Some(self.limit.load(Ordering::Relaxed)).filter(|l| *l != usize::MAX)
    }

    /// The latest min RTT measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.as_ref().and_then(|s| s.min_rtt)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn sample(&self, now: Instant, started: Instant) {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(s) = guard.as_mut() else { return };
        if let Some(limit) = s.sample(now, started) {
            self.limit.store(limit, Ordering::Relaxed);
        }
    }
}

// === impl State ===

impl State {
    /// Records one answer; the new limit in force when it changed.
    fn sample(&mut self, now: Instant, started: Instant) -> Option<usize> {
        let rtt = now.saturating_duration_since(started);
        if let Some(since) = self.probe {
            // Requests admitted before the probe were queued behind more.
            if started >= since && self.samples.len() < MAX_SAMPLES {
                self.samples.push(rtt);
            }
            if self.samples.len() < self.cfg.min_rtt_requests {
                return None;
            }
            self.min_rtt = Some(median(&mut self.samples));
            self.samples.clear();
            self.probe = None;
            self.window_start = now;
            self.next_probe = now + jittered(self.cfg.min_rtt_interval);
            return Some(self.limit.round() as usize);
        }
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(rtt);
        }
        if now.saturating_duration_since(self.window_start) < self.cfg.window
            || self.samples.len() < MIN_WINDOW_SAMPLES
        {
            return None;
        }
        let sample = median(&mut self.samples);
        self.samples.clear();
        self.window_start = now;
        let min_rtt = self.min_rtt?.as_secs_f64();
        // A clock too coarse to see the latency would divide by zero.
        let sample = sample.as_secs_f64().max(1e-6);
        let gradient = (min_rtt * (1.0 + self.cfg.buffer) / sample).clamp(0.5, 2.0);
        let limit = gradient * self.limit + self.limit.sqrt();
        self.limit = limit.clamp(self.cfg.min_limit as f64, self.cfg.max_limit as f64);
        if now >= self.next_probe {
            self.probe = Some(now);
            return Some(self.cfg.min_limit);
        }
        Some(self.limit.round() as usize)
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    let mid = samples.len() / 2;
    *samples.select_nth_unstable(mid).1
}

/// `d` ± 10 %, so sidecars that started together do not probe together.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + rand::random::<f64>() * 0.2)
}

#[cfg(test)]
mod tests;
