//! Endpoint weights from load reports, after gRPC's weighted round robin
//! (gRFC A58): `qps / (utilisation + error_penalty × eps / qps)`.
//!
//! Per endpoint: the utilisation is the application's own (ORCA) when it
//! reports one, else its host's CPU. A weight is used only once the
//! endpoint has reported usable figures for the `blackout` period (a new
//! endpoint's first figures are noisy: it is warming up), and forgotten
//! when no report came for `expiry`. Each new weight is smoothed with the
//! previous one, and every weight is clamped within `max_ratio` of the
//! median, so one report can neither starve nor flood an endpoint.
//! Endpoints without a weight get the mean. Weights are then scaled so
//! the mean is [`SCALE`] and pushed as integers; [`moved`] says whether a
//! new set differs enough from the last pushed one to be worth a push.
//!
//! Time is passed in (`now`), so every rule is tested without waiting.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// What the mean weight is scaled to.
pub const SCALE: f64 = 100.0;

/// The knobs, with gRPC's defaults where gRPC has one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightConfig {
    pub blackout: Duration,
    pub expiry: Duration,
    pub error_penalty: f64,
    /// The weight of the newest figure in the smoothed weight, 0..=1.
    pub smoothing: f64,
    /// Every weight within `median / max_ratio ..= median × max_ratio`.
    pub max_ratio: f64,
    /// A push is worth it when a weight moved by more than this share.
    pub min_change: f64,
}

impl Default for WeightConfig {
    fn default() -> Self {
        WeightConfig {
            blackout: Duration::from_secs(10),
            expiry: Duration::from_secs(180),
            error_penalty: 1.0,
            smoothing: 0.5,
            max_ratio: 10.0,
            min_change: 0.1,
        }
    }
}

/// One report's figures for one endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Figures {
    pub qps: f64,
    pub eps: f64,
    pub utilization: f64,
}

#[derive(Clone, Copy, Debug)]
struct State {
    weight: f64,
    /// When the endpoint started reporting usable figures.
    usable_since: Instant,
    updated: Instant,
}

/// Weights of the endpoints that reported; one per control-plane replica.
#[derive(Debug, Default)]
pub struct Weights {
    cfg: WeightConfig,
    endpoints: HashMap<String, State>,
}

// === impl Weights ===

impl Weights {
    pub fn new(cfg: WeightConfig) -> Self {
        Weights {
            cfg,
            endpoints: HashMap::new(),
        }
    }

    /// Folds in endpoint `id`'s report at `now`.
    pub fn report(&mut self, id: &str, f: Figures, now: Instant) {
        let raw = raw_weight(f, self.cfg.error_penalty);
        let expired = |s: &State| now.saturating_duration_since(s.updated) > self.cfg.expiry;
        match (raw, self.endpoints.get_mut(id)) {
            (None, _) => {
                // Nothing usable: the blackout starts again with the next.
                self.endpoints.remove(id);
            }
            (Some(w), Some(s)) if !expired(s) => {
                s.weight = s.weight * (1.0 - self.cfg.smoothing) + w * self.cfg.smoothing;
                s.updated = now;
            }
            (Some(w), _) => {
                let state = State {
                    weight: w,
                    usable_since: now,
                    updated: now,
                };
                self.endpoints.insert(id.to_owned(), state);
            }
        }
    }

    /// The weights of `ids` at `now`, scaled so their mean is [`SCALE`]:
    /// the mean for endpoints without a usable weight (none reported, in
    /// blackout, expired), every one first clamped within `max_ratio` of
    /// the median.
    pub fn weights(&self, ids: &[&str], now: Instant) -> Vec<u32> {
        let known: Vec<Option<f64>> = ids
            .iter()
            .map(|id| {
                let s = self.endpoints.get(*id)?;
                let fresh = now.saturating_duration_since(s.updated) <= self.cfg.expiry;
                let warm = now.saturating_duration_since(s.usable_since) >= self.cfg.blackout;
                (fresh && warm).then_some(s.weight)
            })
            .collect();
        let mut usable: Vec<f64> = known.iter().flatten().copied().collect();
        if usable.is_empty() {
            return vec![SCALE as u32; ids.len()];
        }
        // Clamped around the median, which one extreme endpoint cannot move.
        usable.sort_by(f64::total_cmp);
        let median = usable[(usable.len() - 1) / 2];
        let (lo, hi) = (median / self.cfg.max_ratio, median * self.cfg.max_ratio);
        let clamped: Vec<Option<f64>> = known.iter().map(|w| w.map(|w| w.clamp(lo, hi))).collect();
        let usable = clamped.iter().flatten();
        let mean = usable.clone().sum::<f64>() / usable.count() as f64;
        clamped
            .iter()
            .map(|w| ((w.unwrap_or(mean) / mean * SCALE).round() as u32).max(1))
            .collect()
    }

    /// Drops endpoints not reported for longer than the expiry.
    pub fn prune(&mut self, now: Instant) {
        let expiry = self.cfg.expiry;
        self.endpoints
            .retain(|_, s| now.saturating_duration_since(s.updated) <= expiry);
    }
}

/// gRPC's formula; None when it gives nothing usable (no traffic or no
/// utilisation reported).
fn raw_weight(f: Figures, error_penalty: f64) -> Option<f64> {
    if !(f.qps > 0.0 && f.utilization > 0.0) {
        return None;
    }
    let penalty = error_penalty * f.eps / f.qps;
    Some(f.qps / (f.utilization + penalty))
}

/// True when a weight of `new` differs from `old`'s by more than
/// `min_change` of the old one, or the sets differ in length.
pub fn moved(old: &[u32], new: &[u32], min_change: f64) -> bool {
    old.len() != new.len()
        || old.iter().zip(new).any(|(&o, &n)| {
            let o = f64::from(o.max(1));
            (f64::from(n) - o).abs() / o > min_change
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(qps: f64, utilization: f64) -> Figures {
        Figures {
            qps,
            eps: 0.0,
            utilization,
        }
    }

    fn cfg() -> WeightConfig {
        WeightConfig {
            smoothing: 1.0,
            ..WeightConfig::default()
        }
    }

    #[test]
    fn busier_endpoints_weigh_less_after_the_blackout() {
        let t0 = Instant::now();
        let mut w = Weights::new(cfg());
        w.report("a", figures(100.0, 0.25), t0);
        w.report("b", figures(100.0, 0.75), t0);
        assert_eq!(w.weights(&["a", "b"], t0), [100, 100], "in blackout");
        let later = t0 + Duration::from_secs(10);
        // 400 vs 133: a gets three times b's weight.
        assert_eq!(w.weights(&["a", "b"], later), [150, 50]);
        assert_eq!(w.weights(&["a", "b", "new"], later), [150, 50, 100]);
    }

    #[test]
    fn errors_cost_weight() {
        let raw = |eps| {
            raw_weight(
                Figures {
                    qps: 100.0,
                    eps,
                    utilization: 0.5,
                },
                1.0,
            )
            .unwrap()
        };
        assert_eq!(raw(0.0), 200.0);
        // Half the requests failing adds 0.5 to the utilisation.
        assert_eq!(raw(50.0), 100.0);
        assert_eq!(raw_weight(figures(0.0, 0.5), 1.0), None, "no traffic");
        assert_eq!(raw_weight(figures(10.0, 0.0), 1.0), None, "no utilisation");
    }

    #[test]
    fn weights_are_smoothed_clamped_and_expire() {
        let t0 = Instant::now();
        let mut w = Weights::new(WeightConfig::default());
        w.report("a", figures(100.0, 0.5), t0);
        w.report("b", figures(100.0, 0.5), t0);
        let t1 = t0 + Duration::from_secs(10);
        // b's utilisation jumps fourfold: smoothed, its weight only halves
        // halfway: (200 + 50) / 2 = 125 against 200.
        w.report("b", figures(100.0, 2.0), t1);
        assert_eq!(w.weights(&["a", "b"], t1), [123, 77]);
        // A near-idle endpoint cannot take everything.
        w.report("c", figures(100.0, 0.0001), t0);
        let ws = w.weights(&["a", "b", "c"], t1);
        assert!(ws[2] <= ws[0] * 10 + 1 && ws[2] > ws[0], "{ws:?}");
        // No report for longer than the expiry: back to the mean.
        let t2 = t1 + Duration::from_secs(181);
        assert_eq!(w.weights(&["a", "b"], t2), [100, 100]);
        w.prune(t2);
        assert!(w.endpoints.is_empty());
    }

    #[test]
    fn an_unusable_report_restarts_the_blackout() {
        let t0 = Instant::now();
        let mut w = Weights::new(cfg());
        w.report("a", figures(100.0, 0.25), t0);
        w.report("b", figures(100.0, 0.75), t0);
        w.report("a", figures(0.0, 0.25), t0 + Duration::from_secs(5));
        w.report("a", figures(100.0, 0.25), t0 + Duration::from_secs(6));
        let at = t0 + Duration::from_secs(12);
        assert_eq!(
            w.weights(&["a", "b"], at),
            [100, 100],
            "a in blackout again"
        );
    }

    #[test]
    fn only_a_real_move_is_worth_a_push() {
        assert!(!moved(&[100, 100], &[109, 91], 0.1));
        assert!(moved(&[100, 100], &[112, 88], 0.1));
        assert!(moved(&[100], &[100, 100], 0.1));
    }
}
