//! The mesh the balancing tests and bench load: `catalog` instances
//! (`echo-http`, `cat-0..n`) behind their sidecars and a `web` sidecar
//! proxying `catalog` with a chosen balancer; each instance may be placed
//! in a zone and at a priority, and `web` in a zone, for the locality
//! tests.

use std::time::Duration;

use tokio::time::Instant;

use super::{Load, Window};
use crate::{ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually};

/// The service the instances serve.
pub const SERVICE: &str = "catalog";
/// How long the mesh may take to come up.
pub const SETUP: Duration = Duration::from_secs(15);
/// Callers in the closed loop, and what each request costs the instance.
pub const WORKERS: usize = 16;
pub const PATH: &str = "/slow?ms=10";
/// Added to the slow instance's 10 ms: five times slower.
pub const SLOW_DELAY_MS: u64 = 40;

/// Where one instance runs and how it ranks: its sidecar's `zone` and its
/// service's `priority`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Place {
    pub zone: Option<&'static str>,
    pub priority: u32,
}

/// `catalog` instances `cat-0..n` and a `web` sidecar using `lb`.
pub struct CatalogMesh {
    pub cp: ControlPlane,
    pub echoes: Vec<EchoHttp>,
    pub sidecars: Vec<Sidecar>,
    pub web: Sidecar,
}

impl CatalogMesh {
    pub async fn start(n: usize, lb: &str) -> Self {
        Self::start_with(n, lb, ControlPlaneOpts::default()).await
    }

    /// [`CatalogMesh::start`] with a control plane started with `opts`.
    pub async fn start_with(n: usize, lb: &str, opts: ControlPlaneOpts) -> Self {
        let places = vec![Place::default(); n];
        Self::start_placed(&places, None, lb, opts, "200ms").await
    }

    /// Instance `cat-i` at `places[i]`, `web` in `web_zone`, health checks
    /// every `interval` (short for the tests that fail them).
    pub async fn start_placed(
        places: &[Place],
        web_zone: Option<&str>,
        lb: &str,
        opts: ControlPlaneOpts,
        interval: &str,
    ) -> Self {
        let n = places.len();
        let cp = ControlPlane::start(opts).await;
        let mut echoes = Vec::new();
        let mut sidecars = Vec::new();
        for (i, place) in places.iter().enumerate() {
            let id = format!("cat-{i}");
            let echo = EchoHttp::start(&id).await;
            let zone = place
                .zone
                .map(|z| format!("zone = \"{z}\"\n"))
                .unwrap_or_default();
            let sidecar = SidecarToml::new(&id, &cp.grpc_url())
                .raw(&format!(
                    "{zone}[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
                     priority = {priority}\ncheck = \"{check}\"\ninterval = \"{interval}\"\n",
                    port = echo.port(),
                    priority = place.priority,
                    check = echo.health_url(),
                ))
                .start()
                .await;
            echoes.push(echo);
            sidecars.push(sidecar);
        }
        let mut web = SidecarToml::new("web", &cp.grpc_url());
        if let Some(z) = web_zone {
            web = web.raw(&format!("zone = \"{z}\""));
        }
        let web = web.upstream_on_port0(SERVICE, "http", lb).start().await;
        let mesh = CatalogMesh {
            cp,
            echoes,
            sidecars,
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

    /// Fails the health checks of instances `which` (they keep serving) and
    /// waits until web's snapshot shows `down` endpoints unhealthy; returns
    /// when the checks failed and when web saw it.
    pub async fn fail_checks(
        &self,
        which: std::ops::Range<usize>,
        down: usize,
    ) -> (Instant, Instant) {
        for echo in &self.echoes[which] {
            echo.fail_health().await;
        }
        let failed_at = Instant::now();
        eventually(
            Duration::from_secs(10),
            &format!("web sees {down} unhealthy"),
            || async {
                let eps = self.web.endpoints(SERVICE).await?;
                let n = eps.iter().filter(|e| e["status"] == "unhealthy").count();
                anyhow::ensure!(n == down, "{n} unhealthy: {eps:?}");
                Ok(())
            },
        )
        .await;
        (failed_at, Instant::now())
    }

    /// Steady load on `web`'s `catalog` listener.
    pub fn load(&self) -> Load {
        Load::start(self.web.upstream_addr(SERVICE), PATH, WORKERS)
    }

    /// Sets instance `i`'s added delay.
    pub async fn delay(&self, i: usize, ms: u64) {
        let path = format!("/admin/delay?ms={ms}");
        let r = crate::http::post(self.echoes[i].addr(), &path)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
}

// === load reports ===

impl CatalogMesh {
    /// Makes instance `i` report (ORCA) a utilisation of `cost` per request
    /// per second it serves, as a server whose requests cost that much.
    pub async fn cost(&self, i: usize, cost: f64) {
        let path = format!("/admin/load?cost={cost}");
        let r = crate::http::post(self.echoes[i].addr(), &path)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
}

// === shares ===

/// The share of `w`'s requests served by the instances `cat-i` for which
/// `pick(i)` holds, of `n`.
pub fn share_where(w: &Window, n: usize, pick: impl Fn(usize) -> bool) -> f64 {
    (0..n)
        .filter(|&i| pick(i))
        .map(|i| w.share(&format!("cat-{i}")))
        .sum()
}

/// From `since` to the end of the first 100 ms window (stepping 20 ms,
/// for up to 5 s) in which `reached` holds of the requests.
pub fn first_window(
    load: &Load,
    since: Instant,
    reached: impl Fn(&Window) -> bool,
) -> Option<Duration> {
    let step = Duration::from_millis(20);
    let width = Duration::from_millis(100);
    (0..250)
        .map(|k| since + step * k)
        .find(|t| {
            let w = load.window(*t, *t + width);
            !w.is_empty() && reached(&w)
        })
        .map(|t| t + width - since)
}

/// Every request of `w` that failed, printed with the total; panics if any.
pub fn assert_none_failed(w: &Window) {
    let failures: Vec<_> =
        w.0.iter()
            .filter(|s| !(200..300).contains(&s.status))
            .collect();
    eprintln!(
        "{} requests in all, {} failed: {failures:?}",
        w.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "no request fails");
}
