//! Quotas per service, session and principal, each refused with
//! RESOURCE_EXHAUSTED naming its flag and limit, changing nothing; and one
//! service growing its `ServiceEndpoints` resource cannot break the xDS
//! stream of the sidecars that follow it, nor keep new ones from becoming
//! ready.

use std::time::Duration;

use isdp_proto::v1::{Instance, RegisterRequest, registry_client::RegistryClient};
use isdp_tests::{ControlPlane, ControlPlaneOpts, SidecarToml, bearer, eventually, holds_for};
use tonic::{Code, Status};

use super::ownership::{RawSession, join_token, sidecar_instance};

/// Registers `instance` through `isdp.v1.Registry/Register` as the admin.
async fn register(cp: &ControlPlane, instance: Instance) -> Result<(), Status> {
    RegistryClient::with_interceptor(cp.channel().await, bearer(cp.admin_token()))
        .register(RegisterRequest {
            instance: Some(instance),
        })
        .await
        .map(drop)
}

/// An operator's instance of `service` with `entries` metadata entries of
/// `value` bytes each.
fn with_metadata(service: &str, id: &str, entries: usize, value: usize) -> Instance {
    Instance {
        id: id.into(),
        service: service.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        metadata: (0..entries)
            .map(|n| (format!("k{n:03}"), "v".repeat(value)))
            .collect(),
        ..Default::default()
    }
}

/// Checks `result` is RESOURCE_EXHAUSTED naming `flag (limit)`.
fn exhausted<T>(result: Result<T, Status>, flag_and_limit: &str) {
    match result {
        Err(s) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s}");
            assert!(
                s.message().contains(&format!("quota {flag_and_limit}")),
                "{flag_and_limit}: {s}"
            );
        }
        Ok(_) => panic!("{flag_and_limit}: accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_quota_is_resource_exhausted_naming_its_limit_and_changes_nothing() {
    let args = [
        "--max-instances-per-service=3",
        "--max-metadata-bytes-per-instance=1000",
        "--max-metadata-bytes-per-service=1500",
        "--max-instances-per-session=1",
        "--max-sessions-per-principal=2",
    ];
    let cp = ControlPlane::start(ControlPlaneOpts {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .await;

    // Instances per service: operator and sidecar registrations together.
    for n in 0..2 {
        register(&cp, with_metadata("counted", &format!("c{n}"), 0, 0))
            .await
            .unwrap();
    }
    let web = join_token(&cp, "counted").await;
    let (_third, _) = RawSession::open(&cp, &web, "node-a", vec![sidecar_instance("counted", 1)])
        .await
        .expect("the third instance");
    exhausted(
        register(&cp, with_metadata("counted", "c3", 0, 0)).await,
        "--max-instances-per-service (3)",
    );
    exhausted(
        RawSession::open(&cp, &web, "node-b", vec![sidecar_instance("counted", 1)]).await,
        "--max-instances-per-service (3)",
    );
    // Replacing an instance is no growth.
    register(&cp, with_metadata("counted", "c1", 1, 10))
        .await
        .expect("re-registering an instance");

    // Metadata bytes per instance (keys + values), then per service.
    exhausted(
        register(&cp, with_metadata("meta", "m0", 2, 500)).await,
        "--max-metadata-bytes-per-instance (1000)",
    );
    register(&cp, with_metadata("meta", "m0", 9, 100))
        .await
        .unwrap();
    exhausted(
        register(&cp, with_metadata("meta", "m1", 9, 100)).await,
        "--max-metadata-bytes-per-service (1500)",
    );

    // Instances per session.
    let admin = cp.admin_token().to_owned();
    exhausted(
        RawSession::open(
            &cp,
            &admin,
            "node-c",
            vec![sidecar_instance("one", 1), sidecar_instance("two", 2)],
        )
        .await,
        "--max-instances-per-session (1)",
    );

    // Sessions per principal: the token's third open session; another
    // token has its own count; closing one frees a place.
    let pay = join_token(&cp, "pay").await;
    let (first, _) = RawSession::open(&cp, &pay, "p-1", vec![sidecar_instance("pay", 1)])
        .await
        .unwrap();
    let (_second, _) = RawSession::open(&cp, &pay, "p-2", vec![sidecar_instance("pay", 1)])
        .await
        .unwrap();
    exhausted(
        RawSession::open(&cp, &pay, "p-3", vec![sidecar_instance("pay", 1)]).await,
        "--max-sessions-per-principal (2)",
    );
    let other = join_token(&cp, "pay").await;
    let (_other, _) = RawSession::open(&cp, &other, "p-4", vec![sidecar_instance("pay", 1)])
        .await
        .expect("another token's session");

    // Nothing refused was stored.
    let listed = |service: &'static str| {
        let cp = &cp;
        async move {
            let list = cp.instances(service).await.expect("instances");
            let mut ids: Vec<String> = list
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_owned())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(listed("counted").await, ["c0", "c1", "node-a.counted"]);
    assert_eq!(listed("meta").await, ["m0"]);
    assert!(listed("one").await.is_empty());
    assert_eq!(listed("pay").await, ["p-1.pay", "p-2.pay", "p-4.pay"]);

    first.close().await;
    RawSession::open(&cp, &pay, "p-3", vec![sidecar_instance("pay", 1)])
        .await
        .expect("a place freed by the close");
}

/// 64 metadata entries with 128-character keys and 512-byte values: the
/// most one instance may carry by the per-entry rules (~41 KiB encoded).
fn maximal(service: &str, id: &str, port: u32) -> Instance {
    Instance {
        id: id.into(),
        service: service.into(),
        address: "127.0.0.1".into(),
        port,
        inbound_port: 15006,
        metadata: (0..64)
            .map(|n| (format!("k{n:0127}"), "v".repeat(512)))
            .collect(),
        ..Default::default()
    }
}

/// A sidecar's xDS connection state from `/config`: (connected, reconnects).
async fn xds_state(sidecar: &isdp_tests::Sidecar) -> anyhow::Result<(bool, u64)> {
    let c = sidecar.config_json().await?;
    let cp = &c["control_plane"];
    Ok((
        cp["connected"].as_bool().unwrap_or(false),
        cp["reconnects"].as_u64().unwrap_or(u64::MAX),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_service_cannot_break_the_xds_streams_of_its_callers() {
    // Metadata quotas out of the way: the bound on the encoded resource
    // is what must hold here.
    let cp = ControlPlane::start(ControlPlaneOpts {
        extra_args: vec![
            "--max-metadata-bytes-per-instance=65536".into(),
            "--max-metadata-bytes-per-service=67108864".into(),
        ],
        ..Default::default()
    })
    .await;
    cp.register("small", "127.0.0.1", 7000, &["--id", "small-1"])
        .await;
    let caller = SidecarToml::new("caller", &cp.grpc_url())
        .upstream("big")
        .upstream("small")
        .start()
        .await;
    caller.wait_ready(Duration::from_secs(20)).await;

    // 110 maximal instances of `big` (about 4.5 MiB of endpoints, past
    // the 4 MiB a sidecar used to decode): the first half through the
    // operator API, the rest through sidecar sessions.
    let mut accepted = 0;
    let mut refusals = Vec::new();
    for n in 0..55u32 {
        match register(&cp, maximal("big", &format!("op-{n}"), 20_000 + n)).await {
            Ok(()) => accepted += 1,
            Err(s) => refusals.push(s),
        }
    }
    let token = join_token(&cp, "big").await;
    let mut sessions = Vec::new();
    for n in 0..55u32 {
        let node = format!("big-{n}");
        match RawSession::open(&cp, &token, &node, vec![maximal("big", "", 21_000 + n)]).await {
            Ok((s, _)) => {
                accepted += 1;
                sessions.push(s);
            }
            Err(s) => refusals.push(s),
        }
    }
    eprintln!(
        "accepted {accepted} big instances, refused {}",
        refusals.len()
    );

    // The caller's stream stayed up and holds every accepted endpoint ...
    eventually(
        Duration::from_secs(20),
        "the caller holds big's endpoints",
        || async {
            let eps = caller.endpoints("big").await?;
            anyhow::ensure!(eps.len() == accepted, "{} of {accepted}", eps.len());
            Ok(())
        },
    )
    .await;
    let (connected, reconnects) = xds_state(&caller).await.expect("/config");
    assert!(
        connected && reconnects == 0,
        "caller's ADS stream broke: connected {connected}, reconnects {reconnects}"
    );
    // ... a new sidecar following big becomes ready ...
    let late = SidecarToml::new("late", &cp.grpc_url())
        .upstream("big")
        .start()
        .await;
    late.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(
        late.endpoints("big").await.expect("endpoints").len(),
        accepted
    );
    // ... and a change to another service still reaches the caller.
    cp.register("small", "127.0.0.1", 7001, &["--id", "small-2"])
        .await;
    eventually(
        Duration::from_secs(10),
        "small's new endpoint at the caller",
        || async {
            let eps = caller.endpoints("small").await?;
            anyhow::ensure!(eps.len() == 2, "{eps:?}");
            Ok(())
        },
    )
    .await;
    holds_for(
        Duration::from_secs(2),
        "the caller's stream stays up",
        || async {
            let (connected, reconnects) = xds_state(&caller).await?;
            anyhow::ensure!(
                connected && reconnects == 0,
                "connected {connected}, reconnects {reconnects}"
            );
            Ok(())
        },
    )
    .await;

    // The control plane refused what would have passed the bound, through
    // both APIs, naming the quota.
    assert!(
        !refusals.is_empty() && accepted > 0,
        "accepted {accepted}, refused {}",
        refusals.len()
    );
    for s in &refusals {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s}");
        assert!(
            s.message()
                .contains("quota --max-service-endpoints-bytes (1048576) exceeded"),
            "{s}"
        );
    }
    drop(sessions);
}
