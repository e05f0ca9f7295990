use isdp_proto::v1::{
    CircuitBreaker, FaultInjection, LoadBalancer, OutlierDetection, RetryPolicy, Route, RouteMatch,
    Subset, Timeouts, WeightedSubset,
};

use super::*;

fn split(parts: &[(&str, u32)]) -> Vec<WeightedSubset> {
    parts
        .iter()
        .map(|(s, w)| WeightedSubset {
            subset: s.to_string(),
            weight: *w,
        })
        .collect()
}

fn policy() -> TrafficPolicy {
    TrafficPolicy {
        service: "web".into(),
        timeouts: Some(Timeouts {
            request_ms: 5000,
            per_try_ms: 1000,
            ..Default::default()
        }),
        retries: Some(RetryPolicy {
            attempts: 3,
            retry_on: vec!["5xx".into()],
            ..Default::default()
        }),
        subsets: ["v1", "v2"]
            .iter()
            .map(|v| Subset {
                name: v.to_string(),
                labels: [("version".to_string(), v.to_string())].into(),
            })
            .collect(),
        split: split(&[("v1", 90), ("v2", 10)]),
        routes: vec![
            Route {
                name: "canary".into(),
                r#match: Some(RouteMatch {
                    headers: [("x-canary".to_string(), "true".to_string())].into(),
                    ..Default::default()
                }),
                split: split(&[("v2", 100)]),
                ..Default::default()
            },
            Route {
                name: "admin-posts".into(),
                r#match: Some(RouteMatch {
                    path_prefix: "/admin".into(),
                    method: "POST".into(),
                    ..Default::default()
                }),
                timeouts: Some(Timeouts {
                    request_ms: 100,
                    ..Default::default()
                }),
                fault: Some(FaultInjection {
                    abort_percent: 100.0,
                    abort_status: 418,
                    ..Default::default()
                }),
                ..Default::default()
            },
        ],
        load_balancer: Some(LoadBalancer {
            algorithm: "ring_hash".into(),
            hash_key: "header:x-user".into(),
        }),
        circuit_breaker: Some(CircuitBreaker {
            max_requests: 7,
            ..Default::default()
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: 3,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder().method(method).uri(path);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap()
}

#[test]
fn first_matching_route_wins_and_falls_back_to_top_level() {
    let c = Compiled::new(&policy(), "7");
    assert_eq!(c.version.as_deref(), Some("7"));
    let top = c.select(&req("GET", "/", &[]));
    assert_eq!(top.name, "default");
    assert_eq!(top.split, vec![(0, 90), (1, 100)]);
    assert_eq!(top.request_timeout, Some(Duration::from_secs(5)));
    assert_eq!(top.retry.attempts, 3);
    assert!(top.retry.on.server_error && !top.retry.on.gateway_error);

    let canary = c.select(&req("GET", "/admin", &[("x-canary", "true")]));
    assert_eq!(canary.name, "canary", "first match wins");
    assert_eq!(canary.split, vec![(1, 100)]);
    assert_eq!(
        canary.per_try_timeout,
        Some(Duration::from_secs(1)),
        "unset sections fall back"
    );
    assert_eq!(
        c.select(&req("GET", "/", &[("x-canary", "no")])).name,
        "default"
    );

    let admin = c.select(&req("POST", "/admin/users", &[]));
    assert_eq!(admin.name, "admin-posts");
    assert_eq!(admin.request_timeout, Some(Duration::from_millis(100)));
    assert_eq!(
        admin.per_try_timeout, None,
        "a route's own section replaces the whole section"
    );
    assert_eq!(
        admin.split, top.split,
        "no split of its own: the top-level one"
    );
    assert_eq!(admin.fault.unwrap().abort_status.as_u16(), 418);
    assert_eq!(c.select(&req("GET", "/admin", &[])).name, "default");
}

#[test]
fn sections_compile_with_defaults_for_what_is_unset() {
    let c = Compiled::new(&policy(), "1");
    let (alg, key) = c.lb.clone().unwrap();
    assert_eq!(alg, Algorithm::RingHash);
    assert!(key.is_some());
    assert_eq!(c.breaker.max_requests, 7);
    assert_eq!(c.breaker.max_pending, DEFAULT_BREAKER_LIMIT);
    assert_eq!(c.outlier.consecutive_5xx, 3);
    assert_eq!(c.outlier.consecutive_gateway_errors, 0);
    assert_eq!(c.outlier.base_ejection, Duration::from_secs(30));
    let retry = &c.select(&req("GET", "/", &[])).retry;
    assert_eq!(retry.backoff_base, DEFAULT_BACKOFF_BASE);
    assert_eq!(retry.budget_ratio, DEFAULT_BUDGET_RATIO);
    assert_eq!(retry.methods.len(), 6);
    assert_eq!(retry.buffer_bytes, DEFAULT_BUFFER_BYTES);
}

#[test]
fn defaults_are_what_mesh_users_expect() {
    let d = Compiled::defaults();
    assert_eq!(d.version, None);
    let r = d.select(&req("GET", "/", &[]));
    assert_eq!(r.retry.attempts, 2);
    assert!(r.retry.on.connect_failure && r.retry.on.reset && r.retry.on.gateway_error);
    assert!(!r.retry.on.server_error);
    assert_eq!(r.request_timeout, None);
    assert!(r.split.is_empty() && r.fault.is_none());
    assert_eq!(d.outlier, OutlierConfig::default());
    assert_eq!(d.outlier.consecutive_gateway_errors, 5);
    assert_eq!(d.breaker.max_requests, 1024);
}

#[test]
fn locality_replaces_the_files_settings_only_when_set() {
    assert_eq!(Compiled::defaults().locality, None);
    let p = TrafficPolicy {
        locality: Some(pb::Locality {
            enabled: true,
            failover: vec!["zone-b".into()],
            overprovisioning_percent: 0,
        }),
        ..Default::default()
    };
    let l = Compiled::new(&p, "1").locality.unwrap();
    assert!(l.enabled);
    assert_eq!(l.failover, ["zone-b"]);
    assert_eq!(l.overprovisioning, 140, "0: the default");
    let p = TrafficPolicy {
        locality: Some(pb::Locality {
            overprovisioning_percent: 5000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let l = Compiled::new(&p, "1").locality.unwrap();
    assert!(!l.enabled);
    assert_eq!(l.overprovisioning, 1000, "clamped whatever is sent");
}
