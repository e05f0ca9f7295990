//! What publishers follow of the load summaries to know which services to
//! rebuild: summaries written or gone, and summaries leaving their
//! blackout, which no write announces (so a clock, every
//! [`BLACKOUT_TICK`]).
//!
//! Changes are gathered for [`COALESCE`] after the first, then handed over
//! at once: each instance's summary changes at most every few seconds, but
//! a service of many instances (or one token holding many sessions) would
//! otherwise have its resources rebuilt and pushed to every caller on each
//! one. So weights cost at most one push per service per [`COALESCE`].

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio::time::Instant;

use super::{LoadWeights, unix_ms, view};
use crate::store::follow::Entries;

/// How often summaries leaving their blackout are looked for.
pub const BLACKOUT_TICK: Duration = Duration::from_secs(1);
/// How long changes are gathered before they are handed over.
pub const COALESCE: Duration = Duration::from_secs(1);

/// What the publisher follows of the load summaries: their changes, and
/// the clock that ends blackouts.
pub struct LoadFollow {
    changes: watch::Receiver<Arc<Entries>>,
    seen: Arc<Entries>,
    tick: tokio::time::Interval,
    last_tick_ms: i64,
    blackout_ms: i64,
    /// Gathered, not yet handed over (kept here, so a `next` cancelled by
    /// its caller's `select!` loses nothing).
    pending: BTreeSet<String>,
    /// When `pending` is handed over; None while it is empty.
    due: Option<Instant>,
}

impl LoadFollow {
    /// None when weights come from operators only: nothing to follow.
    pub fn new(weights: &LoadWeights) -> Option<Self> {
        let view = weights.view()?;
        let mut changes = view.subscribe();
        let seen = changes.borrow_and_update().clone();
        let mut tick = tokio::time::interval(BLACKOUT_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(LoadFollow {
            changes,
            seen,
            tick,
            last_tick_ms: unix_ms(),
            blackout_ms: i64::try_from(weights.config().blackout.as_millis()).unwrap_or(i64::MAX),
            pending: BTreeSet::new(),
            due: None,
        })
    }

    /// The instances whose weight may have changed: summaries written or
    /// gone, or leaving their blackout. Pending forever without summaries.
    pub async fn next(this: &mut Option<Self>) -> BTreeSet<String> {
        let Some(f) = this.as_mut() else {
            return std::future::pending().await;
        };
        match f.step().await {
            Some(ids) => ids,
            None => {
                // The view stopped (shutdown): nothing more to follow.
                *this = None;
                BTreeSet::new()
            }
        }
    }

    async fn step(&mut self) -> Option<BTreeSet<String>> {
        loop {
            let due = self.due;
            tokio::select! {
                changed = self.changes.changed() => {
                    changed.ok()?;
                    let now = self.changes.borrow_and_update().clone();
                    let ids = view::changed(&self.seen, &now);
                    self.seen = now;
                    self.gather(ids);
                }
                _ = self.tick.tick() => {
                    let now = unix_ms();
                    let ids = view::leaving_blackout(&self.seen, self.blackout_ms, self.last_tick_ms, now);
                    self.last_tick_ms = now;
                    self.gather(ids);
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.due = None;
                    return Some(std::mem::take(&mut self.pending));
                }
            }
        }
    }

    fn gather(&mut self, ids: impl IntoIterator<Item = String>) {
        let before = self.pending.len();
        self.pending.extend(ids);
        if self.pending.len() > before {
            self.due.get_or_insert_with(|| Instant::now() + COALESCE);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::load::{LoadView, WeightConfig, write_summaries};
    use crate::store::{Store, embedded::EmbeddedStore};

    /// Two summaries written 300 ms apart come out as one change: one
    /// rebuild and push, not two.
    #[tokio::test]
    async fn changes_close_together_are_handed_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let view = LoadView::start(store.clone(), "/isdp/", shutdown.clone())
            .await
            .unwrap();
        let mut follow =
            Some(LoadFollow::new(&LoadWeights::new(WeightConfig::default(), view)).unwrap());
        let writes = async {
            write_summaries(&store, shutdown.clone(), &[("a", 0.5)]).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            write_summaries(&store, shutdown.clone(), &[("b", 0.5)]).await;
        };
        let (got, ()) = tokio::join!(LoadFollow::next(&mut follow), writes);
        assert_eq!(got, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
    }
}
