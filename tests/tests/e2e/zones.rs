//! Zone-aware routing end to end: `catalog` instances in zones a and b
//! behind their sidecars (each sidecar's `zone` stamped on its instance),
//! and a `web` sidecar in zone a under steady concurrent load. Traffic
//! stays in zone a while it is healthy, and spills to zone b by Envoy's
//! overprovisioning rule once three of a's four instances fail their
//! health checks. Figures are printed; assertions keep generous bounds.

use std::time::Duration;

use isdp_tests::load::{Load, PATH, SETUP, WORKERS, Window};
use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually};
use tokio::time::Instant;

const SERVICE: &str = "catalog";
/// `cat-0..3` run in zone a, `cat-4..5` in zone b.
const IN_A: usize = 4;
const IN_B: usize = 2;

fn zone_of(i: usize) -> &'static str {
    if i < IN_A { "a" } else { "b" }
}

/// The share of a window's requests served in `zone`.
fn zone_share(w: &Window, zone: &str) -> f64 {
    (0..IN_A + IN_B)
        .filter(|&i| zone_of(i) == zone)
        .map(|i| w.share(&format!("cat-{i}")))
        .sum()
}

struct ZonedMesh {
    _cp: ControlPlane,
    echoes: Vec<EchoHttp>,
    _sidecars: Vec<Sidecar>,
    web: Sidecar,
}

async fn start() -> ZonedMesh {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut echoes = Vec::new();
    let mut sidecars = Vec::new();
    for i in 0..IN_A + IN_B {
        let id = format!("cat-{i}");
        let echo = EchoHttp::start(&id).await;
        let sidecar = SidecarToml::new(&id, &cp.grpc_url())
            .raw(&format!(
                "zone = \"{zone}\"\n[[service]]\nname = \"{SERVICE}\"\nport = {port}\n\
                 protocol = \"http\"\ncheck = \"{check}\"\ninterval = \"100ms\"\n",
                zone = zone_of(i),
                port = echo.port(),
                check = echo.health_url(),
            ))
            .start()
            .await;
        echoes.push(echo);
        sidecars.push(sidecar);
    }
    let web = SidecarToml::new("web", &cp.grpc_url())
        .raw("zone = \"a\"")
        .upstream_on_port0(SERVICE, "http", "load_aware")
        .start()
        .await;
    let mesh = ZonedMesh {
        _cp: cp,
        echoes,
        _sidecars: sidecars,
        web,
    };
    eventually(SETUP, "web sees every instance healthy", || async {
        let eps = mesh.web.endpoints(SERVICE).await?;
        let healthy = eps.iter().filter(|e| e["status"] == "healthy").count();
        anyhow::ensure!(healthy == IN_A + IN_B, "{healthy} healthy: {eps:?}");
        Ok(())
    })
    .await;
    mesh
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

    let load = Load::start(mesh.web.upstream_addr(SERVICE), PATH, WORKERS);
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

    for echo in &mesh.echoes[..3] {
        echo.fail_health().await;
    }
    let failed_at = Instant::now();
    // When web's snapshot shows the change: the rebuild follows it.
    eventually(
        Duration::from_secs(10),
        "web sees cat-0..2 unhealthy",
        || async {
            let eps = mesh.web.endpoints(SERVICE).await?;
            let down = eps.iter().filter(|e| e["status"] == "unhealthy").count();
            anyhow::ensure!(down == 3, "{down} unhealthy: {eps:?}");
            Ok(())
        },
    )
    .await;
    let pushed = Instant::now();
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
    let step = Duration::from_millis(20);
    let spill = (0..250)
        .map(|k| failed_at + step * k)
        .find(|t| {
            let w = load.window(*t, *t + Duration::from_millis(100));
            !w.is_empty() && zone_share(&w, "b") >= 0.5
        })
        .map(|t| t + Duration::from_millis(100) - failed_at);
    eprintln!(
        "spill to zone b: {spill:?} after the checks failed (web saw it after {:?})",
        pushed - failed_at
    );
    let spill = spill.expect("traffic spilled to zone b");
    assert!(
        spill <= (pushed - failed_at) + Duration::from_secs(1),
        "spill took {spill:?}"
    );

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
