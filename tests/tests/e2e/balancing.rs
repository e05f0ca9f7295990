//! Load distribution end to end: three `catalog` instances (`echo-http`)
//! behind their sidecars, a `web` sidecar proxying `catalog` under steady
//! concurrent load (`isdp_tests::load`), one instance turned slow with
//! `POST /admin/delay` and back. Assertions count which instance served
//! the requests of a time window; latency figures belong to the bench
//! (`tests/benches/balancing.rs`), not to a test.

use std::time::Duration;

use isdp_tests::load::{CatalogMesh, SERVICE, SLOW_DELAY_MS};
use isdp_tests::{eventually, find_by_id};
use tokio::time::Instant;

/// The headline: one of three instances turns five times slower under
/// steady load; `load_aware` (the default) leaves it under 5 % of the
/// requests from 5 s on, and gives it its third back within 10 s of its
/// recovery, with no failed request throughout.
#[tokio::test]
async fn load_aware_routes_around_a_slow_instance_and_back() {
    let mesh = CatalogMesh::start(3, "load_aware").await;
    let config = mesh.web.config_json().await.unwrap();
    assert_eq!(config["upstreams"][SERVICE]["lb"], "load_aware", "{config}");
    let load = mesh.load();
    let start = Instant::now();

    let before = load
        .window_after(start, Duration::from_secs(1), Duration::from_secs(4))
        .await;
    eprintln!("all fast: {}", before.describe(3));
    assert!(before.len() > 300, "the load runs: {}", before.describe(3));
    for i in 0..3 {
        let share = before.share(&format!("cat-{i}"));
        assert!(
            share > 0.2,
            "all fast, cat-{i} has {share}: {}",
            before.describe(3)
        );
    }

    mesh.delay(0, SLOW_DELAY_MS).await;
    let slowed = Instant::now();
    let slow = load
        .window_after(slowed, Duration::from_secs(5), Duration::from_secs(10))
        .await;
    eprintln!("cat-0 slow, 5..10 s: {}", slow.describe(3));
    assert!(
        slow.share("cat-0") < 0.05,
        "the slow instance keeps too much: {}",
        slow.describe(3)
    );

    mesh.delay(0, 0).await;
    let recovered = Instant::now();
    let back = load
        .window_after(recovered, Duration::from_secs(7), Duration::from_secs(10))
        .await;
    eprintln!("cat-0 recovered, 7..10 s: {}", back.describe(3));
    assert!(
        back.share("cat-0") > 0.2,
        "the recovered instance is not back: {}",
        back.describe(3)
    );

    let all = load.window(start, Instant::now());
    assert_eq!(all.failed(), 0, "no request fails: {}", all.describe(3));
}

/// Latency outliers: with `round_robin`, which never looks at latency, a
/// policy's `latency_factor` ejects the instance that turned five times
/// slower, and from then on it serves nothing; nothing fails.
#[tokio::test]
async fn a_latency_outlier_is_ejected_by_policy() {
    let mesh = CatalogMesh::start(3, "round_robin").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.json");
    let policy = serde_json::json!({"service": SERVICE, "outlier_detection": {
        "latency_factor": 3, "interval": "500ms", "latency_intervals": 2,
        "base_ejection_time": "30s"}});
    std::fs::write(&path, policy.to_string()).unwrap();
    mesh.cp
        .ctl_ok(&["policy", "apply", "-f", &path.display().to_string()])
        .await;
    eventually(Duration::from_secs(5), "web runs on the policy", || async {
        let config = mesh.web.config_json().await?;
        let version = &config["upstreams"][SERVICE]["policy_version"];
        anyhow::ensure!(version.is_string(), "{config}");
        Ok(())
    })
    .await;
    let load = mesh.load();
    let start = Instant::now();
    mesh.delay(0, SLOW_DELAY_MS).await;
    eventually(Duration::from_secs(10), "cat-0 ejected", || async {
        let eps = mesh.web.endpoints(SERVICE).await?;
        let cat0 = find_by_id(&eps, "cat-0.catalog")
            .cloned()
            .unwrap_or_default();
        anyhow::ensure!(cat0["ejected"] == true, "{eps:?}");
        Ok(())
    })
    .await;
    let ejected = Instant::now();
    let after = load
        .window_after(ejected, Duration::from_millis(500), Duration::from_secs(3))
        .await;
    eprintln!("after the ejection: {}", after.describe(3));
    assert!(after.len() > 100, "{}", after.describe(3));
    assert_eq!(after.share("cat-0"), 0.0, "{}", after.describe(3));
    let all = load.window(start, Instant::now());
    assert_eq!(all.failed(), 0, "{}", all.describe(3));
}

/// Load reports: the inbound sidecar reads and strips the application's
/// ORCA header (callers never see it), shows the utilisation on its
/// `/config`, and reports load on its session, which the control plane
/// counts as accepted.
#[tokio::test]
async fn load_reports_reach_the_control_plane_and_orca_is_stripped() {
    let mesh = CatalogMesh::start(1, "load_aware").await;
    let r = isdp_tests::http::post(mesh.echoes[0].addr(), "/admin/load?utilization=0.8")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let direct = isdp_tests::http::get(mesh.echoes[0].addr(), "/")
        .await
        .unwrap();
    assert_eq!(
        direct.header("endpoint-load-metrics"),
        Some("TEXT application_utilization=0.8"),
        "the instance sends it"
    );
    let through = isdp_tests::http::get(mesh.web.upstream_addr(SERVICE), "/")
        .await
        .unwrap();
    assert_eq!(through.status, 200, "{}", through.body);
    assert_eq!(through.header("x-instance-id"), Some("cat-0"));
    assert_eq!(through.header("endpoint-load-metrics"), None, "stripped");
    let sidecar = &mesh.sidecars[0];
    let config = sidecar.config_json().await.unwrap();
    let service = &config["services"][0];
    assert_eq!(service["application_utilization"], 0.8, "{config}");
    assert!(service["latency_ms"].is_number(), "{config}");
    eventually(Duration::from_secs(6), "a load report accepted", || async {
        let metrics = isdp_tests::http::get(mesh.cp.admin_addr(), "/metrics").await?;
        let accepted = metrics
            .body
            .lines()
            .find(|l| l.starts_with("isdp_load_reports_total{status=\"accepted\"}"));
        anyhow::ensure!(accepted.is_some(), "no accepted report yet");
        Ok(())
    })
    .await;
}
