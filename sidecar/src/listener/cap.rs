//! Places for what a listener holds at once: connections, or on the
//! inbound listener TLS handshakes in progress.
//!
//! A connection takes a place as it is accepted and gives it back when it
//! is dropped; with none free it is closed at once, before any task or
//! buffer is spent on it. Refusals are counted, and logged at a bounded
//! rate: a flood must not grow the log by a line per connection, so the
//! first refusal of a quiet spell is written at once and the rest are
//! written as one line per [`LOG_INTERVAL`] counting them.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::metrics::CapMetrics;

/// At most one line per listener and cap per interval, after the first.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A cap's places; a cheap handle, clones share them.
#[derive(Clone)]
pub struct Cap {
    shared: Arc<Shared>,
}

struct Shared {
    places: Arc<Semaphore>,
    max: usize,
    /// The listener, as metrics and the log name it.
    listener: Arc<str>,
    /// The config key that sets `max`, for the log line.
    key: &'static str,
    /// The `reason` label of its refusals.
    reason: &'static str,
    metrics: CapMetrics,
    log: Mutex<RefusalLog>,
}

/// One place, held for as long as what took it lives.
pub struct Place {
    _permit: OwnedSemaphorePermit,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.dec();
    }
}

// === impl Cap ===

impl Cap {
    pub fn new(
        listener: Arc<str>,
        key: &'static str,
        reason: &'static str,
        max: usize,
        metrics: CapMetrics,
    ) -> Self {
        Cap {
            shared: Arc::new(Shared {
                places: Arc::new(Semaphore::new(max)),
                max,
                listener,
                key,
                reason,
                metrics,
                log: Mutex::default(),
            }),
        }
    }

    /// A place for what `peer` just opened, or None (counted, and logged
    /// within the rate) when every place is taken.
    pub fn admit(&self, peer: SocketAddr) -> Option<Place> {
        let s = &self.shared;
        match s.places.clone().try_acquire_owned() {
            Ok(permit) => {
                s.metrics.open.inc();
                Some(Place {
                    _permit: permit,
                    open: s.metrics.open.clone(),
                })
            }
            Err(_) => {
                s.metrics.refused.inc();
                self.log_refusal(peer);
                None
            }
        }
    }

    fn log_refusal(&self, peer: SocketAddr) {
        let s = &self.shared;
        let now = Instant::now();
        let decision = s.log.lock().expect("refusal log lock").refused(now);
        match decision {
            Decision::Write => tracing::warn!(
                listener = %s.listener,
                %peer,
                limit = s.max,
                reason = s.reason,
                "connection refused: {} ({}) reached; further refusals are counted in one line per {}s",
                s.key,
                s.max,
                LOG_INTERVAL.as_secs(),
            ),
            Decision::Count => {
                tracing::debug!(listener = %s.listener, %peer, reason = s.reason, "connection refused")
            }
            Decision::CountAndFlushAt(at) => {
                let cap = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    cap.flush();
                });
            }
        }
    }

    /// Writes the count of refusals left out of the log, once their
    /// interval is over.
    fn flush(&self) {
        let s = &self.shared;
        let left_out = s
            .log
            .lock()
            .expect("refusal log lock")
            .flush(Instant::now());
        if left_out > 0 {
            tracing::warn!(
                listener = %s.listener,
                refused = left_out,
                limit = s.max,
                reason = s.reason,
                "{left_out} more connections refused in the last {}s: {} ({}) reached",
                LOG_INTERVAL.as_secs(),
                s.key,
                s.max,
            );
        }
    }
}

// === RefusalLog ===

/// What to do with one refusal's line.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Write it: the first in a quiet spell.
    Write,
    /// Count it; a flush is already due.
    Count,
    /// Count it, and write the count at this instant.
    CountAndFlushAt(Instant),
}

/// The log's rate for one cap: a line, then counts once per interval.
#[derive(Debug, Default)]
struct RefusalLog {
    /// When the last line was written; None before the first.
    last_line: Option<Instant>,
    /// Refusals counted and not written yet.
    left_out: u64,
    /// Whether a flush is due.
    flush_due: bool,
}

impl RefusalLog {
    fn refused(&mut self, now: Instant) -> Decision {
        let quiet = self
            .last_line
            .is_none_or(|t| now.duration_since(t) >= LOG_INTERVAL);
        if quiet && !self.flush_due {
            self.last_line = Some(now);
            return Decision::Write;
        }
        self.left_out += 1;
        if self.flush_due {
            return Decision::Count;
        }
        self.flush_due = true;
        let since = self.last_line.unwrap_or(now);
        Decision::CountAndFlushAt(since + LOG_INTERVAL)
    }

    /// The refusals to write in one line now; the line starts a new
    /// interval.
    fn flush(&mut self, now: Instant) -> u64 {
        self.flush_due = false;
        let left_out = std::mem::take(&mut self.left_out);
        if left_out > 0 {
            self.last_line = Some(now);
        }
        left_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    /// Places are given back when dropped; one over the cap is refused
    /// and counted, and the gauge follows what is held.
    #[tokio::test]
    async fn over_the_cap_is_refused_until_a_place_is_given_back() {
        let metrics = CapMetrics::default();
        let cap = Cap::new(
            Arc::from("outbound"),
            "k",
            "max-connections",
            2,
            metrics.clone(),
        );
        let a = cap.admit(peer()).expect("first");
        let _b = cap.admit(peer()).expect("second");
        assert!(cap.admit(peer()).is_none());
        assert_eq!((metrics.open.get(), metrics.refused.get()), (2, 1));
        drop(a);
        assert_eq!(metrics.open.get(), 1);
        assert!(cap.admit(peer()).is_some());
        assert_eq!(metrics.refused.get(), 1);
    }

    /// A flood writes its first refusal, then one count per interval,
    /// however many refusals come; a quiet spell resets it.
    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_then_counted_per_interval() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.refused(t0), Decision::Write);
        assert_eq!(
            log.refused(t0 + Duration::from_secs(1)),
            Decision::CountAndFlushAt(t0 + LOG_INTERVAL)
        );
        for s in 2..10 {
            assert_eq!(log.refused(t0 + Duration::from_secs(s)), Decision::Count);
        }
        assert_eq!(log.flush(t0 + LOG_INTERVAL), 9);
        // Still flooding: the next refusal is counted in the next line.
        let t1 = t0 + LOG_INTERVAL + Duration::from_secs(1);
        assert_eq!(
            log.refused(t1),
            Decision::CountAndFlushAt(t0 + LOG_INTERVAL * 2)
        );
        assert_eq!(log.flush(t0 + LOG_INTERVAL * 2), 1);
        // A quiet interval later, the next refusal is written again.
        assert_eq!(log.refused(t0 + LOG_INTERVAL * 4), Decision::Write);
    }

    /// The count is written when its interval ends even if no refusal
    /// follows (the spawned flush runs).
    #[tokio::test(start_paused = true)]
    async fn the_count_is_flushed_without_a_further_refusal() {
        let cap = Cap::new(
            Arc::from("inbound"),
            "k",
            "max-connections",
            0,
            CapMetrics::default(),
        );
        for _ in 0..5 {
            assert!(cap.admit(peer()).is_none());
        }
        {
            let log = cap.shared.log.lock().unwrap();
            assert_eq!((log.left_out, log.flush_due), (4, true));
        }
        tokio::time::sleep(LOG_INTERVAL + Duration::from_millis(1)).await;
        let log = cap.shared.log.lock().unwrap();
        assert_eq!((log.left_out, log.flush_due), (0, false));
    }
}
