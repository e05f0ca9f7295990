use std::collections::BTreeMap;

use serde_json::json;

use super::*;

fn anyone(_: &str, _: &BTreeMap<String, String>) -> bool {
    true
}

fn fields(doc: Value) -> Vec<String> {
    match parse(&doc, &anyone) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(p) => p.0.into_iter().map(|e| e.field).collect(),
    }
}

#[test]
fn a_full_document_is_read() {
    let doc = json!({
        "service": "payments",
        "timeouts": {"request": "5s", "per_try": "1s", "connect": "500ms", "idle": "1m"},
        "retries": {
            "attempts": 2,
            "retry_on": ["connect-failure", "retriable-status-codes"],
            "status_codes": [503],
            "backoff": {"base": "25ms", "max": "250ms"},
            "budget": {"ratio": 0.2, "min_per_second": 10},
            "buffer": 65536
        },
        "circuit_breaker": {"max_connections": 100, "max_pending_requests": 10, "max_requests": 100},
        "outlier_detection": {"consecutive_5xx": 5, "interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 50},
        "load_balancer": {"algorithm": "ring_hash", "hash_key": "header:x-user"},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
        "split": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
        "routes": [{"name": "canary", "match": {"headers": {"x-canary": "true"}}, "split": [{"subset": "v2", "weight": 100}]}],
        "fault": {"delay": {"percent": 10, "duration": "100ms"}, "abort": {"percent": 1.5, "status": 503}}
    });
    let p = parse(&doc, &anyone).unwrap();
    assert_eq!(p.service, "payments");
    let t = p.timeouts.unwrap();
    assert_eq!(
        (t.request_ms, t.per_try_ms, t.connect_ms, t.idle_ms),
        (5000, 1000, 500, 60_000)
    );
    let r = p.retries.unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(r.status_codes, [503]);
    assert_eq!((r.backoff_base_ms, r.backoff_max_ms), (25, 250));
    assert_eq!(r.buffer_bytes, 65536);
    assert_eq!(p.split.len(), 2);
    assert_eq!(
        p.routes[0].r#match.as_ref().unwrap().headers["x-canary"],
        "true"
    );
    let f = p.fault.unwrap();
    assert_eq!((f.delay_ms, f.abort_status), (100, 503));
    assert_eq!(f.abort_percent, 1.5);
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let doc = json!({
        "service": "payments",
        "timeouts": {"request": "-1s", "per_try": 5},
        "retries": {"attempts": 11, "retry_on": ["sometimes"], "colour": "red"},
        "circuit_breaker": {"max_connections": "many"},
        "load_balancer": {"algorithm": "ring_hash"},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
        "split": [{"subset": "v1", "weight": 90}, {"subset": "v3", "weight": 5}],
        "extra": true
    });
    let mut got = fields(doc);
    got.sort();
    let mut want = [
        "timeouts.request",
        "timeouts.per_try",
        "retries.attempts",
        "retries.retry_on[0]",
        "retries.colour",
        "circuit_breaker.max_connections",
        "load_balancer.hash_key",
        "split[1].subset",
        "split",
        "extra",
    ];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn messages_name_the_limit() {
    let err = parse(
        &json!({"service": "payments", "retries": {"attempts": 11}}),
        &anyone,
    )
    .unwrap_err();
    assert_eq!(
        err.0[0].to_string(),
        "retries.attempts: must be an integer 0..10, got 11"
    );
    let err = parse(
        &json!({"service": "payments", "timeouts": {"idle": "-5s"}}),
        &anyone,
    )
    .unwrap_err();
    assert!(err.0[0].rule.contains("negative"), "{}", err.0[0]);
}

#[test]
fn a_split_to_a_subset_without_instances_is_refused() {
    let doc = json!({
        "service": "payments",
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v9", "labels": {"version": "v9"}}],
        "split": [{"subset": "v1", "weight": 100}, {"subset": "v9", "weight": 0}],
        "routes": [{"name": "canary", "match": {"method": "GET"}, "split": [{"subset": "v9", "weight": 100}]}]
    });
    let only_v1 = |_: &str, labels: &BTreeMap<String, String>| labels["version"] == "v1";
    let err = parse(&doc, &only_v1).unwrap_err();
    assert_eq!(err.0.len(), 1, "{:?}", err.0);
    assert_eq!(err.0[0].field, "subsets[1]");
    assert!(err.0[0].rule.contains("no instances"));
}

#[test]
fn the_document_must_be_a_mapping_with_a_service() {
    assert_eq!(fields(json!([1, 2])), ["document"]);
    assert_eq!(fields(json!({})), ["service"]);
    assert_eq!(fields(json!({"service": "Not A Label"})), ["service"]);
}

#[test]
fn latency_outlier_fields_are_read_and_bounded() {
    let doc = json!({"service": "payments", "outlier_detection": {
        "latency_factor": 3, "latency_min": "20ms", "latency_intervals": 4}});
    let o = parse(&doc, &anyone).unwrap().outlier_detection.unwrap();
    assert_eq!(
        (o.latency_factor, o.latency_min_ms, o.latency_intervals),
        (3.0, 20, 4)
    );
    let doc = json!({"service": "payments", "outlier_detection": {"latency_factor": 0}});
    let o = parse(&doc, &anyone).unwrap().outlier_detection.unwrap();
    assert_eq!(o.latency_factor, 0.0, "0 turns it off");
    for (field, value) in [
        ("latency_factor", json!(1.2)),
        ("latency_factor", json!(101)),
        ("latency_factor", json!("3")),
        ("latency_min", json!("0ms")),
        ("latency_intervals", json!(0)),
        ("latency_intervals", json!(101)),
    ] {
        let doc = json!({"service": "payments", "outlier_detection": {field: value}});
        let problems = match parse(&doc, &anyone) {
            Ok(p) => panic!("{field} = {value} accepted: {p:?}"),
            Err(p) => p.0,
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, format!("outlier_detection.{field}"));
        let rule = &problems[0].rule;
        let limit = match field {
            "latency_factor" => "..100",
            "latency_min" => "1ms",
            _ => "1..100",
        };
        assert!(rule.contains(limit), "{field}: {rule}");
    }
}

#[test]
fn adaptive_concurrency_is_read_and_bounded() {
    let doc = json!({"service": "payments", "adaptive_concurrency": {
        "min_limit": 5, "max_limit": 300, "buffer": 0.5, "window": "500ms",
        "min_rtt_interval": "2m", "min_rtt_requests": 20}});
    let a = parse(&doc, &anyone).unwrap().adaptive_concurrency.unwrap();
    assert_eq!(
        (a.min_limit, a.max_limit, a.buffer, a.window_ms),
        (5, 300, 0.5, 500)
    );
    assert_eq!((a.min_rtt_interval_ms, a.min_rtt_requests), (120_000, 20));
    let doc = json!({"service": "payments", "adaptive_concurrency": {}});
    let a = parse(&doc, &anyone).unwrap().adaptive_concurrency.unwrap();
    assert_eq!(
        a,
        AdaptiveConcurrency::default(),
        "an empty section: defaults"
    );
    for (value, field, limit) in [
        (json!({"min_limit": 0}), "min_limit", "1..1000000"),
        (json!({"max_limit": 2_000_000}), "max_limit", "1..1000000"),
        (json!({"buffer": 0}), "buffer", "0.01..10"),
        (json!({"buffer": "high"}), "buffer", ""),
        (json!({"window": "5ms"}), "window", "10ms"),
        (json!({"window": "2m"}), "window", "1m"),
        (
            json!({"min_rtt_interval": "100ms"}),
            "min_rtt_interval",
            "1s",
        ),
        (
            json!({"min_rtt_requests": 5000}),
            "min_rtt_requests",
            "1..1000",
        ),
        (
            json!({"min_limit": 50, "max_limit": 10}),
            "max_limit",
            "min_limit (50)",
        ),
        (json!({"limit": 10}), "limit", ""),
    ] {
        let doc = json!({"service": "payments", "adaptive_concurrency": value});
        let problems = match parse(&doc, &anyone) {
            Ok(p) => panic!("{value} accepted: {p:?}"),
            Err(p) => p.0,
        };
        assert_eq!(problems.len(), 1, "{value}: {problems:?}");
        assert_eq!(problems[0].field, format!("adaptive_concurrency.{field}"));
        assert!(
            problems[0].rule.contains(limit),
            "{value}: {}",
            problems[0].rule
        );
    }
}

#[test]
fn locality_is_read_and_checked() {
    let doc = json!({"service": "payments", "locality": {
        "failover": ["zone-b", "zone-c"], "overprovisioning_percent": 200
    }});
    let l = parse(&doc, &anyone).unwrap().locality.unwrap();
    assert!(l.enabled, "writing the section turns it on");
    assert_eq!(l.failover, ["zone-b", "zone-c"]);
    assert_eq!(l.overprovisioning_percent, 200);
    let doc = json!({"service": "payments", "locality": {"enabled": false}});
    let l = parse(&doc, &anyone).unwrap().locality.unwrap();
    assert!(!l.enabled);
    assert_eq!(l.overprovisioning_percent, 0, "0: the sidecar's default");
    assert_eq!(
        fields(json!({"service": "payments", "locality": {
            "enabled": "yes",
            "failover": ["Zone_B", "zone-c", "zone-c", 7],
            "overprovisioning_percent": 99,
            "weights": 1
        }})),
        [
            "locality.enabled",
            "locality.failover[0]",
            "locality.failover[2]",
            "locality.failover[3]",
            "locality.overprovisioning_percent",
            "locality.weights"
        ]
    );
}
