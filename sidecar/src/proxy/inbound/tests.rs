use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use tower::Service as _;

use super::*;

/// Over mTLS the SNI's service is the destination; a header naming
/// another is refused.
#[tokio::test]
async fn requests_go_to_the_service_the_connection_is_for() {
    let config = crate::Config::from_toml(
        "node_id = \"n\"\ncontrol_plane = [\"http://127.0.0.1:1\"]\n\
         [[service]]\nname = \"payments\"\nport = 1\n\
         [[service]]\nname = \"ledger\"\nport = 1\n",
    )
    .unwrap();
    let metrics = Metrics::new();
    let policy = |default: isdp_proto::v1::Action| {
        let p = crate::authz::Policy::compile(&isdp_proto::v1::AuthorizationPolicy {
            destination: "payments".into(),
            default_action: default as i32,
            rules: vec![],
            trust_domain: "isdp.local".into(),
        });
        Arc::new(crate::authz::Policies::from([(
            "payments".to_owned(),
            Arc::new(p),
        )]))
    };
    let (policies, rx) = tokio::sync::watch::channel(policy(isdp_proto::v1::Action::Allow));
    let mut inbound = Inbound::new(
        &config.services,
        &[],
        Forwarder::new(
            Duration::from_millis(200),
            Tunnels::unregistered(Duration::from_secs(60)),
        ),
        &metrics,
        Authorizer::new(rx, metrics.clone()),
    );
    let req = |header: Option<&str>| {
        let mut client = ClientAddr::new("127.0.0.1:9".parse().unwrap());
        client.service = Some(Arc::from("payments"));
        let mut r = Request::get("/")
            .body(super::super::svc::boxed(
                Empty::<bytes::Bytes>::new().map_err(|e| match e {}),
            ))
            .unwrap();
        if let Some(h) = header {
            r.headers_mut()
                .insert(SERVICE_HEADER.clone(), h.parse().unwrap());
        }
        r.extensions_mut().insert(client);
        r
    };
    let resp = inbound.call(req(Some("ledger"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
    // No header: the SNI's service, though several are local (the
    // service itself is down here: 502, not 404).
    let resp = inbound.call(req(None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let resp = inbound.call(req(Some("payments"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);

    // A policy change applies to the next request.
    policies.send_replace(policy(isdp_proto::v1::Action::Deny));
    let resp = inbound.call(req(None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-isdp-error"], "denied-by-policy");
}

// === the request as rules and the application see it ===

const WEB: &str = "spiffe://isdp.local/svc/web";

/// A local application on a loopback port: answers every request 200 and
/// reports its request line, so a test sees exactly what reached it.
async fn app() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = conn.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut first = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.is_empty() {
                        let _ = tx.send(first.take().unwrap_or_default());
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if write.write_all(ok).await.is_err() {
                            return;
                        }
                    } else if first.is_none() {
                        first = Some(line);
                    }
                }
            });
        }
    });
    (port, rx)
}

/// `payments` (HTTP, on `http_port`) and `ledger` (TCP, on `tcp_port`),
/// both with `rules` under a default allow.
fn inbound(
    http_port: u16,
    tcp_port: u16,
    rules: Vec<isdp_proto::v1::AuthzRule>,
) -> (Inbound, Metrics) {
    let config = crate::Config::from_toml(&format!(
        "node_id = \"n\"\ncontrol_plane = [\"http://127.0.0.1:1\"]\n\
         [[service]]\nname = \"payments\"\nport = {http_port}\n\
         [[service]]\nname = \"ledger\"\nport = {tcp_port}\nprotocol = \"tcp\"\n"
    ))
    .unwrap();
    let metrics = Metrics::new();
    let policy = |destination: &str| {
        let p = crate::authz::Policy::compile(&isdp_proto::v1::AuthorizationPolicy {
            destination: destination.into(),
            default_action: isdp_proto::v1::Action::Allow as i32,
            rules: rules.clone(),
            trust_domain: "isdp.local".into(),
        });
        (destination.to_owned(), Arc::new(p))
    };
    let compiled = crate::authz::Policies::from([policy("payments"), policy("ledger")]);
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(compiled));
    let inbound = Inbound::new(
        &config.services,
        &[],
        Forwarder::new(
            Duration::from_millis(500),
            Tunnels::unregistered(Duration::from_secs(60)),
        ),
        &metrics,
        Authorizer::new(rx, metrics.clone()),
    );
    (inbound, metrics)
}

fn deny_admin() -> isdp_proto::v1::AuthzRule {
    isdp_proto::v1::AuthzRule {
        name: "no-admin".into(),
        destination: "payments".into(),
        sources: vec!["web".into()],
        action: isdp_proto::v1::Action::Deny as i32,
        methods: vec![],
        path_prefix: "/admin".into(),
    }
}

/// A request from `web` over mTLS for `payments`.
fn from_web(method: &str, target: &str) -> Request<Body> {
    let mut client = ClientAddr::new("127.0.0.1:9".parse().unwrap());
    client.service = Some(Arc::from("payments"));
    client.peer = Some(PeerIdentity(Arc::from(WEB)));
    let mut r = Request::builder()
        .method(method)
        .uri(target)
        .body(super::super::svc::boxed(
            Empty::<bytes::Bytes>::new().map_err(|e| match e {}),
        ))
        .unwrap();
    r.extensions_mut().insert(client);
    r
}

#[tokio::test]
async fn every_spelling_of_a_denied_path_is_denied() {
    let (port, mut seen) = app().await;
    let (mut inbound, _) = inbound(port, 1, vec![deny_admin()]);
    for target in [
        "/admin",
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/ad%6Din/users",
        "/admin;jsessionid=1",
        "/%2e%2e/admin",
        "/admin/.",
        "/x/%2E%2E//admin/",
        "http://payments//admin",
    ] {
        let resp = inbound.call(from_web("GET", target)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{target}");
    }
    assert!(seen.try_recv().is_err(), "a denied request reached the app");
}

#[tokio::test]
async fn paths_without_a_canonical_form_and_lower_case_methods_are_refused() {
    let (port, mut seen) = app().await;
    let (mut inbound, metrics) = inbound(port, 1, vec![deny_admin()]);
    for target in [
        "/admin%2f",
        "/%2Fadmin",
        "/x%5Cadmin",
        "/x\\..\\admin",
        "/%zz",
        "/admin%4",
        "/public/..;/admin",
        "/admin%00",
        "/%C0%AF",
    ] {
        let resp = inbound.call(from_web("GET", target)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{target}");
        assert_eq!(resp.headers()["x-isdp-error"], "bad-path", "{target}");
    }
    for method in ["get", "delete", "Delete"] {
        let resp = inbound.call(from_web(method, "/x")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{method}");
        assert_eq!(resp.headers()["x-isdp-error"], "bad-method", "{method}");
    }
    let resp = inbound.call(from_web("GET", "*")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(
        seen.try_recv().is_err(),
        "a refused request reached the app"
    );
    let page = metrics.render();
    for line in [
        r#"isdp_proxy_errors_total{direction="inbound",service="payments",reason="bad-path"} 10"#,
        r#"isdp_proxy_errors_total{direction="inbound",service="payments",reason="bad-method"} 3"#,
    ] {
        assert!(page.contains(line), "missing {line}\n{page}");
    }
}

/// What was checked is what the application gets: the canonical path,
/// with the query as it came.
#[tokio::test]
async fn the_application_sees_the_path_that_was_checked() {
    let (port, mut seen) = app().await;
    let (mut inbound, _) = inbound(port, 1, vec![deny_admin()]);
    for (method, target, line) in [
        ("GET", "/administrator", "GET /administrator HTTP/1.1"),
        ("GET", "/Admin", "GET /Admin HTTP/1.1"),
        (
            "GET",
            "/public//x/./y/%7Ez?q=%2F%zz/../a",
            "GET /public/x/y/~z?q=%2F%zz/../a HTTP/1.1",
        ),
        ("GET", "/admin/../public", "GET /public HTTP/1.1"),
        ("GET", "http://payments/a//b?c", "GET /a/b?c HTTP/1.1"),
        ("OPTIONS", "*", "OPTIONS * HTTP/1.1"),
    ] {
        let resp = inbound.call(from_web(method, target)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{target}");
        let got = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, line, "{target}");
    }
}

#[tokio::test]
async fn tunnels_reach_tcp_services_only() {
    let (http_port, _seen) = app().await;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let (inbound, metrics) = inbound(http_port, tcp_port, vec![]);
    let web = PeerIdentity(Arc::from(WEB));

    // To the HTTP service: closed at once, counted, nothing connected.
    let (_client, stream) = tokio::io::duplex(1024);
    tokio::time::timeout(
        Duration::from_secs(5),
        inbound.tcp(stream, "payments", &web, Duration::from_secs(1)),
    )
    .await
    .expect("a refused tunnel returns at once");
    let page = metrics.render();
    assert!(
        page.contains(
            "isdp_authz_denied_total{service=\"payments\",source=\"web\",rule=\"tunnel-to-http\"} 1"
        ),
        "{page}"
    );

    // To the TCP service: spliced through.
    let (_client, stream) = tokio::io::duplex(1024);
    let tunnel = {
        let inbound = inbound.clone();
        tokio::spawn(async move {
            inbound
                .tcp(stream, "ledger", &web, Duration::from_secs(1))
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(5), tcp.accept())
        .await
        .expect("the tcp service gets the tunnel")
        .unwrap();
    tunnel.abort();
}

/// An application's ORCA report in its trailers (where gRPC servers put
/// it) is read into the instance's load and never reaches the caller; the
/// other trailers pass.
#[tokio::test]
async fn an_orca_report_in_the_trailers_is_read_and_stripped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if conn.read(&mut byte).await.unwrap() == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let answer = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                      trailer: endpoint-load-metrics, x-done\r\n\r\n\
                      2\r\nok\r\n0\r\n\
                      endpoint-load-metrics: TEXT cpu_utilization=0.4\r\n\
                      x-done: yes\r\n\r\n";
        conn.write_all(answer.as_bytes()).await.unwrap();
        // Held open, as a keep-alive connection is.
        let _ = conn.read(&mut [0u8; 1]).await;
    });
    let config = crate::Config::from_toml(&format!(
        "node_id = \"n\"\ncontrol_plane = [\"http://127.0.0.1:1\"]\n\
         [[service]]\nname = \"payments\"\nport = {port}\n"
    ))
    .unwrap();
    let metrics = Metrics::new();
    let load = LocalLoad::new("payments");
    let allow = crate::authz::Policy::compile(&isdp_proto::v1::AuthorizationPolicy {
        destination: "payments".into(),
        default_action: isdp_proto::v1::Action::Allow as i32,
        rules: vec![],
        trust_domain: "isdp.local".into(),
    });
    let policies = crate::authz::Policies::from([("payments".to_owned(), Arc::new(allow))]);
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(policies));
    let mut inbound = Inbound::new(
        &config.services,
        std::slice::from_ref(&load),
        Forwarder::new(
            Duration::from_millis(500),
            Tunnels::unregistered(Duration::from_secs(60)),
        ),
        &metrics,
        Authorizer::new(rx, metrics.clone()),
    );
    let resp = inbound.call(from_web("GET", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the body ends")
        .unwrap();
    let trailers = body.trailers().cloned().expect("trailers");
    assert_eq!(
        trailers.get("x-done").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    assert!(
        trailers.get("endpoint-load-metrics").is_none(),
        "{trailers:?}"
    );
    assert_eq!(body.to_bytes(), "ok");
    assert_eq!(load.orca().map(|o| o.cpu_utilization), Some(Some(0.4)));
}
