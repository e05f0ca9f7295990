//! Load weights end to end: three `catalog` instances (`echo-http`) behind
//! their sidecars, a `web` sidecar proxying `catalog` under steady
//! concurrent load. Every instance reports (ORCA) a utilisation that
//! follows its traffic; one turns ten times as costly per request and
//! back. The control plane turns the sidecars' load reports into weights
//! pushed with the endpoints: the costly instance's share falls, the
//! weights `isdpctl instances`, web's `/config` and the standard
//! assignment (what Envoy and proxyless gRPC read) show agree, and its
//! share comes back once its cost does.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
    service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use isdp_control_plane::publish::standard::CLUSTER_LOAD_ASSIGNMENT;
use isdp_tests::load::{CatalogMesh, SERVICE};
use isdp_tests::{ControlPlaneOpts, bearer, eventually, find_by_id};
use prost::Message;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;

/// Utilisation per request per second: at ~500 requests per second an
/// instance reports 0.5; the costly one ten times that per request.
const CHEAP: f64 = 0.001;
const COSTLY: f64 = 0.01;
/// Short, so the test does not wait the default 10 s.
const BLACKOUT: &str = "2s";

/// cat-`i`'s endpoint in web's `/config`.
async fn web_endpoint(mesh: &CatalogMesh, i: usize) -> anyhow::Result<serde_json::Value> {
    let eps = mesh.web.endpoints(SERVICE).await?;
    find_by_id(&eps, &format!("cat-{i}.catalog"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("cat-{i} not in {eps:?}"))
}

/// The pushed weight of cat-`i` at web.
async fn weight(mesh: &CatalogMesh, i: usize) -> anyhow::Result<u64> {
    let e = web_endpoint(mesh, i).await?;
    e["weight"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no weight: {e}"))
}

/// The endpoint weights of the standard assignment of `catalog`, by
/// instance id, as one state-of-the-world request reads them.
async fn standard_weights(mesh: &CatalogMesh) -> anyhow::Result<BTreeMap<String, u32>> {
    let channel = InterceptedService::new(mesh.cp.channel().await, bearer(mesh.cp.admin_token()));
    let request = DiscoveryRequest {
        node: Some(Node {
            id: "load-weights-reader".into(),
            ..Default::default()
        }),
        type_url: CLUSTER_LOAD_ASSIGNMENT.into(),
        resource_names: vec![SERVICE.into()],
        ..Default::default()
    };
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
    let any = response
        .resources
        .first()
        .ok_or_else(|| anyhow::anyhow!("no assignment"))?;
    let assignment = ClusterLoadAssignment::decode(any.value.as_slice())?;
    Ok(assignment
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => Some((
                ep.hostname.clone(),
                e.load_balancing_weight.map_or(0, |w| w.value),
            )),
            _ => None,
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_costly_instance_loses_its_share_and_wins_it_back() {
    let mesh = CatalogMesh::start_with(
        3,
        "load_aware",
        ControlPlaneOpts {
            extra_args: vec!["--load-weight-blackout".into(), BLACKOUT.into()],
            ..ControlPlaneOpts::default()
        },
    )
    .await;
    for i in 0..3 {
        mesh.cost(i, CHEAP).await;
    }
    let load = mesh.load();
    let start = Instant::now();
    // Every endpoint weighed by load, not by default.
    eventually(Duration::from_secs(20), "weights from load", || async {
        for i in 0..3 {
            let e = web_endpoint(&mesh, i).await?;
            let reason = e["weight_reason"].as_str().unwrap_or_default();
            anyhow::ensure!(reason.starts_with("load:"), "cat-{i}: {e}");
        }
        Ok(())
    })
    .await;
    let even = load
        .window_after(
            Instant::now(),
            Duration::from_secs(1),
            Duration::from_secs(4),
        )
        .await;
    let weights_even = [
        weight(&mesh, 0).await.unwrap(),
        weight(&mesh, 1).await.unwrap(),
        weight(&mesh, 2).await.unwrap(),
    ];
    eprintln!(
        "all equal: weights {weights_even:?}, shares {}",
        even.describe(3)
    );
    assert!(even.len() > 300, "the load runs: {}", even.describe(3));
    for i in 0..3 {
        let share = even.share(&format!("cat-{i}"));
        assert!(share > 0.2, "cat-{i} has {share}: {}", even.describe(3));
    }

    mesh.cost(0, COSTLY).await;
    let costly = Instant::now();
    let took = eventually(Duration::from_secs(30), "cat-0's weight falls", || async {
        let w = weight(&mesh, 0).await?;
        anyhow::ensure!(w < 40, "cat-0 still weighs {w}");
        Ok(())
    })
    .await;
    eprintln!("cat-0 costly: its weight fell under 40 after {took:?}");
    let fallen = load
        .window_after(
            Instant::now(),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .await;
    let weights_fallen = [
        weight(&mesh, 0).await.unwrap(),
        weight(&mesh, 1).await.unwrap(),
        weight(&mesh, 2).await.unwrap(),
    ];
    eprintln!(
        "cat-0 costly: weights {weights_fallen:?}, shares {}",
        fallen.describe(3)
    );
    assert!(
        fallen.share("cat-0") < 0.2,
        "the costly instance keeps too much: {}",
        fallen.describe(3)
    );
    for i in 1..3 {
        let share = fallen.share(&format!("cat-{i}"));
        assert!(share > 0.35, "cat-{i} has {share}: {}", fallen.describe(3));
    }

    // What isdpctl shows is what web balances with, and what Envoy and
    // proxyless gRPC clients are sent.
    eventually(
        Duration::from_secs(10),
        "isdpctl and the standard assignment agree with web",
        || async {
            let list = mesh.cp.instances(SERVICE).await?;
            let standard = standard_weights(&mesh).await?;
            for i in 0..3 {
                let id = format!("cat-{i}.catalog");
                let shown = find_by_id(&list, &id).map(|v| v["load"].clone());
                let shown = shown.ok_or_else(|| anyhow::anyhow!("{id} not in {list:?}"))?;
                let e = web_endpoint(&mesh, i).await?;
                anyhow::ensure!(shown["lb_weight"] == e["weight"], "{id}: {shown} vs {e}");
                anyhow::ensure!(
                    shown["reason"] == e["weight_reason"],
                    "{id}: {shown} vs {e}"
                );
                anyhow::ensure!(e["weight_in_force"] == e["weight"], "{id} in force: {e}");
                anyhow::ensure!(e["operator_weight"] == 1, "{id}: {e}");
                anyhow::ensure!(
                    standard.get(&id).map(|w| u64::from(*w)) == e["weight"].as_u64(),
                    "{id}: standard {standard:?} vs {e}"
                );
            }
            Ok(())
        },
    )
    .await;
    // The sidecar's own account, per endpoint: the weight in force and
    // why, as `isdpctl proxy-status --sidecar` prints it.
    let admin = mesh.web.admin_addr().to_owned();
    let args = [
        "proxy-status",
        "--sidecar",
        admin.as_str(),
        "--upstream",
        SERVICE,
    ];
    let shown = mesh.cp.ctl_ok(&args).await;
    eprintln!("isdpctl proxy-status --sidecar (web):\n{shown}");
    let json_args = [&args[..], &["-o", "json"]].concat();
    let json: serde_json::Value = serde_json::from_str(&mesh.cp.ctl_ok(&json_args).await).unwrap();
    let eps = json[SERVICE]["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 3, "{json}");
    for e in eps {
        let id = e["id"].as_str().unwrap();
        let why = e["why"].as_str().unwrap();
        assert!(why.starts_with("load: util"), "{id}: {why}");
        let row = shown
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} not in\n{shown}"));
        let in_force = e["weight_in_force"].as_u64().expect("balanced");
        assert!(
            row.split_whitespace().any(|c| c == in_force.to_string()),
            "{id}'s weight {in_force} not in {row:?}"
        );
    }
    // Asked of an address where no sidecar listens, or of an upstream the
    // sidecar does not have: a clear error, not an empty table.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    for (args, want) in [
        (
            vec!["proxy-status", "--sidecar", closed_addr.as_str()],
            "sidecar admin",
        ),
        (
            vec![
                "proxy-status",
                "--sidecar",
                admin.as_str(),
                "--upstream",
                "nope",
            ],
            "has no such upstream (it has: catalog)",
        ),
    ] {
        let out = mesh.cp.ctl(&args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    let table = mesh.cp.ctl_ok(&["instances", SERVICE]).await;
    eprintln!("isdpctl instances {SERVICE}:\n{table}");
    assert!(
        table.contains("LB WEIGHT") && table.contains("REASON"),
        "{table}"
    );
    let metrics = isdp_tests::http::get(mesh.cp.admin_addr(), "/metrics")
        .await
        .unwrap();
    let series = metrics
        .body
        .lines()
        .filter(|l| {
            l.starts_with("isdp_instance_weight{")
                || l.starts_with("isdp_instance_load_utilization{")
        })
        .count();
    assert_eq!(series, 6, "two series per instance:\n{}", metrics.body);

    mesh.cost(0, CHEAP).await;
    let cheap = Instant::now();
    let recovered = eventually(Duration::from_secs(40), "cat-0's weight back", || async {
        let w = weight(&mesh, 0).await?;
        anyhow::ensure!(w > 85, "cat-0 weighs {w}");
        Ok(())
    })
    .await;
    let back = load
        .window_after(
            Instant::now(),
            Duration::from_secs(1),
            Duration::from_secs(4),
        )
        .await;
    let weights_back = [
        weight(&mesh, 0).await.unwrap(),
        weight(&mesh, 1).await.unwrap(),
        weight(&mesh, 2).await.unwrap(),
    ];
    eprintln!(
        "cat-0 cheap again: weight back over 85 after {recovered:?}; weights {weights_back:?}, shares {}",
        back.describe(3)
    );
    assert!(
        back.share("cat-0") > 0.2,
        "the instance is not back: {}",
        back.describe(3)
    );
    let _ = (costly, cheap);

    let all = load.window(start, Instant::now());
    assert_eq!(all.failed(), 0, "no request fails: {}", all.describe(3));
}
