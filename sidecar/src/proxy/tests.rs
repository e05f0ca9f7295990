//! The request path between two in-process sidecars: the forwarder's
//! HTTP/2 pool over mTLS to an inbound connection served by `serve_conn`,
//! the sidecar's own answers as a gRPC caller gets them, and what a
//! revoked token does to both ends of it.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};

use super::transport::testing::{
    CONNECT, PAY, WEB, count, ctx, ctx_granted, refusals, tls_of, tls_with,
};
use crate::{
    config::Limits,
    listener::{Gate, Tunnels},
    metrics::Metrics,
    tls::{PeerIdentity, Revocations, TlsContext, test_pki::TestCa},
};

/// The request path between two sidecars: the forwarder's h2 pool over
/// mTLS to an inbound connection whose requests carry the caller's
/// identity.
#[tokio::test]
async fn requests_between_sidecars_carry_the_callers_identity() {
    use http_body_util::{BodyExt, Full};

    use crate::proxy::{
        forward::{Forwarder, Hop},
        serve_conn,
        svc::{Body, BoxFuture, ClientAddr, Dest, answer, boxed},
    };

    let ca = TestCa::new("mesh");
    let (server_tls, _, _keep) = tls_of(ctx(&ca, &["payments"], "payments"));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let svc = tower::service_fn(|req: http::Request<Body>| -> BoxFuture {
        let who = PeerIdentity::of(&req).map_or("nobody".to_owned(), |p| p.0.to_string());
        answer(http::Response::new(boxed(
            Full::new(bytes::Bytes::from(who)).map_err(|e| match e {}),
        )))
    });
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let gate = Gate::data("inbound", &Limits::default(), &Metrics::new());
    tokio::spawn(async move {
        loop {
            let (s, peer) = l.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let a = server_tls.accept(s, peer).await.unwrap();
            let client = ClientAddr::mesh(peer, a.peer, Arc::from(a.service), a.guard);
            let place = gate.admit(peer).unwrap();
            tokio::spawn(serve_conn(
                gate.clone(),
                a.stream,
                place,
                client,
                svc,
                shutdown.clone(),
            ));
        }
    });

    let (client_tls, _, _keep2) = tls_of(ctx(&ca, &["web"], "web"));
    let forwarder = Forwarder::new(CONNECT, Tunnels::unregistered(Duration::from_secs(60)))
        .with_tls(client_tls);
    let dest = Dest::mesh(addr, Arc::from("payments"));
    for _ in 0..3 {
        let req = http::Request::get("http://payments/x")
            .body(boxed(
                http_body_util::Empty::<bytes::Bytes>::new().map_err(|e| match e {}),
            ))
            .unwrap();
        let resp = forwarder.forward(req, &dest, Hop::Http2).await;
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "spiffe://mesh.test/svc/web");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one multiplexed connection per (address, service)"
    );

    // Without mTLS configured, a sidecar destination is refused, not sent
    // in plaintext.
    let req = http::Request::get("http://payments/x")
        .body(boxed(
            http_body_util::Empty::<bytes::Bytes>::new().map_err(|e| match e {}),
        ))
        .unwrap();
    let resp = Forwarder::new(CONNECT, Tunnels::unregistered(Duration::from_secs(60)))
        .forward(req, &dest, Hop::Http2)
        .await;
    assert_eq!(resp.status(), 502);
}
/// A gRPC call the sidecar answers itself (here refused by policy) gets
/// the answer in gRPC's form, whichever layer made it: the HTTP status and
/// reason as before, `grpc-status` PERMISSION_DENIED and the reason as
/// `grpc-message`, and no body, so the headers end the stream (gRPC's C
/// core may read a body after a non-200 status as UNKNOWN). Other calls
/// keep the text body.
#[tokio::test]
async fn a_grpc_caller_gets_the_sidecars_answers_in_grpcs_form() {
    use http_body::Body as _;
    use http_body_util::BodyExt;

    use crate::proxy::{
        forward::{Forwarder, Hop},
        serve_conn,
        svc::{Body, BoxFuture, ClientAddr, Dest, ERROR_HEADER, ProxyError, answer, boxed},
    };

    let ca = TestCa::new("mesh");
    let (server_tls, _, _keep) = tls_of(ctx(&ca, &["payments"], "payments"));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (_stop, shutdown) = watch::channel(false);
    let svc = tower::service_fn(|_req: http::Request<Body>| -> BoxFuture {
        answer(ProxyError::DeniedByPolicy.response("rule deny-web"))
    });
    let gate = Gate::data("inbound", &Limits::default(), &Metrics::new());
    tokio::spawn(async move {
        loop {
            let (s, peer) = l.accept().await.unwrap();
            let a = server_tls.accept(s, peer).await.unwrap();
            let client = ClientAddr::mesh(peer, a.peer, Arc::from(a.service), a.guard);
            let place = gate.admit(peer).unwrap();
            tokio::spawn(serve_conn(
                gate.clone(),
                a.stream,
                place,
                client,
                svc,
                shutdown.clone(),
            ));
        }
    });
    let (client_tls, _, _keep2) = tls_of(ctx(&ca, &["web"], "web"));
    let forwarder = Forwarder::new(CONNECT, Tunnels::unregistered(Duration::from_secs(60)))
        .with_tls(client_tls);
    let dest = Dest::mesh(addr, Arc::from("payments"));
    let request = |content_type: &str| {
        http::Request::post("http://payments/pkg.Svc/Call")
            .header(http::header::CONTENT_TYPE, content_type)
            .body(boxed(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            ))))
            .unwrap()
    };

    for content_type in ["application/grpc", "application/grpc+proto"] {
        let resp = forwarder
            .forward(request(content_type), &dest, Hop::Http2)
            .await;
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()[&ERROR_HEADER], "denied-by-policy");
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "application/grpc"
        );
        assert_eq!(resp.headers()["grpc-status"], "7");
        assert_eq!(
            resp.headers()["grpc-message"],
            "denied-by-policy: rule deny-web"
        );
        assert!(resp.body().is_end_stream(), "the headers end the stream");
    }

    let resp = forwarder
        .forward(request("application/json"), &dest, Hop::Http2)
        .await;
    assert_eq!(resp.status(), 403);
    assert!(!resp.headers().contains_key("grpc-status"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "denied-by-policy: rule deny-web\n");
}

/// Two sidecars, in process, as in
/// [`requests_between_sidecars_carry_the_callers_identity`]: `web` (its
/// certificate issued under token `WEB`) calls `payments` (under `PAY`)
/// through the forwarder's HTTP/2 pool; each side has its own revoked set.
struct Pair {
    forwarder: crate::proxy::forward::Forwarder,
    dest: crate::proxy::svc::Dest,
    /// Handshakes the server side accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    server: (Revocations, Metrics),
    client: (Revocations, Metrics),
    _keep: Vec<watch::Sender<Option<Arc<TlsContext>>>>,
    _stop: watch::Sender<bool>,
}

impl Pair {
    async fn start() -> Pair {
        use http_body_util::{BodyExt, Full};

        use crate::proxy::{
            forward::Forwarder,
            serve_conn,
            svc::{Body, BoxFuture, ClientAddr, Dest, answer, boxed},
        };
        let ca = TestCa::new("mesh");
        let server_metrics = Metrics::new();
        let server = (Revocations::new(server_metrics.clone()), server_metrics);
        let client_metrics = Metrics::new();
        let client = (Revocations::new(client_metrics.clone()), client_metrics);
        let server_ctx = ctx_granted(&ca, &["payments"], "payments", Some(PAY), &server.0);
        let (server_tls, keep_server) = tls_with(server_ctx, &server.0, &server.1);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let svc = tower::service_fn(|_req: http::Request<Body>| -> BoxFuture {
            answer(http::Response::new(boxed(
                Full::new(bytes::Bytes::from("ok")).map_err(|e| match e {}),
            )))
        });
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let gate = Gate::data("inbound", &Limits::default(), &server.1);
        tokio::spawn(async move {
            loop {
                let (s, peer) = l.accept().await.unwrap();
                let (server_tls, count, shutdown, gate) = (
                    server_tls.clone(),
                    count.clone(),
                    shutdown.clone(),
                    gate.clone(),
                );
                tokio::spawn(async move {
                    let Some(a) = server_tls.accept(s, peer).await else {
                        return;
                    };
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let client = ClientAddr::mesh(peer, a.peer, Arc::from(a.service), a.guard);
                    let place = gate.admit(peer).unwrap();
                    serve_conn(gate, a.stream, place, client, svc, shutdown).await
                });
            }
        });
        let client_ctx = ctx_granted(&ca, &["web"], "web", Some(WEB), &client.0);
        let (client_tls, keep_client) = tls_with(client_ctx, &client.0, &client.1);
        Pair {
            forwarder: Forwarder::new(CONNECT, Tunnels::unregistered(Duration::from_secs(60)))
                .with_tls(client_tls),
            dest: Dest::mesh(addr, Arc::from("payments")),
            accepted,
            server,
            client,
            _keep: vec![keep_server, keep_client],
            _stop: stop,
        }
    }

    async fn status(&self) -> u16 {
        use http_body_util::BodyExt;
        let req = http::Request::get("http://payments/x")
            .body(crate::proxy::svc::boxed(
                http_body_util::Empty::<bytes::Bytes>::new().map_err(|e| match e {}),
            ))
            .unwrap();
        let resp = self
            .forwarder
            .forward(req, &self.dest, crate::proxy::forward::Hop::Http2)
            .await;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}
/// Revoking the caller's token reaches its open connection: the server
/// closes it, and the caller's next handshake is refused as `revoked`.
/// Another token's revocation changes nothing.
#[tokio::test]
async fn a_revoked_caller_loses_its_open_connection_and_new_handshakes() {
    let pair = Pair::start().await;
    for _ in 0..3 {
        assert_eq!(pair.status().await, 200);
    }
    assert_eq!(pair.accepted(), 1, "one multiplexed connection");

    pair.server.0.update(&["cccccccccccccccc".into()]);
    assert_eq!(pair.status().await, 200, "another token");
    assert_eq!(pair.accepted(), 1, "the connection stays");

    pair.server
        .0
        .update(&["cccccccccccccccc".into(), WEB.into()]);
    let mut status = 200;
    for _ in 0..50 {
        status = pair.status().await;
        if status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(status == 502 || status == 403, "refused: {status}");
    assert_eq!(refusals(&pair.server.1, "inbound", "connection"), 1);
    // The next attempts open new connections, which the handshake refuses.
    for _ in 0..2 {
        assert_ne!(pair.status().await, 200);
    }
    assert_eq!(pair.accepted(), 1, "no handshake succeeded since");
    assert!(count(&pair.server.1, "inbound", "revoked") >= 1);

    // Pruned from the bundle (the certificate would have expired): back.
    pair.server.0.update(&[]);
    assert_eq!(pair.status().await, 200);
}

/// Revoking the server's token makes the caller drop its pooled
/// connection to it and refuse the server at the next handshake.
#[tokio::test]
async fn a_revoked_server_is_dropped_from_the_pool_and_refused() {
    let pair = Pair::start().await;
    assert_eq!(pair.status().await, 200);
    pair.client.0.update(&[PAY.into()]);
    let mut status = 200;
    for _ in 0..50 {
        status = pair.status().await;
        if status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 502, "the caller refuses the server");
    assert_eq!(refusals(&pair.client.1, "outbound", "connection"), 1);
    assert_eq!(count(&pair.client.1, "outbound", "revoked"), 1);
    assert_eq!(
        pair.accepted(),
        1,
        "the server never saw a second handshake through"
    );
}
