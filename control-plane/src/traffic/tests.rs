//! Rates, error rates and p99 from two reports; bounds and staleness.

use super::*;

fn up(name: &str, requests: u64, errors: u64, counts: &[u64]) -> UpstreamTraffic {
    UpstreamTraffic {
        upstream: name.into(),
        requests,
        errors,
        bounds_ms: [5.0, 50.0, 500.0, 0.0][..counts.len()].to_vec(),
        counts: counts.to_vec(),
    }
}

fn report(upstreams: Vec<UpstreamTraffic>) -> TrafficReport {
    TrafficReport { upstreams }
}

#[test]
fn an_edge_needs_two_reports_and_shows_the_interval_between_them() {
    let t = Traffic::default();
    t.record(
        1,
        "web",
        report(vec![up("api", 100, 0, &[90, 100, 100, 100])]),
        0,
    );
    assert!(t.edges(1_000).is_empty(), "one report is no rate");
    // 5 s later: 50 more requests, 5 of them errors; 49 within 50 ms, 1 slower.
    t.record(
        1,
        "web",
        report(vec![up("api", 150, 5, &[100, 149, 150, 150])]),
        5_000,
    );
    let edges = t.edges(6_000);
    assert_eq!(edges.len(), 1);
    let e = &edges[0];
    assert_eq!((e.caller.as_str(), e.callee.as_str()), ("web", "api"));
    assert!((e.rps - 10.0).abs() < 1e-9, "{}", e.rps);
    assert!((e.error_rate - 0.1).abs() < 1e-9, "{}", e.error_rate);
    // 99% of 50 is 49.5 -> the 50th request, in the 500 ms bucket.
    assert_eq!(e.p99_ms, Some(500.0));
}

#[test]
fn sessions_of_one_service_add_up_and_stale_ones_drop_out() {
    let t = Traffic::default();
    for session in [1, 2] {
        t.record(session, "web", report(vec![up("api", 0, 0, &[])]), 0);
        t.record(session, "web", report(vec![up("api", 20, 0, &[])]), 2_000);
    }
    let edges = t.edges(2_000);
    assert!((edges[0].rps - 20.0).abs() < 1e-9, "{}", edges[0].rps);
    assert_eq!(edges[0].p99_ms, None, "no histogram, no p99");
    assert!(t.edges(2_000 + STALE).is_empty(), "silent for STALE");
    t.forget(1);
    t.forget(2);
    assert!(t.edges(2_000).is_empty());
}

#[test]
fn a_restarted_sidecar_counts_from_zero() {
    let t = Traffic::default();
    t.record(1, "web", report(vec![up("api", 1000, 10, &[])]), 0);
    t.record(1, "web", report(vec![up("api", 30, 3, &[])]), 3_000);
    let e = &t.edges(3_000)[0];
    assert!(
        (e.rps - 10.0).abs() < 1e-9 && (e.error_rate - 0.1).abs() < 1e-9,
        "{e:?}"
    );
}

#[test]
fn quantiles_read_cumulative_buckets() {
    assert_eq!(quantile(&[], 0.99), None);
    assert_eq!(quantile(&[(1.0, 0), (0.0, 0)], 0.99), None);
    assert_eq!(
        quantile(&[(1.0, 99), (10.0, 100), (0.0, 100)], 0.99),
        Some(1.0)
    );
    assert_eq!(
        quantile(&[(1.0, 98), (10.0, 100), (0.0, 100)], 0.99),
        Some(10.0)
    );
    // Past every finite bound: the largest finite one.
    assert_eq!(
        quantile(&[(1.0, 1), (10.0, 2), (0.0, 100)], 0.99),
        Some(10.0)
    );
}

#[test]
fn reports_are_bounded_and_checked() {
    let many = report(
        (0..=MAX_UPSTREAMS)
            .map(|i| up(&format!("s{i}"), 0, 0, &[]))
            .collect(),
    );
    assert_eq!(
        check(&many),
        Err(ReportError::Upstreams {
            count: MAX_UPSTREAMS + 1
        })
    );
    let bad_name = report(vec![up("Not A Label", 0, 0, &[])]);
    assert!(
        check(&bad_name)
            .unwrap_err()
            .to_string()
            .contains("upstream")
    );
    let mut uneven = up("api", 1, 0, &[1, 1]);
    uneven.counts.pop();
    let err = check(&report(vec![uneven])).unwrap_err().to_string();
    assert!(
        err.contains("bounds_ms") && err.contains("1 counts"),
        "{err}"
    );
    let err = check(&report(vec![up("api", 1, 2, &[])]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("errors"), "{err}");
    assert_eq!(check(&report(vec![up("api", 2, 1, &[1, 2, 2, 2])])), Ok(()));
}

#[test]
fn a_reporter_refuses_bad_reports_and_forgets_its_session_when_dropped() {
    let t = Traffic::default();
    let reporter = Reporter::new(t.clone());
    let bad = report(vec![up("api", 1, 2, &[])]);
    assert!(reporter.report(Some("web"), bad).is_err());
    reporter
        .report(Some("web"), report(vec![up("api", 0, 0, &[])]))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    reporter
        .report(Some("web"), report(vec![up("api", 10, 0, &[])]))
        .unwrap();
    let now = crate::ca::unix_ms();
    assert_eq!(t.edges(now).len(), 1);
    assert_eq!(t.edges(now)[0].caller, "web");
    // A session without instances has no service: nothing is recorded.
    let anonymous = Reporter::new(t.clone());
    anonymous
        .report(None, report(vec![up("db", 5, 0, &[])]))
        .unwrap();
    drop(reporter);
    assert!(t.edges(now).is_empty(), "the session ended");
}

#[test]
fn histograms_must_be_rising_cumulative_and_named_once() {
    let bad = |u: UpstreamTraffic| check(&report(vec![u])).unwrap_err().to_string();
    let mut repeated = up("api", 2, 0, &[0, 0]);
    repeated.bounds_ms = vec![1.0, 1.0];
    assert!(bad(repeated).contains("bounds_ms"));
    let mut nan = up("api", 2, 0, &[0, 0]);
    nan.bounds_ms = vec![f64::NAN, 5.0];
    assert!(bad(nan).contains("bounds_ms"));
    assert!(bad(up("api", 2, 0, &[2, 1])).contains("counts"), "falling");
    assert!(
        bad(up("api", 2, 0, &[3, 3])).contains("counts"),
        "above requests"
    );
    let twice = check(&report(vec![up("api", 1, 0, &[1]), up("api", 1, 0, &[1])]));
    assert!(twice.unwrap_err().to_string().contains("named twice"));
    assert!(check(&report(vec![up("api", 3, 1, &[1, 2, 3, 3])])).is_ok());
}

#[test]
fn huge_counters_saturate_rather_than_overflow() {
    let t = Traffic::default();
    let max = u64::MAX;
    for session in [1, 2] {
        t.record(session, "web", report(vec![up("api", 0, 0, &[0, 0])]), 0);
        t.record(
            session,
            "web",
            report(vec![up("api", max, max, &[max, max])]),
            1_000,
        );
    }
    let edges = t.edges(1_500);
    assert_eq!(edges.len(), 1);
    assert_eq!(edges[0].error_rate, 1.0);
    assert_eq!(edges[0].p99_ms, Some(5.0));
}

#[test]
fn one_edge_adds_up_a_bounded_number_of_distinct_bounds() {
    let t = Traffic::default();
    for session in 0..(MAX_EDGE_BUCKETS as u64 + 10) {
        let mut u = up("api", 0, 0, &[0]);
        u.bounds_ms = vec![1.0 + session as f64];
        t.record(session, "web", report(vec![u.clone()]), 0);
        u.requests = 1;
        u.counts = vec![1];
        t.record(session, "web", report(vec![u]), 1_000);
    }
    let edges = t.edges(1_500);
    assert_eq!(edges.len(), 1);
    assert!(edges[0].rps > 70.0, "every session's requests count");
    assert!(edges[0].p99_ms.is_some());
}
