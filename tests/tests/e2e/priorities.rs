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

use isdp_tests::load::{Load, PATH, SETUP, WORKERS, Window};
use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually};
use tokio::time::Instant;

const SERVICE: &str = "catalog";
/// `cat-0..2` at priority 0, `cat-3..4` at priority 1.
const AT_0: usize = 3;
const AT_1: usize = 2;

fn priority_of(i: usize) -> u32 {
    u32::from(i >= AT_0)
}

/// The share of a window's requests served at `priority`.
fn priority_share(w: &Window, priority: u32) -> f64 {
    (0..AT_0 + AT_1)
        .filter(|&i| priority_of(i) == priority)
        .map(|i| w.share(&format!("cat-{i}")))
        .sum()
}

struct RankedMesh {
    cp: ControlPlane,
    echoes: Vec<EchoHttp>,
    _sidecars: Vec<Sidecar>,
    web: Sidecar,
}

async fn start() -> RankedMesh {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut echoes = Vec::new();
    let mut sidecars = Vec::new();
    for i in 0..AT_0 + AT_1 {
        let id = format!("cat-{i}");
        let echo = EchoHttp::start(&id).await;
        let sidecar = SidecarToml::new(&id, &cp.grpc_url())
            .raw(&format!(
                "[[service]]\nname = \"{SERVICE}\"\nport = {port}\npriority = {priority}\n\
                 protocol = \"http\"\ncheck = \"{check}\"\ninterval = \"100ms\"\n",
                port = echo.port(),
                priority = priority_of(i),
                check = echo.health_url(),
            ))
            .start()
            .await;
        echoes.push(echo);
        sidecars.push(sidecar);
    }
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "load_aware")
        .start()
        .await;
    let mesh = RankedMesh {
        cp,
        echoes,
        _sidecars: sidecars,
        web,
    };
    eventually(SETUP, "web sees every instance healthy", || async {
        let eps = mesh.web.endpoints(SERVICE).await?;
        let healthy = eps.iter().filter(|e| e["status"] == "healthy").count();
        anyhow::ensure!(healthy == AT_0 + AT_1, "{healthy} healthy: {eps:?}");
        Ok(())
    })
    .await;
    mesh
}

fn describe(w: &Window) -> String {
    format!(
        "{}; priority 0 {:.1}%, priority 1 {:.1}%",
        w.describe(AT_0 + AT_1),
        100.0 * priority_share(w, 0),
        100.0 * priority_share(w, 1)
    )
}

/// Fails the health checks of `echoes` and waits until web's snapshot
/// shows `down` endpoints unhealthy; returns when the checks failed and
/// when web saw it.
async fn fail(mesh: &RankedMesh, echoes: &[EchoHttp], down: usize) -> (Instant, Instant) {
    for echo in echoes {
        echo.fail_health().await;
    }
    let failed_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        &format!("web sees {down} unhealthy"),
        || async {
            let eps = mesh.web.endpoints(SERVICE).await?;
            let n = eps.iter().filter(|e| e["status"] == "unhealthy").count();
            anyhow::ensure!(n == down, "{n} unhealthy: {eps:?}");
            Ok(())
        },
    )
    .await;
    (failed_at, Instant::now())
}

/// From `failed_at` to the end of the first 100 ms in which priority 1
/// serves at least `share` of the requests.
fn spill_time(load: &Load, failed_at: Instant, share: f64) -> Option<Duration> {
    let step = Duration::from_millis(20);
    (0..250)
        .map(|k| failed_at + step * k)
        .find(|t| {
            let w = load.window(*t, *t + Duration::from_millis(100));
            !w.is_empty() && priority_share(&w, 1) >= share
        })
        .map(|t| t + Duration::from_millis(100) - failed_at)
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

    let load = Load::start(mesh.web.upstream_addr(SERVICE), PATH, WORKERS);
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
    let (failed_at, pushed) = fail(&mesh, &mesh.echoes[..2], 2).await;
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
    let (failed_at, pushed) = fail(&mesh, &mesh.echoes[2..3], 3).await;
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

    let all = load.window(start, Instant::now());
    let failures: Vec<_> = all
        .0
        .iter()
        .filter(|s| !(200..300).contains(&s.status))
        .collect();
    eprintln!(
        "{} requests in all, {} failed: {failures:?}",
        all.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "no request fails");
}
