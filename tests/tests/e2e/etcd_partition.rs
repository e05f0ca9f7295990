//! A control-plane replica cut off from etcd for longer than the session
//! timeout: etcd expires the leases of the sessions it holds and deletes
//! their instances, while the sidecars stay connected to the replica.
//! Once the partition heals, the replica's keep-alive finds the lease gone
//! and ends the session; the sidecar opens it again and its instance is
//! back, without anyone restarting anything.

use std::time::Duration;

use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, EtcdCluster, SidecarToml, TcpGate, eventually,
    find_by_id,
};

const SERVICE: &str = "partitioned";
const PROBE: Duration = Duration::from_millis(200);
const SESSION_TIMEOUT: Duration = Duration::from_secs(3);

async fn listed(cp: &ControlPlane, id: &str) -> anyhow::Result<bool> {
    let list = cp.instances(SERVICE).await?;
    Ok(find_by_id(&list, id).is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_etcd_past_the_session_timeout_gets_its_sidecars_registered_again() {
    let etcd = EtcdCluster::start(1).await;
    let gate = TcpGate::start(etcd.first_member()).await;
    let prefix = format!("/isdp-partition-{}/", std::process::id());

    // Replica A reaches etcd through the gate; B directly, and reads
    // what etcd holds throughout.
    let a_args = etcd.control_plane_args_through(&prefix, gate.addr());
    let opts = |extra_args: Vec<String>| ControlPlaneOpts {
        session_grace: Some(Duration::from_secs(1)),
        session_timeout: Some(SESSION_TIMEOUT),
        extra_args,
    };
    let b = ControlPlane::start(opts(etcd.control_plane_args(&prefix))).await;
    let a = ControlPlane::start(opts(a_args)).await;

    let echo = EchoHttp::start("part-1").await;
    let sidecar = SidecarToml::new("part-1", &a.grpc_url())
        .service(SERVICE, echo.port(), PROBE)
        .start()
        .await;
    let id = format!("part-1.{SERVICE}");
    eventually(Duration::from_secs(10), "registered, seen by B", || async {
        anyhow::ensure!(listed(&b, &id).await?, "not listed");
        Ok(())
    })
    .await;

    // The partition outlasts the session timeout: etcd expires the lease
    // and the instance goes, though the sidecar's session never broke.
    gate.cut();
    eventually(
        SESSION_TIMEOUT * 4,
        "the instance expired in etcd",
        || async {
            anyhow::ensure!(!listed(&b, &id).await?, "still listed");
            Ok(())
        },
    )
    .await;

    gate.heal();
    let took = eventually(
        Duration::from_secs(15),
        "the instance registered again",
        || async {
            anyhow::ensure!(listed(&b, &id).await?, "not listed");
            Ok(())
        },
    )
    .await;
    eprintln!("partition healed -> registered again after {took:?}");
    // The sidecar reopened its session rather than restarting.
    let config = sidecar.config_json().await.expect("/config");
    assert!(
        config["session"]["reconnects"].as_u64().unwrap_or(0) >= 1,
        "{config}"
    );
}
