//! The mesh the balancing tests and bench load: `catalog` instances
//! (`echo-http`, `cat-0..n`) behind their sidecars and a `web` sidecar
//! proxying `catalog` with a chosen balancer.

use std::time::Duration;

use super::Load;
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
        let cp = ControlPlane::start(opts).await;
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
