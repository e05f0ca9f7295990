//! The sidecar's xDS relay end to end: a real control plane, a sidecar
//! joined with a token scoped to `web` and its upstream `payments`, its
//! relay on a loopback port (or a unix socket), and the standard
//! `envoy-types` ADS client connecting to the relay in plaintext, as a
//! proxyless client limited to `insecure` credentials (grpc-js) does.
//!
//! What the relayed client reads is what the sidecar's principal may read
//! (the control plane applies the token's scope), its ACKs and NACKs reach
//! the control plane under its own node id, the relay's stream cap holds,
//! a lost control plane ends the stream UNAVAILABLE until it is back, and
//! a relay others could reach is refused at startup.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL as EPS, ServiceEndpoints};
use isdp_tests::{ControlPlane, ControlPlaneOpts, Sidecar, SidecarToml, eventually};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

const WAIT: Duration = Duration::from_secs(10);

// === The mesh ===

/// A control plane with `payments` and `billing` registered, and a
/// sidecar relaying xDS under a join token for `web` that reads only
/// `payments` besides its own.
struct Mesh {
    cp: ControlPlane,
    /// The sidecar's token id: the principal the control plane shows.
    token_id: String,
    sidecar: Sidecar,
}

async fn mesh(listen: &str, max_streams: Option<usize>) -> Mesh {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let token = cp
        .create_token(&[
            "--role",
            "join",
            "--service",
            "web",
            "--upstream",
            "payments",
        ])
        .await;
    cp.register("payments", "127.0.0.1", 8001, &[]).await;
    cp.register("billing", "127.0.0.1", 9001, &[]).await;
    let sidecar = SidecarToml::new("web", &cp.grpc_url())
        .join_token(&token.secret)
        .xds_relay(listen, max_streams)
        .start()
        .await;
    Mesh {
        cp,
        token_id: token.id,
        sidecar,
    }
}

/// A plaintext (h2c) client of the relay at `addr`, as grpc-js with
/// `insecure` channel credentials connects.
async fn relay_client(addr: &str) -> AggregatedDiscoveryServiceClient<Channel> {
    let channel = tokio::time::timeout(
        WAIT,
        Channel::from_shared(format!("http://{addr}"))
            .expect("relay URL")
            .connect(),
    )
    .await
    .expect("connecting to the relay timed out")
    .expect("connect to the relay");
    AggregatedDiscoveryServiceClient::new(channel)
}

// === Streams ===

/// One ADS stream through the relay: requests in, responses (or the
/// status that ends it) out.
struct Ads<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Result<Streaming<Resp>, Status>,
}

impl<Req, Resp> Ads<Req, Resp> {
    async fn send(&self, req: Req) {
        self.tx.send(req).await.expect("the request stream is open");
    }

    async fn next(&mut self, what: &str) -> Resp {
        let rx = self
            .rx
            .as_mut()
            .unwrap_or_else(|s| panic!("{what}: refused: {s:?}"));
        match tokio::time::timeout(WAIT, rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("{what}: the stream ended"),
            Ok(Err(s)) => panic!("{what}: the stream failed: {s:?}"),
            Err(_) => panic!("{what}: no response within {WAIT:?}"),
        }
    }

    /// The status the stream ends with, on opening or after.
    async fn error(&mut self, what: &str) -> Status {
        let rx = match &mut self.rx {
            Err(s) => return s.clone(),
            Ok(rx) => rx,
        };
        match tokio::time::timeout(WAIT, rx.message()).await {
            Ok(Err(s)) => s,
            Ok(Ok(Some(_))) => panic!("{what}: expected the stream to fail, got a response"),
            Ok(Ok(None)) => panic!("{what}: expected the stream to fail, it ended with OK"),
            Err(_) => panic!("{what}: expected the stream to fail within {WAIT:?}"),
        }
    }
}

type Delta = Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

async fn delta(client: &mut AggregatedDiscoveryServiceClient<Channel>, node_id: &str) -> Delta {
    let (tx, rx) = mpsc::channel(16);
    tx.send(subscribe(node_id, &["payments", "billing"]))
        .await
        .expect("queue the first request");
    let rx = tokio::time::timeout(
        WAIT,
        client.delta_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("the relay answered")
    .map(tonic::Response::into_inner);
    Ads { tx, rx }
}

fn subscribe(node_id: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: node_id.into(),
            ..Default::default()
        }),
        type_url: EPS.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    }
}

fn ack(r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

/// What a delta client holds: endpoints (instance ids) by service, and
/// every name it was told is absent.
#[derive(Default, Debug)]
struct Held {
    services: BTreeMap<String, Vec<String>>,
    absent: BTreeSet<String>,
}

impl Held {
    fn apply(&mut self, r: &DeltaDiscoveryResponse) {
        assert_eq!(r.type_url, EPS);
        for res in &r.resources {
            let any = res.resource.as_ref().expect("a resource with its body");
            let se = ServiceEndpoints::decode(any.value.as_slice()).expect("ServiceEndpoints");
            let ids = se.endpoints.iter().map(|e| e.instance_id.clone()).collect();
            self.services.insert(res.name.clone(), ids);
        }
        for name in &r.removed_resources {
            self.services.remove(name);
            self.absent.insert(name.clone());
        }
    }
}

/// Reads and ACKs responses until `done` holds for what the client holds.
async fn follow(ads: &mut Delta, held: &mut Held, what: &str, done: impl Fn(&Held) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(held) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {held:?}"
        );
        let r = ads.next(what).await;
        held.apply(&r);
        ads.send(ack(&r)).await;
    }
}

/// The `proxy-status` entry of `node_id`, if its stream is open.
async fn proxy_status(cp: &ControlPlane, node_id: &str) -> Option<serde_json::Value> {
    let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
    let all: serde_json::Value = serde_json::from_str(&out).expect("proxy-status JSON");
    all.as_array()?
        .iter()
        .find(|p| p["node_id"] == node_id)
        .cloned()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

// === Tests ===

/// A client of the relay reads a service in the sidecar token's scope
/// (`payments`) and its updates, and reads `billing`, registered but
/// outside the scope, as absent: the control plane applied the sidecar's
/// principal. Its ACK and then its NACK reach the control plane, which
/// shows them under the client's node id with the sidecar's token as
/// principal. State of the world is relayed too. The sidecar's `/config`
/// and metrics show the relayed stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_client_reads_the_sidecars_scope_and_its_acks_and_nacks_pass() {
    let m = mesh("127.0.0.1:0", None).await;
    let relay = m.sidecar.relay_addr().to_owned();
    assert!(relay.starts_with("127.0.0.1:"), "{relay}");
    let mut c = relay_client(&relay).await;
    let mut ads = delta(&mut c, "grpc-js-1").await;
    let mut held = Held::default();
    follow(&mut ads, &mut held, "payments, and billing absent", |h| {
        h.services.contains_key("payments") && h.absent.contains("billing")
    })
    .await;
    assert_eq!(held.services["payments"].len(), 1, "{held:?}");
    assert!(!held.services.contains_key("billing"), "{held:?}");

    let second = m.cp.register("payments", "127.0.0.1", 8002, &[]).await;
    follow(&mut ads, &mut held, "payments' second instance", |h| {
        h.services["payments"].contains(&second)
    })
    .await;
    // A change outside the scope reaches the client as nothing.
    m.cp.register("billing", "127.0.0.1", 9002, &[]).await;

    eventually(WAIT, "the relayed stream's ACK in proxy-status", || async {
        let p = proxy_status(&m.cp, "grpc-js-1")
            .await
            .ok_or_else(|| anyhow::anyhow!("grpc-js-1 not listed"))?;
        anyhow::ensure!(p["principal"] == m.token_id.as_str(), "{p}");
        let eps = &p["types"][0];
        anyhow::ensure!(
            eps["type_url"] == EPS && eps["acks"].as_u64() >= Some(2),
            "{p}"
        );
        anyhow::ensure!(eps["acked"]["payments"].is_string(), "{p}");
        Ok(())
    })
    .await;

    let third = m.cp.register("payments", "127.0.0.1", 8003, &[]).await;
    let r = ads.next("payments' third instance").await;
    held.apply(&r);
    assert!(held.services["payments"].contains(&third), "{held:?}");
    ads.send(DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: Code::InvalidArgument as i32,
            message: "rejected by the relayed client".into(),
            ..Default::default()
        }),
        ..ack(&r)
    })
    .await;
    eventually(WAIT, "the relayed NACK in proxy-status", || async {
        let p = proxy_status(&m.cp, "grpc-js-1")
            .await
            .ok_or_else(|| anyhow::anyhow!("grpc-js-1 not listed"))?;
        let eps = &p["types"][0];
        anyhow::ensure!(eps["nacks"] == 1, "{p}");
        anyhow::ensure!(eps["last_nack"] == "rejected by the relayed client", "{p}");
        anyhow::ensure!(p["principal"] == m.token_id.as_str(), "{p}");
        Ok(())
    })
    .await;

    let config = m.sidecar.config_json().await.expect("/config");
    let r = &config["xds_relay"];
    assert_eq!(r["enabled"], true, "{r}");
    assert_eq!(r["listen"], relay.as_str(), "{r}");
    assert_eq!(r["max_streams"], 64, "{r}");
    assert_eq!(r["open_streams"], 1, "{r}");
    assert_eq!(r["streams"][0]["node_id"], "grpc-js-1", "{r}");
    assert_eq!(r["streams"][0]["delta"], true, "{r}");
    assert_eq!(
        r["streams"][0]["control_plane"],
        m.cp.grpc_url().as_str(),
        "{r}"
    );

    // State of the world, on the same connection.
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "grpcio-1".into(),
            ..Default::default()
        }),
        type_url: EPS.into(),
        resource_names: vec!["payments".into(), "billing".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut sotw: Ads<DiscoveryRequest, DiscoveryResponse> = Ads {
        tx,
        rx: c
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner),
    };
    let r = sotw.next("the state of the world").await;
    let names: Vec<String> = r
        .resources
        .iter()
        .map(|any| {
            ServiceEndpoints::decode(any.value.as_slice())
                .expect("ServiceEndpoints")
                .service
        })
        .collect();
    assert_eq!(names, ["payments"], "billing is outside the scope");

    let text = isdp_tests::http::get(m.sidecar.admin_addr(), "/metrics")
        .await
        .expect("/metrics")
        .body;
    assert_eq!(metric(&text, "isdp_xds_relay_streams_open"), Some(2.0));
    assert_eq!(metric(&text, "isdp_xds_relay_streams_total"), Some(2.0));
}

/// Past `xds_relay_max_streams` a new stream is RESOURCE_EXHAUSTED naming
/// the key and the limit; one that ends frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_relays_cap_are_resource_exhausted() {
    let m = mesh("127.0.0.1:0", Some(2)).await;
    let mut c = relay_client(m.sidecar.relay_addr()).await;
    let mut open = Vec::new();
    for i in 0..2 {
        let mut ads = delta(&mut c, &format!("capped-{i}")).await;
        ads.next("a first response").await;
        open.push(ads);
    }
    let status = delta(&mut c, "capped-2").await.error("over the cap").await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("xds_relay_max_streams (2) reached"),
        "{status:?}"
    );
    let config = m.sidecar.config_json().await.expect("/config");
    assert_eq!(config["xds_relay"]["open_streams"], 2);

    drop(open.pop());
    let c = &c;
    eventually(WAIT, "a place freed by the stream that ended", || async {
        let mut c = c.clone();
        let mut ads = delta(&mut c, "capped-3").await;
        if let Err(s) = &ads.rx {
            anyhow::bail!("{s:?}");
        }
        ads.next("a first response").await;
        Ok(())
    })
    .await;
}

/// The control plane killed: the relayed stream ends UNAVAILABLE naming
/// it, and so does a new stream while it is down; once it is back on its
/// address, a new stream is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_control_plane_ends_relayed_streams_unavailable_until_it_is_back() {
    let mut m = mesh("127.0.0.1:0", None).await;
    let mut c = relay_client(m.sidecar.relay_addr()).await;
    let mut ads = delta(&mut c, "grpc-js-1").await;
    let mut held = Held::default();
    follow(&mut ads, &mut held, "payments", |h| {
        h.services.contains_key("payments")
    })
    .await;

    m.cp.kill9().await;
    let status = ads.error("the control plane killed").await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&m.cp.grpc_url()),
        "names the control plane: {status:?}"
    );
    let status = delta(&mut c, "grpc-js-1").await.error("while down").await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("control plane is unreachable"),
        "{status:?}"
    );

    m.cp.restart().await;
    let c = &c;
    eventually(
        Duration::from_secs(20),
        "a stream after the restart",
        || async {
            let mut c = c.clone();
            let mut ads = delta(&mut c, "grpc-js-1").await;
            if let Err(s) = &ads.rx {
                anyhow::bail!("{s:?}");
            }
            let mut held = Held::default();
            follow(&mut ads, &mut held, "payments after the restart", |h| {
                h.services.contains_key("payments")
            })
            .await;
            Ok(())
        },
    )
    .await;
}

/// A unix socket relay: `relay=unix:PATH` in the listening line, the
/// socket 0660, and a client connecting through it reads the scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_relay_is_0660_and_relays() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("xds.sock");
    let listen = format!("unix:{}", path.display());
    let m = mesh(&listen, None).await;
    assert_eq!(m.sidecar.relay_addr(), listen);
    let meta = std::fs::metadata(&path).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let channel = tonic::transport::Endpoint::from_static("http://relay")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connect to the unix socket");
    let mut c = AggregatedDiscoveryServiceClient::new(channel);
    let mut ads = delta(&mut c, "uds-1").await;
    let mut held = Held::default();
    follow(&mut ads, &mut held, "payments over the socket", |h| {
        h.services.contains_key("payments") && h.absent.contains("billing")
    })
    .await;
}

/// A relay on an address others could reach is refused at startup, from
/// the flag, the variable or the file alike, with the key and the reason;
/// the sidecar binds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_others_could_reach_is_refused_at_startup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sidecar.toml");
    std::fs::write(
        &file,
        "node_id = \"n\"\ncontrol_plane = [\"http://127.0.0.1:1\"]\nxds_relay_listen = \"[::]:15002\"\n",
    )
    .expect("write the config");
    let base = ["--node-id", "n", "--control-plane", "http://127.0.0.1:1"];
    let cases: [(&str, Vec<&str>, Option<&str>); 3] = [
        (
            "flag",
            [&base[..], &["--xds-relay-listen", "0.0.0.0:15002"]].concat(),
            None,
        ),
        ("variable", base.to_vec(), Some("10.1.2.3:15002")),
        (
            "file",
            vec!["--config", file.to_str().expect("UTF-8 path")],
            None,
        ),
    ];
    for (how, args, env) in cases {
        let mut cmd = tokio::process::Command::new(isdp_tests::binary("isdp-sidecar"));
        cmd.args(&args).kill_on_drop(true);
        if let Some(v) = env {
            cmd.env("ISDP_XDS_RELAY_LISTEN", v);
        }
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{how}: the sidecar did not exit"))
            .expect("run isdp-sidecar");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{how}: started: {stderr}");
        assert!(
            stderr.contains("xds_relay_listen: must be a loopback address")
                && stderr.contains("reads the mesh with this sidecar's credentials"),
            "{how}: {stderr}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening:"),
            "{how}: bound listeners"
        );
    }
}
