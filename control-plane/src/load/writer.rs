//! One session's side of the load summaries: what of its reports is worth
//! writing to the store, and when.
//!
//! Every replica computes weights from the summaries in the store, but a
//! report reaches only the replica holding its session, so that replica
//! writes them. Reports come every ~2 s per sidecar; writing each would
//! make load most of the store's writes. So figures are smoothed, and a
//! summary is written only when one moved by more than [`MIN_CHANGE`]
//! (or the figures turned usable or unusable), at most every
//! [`MIN_WRITE_GAP`] per instance; figures that are not usable (no
//! traffic or no utilisation: they weigh nothing) are written once, not
//! on every move, so a mesh whose applications report no utilisation
//! writes a summary per instance and session, not a stream of them. An instance that stops reporting for
//! [`super::REPORT_TTL`] has its summary deleted. Pure: time is passed in.

use std::collections::HashMap;
use std::time::Duration;

use isdp_proto::v1::{InstanceLoad, LoadSummary};
use tokio::time::Instant;

/// A summary is rewritten when a figure moved by more than this share.
pub const MIN_CHANGE: f64 = 0.1;
/// The least time between two writes of one instance's summary.
pub const MIN_WRITE_GAP: Duration = Duration::from_secs(3);
/// The weight of the newest report in the smoothed figures.
pub const SMOOTHING: f64 = 0.5;

/// The figures of one instance, smoothed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Figures {
    rps: f64,
    eps: f64,
    utilization: f64,
}

#[derive(Debug)]
struct State {
    figures: Figures,
    /// Wall clock (Unix ms) since when the figures are usable.
    usable_since_unix_ms: i64,
    /// What was last written, and when.
    written: Option<(Figures, i64, Instant)>,
    reported: Instant,
}

/// What a store write should do for one instance.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Put(LoadSummary),
    Delete(String),
}

/// One session's instances' figures and what was written of them.
#[derive(Debug, Default)]
pub struct Writer {
    instances: HashMap<String, State>,
}

// === impl Writer ===

impl Writer {
    /// Folds in one instance's report at `now` (`now_unix_ms` on the wall
    /// clock); the summary to write, if one is due.
    pub fn offer(
        &mut self,
        load: &InstanceLoad,
        now: Instant,
        now_unix_ms: i64,
    ) -> Option<LoadSummary> {
        let sample = Figures {
            rps: load.rps,
            eps: load.eps,
            utilization: load
                .application_utilization
                .or(load.cpu_utilization)
                .unwrap_or(0.0),
        };
        let usable = |f: &Figures| f.rps > 0.0 && f.utilization > 0.0;
        let state = self
            .instances
            .entry(load.instance_id.clone())
            .or_insert_with(|| State {
                figures: sample,
                usable_since_unix_ms: 0,
                written: None,
                reported: now,
            });
        state.reported = now;
        state.figures = if usable(&state.figures) && usable(&sample) {
            smooth(state.figures, sample)
        } else {
            // Turning usable or not is news: no history to smooth with.
            sample
        };
        match (usable(&state.figures), state.usable_since_unix_ms) {
            (true, 0) => state.usable_since_unix_ms = now_unix_ms.max(1),
            (false, _) => state.usable_since_unix_ms = 0,
            _ => {}
        }
        let due = match &state.written {
            None => true,
            Some((figures, since, at)) => {
                let news = *since != state.usable_since_unix_ms
                    && (*since == 0 || state.usable_since_unix_ms == 0);
                let gap = now.saturating_duration_since(*at) >= MIN_WRITE_GAP;
                // Figures without a utilisation weigh nothing: only
                // their turning usable is worth a write.
                let usable_now = state.usable_since_unix_ms != 0;
                news || (gap && usable_now && moved(figures, &state.figures))
            }
        };
        if !due {
            return None;
        }
        state.written = Some((state.figures, state.usable_since_unix_ms, now));
        Some(LoadSummary {
            instance_id: load.instance_id.clone(),
            rps: state.figures.rps,
            eps: state.figures.eps,
            utilization: state.figures.utilization,
            usable_since_unix_ms: state.usable_since_unix_ms,
        })
    }

    /// Forgets that `id`'s last summary was written (its write was
    /// dropped): the next report writes it again.
    pub fn unwritten(&mut self, id: &str) {
        if let Some(s) = self.instances.get_mut(id) {
            s.written = None;
        }
    }

    /// Instances that stopped reporting for `ttl`: forgotten, and their
    /// summaries are to be deleted.
    pub fn stale(&mut self, now: Instant, ttl: Duration) -> Vec<String> {
        let mut gone = Vec::new();
        self.instances.retain(|id, s| {
            let fresh = now.saturating_duration_since(s.reported) <= ttl;
            if !fresh {
                gone.push(id.clone());
            }
            fresh
        });
        gone
    }
}

fn smooth(old: Figures, new: Figures) -> Figures {
    let mix = |o: f64, n: f64| o * (1.0 - SMOOTHING) + n * SMOOTHING;
    Figures {
        rps: mix(old.rps, new.rps),
        eps: mix(old.eps, new.eps),
        utilization: mix(old.utilization, new.utilization),
    }
}

/// True when a figure moved by more than [`MIN_CHANGE`] of the larger of
/// the two values, and by more than noise (half a request per second, a
/// hundredth of utilisation), so a figure near zero does not flap.
fn moved(old: &Figures, new: &Figures) -> bool {
    let far = |o: f64, n: f64, floor: f64| {
        let d = (o - n).abs();
        d > floor && d > MIN_CHANGE * o.abs().max(n.abs())
    };
    far(old.rps, new.rps, 0.5)
        || far(old.eps, new.eps, 0.5)
        || far(old.utilization, new.utilization, 0.01)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(rps: f64, utilization: f64) -> InstanceLoad {
        InstanceLoad {
            instance_id: "n1.web".into(),
            rps,
            application_utilization: Some(utilization),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn writes_only_moves_and_at_most_every_gap() {
        let mut w = Writer::default();
        let t0 = Instant::now();
        let first = w
            .offer(&load(100.0, 0.5), t0, 1_000)
            .expect("first is written");
        assert_eq!(
            (first.rps, first.utilization, first.usable_since_unix_ms),
            (100.0, 0.5, 1_000)
        );
        // Within the threshold: nothing to write, however long after.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(w.offer(&load(105.0, 0.52), t1, 11_000), None);
        // A big move, but too soon after the last write.
        tokio::time::advance(Duration::from_secs(11)).await;
        let t2 = t0 + Duration::from_secs(11);
        w.written_at(t2);
        assert_eq!(
            w.offer(&load(100.0, 1.5), t2 + Duration::from_secs(1), 12_000),
            None
        );
        // Past the gap: written, smoothed, and still usable since the start.
        let s = w
            .offer(&load(100.0, 1.5), t2 + MIN_WRITE_GAP, 14_000)
            .expect("moved and due");
        assert!(s.utilization > 0.55 && s.utilization < 1.5, "{s:?}");
        assert_eq!(s.usable_since_unix_ms, 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn turning_unusable_is_written_at_once_and_restarts_the_blackout() {
        let mut w = Writer::default();
        let t0 = Instant::now();
        w.offer(&load(100.0, 0.5), t0, 1_000).unwrap();
        let idle = w
            .offer(&load(0.0, 0.5), t0 + Duration::from_millis(500), 1_500)
            .expect("news");
        assert_eq!(idle.usable_since_unix_ms, 0);
        let back = w
            .offer(&load(50.0, 0.5), t0 + Duration::from_secs(1), 2_000)
            .expect("news");
        assert_eq!((back.rps, back.usable_since_unix_ms), (50.0, 2_000));
    }

    #[tokio::test(start_paused = true)]
    async fn figures_without_a_utilisation_are_written_once() {
        let mut w = Writer::default();
        let t0 = Instant::now();
        let none = InstanceLoad {
            instance_id: "n1.web".into(),
            rps: 100.0,
            ..Default::default()
        };
        let first = w.offer(&none, t0, 1_000).expect("first is written");
        assert_eq!(first.usable_since_unix_ms, 0);
        let busier = InstanceLoad { rps: 500.0, ..none };
        assert_eq!(w.offer(&busier, t0 + Duration::from_secs(10), 11_000), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_write_is_retried_and_silence_deletes() {
        let mut w = Writer::default();
        let t0 = Instant::now();
        w.offer(&load(100.0, 0.5), t0, 1_000).unwrap();
        w.unwritten("n1.web");
        assert!(
            w.offer(&load(100.0, 0.5), t0 + Duration::from_millis(500), 1_500)
                .is_some()
        );
        let ttl = Duration::from_secs(10);
        assert!(w.stale(t0 + ttl, ttl).is_empty());
        assert_eq!(w.stale(t0 + ttl + Duration::from_secs(1), ttl), ["n1.web"]);
        assert!(w.instances.is_empty());
    }

    impl Writer {
        /// Pretends every summary was last written at `at`.
        fn written_at(&mut self, at: Instant) {
            for s in self.instances.values_mut() {
                if let Some(w) = &mut s.written {
                    w.2 = at;
                }
            }
        }
    }
}
