//! Traces and the access log end to end: a request carrying the
//! application's `traceparent` crosses two sidecars (`web` -> `pay-0`, in
//! front of echo-http), both exporting spans over OTLP to a real receiver
//! started by the test.
//!
//! # Layout
//! - [`Pair`]: the two sidecars, with extra top-level TOML for each.
//! - the tests: one trace across both hops; traffic unaffected by a
//!   collector that is not there; a JSON access-log line per request.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use isdp_tests::otlp::{SPAN_KIND_CLIENT, SPAN_KIND_SERVER};
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, OtlpReceiver, ReceivedSpan, Sidecar, SidecarToml,
    eventually, status_of,
};
use tokio::time::timeout;

const SERVICE: &str = "payments";
const SETUP: Duration = Duration::from_secs(15);
const REQUEST: Duration = Duration::from_secs(5);
/// Spans leave in batches at most a second old; allow for a slow machine.
const EXPORT: Duration = Duration::from_secs(10);

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

// === Pair ===

/// echo-http as `pay-0.payments` behind its sidecar, and a `web` sidecar
/// calling it through a dedicated `payments` listener.
struct Pair {
    _cp: ControlPlane,
    _echo: EchoHttp,
    backend: Sidecar,
    web: Sidecar,
}

impl Pair {
    /// `extra` is top-level TOML given to both sidecars.
    async fn start(extra: &str) -> Self {
        let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
        let echo = EchoHttp::start("pay-0").await;
        let backend = SidecarToml::new("pay-0", &cp.grpc_url())
            .raw(extra)
            .raw(&format!(
                "[[service]]\nname = \"{SERVICE}\"\nport = {}\nprotocol = \"http\"\n\
                 check = \"{}\"\ninterval = \"200ms\"\n",
                echo.port(),
                echo.health_url()
            ))
            .start()
            .await;
        let web = SidecarToml::new("web", &cp.grpc_url())
            .raw(extra)
            .upstream_on_port0(SERVICE, "http", "round_robin")
            .start()
            .await;
        eventually(SETUP, "web sees pay-0 healthy", || async {
            let eps = web.endpoints(SERVICE).await?;
            anyhow::ensure!(status_of(&eps, "pay-0.payments")? == "healthy", "{eps:?}");
            Ok(())
        })
        .await;
        Pair {
            _cp: cp,
            _echo: echo,
            backend,
            web,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.web.upstream_addr(SERVICE))
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `url` with the application's `traceparent`; the status and the JSON
/// echo-http answered with.
async fn get_traced(
    client: &Client<HttpConnector, Body>,
    url: &str,
) -> (StatusCode, serde_json::Value) {
    let req = Request::get(url)
        .header("traceparent", format!("00-{TRACE_ID}-{APP_SPAN}-01"))
        .header("tracestate", "app=1")
        .body(Empty::new().boxed())
        .expect("valid request");
    let resp = timeout(REQUEST, client.request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

// === One trace across two sidecars ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_two_sidecars() {
    let otlp = OtlpReceiver::start().await;
    let pair = Pair::start(&format!("otlp_endpoint = \"{}\"", otlp.endpoint())).await;
    let (status, echoed) = get_traced(&client(), &pair.url("/orders/42")).await;
    assert_eq!(status, StatusCode::OK, "{echoed}");

    let mut spans: Vec<ReceivedSpan> = Vec::new();
    eventually(EXPORT, "a client and a server span of the trace", || {
        spans = otlp
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .collect();
        let n = spans.len();
        async move {
            anyhow::ensure!(n >= 2, "{n} spans of the trace so far");
            Ok(())
        }
    })
    .await;
    assert_eq!(spans.len(), 2, "exactly one span per hop: {spans:#?}");
    let client_span = spans
        .iter()
        .find(|s| s.kind == SPAN_KIND_CLIENT)
        .expect("client span");
    let server_span = spans
        .iter()
        .find(|s| s.kind == SPAN_KIND_SERVER)
        .expect("server span");

    // app span -> web's client span -> pay-0's server span -> the service.
    assert_eq!(client_span.service, "isdp-sidecar-web");
    assert_eq!(client_span.parent_span_id, APP_SPAN, "{client_span:#?}");
    assert_eq!(server_span.service, "isdp-sidecar-pay-0");
    assert_eq!(
        server_span.parent_span_id, client_span.span_id,
        "{server_span:#?}"
    );
    let seen = echoed["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        seen,
        format!("00-{TRACE_ID}-{}-01", server_span.span_id),
        "{echoed}"
    );
    assert_eq!(
        echoed["headers"]["tracestate"], "app=1",
        "tracestate passes through"
    );

    assert_eq!(client_span.name, "GET");
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", "/orders/42"),
        ("http.response.status_code", "200"),
        ("server.address", SERVICE),
        ("isdp.upstream", SERVICE),
        ("isdp.endpoint.id", "pay-0.payments"),
        ("network.peer.address", "127.0.0.1"),
    ] {
        assert_eq!(
            client_span.attr(k),
            Some(v),
            "client span {k}: {client_span:#?}"
        );
    }
    let inbound_port = pair.backend.inbound_addr().rsplit(':').next().unwrap();
    assert_eq!(client_span.attr("network.peer.port"), Some(inbound_port));
    for (k, v) in [
        ("http.request.method", "GET"),
        ("url.path", "/orders/42"),
        ("http.response.status_code", "200"),
        ("isdp.service", SERVICE),
        ("network.peer.address", "127.0.0.1"),
    ] {
        assert_eq!(
            server_span.attr(k),
            Some(v),
            "server span {k}: {server_span:#?}"
        );
    }
    let peer = server_span.attr("isdp.peer.identity").unwrap_or_default();
    assert!(
        peer.starts_with("127.0.0.1:"),
        "peer identity: {server_span:#?}"
    );
    assert_eq!(client_span.status, 0, "a 200 is no error");
}

// === No collector ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_promptly_when_the_collector_is_unreachable() {
    // A port nobody listens on.
    let closed = isdp_tests::free_port();
    let pair = Pair::start(&format!(
        "otlp_endpoint = \"http://127.0.0.1:{closed}\"\ntrace_sample_ratio = 1.0"
    ))
    .await;
    let client = client();
    let start = Instant::now();
    for i in 0..200 {
        let t = Instant::now();
        let (status, _) = get_traced(&client, &pair.url("/x")).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "request {i} took {:?}",
            t.elapsed()
        );
    }
    // Batches fail to send meanwhile (every second); requests never wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..20 {
        let (status, _) = get_traced(&client, &pair.url("/y")).await;
        assert_eq!(status, StatusCode::OK, "request {i} after failed exports");
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    // The spans that could not be sent are counted where operators look.
    eventually(
        Duration::from_secs(10),
        "dropped spans on /metrics",
        || async {
            let text = isdp_tests::http::get(pair.web.admin_addr(), "/metrics")
                .await?
                .body;
            let dropped: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("isdp_trace_spans_dropped_total "))
                .ok_or_else(|| anyhow::anyhow!("no isdp_trace_spans_dropped_total"))?
                .parse()?;
            anyhow::ensure!(dropped > 0.0, "none dropped yet");
            Ok(())
        },
    )
    .await;
}

// === Access log ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request() {
    let mut pair = Pair::start("access_log = true\nlog_format = \"json\"").await;
    let (status, _) = get_traced(&client(), &pair.url("/orders/7?x=1")).await;
    assert_eq!(status, StatusCode::OK);
    let log = pair.web.process().log_path().to_owned();
    let mut line = serde_json::Value::Null;
    eventually(REQUEST, "an access-log line in web's log", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        line = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "isdp::access")
            .unwrap_or_default();
        let found = !line.is_null();
        async move {
            anyhow::ensure!(found, "no isdp::access line yet");
            Ok(())
        }
    })
    .await;
    let f = &line["fields"];
    assert_eq!(f["direction"], "outbound", "{line}");
    assert_eq!(f["method"], "GET", "{line}");
    assert_eq!(f["authority"], pair.web.upstream_addr(SERVICE), "{line}");
    assert_eq!(f["path"], "/orders/7", "{line}");
    assert_eq!(f["status"], 200, "{line}");
    assert!(f["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{line}");
    assert_eq!(f["upstream"], SERVICE, "{line}");
    assert_eq!(f["endpoint"], pair.backend.inbound_addr(), "{line}");
    assert_eq!(f["endpoint_id"], "pay-0.payments", "{line}");
    assert_eq!(
        f["trace_id"], TRACE_ID,
        "tracing off: the caller's trace id: {line}"
    );
}

// === Control plane ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_traces_registrations_sessions_and_pushes() {
    let otlp = OtlpReceiver::start().await;
    let cp = ControlPlane::start(ControlPlaneOpts {
        extra_args: vec!["--otlp-endpoint".into(), otlp.endpoint()],
        ..ControlPlaneOpts::default()
    })
    .await;
    let id = cp.register("orders", "127.0.0.1", 9, &[]).await;
    // A sidecar following `orders`: a session, and an xDS push to it.
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0("orders", "http", "round_robin")
        .start()
        .await;
    web.wait_ready(SETUP).await;

    let mut spans: Vec<ReceivedSpan> = Vec::new();
    eventually(EXPORT, "register, session and push spans", || {
        spans = otlp.spans();
        let names: Vec<String> = spans.iter().map(|s| s.name.clone()).collect();
        async move {
            for want in [
                "isdp.v1.Registry/Register",
                "isdp.v1.Sidecar/Session.Open",
                "xds push",
            ] {
                anyhow::ensure!(names.iter().any(|n| n == want), "no {want} in {names:?}");
            }
            Ok(())
        }
    })
    .await;
    let register = spans
        .iter()
        .find(|s| s.name == "isdp.v1.Registry/Register")
        .unwrap();
    assert_eq!(register.service, "isdp-control-plane");
    assert_eq!(register.kind, SPAN_KIND_SERVER);
    assert_eq!(
        register.attr("isdp.service"),
        Some("orders"),
        "{register:#?}"
    );
    assert_eq!(register.attr("isdp.instance.id"), Some(id.as_str()));
    assert_eq!(register.attr("rpc.grpc.status_code"), Some("0"));
    let open = spans
        .iter()
        .find(|s| s.name == "isdp.v1.Sidecar/Session.Open")
        .unwrap();
    assert_eq!(open.attr("isdp.node"), Some("web"), "{open:#?}");
    let push = spans
        .iter()
        .find(|s| s.name == "xds push" && s.attr("isdp.node") == Some("web"))
        .unwrap_or_else(|| panic!("no push to web: {spans:#?}"));
    assert!(
        push.attr("xds.type_url")
            .is_some_and(|t| t.ends_with("ServiceEndpoints")),
        "{push:#?}"
    );
}
