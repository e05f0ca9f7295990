use std::collections::BTreeMap;
use std::time::Duration;

use isdp_proto::v1::{LoadBalancer, OutlierDetection, Subset, TrafficPolicy, WeightedSubset};

use super::*;
use crate::balance::{Outcome, OutlierConfig, locality::LocalityConfig, outlier};
use crate::xds::{Endpoint, UpstreamState, security::Versioned};

fn endpoint(n: u16, version: &str) -> Endpoint {
    Endpoint {
        id: format!("pay-{n}"),
        address: "127.0.0.1".into(),
        port: 9000 + n,
        inbound_port: 0,
        weight: 1,
        operator_weight: 1,
        weight_reason: String::new(),
        metadata: [("version".to_string(), version.to_string())].into(),
        health: Health::Healthy,
        zone: String::new(),
        priority: 0,
    }
}

fn snapshot(endpoint_version: &str, policy: Option<(&str, TrafficPolicy)>) -> Arc<Snapshot> {
    let mut snap = Snapshot::default();
    snap.upstreams.insert(
        "payments".into(),
        UpstreamState {
            exists: true,
            version: endpoint_version.into(),
            endpoints: vec![endpoint(0, "v1"), endpoint(1, "v1"), endpoint(2, "v2")],
        },
    );
    if let Some((version, value)) = policy {
        snap.traffic_policies.insert(
            "payments".into(),
            Versioned {
                version: version.into(),
                value,
            },
        );
    }
    Arc::new(snap)
}

fn canary_policy() -> TrafficPolicy {
    TrafficPolicy {
        service: "payments".into(),
        subsets: vec![Subset {
            name: "v2".into(),
            labels: [("version".to_string(), "v2".to_string())].into(),
        }],
        split: vec![WeightedSubset {
            subset: "v2".into(),
            weight: 100,
        }],
        load_balancer: Some(LoadBalancer {
            algorithm: "random".into(),
            hash_key: String::new(),
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_gateway_errors: 1,
            base_ejection_ms: 1000,
            max_ejection_percent: 50,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The upstreams, and the senders that keep their task running.
fn upstreams(
    first: Arc<Snapshot>,
) -> (Upstreams, watch::Sender<Arc<Snapshot>>, watch::Sender<bool>) {
    upstreams_cfg(first, None, Algorithm::RoundRobin)
}

fn upstreams_in(
    first: Arc<Snapshot>,
    zone: Option<&str>,
) -> (Upstreams, watch::Sender<Arc<Snapshot>>, watch::Sender<bool>) {
    upstreams_cfg(first, zone, Algorithm::RoundRobin)
}

fn upstreams_with(
    first: Arc<Snapshot>,
    lb: Algorithm,
) -> (Upstreams, watch::Sender<Arc<Snapshot>>, watch::Sender<bool>) {
    upstreams_cfg(first, None, lb)
}

fn upstreams_cfg(
    first: Arc<Snapshot>,
    zone: Option<&str>,
    lb: Algorithm,
) -> (Upstreams, watch::Sender<Arc<Snapshot>>, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(first);
    let (stop_tx, stop) = watch::channel(false);
    let cfg = Upstream {
        name: "payments".into(),
        listen: None,
        protocol: Protocol::Http,
        lb,
        hash_key: None,
        locality: LocalityConfig::default(),
        caller_zone: zone.map(str::to_owned),
    };
    (
        Upstreams::spawn(&[cfg], &Metrics::new(), rx, stop),
        tx,
        stop_tx,
    )
}

fn pick_ids(
    lb: &UpstreamLb,
    subset: Option<usize>,
    avoid: &[Arc<LbEndpoint>],
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..60 {
        let (t, _g) = lb.pick_in(&HeaderMap::new(), None, subset, avoid).unwrap();
        *seen.entry(t.id.clone()).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn a_policy_compiles_subsets_and_overrides_the_balancer() {
    let (ups, tx, _stop) = upstreams(snapshot("e1", None));
    let lb = ups.get("payments").unwrap();
    assert_eq!(lb.policy.version, None, "no policy: defaults");
    assert_eq!(lb.algorithm(), Algorithm::RoundRobin);

    tx.send_replace(snapshot("e1", Some(("p1", canary_policy()))));
    tokio::time::timeout(Duration::from_secs(2), async {
        while ups.get("payments").unwrap().policy.version.is_none() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let lb2 = ups.get("payments").unwrap();
    assert_eq!(lb2.policy.version.as_deref(), Some("p1"));
    assert_eq!(lb2.algorithm(), Algorithm::Random);
    let v2 = pick_ids(&lb2, Some(0), &[]);
    assert_eq!(v2.keys().collect::<Vec<_>>(), ["pay-2"], "{v2:?}");
    // The old state is untouched for requests that hold it.
    assert_eq!(lb.algorithm(), Algorithm::RoundRobin);
    // Load and outlier state are the same objects across the rebuild.
    assert!(Arc::ptr_eq(
        &lb.endpoints[0].outlier,
        &lb2.endpoints[0].outlier
    ));
    assert!(Arc::ptr_eq(&lb.breaker, &lb2.breaker));
}

#[tokio::test(start_paused = true)]
async fn ejected_and_avoided_endpoints_are_skipped() {
    let (ups, _tx, _stop) = upstreams(snapshot("e1", Some(("p1", canary_policy()))));
    let lb = ups.get("payments").unwrap();
    let cfg = lb.policy.outlier;
    let victim = lb.endpoints.iter().find(|t| t.id == "pay-0").unwrap();
    assert!(victim.outlier.record(Outcome::GatewayError, &cfg));
    let all: Vec<&Outlier> = lb.endpoints.iter().map(|t| &*t.outlier).collect();
    assert!(
        outlier::eject(
            &all,
            &victim.outlier,
            outlier::Cause::Errors,
            &cfg,
            tokio::time::Instant::now()
        )
        .is_some()
    );
    assert_eq!(lb.ejected_now(), 1);
    assert_eq!(
        lb.ejection("pay-0"),
        Some((true, 1, Some(outlier::Cause::Errors)))
    );
    let seen = pick_ids(&lb, None, &[]);
    assert!(!seen.contains_key("pay-0"), "{seen:?}");

    let avoid = [lb
        .endpoints
        .iter()
        .find(|t| t.id == "pay-1")
        .unwrap()
        .clone()];
    let seen = pick_ids(&lb, None, &avoid);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["pay-2"], "{seen:?}");

    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(lb.ejected_now(), 0);
    let seen = pick_ids(&lb, None, &[]);
    assert!(seen.contains_key("pay-0"), "back after its time: {seen:?}");
}

/// Endpoints 0-3 in zone a, 4-5 in zone b; `down` are unhealthy.
fn zoned_snapshot(version: &str, down: &[u16]) -> Arc<Snapshot> {
    let mut snap = Snapshot::default();
    let endpoints = (0..6)
        .map(|n| Endpoint {
            zone: if n < 4 { "a" } else { "b" }.into(),
            health: if down.contains(&n) {
                Health::Unhealthy
            } else {
                Health::Healthy
            },
            ..endpoint(n, "v1")
        })
        .collect();
    snap.upstreams.insert(
        "payments".into(),
        UpstreamState {
            exists: true,
            version: version.into(),
            endpoints,
        },
    );
    Arc::new(snap)
}

/// `payments` at `version` with weights `weights` (pay-0, pay-1, pay-2).
fn weighted(version: &str, weights: [u32; 3]) -> Arc<Snapshot> {
    let mut snap = Snapshot::default();
    let endpoints = weights
        .iter()
        .enumerate()
        .map(|(n, w)| Endpoint {
            weight: *w,
            ..endpoint(n as u16, "v1")
        })
        .collect();
    snap.upstreams.insert(
        "payments".into(),
        UpstreamState {
            exists: true,
            version: version.into(),
            endpoints,
        },
    );
    Arc::new(snap)
}

fn zone_counts(lb: &UpstreamLb) -> (usize, usize) {
    let mut counts = (0, 0);
    for _ in 0..2000 {
        let (t, _g) = lb.pick(&HeaderMap::new(), None).unwrap();
        if t.zone == "a" {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    counts
}

#[tokio::test]
async fn calls_stay_in_the_callers_zone_until_it_degrades() {
    let (ups, _tx, _stop) = upstreams_in(zoned_snapshot("e1", &[]), Some("a"));
    let lb = ups.get("payments").unwrap();
    assert_eq!(zone_counts(&lb), (2000, 0));
    let levels = lb.levels();
    assert_eq!(levels.len(), 2);
    assert_eq!(
        (levels[0].zone.as_str(), levels[0].share_percent),
        ("a", 100.0)
    );
    assert_eq!(lb.level_of("pay-5"), Some(1));

    // Three of a's four down: 25 % × 1.4 = 35 % stays.
    let (ups, _tx, _stop) = upstreams_in(zoned_snapshot("e2", &[0, 1, 2]), Some("a"));
    let lb = ups.get("payments").unwrap();
    let (a, b) = zone_counts(&lb);
    assert!((600..800).contains(&a), "{a} in a, {b} in b");
    assert_eq!(lb.levels()[1].share_percent, 65.0);

    // A caller without a zone spreads evenly, as before.
    let (ups, _tx, _stop) = upstreams_in(zoned_snapshot("e1", &[]), None);
    let lb = ups.get("payments").unwrap();
    assert!(lb.levels().is_empty());
    let (a, b) = zone_counts(&lb);
    assert!((1200..1500).contains(&a), "{a} in a, {b} in b");
}

#[tokio::test(start_paused = true)]
async fn ejections_move_traffic_out_of_the_zone() {
    let (ups, _tx, _stop) = upstreams_in(zoned_snapshot("e1", &[]), Some("a"));
    let lb = ups.get("payments").unwrap();
    let cfg = OutlierConfig {
        max_ejection_percent: 100,
        ..lb.policy.outlier
    };
    let all: Vec<&Outlier> = lb.endpoints.iter().map(|t| &*t.outlier).collect();
    for t in lb.endpoints.iter().filter(|t| t.zone == "a") {
        assert!(
            outlier::eject(
                &all,
                &t.outlier,
                outlier::Cause::Errors,
                &cfg,
                tokio::time::Instant::now()
            )
            .is_some()
        );
    }
    lb.refresh_locality();
    assert_eq!(lb.levels()[0].share_percent, 0.0);
    assert_eq!(zone_counts(&lb), (0, 2000));
}

/// Endpoints 0-2 at priority 0, 3-4 at priority 1 (no zones); `down` are
/// unhealthy.
fn ranked_snapshot(version: &str, down: &[u16]) -> Arc<Snapshot> {
    let mut snap = Snapshot::default();
    let endpoints = (0..5)
        .map(|n| Endpoint {
            priority: u32::from(n >= 3),
            health: if down.contains(&n) {
                Health::Unhealthy
            } else {
                Health::Healthy
            },
            ..endpoint(n, "v1")
        })
        .collect();
    snap.upstreams.insert(
        "payments".into(),
        UpstreamState {
            exists: true,
            version: version.into(),
            endpoints,
        },
    );
    Arc::new(snap)
}

/// Picks at priority 0 and at 1, of 2000.
fn priority_counts(lb: &UpstreamLb) -> [usize; 2] {
    let mut counts = [0; 2];
    for _ in 0..2000 {
        let (t, _g) = lb.pick(&HeaderMap::new(), None).unwrap();
        counts[t.priority as usize] += 1;
    }
    counts
}

#[tokio::test]
async fn priorities_fail_over_in_order_without_zones() {
    // With or without a zone of its own, the caller keeps to priority 0.
    for zone in [None, Some("a")] {
        let (ups, _tx, _stop) = upstreams_in(ranked_snapshot("e1", &[]), zone);
        let lb = ups.get("payments").unwrap();
        assert_eq!(priority_counts(&lb), [2000, 0], "{zone:?}");
        let levels = lb.levels();
        assert_eq!(
            levels
                .iter()
                .map(|l| (l.zone.as_str(), l.priority, l.share_percent))
                .collect::<Vec<_>>(),
            [("*", 0, 100.0), ("*", 1, 0.0)]
        );
        assert_eq!(lb.level_of("pay-4"), Some(1));
    }

    // Two of three down: 1/3 × 1.4 ≈ 47 % stays, the standby takes the rest.
    let (ups, _tx, _stop) = upstreams(ranked_snapshot("e2", &[0, 1]));
    let lb = ups.get("payments").unwrap();
    assert!(!lb.panic);
    let [p0, p1] = priority_counts(&lb);
    assert!((800..1060).contains(&p0), "{p0} at 0, {p1} at 1");
    assert_eq!(lb.levels()[1].share_percent, 53.33);
}

#[tokio::test]
async fn a_standby_that_carries_everything_keeps_the_upstream_out_of_panic() {
    // 2 of 5 healthy is under the panic threshold, but priority 1 is whole
    // and takes all: nothing goes back to the dead primary.
    let (ups, _tx, _stop) = upstreams(ranked_snapshot("e1", &[0, 1, 2]));
    let lb = ups.get("payments").unwrap();
    assert!(!lb.panic);
    assert_eq!(lb.endpoints.len(), 2, "only the healthy ones");
    assert_eq!(priority_counts(&lb), [0, 2000]);

    // The standby degraded too (1 of 5): the levels fall short, so panic,
    // without levels, over every endpoint.
    let (ups, _tx, _stop) = upstreams(ranked_snapshot("e2", &[0, 1, 2, 3]));
    let lb = ups.get("payments").unwrap();
    assert!(lb.panic);
    assert_eq!(lb.endpoints.len(), 5);
    assert!(lb.levels().is_empty());
    let [p0, p1] = priority_counts(&lb);
    assert!((1000..1400).contains(&p0), "{p0} at 0, {p1} at 1");

    // Without levels (one priority, no zones) panic is as it always was.
    let (ups, _tx, _stop) = upstreams(zoned_snapshot("e3", &[0, 1, 2, 3]));
    let lb = ups.get("payments").unwrap();
    assert!(lb.panic);
}

/// Picks per endpoint id over `n` picks of the whole upstream.
fn shares(lb: &UpstreamLb, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (t, _g) = lb.pick(&HeaderMap::new(), None).unwrap();
        *seen.entry(t.id.clone()).or_default() += 1;
    }
    seen
}

/// A new weight pushed for endpoints that stay takes effect: the load
/// state is kept (same object) with the new weight, and the balancers
/// that precompute from weights follow it.
#[tokio::test]
async fn a_pushed_weight_change_on_existing_endpoints_takes_effect() {
    for algorithm in [Algorithm::WeightedRoundRobin, Algorithm::Random] {
        let (ups, tx, _stop) = upstreams_with(weighted("e1", [100, 100, 100]), algorithm);
        let before = ups.get("payments").unwrap();
        let even = shares(&before, 3000);
        assert!(even["pay-0"] > 800, "{algorithm:?} even: {even:?}");

        tx.send_replace(weighted("e2", [800, 100, 100]));
        tokio::time::timeout(Duration::from_secs(2), async {
            while ups.get("payments").unwrap().version != "e2" {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let after = ups.get("payments").unwrap();
        assert!(Arc::ptr_eq(
            &before.endpoints[0].load,
            &after.endpoints[0].load
        ));
        assert_eq!(after.load("pay-0").unwrap().weight(), 800);
        assert_eq!(after.load("pay-1").unwrap().weight(), 100);
        let skewed = shares(&after, 3000);
        // 80 % of 3000, give or take.
        assert!(
            (2200..=2600).contains(&skewed["pay-0"]),
            "{algorithm:?} skewed: {skewed:?}"
        );
    }
}
