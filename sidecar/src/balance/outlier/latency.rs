//! Latency outliers: a sweep per upstream, every `interval`, that ejects
//! an endpoint whose recent latency stays well above its peers'.
//!
//! An endpoint is slow at a sweep when its recent average latency (the
//! one-second average `load_aware` balances on) is above both
//! `latency_factor` times the median of the measured endpoints not
//! ejected and `latency_min` (so 2 ms among 0.5 ms peers is not an
//! outlier). Slow at `latency_intervals` sweeps in a row, it is ejected
//! with [`eject`](super::eject): for `base_ejection × n`, never past
//! `max_ejection_percent`. At least two measured endpoints are needed: a
//! lone endpoint has no peers to be slower than.
//!
//! An ejected endpoint's average is forgotten, so when it comes back it
//! is judged on what it answers then, not on the slowness that ejected
//! it; `load_aware` treats it as new (load alone) until it has answered.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{Cause, Outlier, OutlierConfig, eject};
use crate::balance::EndpointLoad;

/// Default of `latency_min`.
pub const DEFAULT_MIN: Duration = Duration::from_millis(5);
/// Default of `latency_intervals`.
pub const DEFAULT_INTERVALS: u32 = 2;
/// Default time between sweeps.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// One sweep over an upstream's endpoints; returns the indices ejected
/// now, with the ejection's length. Does nothing when `latency_factor` is 0.
pub fn sweep(
    endpoints: &[(&EndpointLoad, &Outlier)],
    cfg: &OutlierConfig,
    now: Instant,
) -> Vec<(usize, Duration)> {
    if cfg.latency_factor <= 0.0 {
        return Vec::new();
    }
    let mut measured: Vec<f64> = endpoints
        .iter()
        .filter(|(_, o)| !o.is_ejected_at(now))
        .filter_map(|(l, _)| l.recent().average_ns())
        .collect();
    if measured.len() < 2 {
        return Vec::new();
    }
    measured.sort_by(f64::total_cmp);
    // The lower median: with two endpoints, the faster one is the peer.
    let median = measured[(measured.len() - 1) / 2];
    let limit = (median * cfg.latency_factor).max(cfg.latency_min.as_nanos() as f64);
    let all: Vec<&Outlier> = endpoints.iter().map(|(_, o)| *o).collect();
    let mut ejected = Vec::new();
    for (i, (load, outlier)) in endpoints.iter().enumerate() {
        let slow =
            !outlier.is_ejected_at(now) && load.recent().average_ns().is_some_and(|ns| ns > limit);
        if !slow {
            outlier.slow_sweeps.store(0, Ordering::Relaxed);
            continue;
        }
        let n = outlier.slow_sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        if n < cfg.latency_intervals.max(1) {
            continue;
        }
        if let Some(length) = eject(&all, outlier, Cause::Latency, cfg, now) {
            outlier.slow_sweeps.store(0, Ordering::Relaxed);
            load.recent().forget();
            ejected.push((i, length));
        }
    }
    ejected
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            latency_factor: 3.0,
            latency_intervals: 2,
            base_ejection: Duration::from_secs(10),
            ..OutlierConfig::default()
        }
    }

    fn upstream(ms: &[u64]) -> Vec<(Arc<EndpointLoad>, Arc<Outlier>)> {
        ms.iter()
            .enumerate()
            .map(|(i, &ms)| {
                let load = EndpointLoad::new(format!("e{i}"), 1);
                if ms > 0 {
                    load.record_latency(Duration::from_millis(ms));
                }
                (load, Outlier::new())
            })
            .collect()
    }

    fn run(eps: &[(Arc<EndpointLoad>, Arc<Outlier>)], cfg: &OutlierConfig) -> Vec<usize> {
        let refs: Vec<(&EndpointLoad, &Outlier)> = eps.iter().map(|(l, o)| (&**l, &**o)).collect();
        sweep(&refs, cfg, Instant::now())
            .into_iter()
            .map(|(i, _)| i)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn slow_for_two_sweeps_is_ejected_then_judged_afresh() {
        let eps = upstream(&[50, 10, 11]);
        assert!(run(&eps, &cfg()).is_empty(), "once is not enough");
        assert_eq!(run(&eps, &cfg()), [0]);
        assert!(eps[0].1.is_ejected());
        assert_eq!(eps[0].1.last_cause(), Some(Cause::Latency));
        assert_eq!(eps[0].0.recent_latency(), None, "its average is forgotten");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!eps[0].1.is_ejected());
        // Back and fast: never slow again.
        eps[0].0.record_latency(Duration::from_millis(12));
        assert!(run(&eps, &cfg()).is_empty());
        assert!(run(&eps, &cfg()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_sweep_resets_the_count() {
        let eps = upstream(&[50, 10, 10]);
        assert!(run(&eps, &cfg()).is_empty());
        tokio::time::advance(Duration::from_secs(5)).await;
        eps[0].0.record_latency(Duration::from_millis(10));
        assert!(run(&eps, &cfg()).is_empty(), "fast again: count reset");
        tokio::time::advance(Duration::from_secs(5)).await;
        eps[0].0.record_latency(Duration::from_millis(50));
        assert!(run(&eps, &cfg()).is_empty(), "slow once more: 1 of 2");
    }

    #[test]
    fn off_floors_and_peers() {
        let eps = upstream(&[50, 10, 10]);
        let off = OutlierConfig {
            latency_factor: 0.0,
            ..cfg()
        };
        for _ in 0..3 {
            assert!(run(&eps, &off).is_empty(), "factor 0 is off");
        }
        let fast = upstream(&[4, 1, 1]);
        for _ in 0..3 {
            assert!(run(&fast, &cfg()).is_empty(), "under latency_min");
        }
        let lone = upstream(&[50, 0, 0]);
        for _ in 0..3 {
            assert!(run(&lone, &cfg()).is_empty(), "no measured peer");
        }
    }

    #[test]
    fn never_past_the_max_ejection_percent() {
        let eps = upstream(&[50, 60, 10, 10]);
        let one = OutlierConfig {
            max_ejection_percent: 25,
            ..cfg()
        };
        run(&eps, &one);
        assert_eq!(run(&eps, &one).len(), 1, "one of four is 25 %");
        assert_eq!(eps.iter().filter(|(_, o)| o.is_ejected()).count(), 1);
    }
}
