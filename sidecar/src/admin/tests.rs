use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::config::Config;
use crate::xds::{Endpoint, UpstreamState};
use isdp_core::probe::Health;

/// A minimal HTTP/1.1 GET; returns (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn live_ready_and_config() {
    let config = Config::from_toml(
        "node_id = \"web-1\"\nca_file = \"/ca.pem\"\njoin_token = \"t\"\n[[service]]\nname = \"web\"\nport = 8080\n[[upstream]]\nname = \"payments\"\n",
    )
    .unwrap();
    let session = Session::new(&config);
    let (xds_tx, xds) = watch::channel(Arc::new(Snapshot::default()));
    let metrics = crate::metrics::Metrics::new();
    metrics.register_collector(super::StateCollector {
        identities: None,
        snapshots: xds.clone(),
        session: session.clone(),
        upstreams: None,
    });
    let state = AdminState {
        session: session.clone(),
        xds,
        has_upstreams: true,
        identities: None,
        listeners: None,
        upstreams: None,
        relay: None,
        metrics,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, shutdown) = watch::channel(false);
    let server = tokio::spawn(serve(
        listener,
        state,
        crate::config::Limits::default(),
        shutdown,
    ));

    assert_eq!(get(addr, "/live").await, (200, "ok".to_owned()));
    let (status, body) = get(addr, "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("xDS"), "{body}");

    let mut snapshot = Snapshot {
        ready: true,
        connected: true,
        control_plane: Some("http://127.0.0.1:15010".into()),
        acks: 3,
        ..Default::default()
    };
    snapshot.acked.insert("payments".into(), "abc".into());
    snapshot
        .authz_policies
        .insert("web".into(), isdp_proto::v1::AuthorizationPolicy::default());
    snapshot.upstreams.insert(
        "payments".into(),
        UpstreamState {
            exists: true,
            version: "abc".into(),
            endpoints: vec![Endpoint {
                id: "pay-1.payments".into(),
                address: "127.0.0.1".into(),
                port: 8081,
                inbound_port: 0,
                weight: 1,
                operator_weight: 1,
                weight_reason: "operator".into(),
                metadata: [("version".to_string(), "v1".to_string())].into(),
                health: Health::Healthy,
                zone: String::new(),
                priority: 0,
            }],
        },
    );
    xds_tx.send_replace(Arc::new(snapshot));
    let (status, body) = get(addr, "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("session"), "{body}");

    session.set_status(|s| s.opened = true);
    session.set_health(0, Health::Unhealthy);
    assert_eq!(get(addr, "/ready").await.0, 200);

    // Refused by the control plane (its token revoked): says so.
    xds_tx.send_modify(|s| {
        Arc::make_mut(s).refused = Some("token 0123456789abcdef was revoked".into())
    });
    let (status, body) = get(addr, "/ready").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("refuses this sidecar: token 0123456789abcdef was revoked"),
        "{body}"
    );
    xds_tx.send_modify(|s| Arc::make_mut(s).refused = None);
    assert_eq!(get(addr, "/ready").await.0, 200);

    let (status, body) = get(addr, "/config").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["node_id"], "web-1");
    assert_eq!(json["control_plane"]["connected"], true);
    assert_eq!(json["control_plane"]["url"], "http://127.0.0.1:15010");
    assert_eq!(json["control_plane"]["reconnects"], 0);
    assert_eq!(
        json["services"],
        serde_json::json!([{"id": "web-1.web", "name": "web", "port": 8080, "status": "unhealthy",
            "in_flight": 0, "latency_ms": null, "application_utilization": null}])
    );
    assert_eq!(
        json["upstreams"]["payments"],
        serde_json::json!({"exists": true, "version": "abc", "lb": null, "panic": null,
            "policy_version": null, "concurrency_limit": null, "concurrency_in_flight": null,
            "concurrency_min_rtt_ms": null, "caller_zone": null, "levels": [],
            "endpoints": [{
            "id": "pay-1.payments", "address": "127.0.0.1", "port": 8081, "inbound_port": 0, "weight": 1,
            "weight_in_force": null, "operator_weight": 1, "weight_reason": "operator",
            "metadata": {"version": "v1"}, "status": "healthy", "ejected": false, "ejections": 0, "ejected_for": null,
            "in_flight": null, "latency_ms": null, "zone": "", "priority": 0, "level": null}]})
    );
    assert_eq!(json["xds"]["acked"]["payments"], "abc");
    assert_eq!(json["xds"]["acks"], 3);
    assert_eq!(json["xds"]["nacks"], 0);
    assert_eq!(
        json["xds_relay"],
        serde_json::json!({"enabled": false, "listen": null, "max_streams": null,
            "open_streams": 0, "streams": []})
    );

    let (status, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "isdp_xds_connected 1",
        "isdp_xds_acks_total 3",
        "isdp_xds_nacks_total 0",
        "isdp_xds_resources_acked 1",
        r#"isdp_upstream_endpoints{service="payments",health="healthy"} 1"#,
        r#"isdp_upstream_endpoints{service="payments",health="unhealthy"} 0"#,
        "isdp_session_connected 0",
        "isdp_local_services 1",
        "isdp_trace_spans_dropped_total ",
        "isdp_upstreams_configured 0",
        r#"isdp_local_service_health{service="web",health="unhealthy"} 1"#,
        r#"isdp_local_service_health{service="web",health="healthy"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    stop.send(true).unwrap();
    server.await.unwrap();
}

/// `/ready` says why the certificates keep the sidecar out: none yet, one
/// the control plane refuses, one issued under a revoked token.
#[test]
fn readiness_names_the_identity_problem() {
    use crate::identity::{Identities, Identity};
    let ca = crate::tls::test_pki::TestCa::new("mesh");
    let identity = |grant: &str| {
        Arc::new(Identity {
            service: "web".into(),
            spiffe_id: "spiffe://mesh.test/svc/web".into(),
            trust_domain: "mesh.test".into(),
            key: ca.service("mesh.test", "web").key,
            pem: None,
            not_after: std::time::SystemTime::now() + std::time::Duration::from_secs(60),
            grant: Some(grant.into()),
        })
    };
    let mut ids = Identities {
        primary: Some("web".into()),
        ..Default::default()
    };
    let why = identity_problem(&ids, &[]).unwrap();
    assert!(why.contains("waiting for a workload certificate"), "{why}");
    ids.refused
        .insert("web".into(), "token 0123456789abcdef was revoked".into());
    let why = identity_problem(&ids, &[]).unwrap();
    assert!(
        why.contains("refuses a workload certificate for web"),
        "{why}"
    );
    assert!(why.contains("0123456789abcdef"), "{why}");

    ids.refused.clear();
    ids.by_service
        .insert("web".into(), identity("0123456789abcdef"));
    assert_eq!(identity_problem(&ids, &[]), None);
    assert_eq!(identity_problem(&ids, &["fedcba9876543210".into()]), None);
    let why = identity_problem(&ids, &["0123456789abcdef".into()]).unwrap();
    assert!(why.contains("issued under token 0123456789abcdef"), "{why}");
    assert!(why.contains("revoked"), "{why}");

    // Held, but its renewal refused: it will not be replaced.
    ids.refused.insert("web".into(), "revoked".into());
    let why = identity_problem(&ids, &[]).unwrap();
    assert!(why.contains("refuses to renew"), "{why}");
}
