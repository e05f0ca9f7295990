use std::collections::BTreeMap;
use std::time::Duration;

use isdp_proto::v1::{LoadBalancer, OutlierDetection, Subset, TrafficPolicy, WeightedSubset};

use super::*;
use crate::balance::{Outcome, outlier};
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
    upstreams_with(first, Algorithm::RoundRobin)
}

fn upstreams_with(
    first: Arc<Snapshot>,
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
    assert!(outlier::eject(&all, &victim.outlier, &cfg, tokio::time::Instant::now()).is_some());
    assert_eq!(lb.ejected_now(), 1);
    assert_eq!(lb.ejection("pay-0"), Some((true, 1)));
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
