//! Zone-aware routing end to end: `catalog` instances in zones a and b
//! behind their sidecars (each sidecar's `zone` stamped on its instance),
//! and a `web` sidecar in zone a under steady concurrent load. Traffic
//! stays in zone a while it is healthy, and spills to zone b by Envoy's
//! overprovisioning rule once three of a's four instances fail their
//! health checks. Figures are printed; assertions keep generous bounds.

use std::time::Duration;

use isdp_tests::ControlPlaneOpts;
use isdp_tests::load::{
    CatalogMesh, Place, SERVICE, Window, assert_none_failed, first_window, share_where,
};
use tokio::time::Instant;

/// `cat-0..3` run in zone a, `cat-4..5` in zone b.
const IN_A: usize = 4;
const IN_B: usize = 2;

fn zone_of(i: usize) -> &'static str {
    if i < IN_A { "a" } else { "b" }
}

/// The share of a window's requests served in `zone`.
fn zone_share(w: &Window, zone: &str) -> f64 {
    share_where(w, IN_A + IN_B, |i| zone_of(i) == zone)
}

async fn start() -> CatalogMesh {
    let places: Vec<Place> = (0..IN_A + IN_B)
        .map(|i| Place {
            zone: Some(zone_of(i)),
            priority: 0,
        })
        .collect();
    CatalogMesh::start_placed(
        &places,
        Some("a"),
        "load_aware",
        ControlPlaneOpts::default(),
        "100ms",
    )
    .await
}

fn describe(w: &Window) -> String {
    format!(
        "{}; zone a {:.1}%, zone b {:.1}%",
        w.describe(IN_A + IN_B),
        100.0 * zone_share(w, "a"),
        100.0 * zone_share(w, "b")
    )
}

/// The headline: ≥ 95 % of requests stay in the caller's zone while it is
/// healthy; once three of its four instances are unhealthy, zone a keeps
/// 25 % × 1.4 = 35 % and zone b takes the rest within a second of web
/// seeing the change, and no request fails throughout.
#[tokio::test]
async fn calls_stay_in_zone_and_spill_over_when_it_degrades() {
    let mesh = start().await;
    let config = mesh.web.config_json().await.unwrap();
    let upstream = &config["upstreams"][SERVICE];
    assert_eq!(upstream["caller_zone"], "a", "{upstream}");
    assert_eq!(upstream["levels"][0]["zone"], "a", "{upstream}");
    assert_eq!(upstream["levels"][0]["share_percent"], 100.0, "{upstream}");
    assert_eq!(upstream["levels"][1]["zone"], "b", "{upstream}");
    for e in upstream["endpoints"].as_array().unwrap() {
        let want = if e["zone"] == "a" { 0 } else { 1 };
        assert_eq!(e["level"], want, "{e}");
    }

    let load = mesh.load();
    let start = Instant::now();
    let healthy = load
        .window_after(start, Duration::from_secs(1), Duration::from_secs(4))
        .await;
    eprintln!("zone a healthy: {}", describe(&healthy));
    assert!(healthy.len() > 200, "the load runs: {}", describe(&healthy));
    assert!(
        zone_share(&healthy, "a") >= 0.95,
        "traffic leaves the zone: {}",
        describe(&healthy)
    );

    // When web's snapshot shows the change: the rebuild follows it.
    let (failed_at, pushed) = mesh.fail_checks(0..3, 3).await;
    let config = mesh.web.config_json().await.unwrap();
    let levels = &config["upstreams"][SERVICE]["levels"];
    eprintln!(
        "health change seen by web {:?} after the checks failed; levels {levels}",
        pushed - failed_at
    );
    assert_eq!(levels[0]["share_percent"], 35.0, "{levels}");
    assert_eq!(levels[1]["share_percent"], 65.0, "{levels}");

    let after = load
        .window_after(pushed, Duration::from_secs(1), Duration::from_secs(4))
        .await;
    eprintln!("3 of zone a's 4 unhealthy, 1..4 s: {}", describe(&after));
    let b = zone_share(&after, "b");
    assert!(
        (0.5..0.8).contains(&b),
        "zone b should take about 65 %: {}",
        describe(&after)
    );
    for i in 0..3 {
        assert_eq!(
            after.share(&format!("cat-{i}")),
            0.0,
            "{}",
            describe(&after)
        );
    }

    // Spill time: from the checks failing to the first 100 ms in which
    // zone b serves at least half the requests.
    let spill = first_window(&load, failed_at, |w| zone_share(w, "b") >= 0.5);
    eprintln!(
        "spill to zone b: {spill:?} after the checks failed (web saw it after {:?})",
        pushed - failed_at
    );
    let spill = spill.expect("traffic spilled to zone b");
    assert!(
        spill <= (pushed - failed_at) + Duration::from_secs(1),
        "spill took {spill:?}"
    );

    assert_none_failed(&load.window(start, Instant::now()));
}
