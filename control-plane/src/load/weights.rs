//! Endpoint weights from load summaries, after gRPC's weighted round robin
//! (gRFC A58): `qps / (utilisation + error_penalty × eps / qps)`.
//!
//! A pure function of the summaries every replica reads from the store
//! (`view.rs`) and the clock, so replicas that see the same summaries
//! push the same weights. Per service: each endpoint whose figures are
//! usable (traffic and a utilisation) and have been for the `blackout`
//! (a new endpoint's first figures are noisy: it is warming up) gets
//! `raw / median(raw)` as its load factor (the median over the endpoints
//! checked healthy, when any are: see [`Endpoint::checked`]), clamped within
//! `min_factor..=max_factor` so no report can starve or flood an
//! endpoint; every other endpoint gets 1 (the median's). The weight pushed is
//! `operator weight × factor × `[`SCALE`], so an operator's weights and
//! the load compose.
//!
//! Smoothing and the push threshold happen where reports arrive
//! (`writer.rs`): a summary only changes when a figure moved enough.

use std::time::Duration;

use isdp_proto::v1::LoadSummary;

/// What a factor of 1 (the median endpoint's) is scaled to in the pushed
/// integer weight.
pub const SCALE: f64 = 100.0;
/// Longest `weight_reason`, in bytes: each endpoint of a resource carries
/// one, and the quota on a service's resource counts it at this size.
pub const MAX_REASON_BYTES: usize = 64;

/// The knobs (`--load-weight-*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightConfig {
    /// False: the operator's weights are pushed as they are.
    pub enabled: bool,
    pub blackout: Duration,
    pub error_penalty: f64,
    pub min_factor: f64,
    pub max_factor: f64,
}

impl Default for WeightConfig {
    fn default() -> Self {
        WeightConfig {
            enabled: true,
            blackout: Duration::from_secs(10),
            error_penalty: 1.0,
            min_factor: 0.1,
            max_factor: 10.0,
        }
    }
}

/// One endpoint's pushed weight and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Weighed {
    pub weight: u32,
    pub operator_weight: u32,
    pub factor: f64,
    pub reason: String,
    /// The summary's figures, 0 without one.
    pub rps: f64,
    pub utilization: f64,
}

/// An endpoint's latest summary, or why it has none that counts.
pub type Figures<'a> = Result<&'a LoadSummary, &'static str>;
/// Why: no summary (or an expired one).
pub const NO_REPORT: &str = "no report";
/// Why: the endpoint is unhealthy. It takes no traffic, so its figures
/// say nothing of its capacity, and counting them in the median would let
/// instances that serve nothing move their peers' weights.
pub const UNHEALTHY: &str = "unhealthy";

/// One endpoint of a service, as its weight is worked out.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    /// The operator's weight.
    pub operator: u32,
    pub figures: Figures<'a>,
    /// Its health check passes. While any endpoint of the service with
    /// usable figures is checked healthy, only those set the median: an
    /// instance nobody checks (registered without a check, or whose
    /// sidecar never reports health) can then move its own factor only,
    /// so a crowd of them cannot drag the checked ones' weights down. A
    /// service with no checks at all is weighed among all its endpoints.
    pub checked: bool,
}

/// The weights of one service's `endpoints`, in order; `now_unix_ms`
/// decides the blackout.
pub fn weigh(cfg: &WeightConfig, endpoints: &[Endpoint<'_>], now_unix_ms: i64) -> Vec<Weighed> {
    let blackout_ms = i64::try_from(cfg.blackout.as_millis()).unwrap_or(i64::MAX);
    let raw: Vec<Result<f64, &'static str>> = endpoints
        .iter()
        .map(|e| {
            let s = e.figures?;
            if s.usable_since_unix_ms == 0 {
                return Err("no usable figures");
            }
            if now_unix_ms.saturating_sub(s.usable_since_unix_ms) < blackout_ms {
                return Err("blackout");
            }
            raw_weight(s.rps, s.eps, s.utilization, cfg.error_penalty).ok_or("no usable figures")
        })
        .collect();
    let usable = |checked_only: bool| -> Vec<f64> {
        endpoints
            .iter()
            .zip(&raw)
            .filter(|(e, _)| e.checked || !checked_only)
            .filter_map(|(_, r)| r.as_ref().ok().copied())
            .collect()
    };
    let checked = usable(true);
    let reference = median(if checked.is_empty() {
        usable(false)
    } else {
        checked
    });
    endpoints
        .iter()
        .zip(&raw)
        .map(|(e, raw)| {
            let operator = e.operator.max(1);
            let (rps, utilization) = e.figures.map_or((0.0, 0.0), |s| (s.rps, s.utilization));
            let (factor, reason) = if !cfg.enabled {
                (1.0, "operator".to_owned())
            } else {
                match raw {
                    Err(why) => (1.0, (*why).to_owned()),
                    Ok(w) => {
                        // Raw weights and their median are normal and
                        // positive, so this is finite; 1 should it not be.
                        let f = Some(w / reference).filter(|f| f.is_finite()).unwrap_or(1.0);
                        let clamped = f.clamp(cfg.min_factor, cfg.max_factor);
                        let mut reason = format!("load: util {utilization:.2} rps {rps:.0}");
                        if clamped != f {
                            reason.push_str(" (clamped)");
                        }
                        (clamped, reason)
                    }
                }
            };
            let weight = if cfg.enabled {
                (f64::from(operator) * factor * SCALE)
                    .round()
                    .clamp(1.0, f64::from(u32::MAX)) as u32
            } else {
                operator
            };
            Weighed {
                weight,
                operator_weight: operator,
                factor,
                reason: cut(reason),
                rps,
                utilization,
            }
        })
        .collect()
}

/// The median of `v` (the mean of the middle two for an even count); 1
/// when empty (then nothing is divided by it). The reference each raw
/// weight is compared with: unlike the mean, one endpoint's extreme
/// figures cannot move it, so a report can raise or lower only its own
/// endpoint's factor (within the clamps), never push its peers' down.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 1.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Utilisations below this count as this: an idle endpoint's figure is
/// noise, and dividing by a vanishing one would give an infinite weight.
pub const MIN_UTILIZATION: f64 = 0.01;

/// Less traffic than this (one request in 100 s) is no traffic: a weight
/// from it is noise, and a vanishing rate would turn `eps / qps` infinite.
pub const MIN_RPS: f64 = 0.01;

/// gRPC's formula; None when it gives nothing usable: no traffic, no
/// utilisation reported, or a result that is not a normal positive
/// number (which would make a 0 or NaN factor for its peers).
pub fn raw_weight(qps: f64, eps: f64, utilization: f64, error_penalty: f64) -> Option<f64> {
    if !(qps >= MIN_RPS && utilization > 0.0) {
        return None;
    }
    let penalty = error_penalty * eps / qps;
    let w = qps / (utilization.max(MIN_UTILIZATION) + penalty);
    (w.is_normal() && w > 0.0).then_some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn summary(rps: f64, utilization: f64, since_ms_ago: i64) -> LoadSummary {
        LoadSummary {
            instance_id: String::new(),
            rps,
            eps: 0.0,
            utilization,
            usable_since_unix_ms: NOW - since_ms_ago,
        }
    }

    /// An endpoint whose health check passes.
    fn ep(operator: u32, figures: Figures<'_>) -> Endpoint<'_> {
        Endpoint {
            operator,
            figures,
            checked: true,
        }
    }

    fn weights(cfg: &WeightConfig, e: &[Endpoint<'_>]) -> Vec<u32> {
        weigh(cfg, e, NOW).iter().map(|w| w.weight).collect()
    }

    #[test]
    fn busier_endpoints_weigh_less_after_the_blackout() {
        let cfg = WeightConfig::default();
        let a = summary(100.0, 0.25, 10_000);
        let b = summary(100.0, 0.75, 10_000);
        // 400 vs 133: a gets three times b's weight; the median (of two,
        // their mean) is 1.
        assert_eq!(weights(&cfg, &[ep(1, Ok(&a)), ep(1, Ok(&b))]), [150, 50]);
        let ws = weigh(
            &cfg,
            &[ep(1, Ok(&a)), ep(1, Ok(&b)), ep(1, Err(NO_REPORT))],
            NOW,
        );
        assert_eq!(
            ws.iter().map(|w| w.weight).collect::<Vec<_>>(),
            [150, 50, 100]
        );
        assert_eq!(ws[0].reason, "load: util 0.25 rps 100");
        assert_eq!(ws[2].reason, "no report");
        // Still in its blackout: factor 1, and says so.
        let young = summary(100.0, 0.25, 9_999);
        let ws = weigh(&cfg, &[ep(1, Ok(&young)), ep(1, Ok(&b))], NOW);
        assert_eq!((ws[0].weight, ws[0].reason.as_str()), (100, "blackout"));
        let idle = LoadSummary {
            usable_since_unix_ms: 0,
            ..summary(0.0, 0.5, 0)
        };
        let ws = weigh(&cfg, &[ep(1, Ok(&idle))], NOW);
        assert_eq!(
            (ws[0].weight, ws[0].reason.as_str()),
            (100, "no usable figures")
        );
    }

    #[test]
    fn errors_cost_weight() {
        assert_eq!(raw_weight(100.0, 0.0, 0.5, 1.0), Some(200.0));
        // Half the requests failing adds 0.5 to the utilisation.
        assert_eq!(raw_weight(100.0, 50.0, 0.5, 1.0), Some(100.0));
        assert_eq!(raw_weight(100.0, 50.0, 0.5, 0.0), Some(200.0), "no penalty");
        assert_eq!(raw_weight(0.0, 0.0, 0.5, 1.0), None, "no traffic");
        assert_eq!(raw_weight(10.0, 0.0, 0.0, 1.0), None, "no utilisation");
        let cfg = WeightConfig::default();
        let ok = summary(100.0, 0.5, 20_000);
        let failing = LoadSummary {
            eps: 50.0,
            ..summary(100.0, 0.5, 20_000)
        };
        // 200 vs 100.
        assert_eq!(
            weights(&cfg, &[ep(1, Ok(&ok)), ep(1, Ok(&failing))]),
            [133, 67]
        );
    }

    #[test]
    fn factors_are_clamped() {
        let cfg = WeightConfig {
            min_factor: 0.5,
            max_factor: 1.5,
            ..WeightConfig::default()
        };
        let idle = summary(100.0, 0.01, 20_000);
        let busy = summary(100.0, 1.0, 20_000);
        let ws = weigh(
            &cfg,
            &[ep(1, Ok(&idle)), ep(1, Ok(&busy)), ep(1, Ok(&busy))],
            NOW,
        );
        // The idle one is clamped up; the busy ones are the median and
        // stay at 1: one endpoint's extreme figures move only its own.
        assert_eq!(
            ws.iter().map(|w| w.weight).collect::<Vec<_>>(),
            [150, 100, 100]
        );
        assert!(ws[0].reason.ends_with("(clamped)"), "{:?}", ws[0]);
    }

    #[test]
    fn a_vanishing_utilisation_neither_breaks_the_weights_nor_starves_the_peers() {
        let cfg = WeightConfig::default();
        let liar = summary(1e7, 1e-310, 20_000);
        let honest = summary(100.0, 0.5, 20_000);
        assert!(raw_weight(1e7, 0.0, 1e-310, 1.0).is_some_and(f64::is_finite));
        let ws = weigh(
            &cfg,
            &[ep(1, Ok(&liar)), ep(1, Ok(&honest)), ep(1, Ok(&honest))],
            NOW,
        );
        assert_eq!(
            ws.iter().map(|w| w.weight).collect::<Vec<_>>(),
            [1000, 100, 100]
        );
    }

    #[test]
    fn the_operator_weight_composes_with_the_load() {
        let cfg = WeightConfig::default();
        let s = summary(100.0, 0.5, 20_000);
        // Equal load: the operator's 1:3 stays, scaled.
        assert_eq!(weights(&cfg, &[ep(1, Ok(&s)), ep(3, Ok(&s))]), [100, 300]);
        let off = WeightConfig {
            enabled: false,
            ..cfg
        };
        let busy = summary(100.0, 5.0, 20_000);
        let ws = weigh(&off, &[ep(1, Ok(&s)), ep(3, Ok(&busy))], NOW);
        assert_eq!(ws.iter().map(|w| w.weight).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(ws[1].reason, "operator");
        assert_eq!(ws[1].factor, 1.0);
    }

    /// A rate so small that `eps / rps` overflows made a raw weight of 0,
    /// a median of 0 and NaN factors (published as weight 0): such figures
    /// are no traffic, and weigh nothing.
    #[test]
    fn vanishing_traffic_weighs_nothing_and_no_weight_is_0() {
        let cfg = WeightConfig::default();
        let mut dust = summary(1e-300, 1.0, 20_000);
        dust.eps = 1.0;
        assert_eq!(raw_weight(1e-300, 1.0, 1.0, 1.0), None);
        assert_eq!(raw_weight(f64::MIN_POSITIVE, 0.0, 1.0, 1.0), None);
        let honest = summary(100.0, 0.5, 20_000);
        let ws = weigh(
            &cfg,
            &[ep(1, Ok(&dust)), ep(1, Ok(&dust)), ep(1, Ok(&honest))],
            NOW,
        );
        for w in &ws {
            assert!(w.factor.is_finite() && w.weight >= 1, "{w:?}");
        }
        assert_eq!(ws[0].reason, "no usable figures");
        assert_eq!(ws[2].weight, 100, "the only usable one is its own median");
    }

    /// Unhealthy endpoints take no traffic: their figures count in nobody's
    /// reference. Sybils reporting huge raw weights while unhealthy no
    /// longer drag every healthy peer's factor to the minimum.
    #[test]
    fn unhealthy_endpoints_are_left_out_of_the_median() {
        let cfg = WeightConfig::default();
        let sybil = summary(1e6, 0.01, 20_000);
        let honest = summary(100.0, 0.5, 20_000);
        let mut e: Vec<Endpoint<'_>> = vec![ep(1, Err(UNHEALTHY)); 6];
        e.push(ep(1, Ok(&honest)));
        e.push(ep(1, Ok(&honest)));
        let ws = weigh(&cfg, &e, NOW);
        assert_eq!(
            ws.iter().map(|w| w.weight).collect::<Vec<_>>(),
            [100, 100, 100, 100, 100, 100, 100, 100]
        );
        assert_eq!(ws[0].reason, "unhealthy");
        // Were they counted, the honest ones would fall to the minimum.
        let counted: Vec<Endpoint<'_>> = (0..6)
            .map(|_| ep(1, Ok(&sybil)))
            .chain([ep(1, Ok(&honest)), ep(1, Ok(&honest))])
            .collect();
        assert_eq!(weigh(&cfg, &counted, NOW)[7].weight, 10);
    }

    /// Instances nobody checks (UNKNOWN) do not set the reference while
    /// checked ones have figures: a crowd of unchecked sybils reporting
    /// huge figures moves only their own factors. A service without
    /// checks is weighed among all its endpoints.
    #[test]
    fn unchecked_endpoints_do_not_set_the_median_while_checked_ones_do() {
        let cfg = WeightConfig::default();
        let sybil = summary(1e6, 0.01, 20_000);
        let honest = summary(100.0, 0.5, 20_000);
        let unchecked = |figures| Endpoint {
            checked: false,
            ..ep(1, figures)
        };
        let mut e: Vec<Endpoint<'_>> = vec![unchecked(Ok(&sybil)); 6];
        e.extend([ep(1, Ok(&honest)), ep(1, Ok(&honest))]);
        let ws = weights(&cfg, &e);
        assert_eq!(&ws[6..], [100, 100], "the checked keep their factor 1");
        assert_eq!(ws[0], 1000, "a sybil's own factor is clamped");
        // No checks anywhere: all of them set the median, as before.
        let none: Vec<Endpoint<'_>> = [Ok(&sybil), Ok(&honest), Ok(&honest)]
            .into_iter()
            .map(unchecked)
            .collect();
        assert_eq!(weights(&cfg, &none), [1000, 100, 100]);
    }
}
