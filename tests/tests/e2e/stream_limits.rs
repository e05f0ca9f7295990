//! What one principal's streams may hold, and for how long, whatever the
//! client does: a client that stops granting HTTP/2 flow-control window
//! (a raw `h2` client with an initial stream window of 0) still has its
//! session and xDS streams ended by its token's revocation or expiry (the
//! session's instance goes unhealthy after the grace period, the stream
//! leaves `isdpctl proxy-status`) and cannot hold up the control plane's
//! shutdown; every streaming method is capped per principal by
//! `--max-streams-per-principal`, ADS's two variants together.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::{
    config::core::v3::Node, service::discovery::v3::DeltaDiscoveryRequest,
};
use h2::{RecvStream, SendStream, client::SendRequest};
use isdp_proto::v1::{
    AUTHORIZATION_POLICY_TYPE_URL, Instance, SERVICE_ENDPOINTS_TYPE_URL, SessionOpen,
    SessionRequest, TRAFFIC_POLICY_TYPE_URL, TRUST_BUNDLE_TYPE_URL, WatchPoliciesRequest,
    WatchServiceRequest, session_request::Kind,
};
use isdp_tests::{ControlPlane, ControlPlaneOpts, eventually, status_of};
use prost::Message as _;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::sync::oneshot;
use tonic::Code;

const SESSION: &str = "/isdp.v1.Sidecar/Session";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const GRACE: Duration = Duration::from_secs(1);

async fn start(args: &[&str]) -> ControlPlane {
    ControlPlane::start(ControlPlaneOpts {
        session_grace: Some(GRACE),
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .await
}

/// A join token for `web`: (id, secret).
async fn join_token(cp: &ControlPlane, extra: &[&str]) -> (String, String) {
    let mut args = vec!["--role", "join", "--service", "web"];
    args.extend_from_slice(extra);
    let t = cp.create_token(&args).await;
    (t.id, t.secret)
}

// === A client that reads nothing ===

/// An HTTP/2 connection to the control plane that grants its streams no
/// flow-control window until [`Stalled::grant`]: the server can send
/// headers, but not one byte of any response body.
struct Stalled {
    send: SendRequest<Bytes>,
    grant: Option<oneshot::Sender<()>>,
}

/// One call on it: the request body kept open, the response once headed.
struct Call {
    _requests: SendStream<Bytes>,
    body: RecvStream,
}

impl Stalled {
    /// A connection granting each stream `window` bytes at first (0: none).
    async fn connect(cp: &ControlPlane, window: u32) -> Self {
        let pem = std::fs::read(cp.ca_file()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(cp.grpc_addr())
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .handshake::<_, Bytes>(tls)
            .await
            .unwrap();
        let (grant, granted) = oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! {
                _ = &mut conn => return,
                Ok(()) = granted => {}
            }
            conn.set_initial_window_size(1 << 20).unwrap();
            let _ = conn.await;
        });
        Stalled {
            send,
            grant: Some(grant),
        }
    }

    /// Opens `path` with `token`, sends `messages` and keeps the request
    /// stream open; returns once the response headers came (200: the
    /// call is served).
    async fn call(&mut self, path: &str, token: &str, messages: &[Vec<u8>]) -> Call {
        let req = http::Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut requests) = send.send_request(req, false).unwrap();
        for (n, m) in messages.iter().enumerate() {
            let last = n + 1 == messages.len() && one_request(path);
            requests.send_data(grpc_frame(m), last).unwrap();
        }
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .unwrap_or_else(|_| panic!("{path}: no response headers"))
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            !response.headers().contains_key("grpc-status"),
            "{path} refused: {:?}",
            response.headers()
        );
        Call {
            _requests: requests,
            body: response.into_body(),
        }
    }

    /// Grants every stream window from now on.
    fn grant(&mut self) {
        let _ = self.grant.take().expect("granted once").send(());
    }
}

impl Call {
    /// Reads the rest of the response (granted window by then) and
    /// returns the status its trailers carry.
    async fn status(mut self) -> tonic::Status {
        let read = async {
            while let Some(data) = self.body.data().await {
                let data = data.unwrap();
                let _ = self.body.flow_control().release_capacity(data.len());
            }
            self.body.trailers().await.unwrap().expect("trailers")
        };
        let trailers = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the call ends once it may send");
        tonic::Status::from_header_map(&trailers).expect("a grpc-status")
    }
}

/// One gRPC message as it goes on the wire: uncompressed, length-prefixed.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(message);
    frame.freeze()
}

/// Whether the method at `path` takes one request (server streaming: the
/// server reads until the request stream ends).
fn one_request(path: &str) -> bool {
    path.starts_with("/isdp.v1.Policies/") || path.starts_with("/isdp.v1.Registry/")
}

/// Session messages: open `node` with one `web` instance, as many times as
/// needed for more answers than the server buffers.
fn session_opens(node: &str) -> Vec<Vec<u8>> {
    let open = SessionRequest {
        kind: Some(Kind::Open(SessionOpen {
            node_id: node.into(),
            instances: vec![Instance {
                service: "web".into(),
                address: "127.0.0.1".into(),
                port: 8080,
                inbound_port: 15006,
                ..Default::default()
            }],
        })),
    };
    (0..12).map(|_| open.encode_to_vec()).collect()
}

/// Delta requests for `node`: every type, then a new name for each type
/// answering its last response (nonces count 1, 2, ... per stream), for
/// more responses than the server buffers.
fn delta_requests(node: &str) -> Vec<Vec<u8>> {
    let types = [
        SERVICE_ENDPOINTS_TYPE_URL,
        TRAFFIC_POLICY_TYPE_URL,
        AUTHORIZATION_POLICY_TYPE_URL,
        TRUST_BUNDLE_TYPE_URL,
    ];
    let req = |type_url: &str, name: String, nonce: String| DeltaDiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names_subscribe: vec![name],
        response_nonce: nonce,
        ..Default::default()
    };
    let mut all: Vec<Vec<u8>> = types
        .iter()
        .map(|t| req(t, "mesh".into(), String::new()).encode_to_vec())
        .collect();
    let mut nonce = 0;
    for round in 1..6 {
        for t in types {
            nonce += 1;
            all.push(req(t, format!("n{round}"), nonce.to_string()).encode_to_vec());
        }
    }
    all
}

/// The node ids `isdpctl proxy-status` lists.
async fn listed_nodes(cp: &ControlPlane) -> anyhow::Result<Vec<String>> {
    let out = cp.ctl(&["-o", "json", "proxy-status"]).await;
    anyhow::ensure!(out.status.success(), "proxy-status failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["node_id"].as_str().map(str::to_owned))
        .collect())
}

/// A stalled session for `node` and a stalled delta ADS stream, both with
/// `token`; returns once the instance is registered and the stream listed.
async fn stall(cp: &ControlPlane, token: &str, node: &str) -> (Stalled, Call, Call) {
    let mut conn = Stalled::connect(cp, 0).await;
    let session = conn.call(SESSION, token, &session_opens(node)).await;
    let ads = conn.call(DELTA, token, &delta_requests(node)).await;
    let id = format!("{node}.web");
    eventually(Duration::from_secs(10), "registered and listed", || async {
        status_of(&cp.instances("web").await?, &id)?;
        anyhow::ensure!(listed_nodes(cp).await?.iter().any(|n| n == node));
        Ok(())
    })
    .await;
    // Long enough for the handlers to fill what they buffer and block.
    tokio::time::sleep(Duration::from_millis(500)).await;
    (conn, session, ads)
}

/// After the credential ended: the session's instance goes unhealthy after
/// the grace period (its handler stopped, as when a client vanishes), and
/// the stream leaves proxy-status; both while the client still grants no
/// window. Then, given window, both calls end with UNAUTHENTICATED.
async fn ended_although_stalled(
    cp: &ControlPlane,
    node: &str,
    (mut conn, session, ads): (Stalled, Call, Call),
    said: &str,
) {
    let id = format!("{node}.web");
    eventually(
        GRACE + Duration::from_secs(8),
        "the stalled session's instance unhealthy",
        || async {
            let status = status_of(&cp.instances("web").await?, &id)?;
            anyhow::ensure!(status == "unhealthy", "{id} is {status}");
            Ok(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the stalled stream leaves proxy-status",
        || async {
            let nodes = listed_nodes(cp).await?;
            anyhow::ensure!(!nodes.iter().any(|n| n == node), "{nodes:?}");
            Ok(())
        },
    )
    .await;

    conn.grant();
    for (what, call) in [("session", session), ("ADS", ads)] {
        let status = call.status().await;
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(status.message().starts_with(said), "{what}: {status:?}");
    }
}

// === Tests ===

/// Revoking the token ends a stalled session and a stalled ADS stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_ends_streams_whose_client_reads_nothing() {
    let cp = start(&[]).await;
    let (id, secret) = join_token(&cp, &[]).await;
    let stalled = stall(&cp, &secret, "stall-1").await;
    cp.ctl_ok(&["token", "revoke", &id]).await;
    let said = format!("token {id} was revoked");
    ended_although_stalled(&cp, "stall-1", stalled, &said).await;
}

/// The token's expiry ends them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_ends_streams_whose_client_reads_nothing() {
    let cp = start(&[]).await;
    let (id, secret) = join_token(&cp, &["--ttl", "5s"]).await;
    let stalled = stall(&cp, &secret, "expiring-1").await;
    let said = format!("token {id} expired at 20");
    ended_although_stalled(&cp, "expiring-1", stalled, &said).await;
}

/// A client that reads nothing cannot hold up shutdown: SIGTERM stops the
/// control plane within its drain (the harness waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_client_that_reads_nothing() {
    let mut cp = start(&[]).await;
    let (_, secret) = join_token(&cp, &[]).await;
    let _stalled = stall(&cp, &secret, "stall-2").await;
    let stopping = Instant::now();
    let status = cp.process().terminate().await;
    eprintln!("stopped {:?} after SIGTERM", stopping.elapsed());
    assert!(status.success(), "{status}");
}

/// Every streaming method is capped per principal and group: the call over
/// `--max-streams-per-principal` is refused with RESOURCE_EXHAUSTED naming
/// the flag, the limit and the principal (never its secret); ADS's two
/// variants count together; another principal has its own count; and a
/// call that ends gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_streaming_method_is_capped_per_principal() {
    let cp = start(&["--max-streams-per-principal=2"]).await;
    let (join_id, join) = join_token(&cp, &[]).await;
    let (_, other_join) = join_token(&cp, &[]).await;
    let created = cp.create_token(&["--role", "read"]).await;
    let (read_id, read) = (created.id, created.secret);
    let sotw = envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
        node: Some(Node {
            id: "capped".into(),
            ..Default::default()
        }),
        type_url: TRUST_BUNDLE_TYPE_URL.into(),
        resource_names: vec!["mesh".into()],
        ..Default::default()
    };
    let watch_service = WatchServiceRequest {
        service: "web".into(),
    };
    let groups = [
        Group {
            name: "ADS",
            // Delta first, then state of the world: one count.
            methods: vec![
                (DELTA, delta_requests("capped").swap_remove(0)),
                (SOTW, sotw.encode_to_vec()),
            ],
            principal: &join_id,
            token: &join,
            other: &other_join,
        },
        Group {
            name: "Sidecar/Session",
            methods: vec![(SESSION, session_opens("capped").swap_remove(0))],
            principal: &join_id,
            token: &join,
            other: &other_join,
        },
        Group {
            name: "Policies/Watch",
            methods: vec![(
                "/isdp.v1.Policies/Watch",
                WatchPoliciesRequest {}.encode_to_vec(),
            )],
            principal: &join_id,
            token: &join,
            other: &other_join,
        },
        Group {
            name: "Registry/WatchService",
            methods: vec![(
                "/isdp.v1.Registry/WatchService",
                watch_service.encode_to_vec(),
            )],
            principal: &read_id,
            token: &read,
            other: cp.admin_token(),
        },
    ];
    // Nothing read on any of these: held open as a stalled client would.
    let mut conn = Stalled::connect(&cp, 0).await;
    for g in &groups {
        let mut open = Vec::new();
        for n in 0..2 {
            let (path, first) = &g.methods[n % g.methods.len()];
            open.push(conn.call(path, g.token, std::slice::from_ref(first)).await);
        }
        for (path, first) in &g.methods {
            let refused = opened(&cp, path, g.token, first).await;
            assert_eq!(
                refused.code(),
                Code::ResourceExhausted,
                "{path}: {refused:?}"
            );
            let expected = format!(
                "quota --max-streams-per-principal (2) exceeded: principal {} already has 2 {} streams open on this control plane",
                g.principal, g.name
            );
            assert_eq!(refused.message(), expected, "{path}");
            assert!(!refused.message().contains(g.token), "never the secret");
        }
        let (path, first) = &g.methods[0];
        let _theirs = conn.call(path, g.other, std::slice::from_ref(first)).await;
        // A call that ends (its client resets it) gives its place back.
        drop(open.pop());
        eventually(
            Duration::from_secs(5),
            &format!("{}: a place given back", g.name),
            || async {
                let s = opened(&cp, path, g.token, first).await;
                anyhow::ensure!(s.code() == Code::Ok, "{s:?}");
                Ok(())
            },
        )
        .await;
    }
}

/// One group of streaming methods, with a principal that opens them, its
/// token, and another principal's token.
struct Group<'a> {
    name: &'static str,
    methods: Vec<(&'static str, Vec<u8>)>,
    principal: &'a str,
    token: &'a str,
    other: &'a str,
}

/// Opens `path` on a fresh connection that reads normally and returns the
/// status it was refused with, or OK when it was served (then closed).
async fn opened(cp: &ControlPlane, path: &str, token: &str, first: &[u8]) -> tonic::Status {
    let conn = Stalled::connect(cp, 65_535).await;
    let req = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let mut send = conn.send.clone().ready().await.unwrap();
    let (response, mut requests) = send.send_request(req, false).unwrap();
    // A refused call may be closed before its request is sent.
    let _ = requests.send_data(grpc_frame(first), one_request(path));
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("response headers")
        .unwrap();
    match tonic::Status::from_header_map(response.headers()) {
        Some(status) => status,
        None => tonic::Status::ok(""),
    }
}
