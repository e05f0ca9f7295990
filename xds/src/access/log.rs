//! The refusal log of one stream, rate-limited: a client can ask for
//! refused names far faster than anyone can read log lines, so the first
//! refusal is logged in full and later ones at most once per
//! [`INTERVAL`], as one line counting those left out (and naming the
//! latest); what is left when the stream ends is counted in a last line.

use std::time::Duration;

use tokio::time::Instant;

/// At most one line per stream per interval after the first.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

/// What to log for one refusal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// The first refusal on the stream: log it in full.
    First,
    /// `refused` refusals (this one the latest) since the last line.
    Summary { refused: u64 },
    /// Counted for the next summary.
    Quiet,
}

#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// When the last line was written; None before the first refusal.
    last: Option<Instant>,
    /// Refusals since then, not yet logged.
    suppressed: u64,
}

impl RefusalLog {
    /// Counts one refusal at `now` and says what to log for it.
    pub(crate) fn note(&mut self, now: Instant) -> Line {
        let Some(last) = self.last else {
            self.last = Some(now);
            return Line::First;
        };
        self.suppressed += 1;
        if now.duration_since(last) < INTERVAL {
            return Line::Quiet;
        }
        self.last = Some(now);
        Line::Summary {
            refused: std::mem::take(&mut self.suppressed),
        }
    }

    /// Refusals not logged yet (told when the stream ends).
    pub(crate) fn unlogged(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
