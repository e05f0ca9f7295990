//! What publishers follow of the load summaries to know which services to
//! rebuild: summaries written or gone, and summaries leaving their
//! blackout, which no write announces (so a clock, every
//! [`BLACKOUT_TICK`]).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{LoadWeights, unix_ms, view};
use crate::store::follow::Entries;

/// How often summaries leaving their blackout are looked for.
pub const BLACKOUT_TICK: Duration = Duration::from_secs(1);

/// What the publisher follows of the load summaries: their changes, and
/// the clock that ends blackouts.
pub struct LoadFollow {
    changes: watch::Receiver<Arc<Entries>>,
    seen: Arc<Entries>,
    tick: tokio::time::Interval,
    last_tick_ms: i64,
    blackout_ms: i64,
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
        tokio::select! {
            changed = self.changes.changed() => {
                changed.ok()?;
                let now = self.changes.borrow_and_update().clone();
                let ids = view::changed(&self.seen, &now);
                self.seen = now;
                Some(ids)
            }
            _ = self.tick.tick() => {
                let now = unix_ms();
                let ids = view::leaving_blackout(&self.seen, self.blackout_ms, self.last_tick_ms, now);
                self.last_tick_ms = now;
                Some(ids.into_iter().collect())
            }
        }
    }
}
