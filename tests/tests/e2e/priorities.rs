//! Priority levels end to end: `catalog` instances cat-0..2 at priority 0
//! and a standby pool cat-3..4 at priority 1 (each sidecar's service
//! `priority` stamped on its instance; no zones anywhere), and a `web`
//! sidecar under steady concurrent load. Traffic stays on priority 0
//! while it is healthy, spills to priority 1 by Envoy's overprovisioning
//! rule once two of its three instances fail their health checks, and
//! moves wholly to the standby when the third fails too, although fewer
//! than half the endpoints are then healthy (the standby can carry it, so
//! there is no panic). Figures are printed; assertions keep generous
//! bounds.

use std::time::Duration;

use isdp_tests::ControlPlaneOpts;
use isdp_tests::load::{
    CatalogMesh, Load, Place, SERVICE, Window, assert_none_failed, first_window, share_where,
};
use tokio::time::Instant;

/// `cat-0..2` at priority 0, `cat-3..4` at priority 1.
const AT_0: usize = 3;
const AT_1: usize = 2;

fn priority_of(i: usize) -> u32 {
    u32::from(i >= AT_0)
}

/// The share of a window's requests served at `priority`.
fn priority_share(w: &Window, priority: u32) -> f64 {
    share_where(w, AT_0 + AT_1, |i| priority_of(i) == priority)
}

/// No zones anywhere: the priorities alone make the levels.
async fn start() -> CatalogMesh {
    let places: Vec<Place> = (0..AT_0 + AT_1)
        .map(|i| Place {
            zone: None,
            priority: priority_of(i),
        })
        .collect();
    CatalogMesh::start_placed(
        &places,
        None,
        "load_aware",
        ControlPlaneOpts::default(),
        "100ms",
    )
    .await
}

fn describe(w: &Window) -> String {
    format!(
        "{}; priority 0 {:.1}%, priority 1 {:.1}%",
        w.describe(AT_0 + AT_1),
        100.0 * priority_share(w, 0),
        100.0 * priority_share(w, 1)
    )
}

/// From `failed_at` to the end of the first 100 ms in which priority 1
/// serves at least `share` of the requests.
fn spill_time(load: &Load, failed_at: Instant, share: f64) -> Option<Duration> {
    first_window(load, failed_at, |w| priority_share(w, 1) >= share)
}

/// The headline: ≥ 99 % of requests go to priority 0 while it is healthy;
/// with two of its three instances unhealthy it keeps 1/3 × 1.4 ≈ 47 %
/// and priority 1 takes the rest within a second of web seeing the
/// change; with all three down (2 of 5 healthy, under the panic
/// threshold) priority 1 takes everything and the upstream does not
/// panic; no request fails throughout.
#[tokio::test]
async fn traffic_fails_over_by_priority_and_a_whole_standby_averts_panic() {
    let mesh = start().await;

    // What isdpctl and the sidecar show of the priorities.
    let listed = mesh.cp.instances(SERVICE).await.expect("instances");
    for i in &listed {
        let n: usize = i["id"].as_str().unwrap()[4..5].parse().unwrap();
        assert_eq!(i["priority"], priority_of(n), "{i}");
    }
    let config = mesh.web.config_json().await.unwrap();
    let upstream = &config["upstreams"][SERVICE];
    let levels = &upstream["levels"];
    assert_eq!(levels.as_array().map(Vec::len), Some(2), "{upstream}");
    for (k, share) in [(0, 100.0), (1, 0.0)] {
        assert_eq!(levels[k]["priority"], k, "{levels}");
        assert_eq!(levels[k]["zone"], "*", "{levels}");
        assert_eq!(levels[k]["share_percent"], share, "{levels}");
    }
    for e in upstream["endpoints"].as_array().unwrap() {
        assert_eq!(e["level"], e["priority"], "{e}");
    }
    let at_1 = upstream["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["priority"] == 1)
        .count();
    assert_eq!(at_1, AT_1, "{upstream}");

    let load = mesh.load();
    let start = Instant::now();
    let healthy = load
        .window_after(start, Duration::from_secs(1), Duration::from_secs(4))
        .await;
    eprintln!("priority 0 healthy: {}", describe(&healthy));
    assert!(healthy.len() > 200, "the load runs: {}", describe(&healthy));
    assert!(
        priority_share(&healthy, 0) >= 0.99,
        "traffic leaves priority 0: {}",
        describe(&healthy)
    );

    // Two of three down: 1/3 × 1.4 ≈ 47 % stays.
    let (failed_at, pushed) = mesh.fail_checks(0..2, 2).await;
    let config = mesh.web.config_json().await.unwrap();
    let levels = &config["upstreams"][SERVICE]["levels"];
    eprintln!(
        "health change seen by web {:?} after the checks failed; levels {levels}",
        pushed - failed_at
    );
    assert_eq!(levels[0]["share_percent"], 46.67, "{levels}");
    assert_eq!(levels[1]["share_percent"], 53.33, "{levels}");
    let after = load
        .window_after(pushed, Duration::from_secs(1), Duration::from_secs(4))
        .await;
    eprintln!(
        "2 of priority 0's 3 unhealthy, 1..4 s: {}",
        describe(&after)
    );
    let p1 = priority_share(&after, 1);
    assert!(
        (0.4..0.7).contains(&p1),
        "priority 1 should take about 53 %: {}",
        describe(&after)
    );
    for i in 0..2 {
        assert_eq!(
            after.share(&format!("cat-{i}")),
            0.0,
            "{}",
            describe(&after)
        );
    }
    let spill = spill_time(&load, failed_at, 0.4);
    eprintln!(
        "spill to priority 1: {spill:?} after the checks failed (web saw it after {:?})",
        pushed - failed_at
    );
    let spill = spill.expect("traffic spilled to priority 1");
    assert!(
        spill <= (pushed - failed_at) + Duration::from_secs(1),
        "spill took {spill:?}"
    );

    // The third down too: 2 of 5 healthy is under the panic threshold,
    // but the standby is whole and carries everything.
    let (failed_at, pushed) = mesh.fail_checks(2..3, 3).await;
    let config = mesh.web.config_json().await.unwrap();
    let upstream = &config["upstreams"][SERVICE];
    eprintln!(
        "priority 0 all down, seen by web {:?} after the checks failed; panic {}, levels {}",
        pushed - failed_at,
        upstream["panic"],
        upstream["levels"]
    );
    assert_eq!(upstream["panic"], false, "{upstream}");
    assert_eq!(upstream["levels"][1]["share_percent"], 100.0, "{upstream}");
    let standby = load
        .window_after(pushed, Duration::from_secs(1), Duration::from_secs(4))
        .await;
    eprintln!("priority 0 all unhealthy, 1..4 s: {}", describe(&standby));
    assert!(
        priority_share(&standby, 1) >= 0.99,
        "traffic goes back to the unhealthy primary: {}",
        describe(&standby)
    );
    let spill = spill_time(&load, failed_at, 0.99);
    eprintln!("all on priority 1: {spill:?} after the checks failed");

    assert_none_failed(&load.window(start, Instant::now()));
}
