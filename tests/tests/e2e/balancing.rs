//! Load distribution end to end: three `catalog` instances (`echo-http`)
//! behind their sidecars, a `web` sidecar proxying `catalog` under steady
//! concurrent load (`isdp_tests::load`), one instance turned slow with
//! `POST /admin/delay` and back. Assertions count which instance served
//! the requests of a time window; latency figures belong to the bench
//! (`tests/benches/balancing.rs`), not to a test.

use std::time::Duration;

use isdp_tests::load::{Load, Window};
use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually};
use tokio::time::{Instant, sleep_until};

const SERVICE: &str = "catalog";
const SETUP: Duration = Duration::from_secs(15);
/// Callers in the closed loop, and what each request costs the instance.
const WORKERS: usize = 16;
const PATH: &str = "/slow?ms=10";
/// Added to the slow instance's 10 ms: five times slower.
const SLOW_DELAY_MS: u64 = 40;

/// `catalog` instances `cat-0..n` and a `web` sidecar using `lb`.
pub struct Mesh {
    _cp: ControlPlane,
    pub echoes: Vec<EchoHttp>,
    _sidecars: Vec<Sidecar>,
    pub web: Sidecar,
}

impl Mesh {
    pub async fn start(n: usize, lb: &str) -> Self {
        let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
        let mut echoes = Vec::new();
        let mut sidecars = Vec::new();
        for i in 0..n {
            let id = format!("cat-{i}");
            let echo = EchoHttp::start(&id).await;
            let sidecar = SidecarToml::new(&id, &cp.grpc_url())
                .raw(&format!(
                    "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
                     check = \"{check}\"\ninterval = \"200ms\"\n",
                    port = echo.port(),
                    check = echo.health_url(),
                ))
                .start()
                .await;
            echoes.push(echo);
            sidecars.push(sidecar);
        }
        let web = SidecarToml::new("web", &cp.grpc_url())
            .upstream_on_port0(SERVICE, "http", lb)
            .start()
            .await;
        let mesh = Mesh {
            _cp: cp,
            echoes,
            _sidecars: sidecars,
            web,
        };
        eventually(SETUP, "web sees every instance healthy", || async {
            let eps = mesh.web.endpoints(SERVICE).await?;
            let healthy = eps.iter().filter(|e| e["status"] == "healthy").count();
            anyhow::ensure!(healthy == n, "{healthy} of {n} healthy: {eps:?}");
            Ok(())
        })
        .await;
        mesh
    }

    /// Steady load on `web`'s `catalog` listener.
    pub fn load(&self) -> Load {
        Load::start(self.web.upstream_addr(SERVICE), PATH, WORKERS)
    }

    /// Sets instance `i`'s added delay.
    pub async fn delay(&self, i: usize, ms: u64) {
        let path = format!("/admin/delay?ms={ms}");
        let r = isdp_tests::http::post(self.echoes[i].addr(), &path)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
}

/// The window `from..to` after `start`, once it is over.
async fn window(load: &Load, start: Instant, from: Duration, to: Duration) -> Window {
    sleep_until(start + to).await;
    load.window(start + from, start + to)
}

fn describe(w: &Window) -> String {
    let shares: Vec<String> = (0..3)
        .map(|i| format!("cat-{i} {:.1}%", 100.0 * w.share(&format!("cat-{i}"))))
        .collect();
    format!(
        "{} requests, {} failed, p50 {:?}, p99 {:?}; {}",
        w.len(),
        w.failed(),
        w.quantile(0.5),
        w.quantile(0.99),
        shares.join(", ")
    )
}

/// The headline: one of three instances turns five times slower under
/// steady load; `load_aware` (the default) leaves it under 5 % of the
/// requests from 5 s on, and gives it its third back within 10 s of its
/// recovery, with no failed request throughout.
#[tokio::test]
async fn load_aware_routes_around_a_slow_instance_and_back() {
    let mesh = Mesh::start(3, "load_aware").await;
    let config = mesh.web.config_json().await.unwrap();
    assert_eq!(config["upstreams"][SERVICE]["lb"], "load_aware", "{config}");
    let load = mesh.load();
    let start = Instant::now();

    let before = window(&load, start, Duration::from_secs(1), Duration::from_secs(4)).await;
    eprintln!("all fast: {}", describe(&before));
    assert!(before.len() > 300, "the load runs: {}", describe(&before));
    for i in 0..3 {
        let share = before.share(&format!("cat-{i}"));
        assert!(
            share > 0.2,
            "all fast, cat-{i} has {share}: {}",
            describe(&before)
        );
    }

    mesh.delay(0, SLOW_DELAY_MS).await;
    let slowed = Instant::now();
    let slow = window(
        &load,
        slowed,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )
    .await;
    eprintln!("cat-0 slow, 5..10 s: {}", describe(&slow));
    assert!(
        slow.share("cat-0") < 0.05,
        "the slow instance keeps too much: {}",
        describe(&slow)
    );

    mesh.delay(0, 0).await;
    let recovered = Instant::now();
    let back = window(
        &load,
        recovered,
        Duration::from_secs(7),
        Duration::from_secs(10),
    )
    .await;
    eprintln!("cat-0 recovered, 7..10 s: {}", describe(&back));
    assert!(
        back.share("cat-0") > 0.2,
        "the recovered instance is not back: {}",
        describe(&back)
    );

    let all = load.window(start, Instant::now());
    assert_eq!(all.failed(), 0, "no request fails: {}", describe(&all));
}
