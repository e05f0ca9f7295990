//! The refusal log of one stream, rate-limited: a client can ask for
//! refused names far faster than anyone can read log lines, so the first
//! refusal is logged in full and later ones at most once per
//! [`INTERVAL`], as one line counting those left out (and naming the
//! latest); what is left when the stream ends is counted in a last line.
//! Every such line also takes a place in the server's [`LogRate`], so
//! streams that come and go cannot add up to a flood either; a line it
//! refuses is tried again with the stream's next refusal.

use std::time::Duration;

use tokio::time::Instant;

use crate::log_rate::LogRate;

/// At most one line per stream per interval after the first.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

/// What to log for one refusal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// The first refusal on the stream: log it in full.
    First,
    /// `refused` refusals (this one the latest) since the last line.
    Summary { refused: u64 },
    /// Counted for the next summary (logged at debug level only).
    Quiet,
}

#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// When the last line was written; None before the first.
    last: Option<Instant>,
    /// Refusals not logged yet.
    suppressed: u64,
    rate: LogRate,
}

impl RefusalLog {
    /// A log whose lines take places in the server's `rate`.
    pub(crate) fn new(rate: LogRate) -> Self {
        RefusalLog {
            last: None,
            suppressed: 0,
            rate,
        }
    }

    /// Counts one refusal at `now` and says what to log for it.
    pub(crate) fn note(&mut self, now: Instant) -> Line {
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= INTERVAL);
        if !due || !self.rate.admit() {
            self.suppressed += 1;
            return Line::Quiet;
        }
        if self.last.replace(now).is_none() && self.suppressed == 0 {
            return Line::First;
        }
        Line::Summary {
            refused: std::mem::take(&mut self.suppressed) + 1,
        }
    }

    /// Refusals not logged yet (told when the stream ends).
    pub(crate) fn unlogged(&self) -> u64 {
        self.suppressed
    }

    /// Whether the server's rate admits one more line.
    pub(crate) fn admit(&self) -> bool {
        self.rate.admit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_rate::LINES_PER_WINDOW;

    #[tokio::test(start_paused = true)]
    async fn the_first_refusal_then_one_summary_per_interval() {
        let mut log = RefusalLog::default();
        assert_eq!(log.note(Instant::now()), Line::First);
        for _ in 0..60_000 {
            assert_eq!(log.note(Instant::now()), Line::Quiet);
        }
        assert_eq!(log.unlogged(), 60_000);
        tokio::time::advance(INTERVAL / 2).await;
        assert_eq!(log.note(Instant::now()), Line::Quiet);
        tokio::time::advance(INTERVAL / 2).await;
        assert_eq!(
            log.note(Instant::now()),
            Line::Summary { refused: 60_002 },
            "every refusal since the first is counted"
        );
        assert_eq!(log.unlogged(), 0);
        assert_eq!(log.note(Instant::now()), Line::Quiet);
        tokio::time::advance(INTERVAL).await;
        assert_eq!(log.note(Instant::now()), Line::Summary { refused: 2 });
    }

    /// Streams share the server's rate: once it is spent, a new stream's
    /// first refusal is counted, not written, and the stream's next
    /// refusal after the window tries again and counts it.
    #[tokio::test(start_paused = true)]
    async fn streams_share_the_servers_rate() {
        let rate = LogRate::default();
        let mut written = 0;
        for _ in 0..1000 {
            let mut stream = RefusalLog::new(rate.clone());
            if stream.note(Instant::now()) == Line::First {
                written += 1;
            }
        }
        assert_eq!(written, LINES_PER_WINDOW);
        let mut late = RefusalLog::new(rate.clone());
        assert_eq!(late.note(Instant::now()), Line::Quiet);
        assert_eq!(late.unlogged(), 1);
        tokio::time::advance(crate::log_rate::WINDOW).await;
        assert_eq!(
            late.note(Instant::now()),
            Line::Summary { refused: 2 },
            "the refusal left out is counted"
        );
    }
}
