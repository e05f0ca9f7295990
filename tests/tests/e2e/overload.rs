//! Adaptive concurrency end to end: one `catalog` instance that serves two
//! requests at a time (`POST /admin/capacity`) and queues the rest, 48
//! callers through the `web` sidecar. Without a limit every caller waits
//! in the instance's queue; with a policy's `adaptive_concurrency` the
//! sidecar sheds the excess with 503 `overload` and the requests it lets
//! through are served without that queue. The comparison is within one
//! run, between two windows of the same load.

use std::time::Duration;

use isdp_tests::load::{CatalogMesh, Load, PATH, SERVICE};
use isdp_tests::{eventually, http};
use tokio::time::Instant;

const CALLERS: usize = 48;

#[tokio::test]
async fn adaptive_concurrency_sheds_instead_of_queueing() {
    let mesh = CatalogMesh::start(1, "round_robin").await;
    let r = http::post(mesh.echoes[0].addr(), "/admin/capacity?n=2")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let load = Load::start_polite(
        mesh.web.upstream_addr(SERVICE),
        PATH,
        CALLERS,
        Duration::from_millis(20),
    );

    let start = Instant::now();
    let queued = load
        .window_after(start, Duration::from_secs(1), Duration::from_secs(3))
        .await;
    eprintln!("no limit: {}", queued.describe(1));
    assert!(queued.len() > 50, "the load runs: {}", queued.describe(1));
    assert_eq!(queued.failed(), 0, "{}", queued.describe(1));
    let config = mesh.web.config_json().await.unwrap();
    assert_eq!(
        config["upstreams"][SERVICE]["concurrency_limit"],
        serde_json::Value::Null,
        "off without a policy: {config}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.json");
    let policy = serde_json::json!({"service": SERVICE, "adaptive_concurrency": {}});
    std::fs::write(&path, policy.to_string()).unwrap();
    mesh.cp
        .ctl_ok(&["policy", "apply", "-f", &path.display().to_string()])
        .await;
    eventually(Duration::from_secs(10), "the min RTT measured", || async {
        let config = mesh.web.config_json().await?;
        let upstream = &config["upstreams"][SERVICE];
        anyhow::ensure!(upstream["concurrency_min_rtt_ms"].is_number(), "{upstream}");
        Ok(())
    })
    .await;

    let limited_at = Instant::now();
    let limited = load
        .window_after(limited_at, Duration::from_secs(1), Duration::from_secs(4))
        .await;
    let served = limited.served();
    eprintln!(
        "limited: {}; served: {}",
        limited.describe(1),
        served.describe(1)
    );
    let config = mesh.web.config_json().await.unwrap();
    let upstream = &config["upstreams"][SERVICE];
    eprintln!("web's view: {upstream}");

    // Every failure is the sidecar's own 503, never a timeout or reset.
    let shed = limited
        .0
        .iter()
        .filter(|s| s.status == 503 && s.instance.is_empty())
        .count();
    assert!(shed > 0, "nothing shed: {}", limited.describe(1));
    assert_eq!(shed, limited.failed(), "{}", limited.describe(1));
    assert!(served.len() > 50, "{}", served.describe(1));
    // Unlimited, a request waits behind ~46 others (~240 ms); under the
    // limit, behind a handful.
    assert!(
        served.quantile(0.5) * 2 < queued.quantile(0.5),
        "served p50 {:?} against {:?} without the limit",
        served.quantile(0.5),
        queued.quantile(0.5)
    );
    let limit = upstream["concurrency_limit"].as_u64().unwrap();
    assert!(
        (3..CALLERS as u64 / 2).contains(&limit),
        "limit {limit}: {upstream}"
    );

    let metrics = http::get(mesh.web.admin_addr(), "/metrics").await.unwrap();
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l.starts_with("isdp_breaker_overflows_total")
                && l.contains("reason=\"adaptive_concurrency\"")),
        "no overflow counted:\n{}",
        metrics.body
    );
}
