//! The engine-wide bound on what streams write to the log.
//!
//! Each stream already logs its refusals at a bounded rate
//! (`access/log.rs`), but streams come and go: a client opening and
//! cancelling streams as fast as it can, each with a refused name, an
//! invalid node id or over its caller's stream quota, would write a line
//! or more per stream, as fast as streams can be opened. So every line a
//! stream's client can cause (a refused stream, request or subscription,
//! a NACK) also takes a place among at most [`LINES_PER_WINDOW`] per
//! [`WINDOW`] for the whole server; the rest are written at debug level
//! only and counted, and the count is written as one line once the window
//! is over (with the next line, or when the next stream ends). The log
//! therefore grows by a bounded number of lines per unit of time whatever
//! the number of streams, and an operator still sees every line while
//! nothing floods it (a misconfigured sidecar's first refusal included).
//! An application may share the budget with lines of its own that clients
//! cause (the control plane's refused calls), so the bound stays one for
//! the whole server.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// The window over which lines are counted.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Most lines written per [`WINDOW`], besides the one counting those left
/// out: two a second on average, which a person can still read, and far
/// more than a healthy mesh writes.
pub const LINES_PER_WINDOW: u32 = 20;

/// A server's log rate: a cheap handle, clones share one budget.
#[derive(Clone, Debug, Default)]
pub struct LogRate {
    shared: Arc<Mutex<Window>>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the current window began; None before the first line.
    start: Option<Instant>,
    /// Lines written in it.
    lines: u32,
    /// Lines left out since the last count was written.
    suppressed: u64,
}

impl LogRate {
    /// Whether a line may be written now. A caller told no writes it at
    /// debug level instead; it is counted.
    pub fn admit(&self) -> bool {
        let (admitted, suppressed) = {
            let mut w = self.shared.lock().expect("log rate lock");
            let suppressed = w.roll(Instant::now());
            let admitted = w.lines < LINES_PER_WINDOW;
            if admitted {
                w.lines += 1;
            } else {
                w.suppressed += 1;
            }
            (admitted, suppressed)
        };
        report(suppressed);
        admitted
    }

    /// Writes the count of lines left out once their window is over, if
    /// any were: called as streams end, so the count is written even when
    /// no further line comes.
    pub fn tick(&self) {
        let suppressed = self
            .shared
            .lock()
            .expect("log rate lock")
            .roll(Instant::now());
        report(suppressed);
    }

    /// Lines left out and not yet counted in a line (tests).
    #[cfg(test)]
    pub(crate) fn suppressed(&self) -> u64 {
        self.shared.lock().expect("log rate lock").suppressed
    }
}

impl Window {
    /// Starts a new window if the current one is over, returning the
    /// count of lines the last one left out (0 if none, or if it is not
    /// over), which then takes the new window's first place.
    fn roll(&mut self, now: Instant) -> u64 {
        if self.start.is_some_and(|s| now.duration_since(s) < WINDOW) {
            return 0;
        }
        self.start = Some(now);
        self.lines = 0;
        let suppressed = std::mem::take(&mut self.suppressed);
        if suppressed > 0 {
            self.lines = 1;
        }
        suppressed
    }
}

fn report(suppressed: u64) {
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "log lines about refused calls, streams, requests, subscriptions and NACKs left out: at most {LINES_PER_WINDOW} are written per {}s, the rest only at debug level",
            WINDOW.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lines_per_window_then_one_count_of_the_rest() {
        let rate = LogRate::default();
        for n in 0..LINES_PER_WINDOW {
            assert!(rate.admit(), "line {n}");
        }
        for _ in 0..10_000 {
            assert!(!rate.admit());
        }
        rate.tick();
        assert_eq!(rate.suppressed(), 10_000, "counted until the window ends");
        tokio::time::advance(WINDOW).await;
        rate.tick();
        assert_eq!(rate.suppressed(), 0, "the count is written");
        // The count took the new window's first place.
        for n in 1..LINES_PER_WINDOW {
            assert!(rate.admit(), "line {n}");
        }
        assert!(!rate.admit());
        tokio::time::advance(WINDOW).await;
        assert!(rate.admit(), "a new window");
        assert_eq!(rate.suppressed(), 0);
    }

    /// Clones share one budget: the bound is the server's, not a stream's.
    #[tokio::test(start_paused = true)]
    async fn clones_share_the_budget() {
        let rate = LogRate::default();
        let streams: Vec<LogRate> = (0..100).map(|_| rate.clone()).collect();
        let admitted = streams.iter().filter(|r| r.admit()).count();
        assert_eq!(admitted, LINES_PER_WINDOW as usize);
        assert_eq!(rate.suppressed(), 100 - u64::from(LINES_PER_WINDOW));
    }
}
