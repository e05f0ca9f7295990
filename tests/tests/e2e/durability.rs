//! Durability: the registry survives a control-plane crash (kill -9) through
//! its data dir, and sidecars keep serving their last endpoints meanwhile.

use std::time::Duration;

use isdp_tests::{ControlPlane, ControlPlaneOpts, SidecarToml, eventually, find_by_id, holds_for};

const SERVICE: &str = "ledger";
const COUNT: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_survives_kill9_and_sidecars_keep_endpoints() {
    let mut cp = ControlPlane::start(ControlPlaneOpts::default()).await;

    // 50 instances, no checks (they stay "unknown" and routable). Ports need
    // not be listening: nothing probes them.
    let mut ids = Vec::with_capacity(COUNT);
    for n in 0..COUNT {
        let port = 20_000 + n as u16;
        let id = format!("ledger-{n:02}");
        let got = cp
            .register(SERVICE, "127.0.0.1", port, &["--id", &id])
            .await;
        assert_eq!(got, id, "isdpctl register printed another id");
        ids.push(id);
    }
    let listed = cp.instances(SERVICE).await.expect("instances");
    assert_eq!(listed.len(), COUNT, "{listed:?}");

    let sidecar = SidecarToml::new("ledger-client", &cp.grpc_url())
        .upstream(SERVICE)
        .start()
        .await;
    eventually(
        Duration::from_secs(10),
        "sidecar has all 50 endpoints",
        || async {
            let eps = sidecar.endpoints(SERVICE).await?;
            anyhow::ensure!(eps.len() == COUNT, "{} endpoints", eps.len());
            Ok(())
        },
    )
    .await;

    // Crash the control plane: the sidecar keeps what it had.
    cp.kill9().await;
    holds_for(
        Duration::from_secs(3),
        "sidecar endpoints while the control plane is down",
        || async {
            let eps = sidecar.endpoints(SERVICE).await?;
            anyhow::ensure!(eps.len() == COUNT, "{} endpoints", eps.len());
            Ok(())
        },
    )
    .await;
    let config = sidecar.config_json().await.expect("/config");
    assert_eq!(
        config["control_plane"]["connected"], false,
        "sidecar should notice the control plane is gone: {config}"
    );

    // Restart on the same data dir and port: every registration is back.
    cp.restart().await;
    let listed = cp
        .instances(SERVICE)
        .await
        .expect("instances after restart");
    assert_eq!(listed.len(), COUNT, "after restart: {listed:?}");
    for id in &ids {
        let inst = find_by_id(&listed, id).unwrap_or_else(|| panic!("{id} lost in restart"));
        assert_eq!(inst["service"], SERVICE);
        assert_eq!(inst["address"], "127.0.0.1");
    }

    // A registration made after the restart reaches the (reconnected) sidecar.
    let late = cp
        .register(SERVICE, "127.0.0.1", 21_000, &["--id", "ledger-late"])
        .await;
    eventually(
        Duration::from_secs(20),
        "sidecar sees the post-restart registration",
        || async {
            let eps = sidecar.endpoints(SERVICE).await?;
            anyhow::ensure!(
                find_by_id(&eps, &late).is_some(),
                "{} endpoints, no {late}",
                eps.len()
            );
            anyhow::ensure!(eps.len() == COUNT + 1, "{} endpoints", eps.len());
            Ok(())
        },
    )
    .await;
    let config = sidecar.config_json().await.expect("/config");
    assert_eq!(config["control_plane"]["connected"], true, "{config}");
    assert!(
        config["control_plane"]["reconnects"].as_u64().unwrap_or(0) >= 1,
        "reconnect not counted: {config}"
    );
}
