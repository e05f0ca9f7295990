//! The data plane end to end: real control plane, sidecars and demo
//! backends as processes on loopback, traffic sent through a `web`
//! sidecar's listeners to `payments` instances behind their own sidecars.
//!
//! Each test starts its own control plane and topology, so tests run in
//! parallel and a failure leaves the others standing. Every wait is bounded
//! and every test stays well under 30 s.
//!
//! # Layout
//! - [`Mesh`]: N `echo-http` instances of `payments`, each behind a sidecar,
//!   and a `web` sidecar with a dedicated `payments` listener.
//! - HTTP helpers: a pooled hyper client, and raw HTTP/1.1 over a socket for
//!   requests a client library would not send (absolute-form, garbage).
//! - the tests, one per behaviour: balancing, failover, routing by host,
//!   no endpoints, gRPC, TCP, large bodies, malformed requests, WebSocket,
//!   graceful shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use isdp_examples::proto::{EchoRequest, StreamRequest, echo_client::EchoClient};
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoGrpc, EchoHttp, EchoTcp, Sidecar, SidecarToml, eventually,
    status_of,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

const SERVICE: &str = "payments";
/// Setup budget: processes started, registered, seen healthy by `web`.
const SETUP: Duration = Duration::from_secs(15);
/// How long one proxied request may take.
const REQUEST: Duration = Duration::from_secs(5);
/// Probe interval of the payments sidecars.
const INTERVAL_MS: u64 = 200;

// === Mesh ===

/// `payments` instances (echo-http behind their own sidecars) and a `web`
/// sidecar that proxies `payments` on a dedicated listener.
struct Mesh {
    cp: ControlPlane,
    echoes: Vec<EchoHttp>,
    sidecars: Vec<Sidecar>,
    web: Sidecar,
}

impl Mesh {
    /// One instance per weight, `pay-N` with weight `weights[N]`; `web`
    /// balances with `lb`. Returns once `web` sees every instance healthy.
    async fn start(weights: &[u32], lb: &str) -> Self {
        // Operator weights only: these tests count shares against the
        // weights registered, which load weights would scale and move.
        let cp = ControlPlane::start(ControlPlaneOpts {
            extra_args: vec!["--load-weights".into(), "false".into()],
            ..ControlPlaneOpts::default()
        })
        .await;
        let mut echoes = Vec::new();
        let mut sidecars = Vec::new();
        for (n, weight) in weights.iter().enumerate() {
            let id = format!("pay-{n}");
            let echo = EchoHttp::start(&id).await;
            let sidecar = SidecarToml::new(&id, &cp.grpc_url())
                .raw(&format!(
                    "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
                     check = \"{check}\"\ninterval = \"{INTERVAL_MS}ms\"\nweight = {weight}\n",
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
        let mesh = Mesh {
            cp,
            echoes,
            sidecars,
            web,
        };
        mesh.wait_all_healthy().await;
        mesh
    }

    /// The registry id of instance `n`: `{node_id}.{service}`.
    fn instance_id(n: usize) -> String {
        format!("pay-{n}.{SERVICE}")
    }

    async fn wait_all_healthy(&self) {
        let want = self.echoes.len();
        eventually(
            SETUP,
            "web sees every payments instance healthy",
            || async {
                let eps = self.web.endpoints(SERVICE).await?;
                anyhow::ensure!(eps.len() == want, "expected {want} endpoints: {eps:?}");
                for n in 0..want {
                    let id = Self::instance_id(n);
                    anyhow::ensure!(status_of(&eps, &id)? == "healthy", "{id}: {eps:?}");
                }
                Ok(())
            },
        )
        .await;
    }

    /// `http://<web's payments listener>`.
    fn base(&self) -> String {
        format!("http://{}", self.web.upstream_addr(SERVICE))
    }
}

// === HTTP helpers ===

type Body = BoxBody<Bytes, Infallible>;
type HttpClient = Client<HttpConnector, Body>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn empty() -> Body {
    Empty::new().boxed()
}

/// A response with its whole body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn instance(&self) -> String {
        self.headers
            .get("x-instance-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>")
            .to_owned()
    }

    fn error(&self) -> Option<&str> {
        self.headers
            .get("x-isdp-error")
            .and_then(|v| v.to_str().ok())
    }
}

async fn send(client: &HttpClient, req: Request<Body>) -> Answer {
    let what = format!("{} {}", req.method(), req.uri());
    let resp = timeout(REQUEST, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {REQUEST:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    let (parts, body) = resp.into_parts();
    let body = timeout(REQUEST, body.collect())
        .await
        .unwrap_or_else(|_| panic!("{what}: body not complete within {REQUEST:?}"))
        .unwrap_or_else(|e| panic!("{what}: body: {e:?}"))
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(client: &HttpClient, url: &str) -> Answer {
    let req = Request::get(url).body(empty()).expect("valid request");
    send(client, req).await
}

/// Sends `n` GETs to `url` one after another and counts 200 answers per
/// `x-instance-id`; panics on any other status.
async fn count_instances(client: &HttpClient, url: &str, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let a = get(client, url).await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "request {i}: {:?} {:?}",
            a.headers,
            a.body
        );
        *counts.entry(a.instance()).or_default() += 1;
    }
    counts
}

/// Writes `raw` on a fresh connection to `addr` and reads until the server
/// closes (the request should say `Connection: close`).
async fn raw_http(addr: &str, raw: &str) -> String {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(raw.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    timeout(REQUEST, exchange)
        .await
        .unwrap_or_else(|_| panic!("{raw:?} to {addr}: no close within {REQUEST:?}"))
        .unwrap_or_else(|e| panic!("{raw:?} to {addr}: {e}"))
}

/// The status code of a raw HTTP/1.x response, if it is one.
fn raw_status(resp: &str) -> Option<u16> {
    resp.strip_prefix("HTTP/1.")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn assert_share(counts: &HashMap<String, usize>, id: &str, want: usize, slack: usize) {
    let got = counts.get(id).copied().unwrap_or(0);
    assert!(
        got.abs_diff(want) <= slack,
        "{id} got {got} requests, want {want} ± {slack}: {counts:?}"
    );
}

// === a) distribution ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let mesh = Mesh::start(&[1, 1, 1], "round_robin").await;
    let client = client();
    let counts = count_instances(&client, &format!("{}/rr", mesh.base()), 300).await;
    for n in 0..3 {
        assert_share(&counts, &format!("pay-{n}"), 100, 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let mesh = Mesh::start(&[1, 1, 2], "weighted_round_robin").await;
    // The weights must have reached the web sidecar before counting.
    let eps = mesh.web.endpoints(SERVICE).await.expect("endpoints");
    let weight =
        |n: usize| isdp_tests::find_by_id(&eps, &Mesh::instance_id(n)).map(|e| e["weight"].clone());
    assert_eq!(
        [weight(0), weight(1), weight(2)],
        [Some(1.into()), Some(1.into()), Some(2.into())],
        "weights in web's /config: {eps:?}"
    );
    let client = client();
    let counts = count_instances(&client, &format!("{}/wrr", mesh.base()), 400).await;
    // 25 / 25 / 50 % of 400, ± 5 percentage points (20 requests).
    assert_share(&counts, "pay-0", 100, 20);
    assert_share(&counts, "pay-1", 100, 20);
    assert_share(&counts, "pay-2", 200, 20);
}

// === b) failover ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_gets_no_traffic_once_unhealthy() {
    let mut mesh = Mesh::start(&[1, 1, 1], "round_robin").await;
    let victim = Mesh::instance_id(1);
    mesh.echoes[1].kill9().await;
    eventually(SETUP, "web sees the killed instance unhealthy", || async {
        let eps = mesh.web.endpoints(SERVICE).await?;
        anyhow::ensure!(status_of(&eps, &victim)? == "unhealthy", "{eps:?}");
        Ok(())
    })
    .await;
    let client = client();
    let counts = count_instances(&client, &format!("{}/after-kill", mesh.base()), 100).await;
    assert!(!counts.contains_key("pay-1"), "dead instance answered?");
    assert_eq!(
        counts.values().sum::<usize>(),
        100,
        "every request succeeded: {counts:?}"
    );
    assert!(
        counts.contains_key("pay-0") && counts.contains_key("pay-2"),
        "both survivors serve: {counts:?}"
    );
}

// === c) the shared outbound listener ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_listener_routes_by_host() {
    let mesh = Mesh::start(&[1], "round_robin").await;
    let outbound = mesh.web.outbound_addr().to_owned();

    let resp = raw_http(
        &outbound,
        "GET /by-host HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), Some(200), "Host: payments -> {resp}");
    assert!(
        resp.to_ascii_lowercase().contains("x-instance-id: pay-0"),
        "{resp}"
    );
    assert!(resp.contains("\"path\":\"/by-host\""), "{resp}");
    // What the sidecars add on the way, and what they keep to themselves.
    let echoed: serde_json::Value = serde_json::from_str(
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("echo body is not JSON ({e}): {resp}"));
    let headers = &echoed["headers"];
    let xff = headers["x-forwarded-for"].as_str().unwrap_or_default();
    assert!(xff.starts_with("127.0.0.1"), "x-forwarded-for: {headers}");
    let request_id = headers["x-request-id"].as_str().unwrap_or_default();
    assert!(!request_id.is_empty(), "x-request-id: {headers}");
    assert!(
        headers.get("x-isdp-service").is_none(),
        "the mesh header leaked to the service: {headers}"
    );

    let resp = raw_http(
        &outbound,
        "GET / HTTP/1.1\r\nHost: nosuch\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), Some(404), "unknown host -> {resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("x-isdp-error: unknown-upstream"),
        "{resp}"
    );

    // As an http_proxy: absolute-form request line.
    let resp = raw_http(
        &outbound,
        "GET http://payments/proxied HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), Some(200), "absolute-form -> {resp}");
    assert!(resp.contains("\"path\":\"/proxied\""), "{resp}");

    // The same through a pooled client with a Host header of its own.
    let client = client();
    let req = Request::get(format!("http://{outbound}/pooled"))
        .header(http::header::HOST, "payments:80")
        .body(empty())
        .expect("request");
    let a = send(&client, req).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.instance(), "pay-0");
    drop(mesh);
}

// === d) no endpoints ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_without_endpoints_fails_fast() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0("ghost", "http", "round_robin")
        .upstream_on_port0("ghost-tcp", "tcp", "round_robin")
        .start()
        .await;
    web.wait_ready(SETUP).await;

    let client = client();
    let a = get(&client, &format!("http://{}/x", web.upstream_addr("ghost"))).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", a.body);
    assert_eq!(a.error(), Some("no-healthy-endpoints"), "{:?}", a.headers);

    let mut s = TcpStream::connect(web.upstream_addr("ghost-tcp"))
        .await
        .expect("connect to the tcp upstream listener");
    let mut buf = [0u8; 16];
    let n = timeout(Duration::from_secs(1), s.read(&mut buf))
        .await
        .expect("tcp upstream with no endpoints must close within 1 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "read {:?} instead of EOF", &buf[..n]);
}

/// One backend behind its own sidecar, as `node.service`.
struct Backend<'a> {
    node: &'a str,
    service: &'a str,
    /// The service's protocol on the backend sidecar.
    protocol: &'a str,
    /// The upstream's protocol on the calling sidecar.
    upstream_protocol: &'a str,
    port: u16,
    check: &'a str,
}

/// Starts the backend's sidecar and a `web` sidecar with the service as a
/// round-robin upstream on its own listener, and waits until `web` sees the
/// backend healthy.
/// `ledger` (the TCP echo `echo`) behind its sidecar, and `web` with a
/// `ledger` listener.
async fn ledger_over_tcp(cp: &ControlPlane, echo: &EchoTcp) -> (Sidecar, Sidecar) {
    behind_one_sidecar(
        cp,
        Backend {
            node: "tcp-0",
            service: "ledger",
            protocol: "tcp",
            upstream_protocol: "tcp",
            port: echo.port(),
            check: &echo.health_target(),
        },
    )
    .await
}

async fn behind_one_sidecar(cp: &ControlPlane, b: Backend<'_>) -> (Sidecar, Sidecar) {
    let backend = SidecarToml::new(b.node, &cp.grpc_url())
        .raw(&format!(
            "[[service]]\nname = \"{}\"\nport = {}\nprotocol = \"{}\"\n\
             check = \"{}\"\ninterval = \"{INTERVAL_MS}ms\"\n",
            b.service, b.port, b.protocol, b.check
        ))
        .start()
        .await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0(b.service, b.upstream_protocol, "round_robin")
        .start()
        .await;
    let id = format!("{}.{}", b.node, b.service);
    eventually(SETUP, &format!("web sees {id} healthy"), || async {
        let eps = web.endpoints(b.service).await?;
        anyhow::ensure!(status_of(&eps, &id)? == "healthy", "{eps:?}");
        Ok(())
    })
    .await;
    (backend, web)
}

// === e) gRPC through two sidecars ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_stream_cross_two_sidecars() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let echo = EchoGrpc::start("grpc-0").await;
    let (_backend_sidecar, web) = behind_one_sidecar(
        &cp,
        Backend {
            node: "grpc-0",
            service: "greeter",
            protocol: "grpc",
            upstream_protocol: "http",
            port: echo.port(),
            check: &echo.health_target(),
        },
    )
    .await;

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", web.upstream_addr("greeter")))
            .expect("endpoint")
            .connect_timeout(REQUEST)
            .timeout(REQUEST)
            .connect()
            .await
            .expect("connect to web's greeter listener");
    let mut client = EchoClient::new(channel);

    let reply = client
        .unary(EchoRequest {
            message: "hello".into(),
        })
        .await
        .expect("Unary through the mesh")
        .into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.instance, "grpc-0");

    let mut stream = client
        .server_stream(StreamRequest {
            message: "tick".into(),
            count: 100,
        })
        .await
        .expect("ServerStream through the mesh")
        .into_inner();
    let mut seqs = Vec::new();
    let all = timeout(REQUEST, async {
        while let Some(r) = stream.message().await.expect("stream message") {
            assert_eq!(r.message, "tick");
            assert_eq!(r.instance, "grpc-0");
            seqs.push(r.seq);
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "stream not finished within {REQUEST:?}: {seqs:?}"
    );
    assert_eq!(seqs, (0..100).collect::<Vec<u32>>(), "all 100, in order");
}

// === f) TCP end to end ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_carries_a_megabyte_and_half_close() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let echo = EchoTcp::start("tcp-0").await;
    let (_backend_sidecar, web) = ledger_over_tcp(&cp, &echo).await;

    let stream = TcpStream::connect(web.upstream_addr("ledger"))
        .await
        .expect("connect to web's ledger listener");
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    timeout(REQUEST, rd.read_line(&mut line))
        .await
        .expect("id line within 5 s")
        .expect("reading the id line");
    assert_eq!(line, "tcp-0\n");

    const MB: usize = 1 << 20;
    let data: Vec<u8> = (0..MB).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await?;
        wr.shutdown().await?;
        // Keep the half alive until the reader is done.
        Ok::<_, std::io::Error>(wr)
    });
    let mut back = Vec::with_capacity(MB);
    timeout(Duration::from_secs(10), rd.read_to_end(&mut back))
        .await
        .expect("echo and EOF within 10 s")
        .expect("reading the echo");
    writer.await.expect("writer task").expect("writing 1 MB");
    assert_eq!(back.len(), MB, "read back exactly 1 MB, then EOF");
    assert!(back == data, "echoed bytes differ from those sent");
}

/// A traffic policy's `circuit_breaker.max_connections` caps the TCP
/// connections a sidecar proxies to an upstream: one over the cap is
/// closed at once (and counted), and a place frees when a connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_over_the_breaker_cap_are_closed_at_once() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let echo = EchoTcp::start("tcp-0").await;
    let (_backend_sidecar, web) = ledger_over_tcp(&cp, &echo).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("ledger.yaml");
    std::fs::write(
        &policy,
        "service: ledger\ncircuit_breaker: { max_connections: 1 }\n",
    )
    .unwrap();
    cp.ctl_ok(&["policy", "apply", "-f", &policy.display().to_string()])
        .await;
    eventually(SETUP, "web holds the ledger policy", || async {
        let config = web.config_json().await?;
        anyhow::ensure!(
            config["upstreams"]["ledger"]["policy_version"].is_string(),
            "{config}"
        );
        Ok(())
    })
    .await;

    /// Connects through web and reads what comes first: the echo's id
    /// line, or nothing when the sidecar closes the connection.
    async fn first_line(addr: &str) -> (TcpStream, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect to web");
        let mut buf = [0u8; 64];
        let n = timeout(REQUEST, stream.read(&mut buf))
            .await
            .expect("an answer or a close within 5 s")
            .unwrap_or(0);
        (stream, String::from_utf8_lossy(&buf[..n]).into_owned())
    }
    let addr = web.upstream_addr("ledger").to_owned();
    let (held, line) = first_line(&addr).await;
    assert_eq!(line, "tcp-0\n");
    let (_, refused) = first_line(&addr).await;
    assert_eq!(refused, "", "a second connection is closed at once");
    let page = isdp_tests::http::get(web.admin_addr(), "/metrics")
        .await
        .unwrap()
        .body;
    assert!(
        page.lines()
            .any(|l| l.starts_with("isdp_breaker_overflows_total")
                && l.contains("service=\"ledger\"")
                && l.contains("reason=\"max_connections\"")
                && !l.ends_with(" 0")),
        "{page}"
    );
    drop(held);
    eventually(SETUP, "a place frees when the first ends", || async {
        let (_, line) = first_line(&addr).await;
        anyhow::ensure!(line == "tcp-0\n", "got {line:?}");
        Ok(())
    })
    .await;
}

// === g) large bodies ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_both_ways() {
    const SIZE: u64 = 50_000_000;
    const CHUNK: usize = 256 * 1024;
    let mesh = Mesh::start(&[1], "round_robin").await;
    let client = client();

    let chunk = Bytes::from(vec![b'y'; CHUNK]);
    let chunks = futures::stream::unfold(SIZE, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK as u64);
            Some((
                Ok::<_, Infallible>(Frame::data(chunk.slice(..n as usize))),
                left - n,
            ))
        }
    });
    let req = Request::post(format!("{}/sink", mesh.base()))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .expect("request");
    let resp = timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("POST /sink answered within 20 s")
        .expect("POST /sink");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        SIZE.to_string(),
        "bytes the echo counted"
    );

    let resp = timeout(
        REQUEST,
        client.request(
            Request::get(format!("{}/bytes?n={SIZE}", mesh.base()))
                .body(empty())
                .expect("request"),
        ),
    )
    .await
    .expect("GET /bytes answered")
    .expect("GET /bytes");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got: u64 = 0;
    timeout(Duration::from_secs(20), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body frame").into_data() {
                got += data.len() as u64;
            }
        }
    })
    .await
    .expect("GET /bytes body within 20 s");
    assert_eq!(got, SIZE, "bytes received");
}

// === h) malformed HTTP ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_is_rejected_and_listener_keeps_serving() {
    let mesh = Mesh::start(&[1], "round_robin").await;
    let addr = mesh.web.upstream_addr(SERVICE).to_owned();
    let resp = raw_http(&addr, "GARBAGE\r\n\r\n").await;
    assert!(
        resp.is_empty() || raw_status(&resp) == Some(400),
        "garbage must get 400 or a closed connection, got {resp:?}"
    );
    let resp = raw_http(
        &addr,
        "GET /after-garbage HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), Some(200), "{resp}");
}

// === i) WebSocket ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_echoes_through_two_sidecars() {
    use tokio_tungstenite::tungstenite::Message;
    let mesh = Mesh::start(&[1], "round_robin").await;
    let url = format!("ws://{}/ws", mesh.web.upstream_addr(SERVICE));
    let (mut ws, resp) = timeout(REQUEST, tokio_tungstenite::connect_async(url.as_str()))
        .await
        .expect("WebSocket handshake within 5 s")
        .expect("WebSocket handshake through the mesh");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.expect("send");
        let echo = timeout(REQUEST, ws.next())
            .await
            .expect("echo within 5 s")
            .expect("socket open")
            .expect("echo frame");
        assert_eq!(echo, Message::text(text));
    }
    let _ = ws.close(None).await;
}

// === j) graceful shutdown ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_deregisters() {
    let mut mesh = Mesh::start(&[1], "round_robin").await;
    let url = format!("{}/slow?ms=1500", mesh.base());
    let client = client();
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, &url).await })
    };
    // Let the request reach echo-http through both sidecars.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!in_flight.is_finished(), "slow request finished too early");
    mesh.sidecars[0].process().send_term().await;

    let a = in_flight.await.expect("request task");
    assert_eq!(
        a.status,
        StatusCode::OK,
        "in-flight request during SIGTERM: {:?} {:?}",
        a.headers,
        a.body
    );
    assert_eq!(a.instance(), "pay-0");

    let status = mesh.sidecars[0].process().wait_exit().await;
    assert!(status.success(), "payments sidecar exited with {status}");

    eventually(SETUP, "pay-0 deregistered", || async {
        let list = mesh.cp.instances(SERVICE).await?;
        anyhow::ensure!(list.is_empty(), "still registered: {list:?}");
        Ok(())
    })
    .await;
    eventually(SETUP, "web drops the endpoint", || async {
        let eps = mesh.web.endpoints(SERVICE).await.unwrap_or_default();
        anyhow::ensure!(eps.is_empty(), "web still has {eps:?}");
        Ok(())
    })
    .await;
}
