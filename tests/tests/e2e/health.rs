//! Control-plane health checks: instances registered by an operator with an
//! HTTP check turn unhealthy soon after their process dies, everywhere (the
//! registry and every sidecar following the service), and recover when it
//! comes back.

use std::time::{Duration, Instant};

use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, SidecarToml, eventually, status_of};

const SERVICE: &str = "checked";
/// The contract: a dead instance is seen as unhealthy within 2 s.
const DETECT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_turns_unhealthy_everywhere_and_recovers() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut echoes = Vec::new();
    let mut ids = Vec::new();
    for n in 0..3 {
        let echo = EchoHttp::start(&format!("checked-{n}")).await;
        let port = echo.port();
        let check = echo.health_url();
        let id = cp
            .register(
                SERVICE,
                "127.0.0.1",
                port,
                &["--check", &check, "--interval", "200ms"],
            )
            .await;
        ids.push(id);
        echoes.push(echo);
    }
    let sidecars = [
        SidecarToml::new("client-a", &cp.grpc_url())
            .upstream(SERVICE)
            .start()
            .await,
        SidecarToml::new("client-b", &cp.grpc_url())
            .upstream(SERVICE)
            .start()
            .await,
    ];

    // Everything healthy, in the registry and in both sidecars.
    eventually(
        Duration::from_secs(10),
        "all healthy in isdpctl",
        || async {
            let list = cp.instances(SERVICE).await?;
            anyhow::ensure!(list.len() == 3, "expected 3 instances: {list:?}");
            for id in &ids {
                anyhow::ensure!(
                    status_of(&list, id)? == "healthy",
                    "{id} not healthy: {list:?}"
                );
            }
            Ok(())
        },
    )
    .await;
    for sc in &sidecars {
        eventually(
            Duration::from_secs(10),
            "all healthy in sidecar",
            || async {
                let eps = sc.endpoints(SERVICE).await?;
                for id in &ids {
                    anyhow::ensure!(status_of(&eps, id)? == "healthy", "{id}: {eps:?}");
                }
                Ok(())
            },
        )
        .await;
    }

    // Kill one: unhealthy within 2 s in isdpctl and in both sidecars.
    let victim = ids[1].clone();
    let killed_at = Instant::now();
    echoes[1].kill9().await;
    eventually(DETECT * 2, "victim unhealthy in isdpctl", || async {
        let list = cp.instances(SERVICE).await?;
        anyhow::ensure!(status_of(&list, &victim)? == "unhealthy", "{list:?}");
        Ok(())
    })
    .await;
    let in_registry = killed_at.elapsed();
    for sc in &sidecars {
        eventually(DETECT * 2, "victim unhealthy in sidecar", || async {
            let eps = sc.endpoints(SERVICE).await?;
            anyhow::ensure!(status_of(&eps, &victim)? == "unhealthy", "{eps:?}");
            Ok(())
        })
        .await;
    }
    let in_sidecars = killed_at.elapsed();
    eprintln!(
        "death seen by the registry after {in_registry:?}, by both sidecars after {in_sidecars:?}"
    );
    assert!(
        in_registry <= DETECT,
        "registry saw the death after {in_registry:?}"
    );
    assert!(
        in_sidecars <= DETECT,
        "sidecars saw the death after {in_sidecars:?}"
    );

    // The other two stay healthy.
    let list = cp.instances(SERVICE).await.expect("instances");
    for id in [&ids[0], &ids[2]] {
        assert_eq!(status_of(&list, id).unwrap(), "healthy", "{list:?}");
    }

    // Bring it back on the same port: healthy again everywhere.
    echoes[1].restart().await;
    eventually(
        Duration::from_secs(5),
        "victim healthy again in isdpctl",
        || async {
            let list = cp.instances(SERVICE).await?;
            anyhow::ensure!(status_of(&list, &victim)? == "healthy", "{list:?}");
            Ok(())
        },
    )
    .await;
    for sc in &sidecars {
        eventually(
            Duration::from_secs(5),
            "victim healthy again in sidecar",
            || async {
                let eps = sc.endpoints(SERVICE).await?;
                anyhow::ensure!(status_of(&eps, &victim)? == "healthy", "{eps:?}");
                Ok(())
            },
        )
        .await;
    }
}
