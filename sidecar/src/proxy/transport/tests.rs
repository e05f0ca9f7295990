//! Handshakes between in-process sidecars with rcgen-made CAs.

use std::sync::Arc;

use rustls::{ClientConfig, pki_types::ServerName, sign::CertifiedKey};
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

use super::*;
use crate::test_pki::{Leaf, TD, TestCa, self_signed};

const CONNECT: Duration = Duration::from_secs(2);

fn ctx(ca: &TestCa, services: &[&str], client_as: &str) -> Arc<TlsContext> {
    let revocations = Revocations::new(Metrics::new());
    ctx_granted(ca, services, client_as, None, &revocations)
}

/// Like [`ctx`], with certificates issued under `grant` and verifiers that
/// read `revocations`.
fn ctx_granted(
    ca: &TestCa,
    services: &[&str],
    client_as: &str,
    grant: Option<&str>,
    revocations: &Revocations,
) -> Arc<TlsContext> {
    let leaf = |service: &str| {
        let leaf = Leaf::service(TD, service);
        match grant {
            Some(g) => leaf.granted_by(g),
            None => leaf,
        }
    };
    let local: Vec<LocalCert> = services
        .iter()
        .map(|s| LocalCert {
            service: s.to_string(),
            key: ca.issue(&leaf(s)),
        })
        .collect();
    let primary = ca.issue(&leaf(client_as));
    Arc::new(
        TlsContext::new(
            TD,
            &local,
            primary,
            std::slice::from_ref(&ca.root),
            revocations,
        )
        .unwrap(),
    )
}

/// A TLS echo server; reports each accepted connection's peer and service.
async fn server(
    tls: Tls,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Option<(PeerIdentity, String, bool)>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, peer) = l.accept().await.unwrap();
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some(a) = tls.accept(s, peer).await else {
                    let _ = tx.send(None);
                    return;
                };
                let _ = tx.send(Some((a.peer, a.service, a.tunnel)));
                let (mut r, mut w) = tokio::io::split(a.stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, rx)
}

fn tls_of(ctx: Arc<TlsContext>) -> (Tls, Metrics, watch::Sender<Option<Arc<TlsContext>>>) {
    let metrics = Metrics::new();
    let (tls, tx) = tls_with(ctx, &Revocations::new(metrics.clone()), &metrics);
    (tls, metrics, tx)
}

fn tls_with(
    ctx: Arc<TlsContext>,
    revocations: &Revocations,
    metrics: &Metrics,
) -> (Tls, watch::Sender<Option<Arc<TlsContext>>>) {
    let (tx, rx) = watch::channel(Some(ctx));
    (Tls::new(rx, revocations.clone(), metrics.clone()), tx)
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

fn count(metrics: &Metrics, direction: &str, reason: &str) -> u64 {
    let needle = format!(
        "isdp_tls_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}} "
    );
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(|n| n.parse().unwrap()))
        .unwrap_or(0)
}

#[tokio::test]
async fn a_mesh_client_is_accepted_and_identified() {
    let ca = TestCa::new("mesh");
    let (server_tls, _, _keep) = tls_of(ctx(&ca, &["payments", "ledger"], "payments"));
    let (addr, mut accepted) = server(server_tls).await;
    let (client, _, _keep2) = tls_of(ctx(&ca, &["web"], "web"));

    let mut s = client
        .connect(addr, "payments", Alpn::H2, CONNECT)
        .await
        .unwrap();
    echo(&mut s, b"hello").await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN_H2));
    let (peer, service, tunnel) = accepted.recv().await.unwrap().unwrap();
    assert_eq!(&*peer.0, "spiffe://mesh.test/svc/web");
    assert_eq!((service.as_str(), tunnel), ("payments", false));

    // Another local service on the same port, by SNI; a tunnel by ALPN.
    let mut s = client
        .connect(addr, "ledger", Alpn::Tcp, CONNECT)
        .await
        .unwrap();
    echo(&mut s, b"bytes").await;
    let (_, service, tunnel) = accepted.recv().await.unwrap().unwrap();
    assert_eq!((service.as_str(), tunnel), ("ledger", true));

    // A service this sidecar does not front: no certificate, no handshake.
    assert!(
        client
            .connect(addr, "orders", Alpn::H2, CONNECT)
            .await
            .is_err()
    );
    assert!(accepted.recv().await.unwrap().is_none());
}

/// A client configuration trusting `ca` as server roots that presents
/// `cert` (or nothing).
fn raw_client(ca: &TestCa, cert: Option<Arc<CertifiedKey>>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root.clone()).unwrap();
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
    let verifier = Arc::new(verify::SpiffeServerVerifier {
        inner,
        trust_domain: Arc::from(TD),
        revocations: Revocations::new(Metrics::new()),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match cert {
        Some(k) => builder.with_client_cert_resolver(Arc::new(Fixed(k))),
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);
impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn bad_clients_are_refused_with_a_reason() {
    let ca = TestCa::new("mesh");
    let other_ca = TestCa::new("other");
    let (server_tls, metrics, _keep) = tls_of(ctx(&ca, &["payments"], "payments"));
    let (addr, mut accepted) = server(server_tls).await;
    let now = OffsetDateTime::now_utc();
    let expired = Leaf {
        not_before: now - TimeDuration::hours(2),
        not_after: now - TimeDuration::hours(1),
        ..Leaf::service(TD, "web")
    };
    let foreign_td = Leaf::service("other.test", "web");
    let two_uris = Leaf {
        uris: vec![
            "spiffe://mesh.test/svc/web".into(),
            "spiffe://mesh.test/svc/admin".into(),
        ],
        ..Leaf::service(TD, "web")
    };
    let cases: Vec<(&str, Option<Arc<CertifiedKey>>, &str)> = vec![
        ("no client cert", None, "no_client_cert"),
        ("self-signed", Some(self_signed(TD, "web")), "unknown_ca"),
        (
            "another CA",
            Some(other_ca.service(TD, "web").key),
            "unknown_ca",
        ),
        (
            "another trust domain",
            Some(ca.issue(&foreign_td)),
            "bad_identity",
        ),
        ("two URI SANs", Some(ca.issue(&two_uris)), "bad_identity"),
        ("expired", Some(ca.issue(&expired)), "expired"),
    ];
    let name = ServerName::try_from("payments.svc.mesh.test").unwrap();
    for (what, cert, reason) in cases {
        let before = count(&metrics, "inbound", reason);
        let tcp = TcpStream::connect(addr).await.unwrap();
        // TLS 1.3: the client finishes first, then the server refuses.
        if let Ok(mut s) = raw_client(&ca, cert).connect(name.clone(), tcp).await {
            let _ = s.write_all(b"x").await;
            let mut buf = [0u8; 1];
            assert!(
                !matches!(s.read(&mut buf).await, Ok(1)),
                "{what}: got data back"
            );
        }
        assert!(accepted.recv().await.unwrap().is_none(), "{what} accepted");
        assert_eq!(count(&metrics, "inbound", reason), before + 1, "{what}");
    }

    // Plaintext, including a plaintext tunnel preamble.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"ISDP-TCP/1 payments\n").await.unwrap();
    assert!(accepted.recv().await.unwrap().is_none());
    assert_eq!(count(&metrics, "inbound", "plaintext"), 1);
}

#[tokio::test]
async fn the_client_refuses_a_server_of_another_service() {
    let ca = TestCa::new("mesh");
    // Serves SNI payments.svc.mesh.test (DNS SAN matches) with the SPIFFE
    // ID of orders.
    let impostor = LocalCert {
        service: "payments".into(),
        key: ca.issue(&Leaf {
            uris: vec!["spiffe://mesh.test/svc/orders".into()],
            ..Leaf::service(TD, "payments")
        }),
    };
    let server_ctx = TlsContext::new(
        TD,
        &[impostor],
        ca.service(TD, "payments").key,
        std::slice::from_ref(&ca.root),
        &Revocations::new(Metrics::new()),
    )
    .unwrap();
    let (server_tls, _, _keep) = tls_of(Arc::new(server_ctx));
    let (addr, _accepted) = server(server_tls).await;
    let (client, metrics, _keep2) = tls_of(ctx(&ca, &["web"], "web"));
    let err = client
        .connect(addr, "payments", Alpn::H2, CONNECT)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("orders"), "{err}");
    assert_eq!(count(&metrics, "outbound", "bad_identity"), 1);

    // And a server whose bundle is another mesh's.
    let other = TestCa::new("other");
    let (client, metrics, _keep3) = tls_of(ctx(&other, &["web"], "web"));
    assert!(
        client
            .connect(addr, "payments", Alpn::H2, CONNECT)
            .await
            .is_err()
    );
    assert_eq!(count(&metrics, "outbound", "unknown_ca"), 1);
}

#[tokio::test]
async fn rotation_keeps_open_connections_and_serves_the_new_cert() {
    let ca = TestCa::new("mesh");
    let first = ctx(&ca, &["payments"], "payments");
    let (server_tls, _, swap) = tls_of(first.clone());
    let (addr, mut accepted) = server(server_tls).await;
    let (client, _, _keep) = tls_of(ctx(&ca, &["web"], "web"));
    let leaf =
        |s: &client::TlsStream<TcpStream>| s.get_ref().1.peer_certificates().unwrap()[0].clone();

    let mut old = client
        .connect(addr, "payments", Alpn::H2, CONNECT)
        .await
        .unwrap();
    echo(&mut old, b"before").await;
    accepted.recv().await.unwrap().unwrap();

    swap.send(Some(ctx(&ca, &["payments"], "payments")))
        .unwrap();
    let mut new = client
        .connect(addr, "payments", Alpn::H2, CONNECT)
        .await
        .unwrap();
    echo(&mut new, b"new").await;
    accepted.recv().await.unwrap().unwrap();
    assert_ne!(
        leaf(&old),
        leaf(&new),
        "new connections get the new certificate"
    );
    echo(&mut old, b"still up after the swap").await;
}

/// The request path between two sidecars: the forwarder's h2 pool over
/// mTLS to an inbound connection whose requests carry the caller's
/// identity.
#[tokio::test]
async fn requests_between_sidecars_carry_the_callers_identity() {
    use http_body_util::{BodyExt, Full};

    use crate::proxy::{
        forward::{Dest, Forwarder, Hop},
        http::{Body, boxed},
        outbound::{BoxFuture, ClientAddr, answer},
        serve_conn,
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
    tokio::spawn(async move {
        loop {
            let (s, peer) = l.accept().await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let a = server_tls.accept(s, peer).await.unwrap();
            let client = ClientAddr::mesh(peer, a.peer, Arc::from(a.service), a.guard);
            tokio::spawn(serve_conn(a.stream, client, svc, shutdown.clone()));
        }
    });

    let (client_tls, _, _keep2) = tls_of(ctx(&ca, &["web"], "web"));
    let forwarder = Forwarder::new(CONNECT).with_tls(client_tls);
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
    let resp = Forwarder::new(CONNECT)
        .forward(req, &dest, Hop::Http2)
        .await;
    assert_eq!(resp.status(), 502);
}

/// TCP tunnels keep half-close across TLS: the client's shutdown reaches
/// the server as EOF (close_notify) while the other direction goes on.
#[tokio::test]
async fn tunnels_pass_half_close_through_tls() {
    let ca = TestCa::new("mesh");
    let (server_tls, _, _keep) = tls_of(ctx(&ca, &["db"], "db"));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, peer) = l.accept().await.unwrap();
        let mut a = server_tls.accept(s, peer).await.unwrap();
        assert!(a.tunnel);
        let mut got = Vec::new();
        a.stream.read_to_end(&mut got).await.unwrap();
        a.stream.write_all(b"after eof: ").await.unwrap();
        a.stream.write_all(&got).await.unwrap();
        a.stream.shutdown().await.unwrap();
    });
    let (client_tls, _, _keep2) = tls_of(ctx(&ca, &["web"], "web"));
    let mut s = client_tls
        .connect(addr, "db", Alpn::Tcp, CONNECT)
        .await
        .unwrap();
    s.write_all(b"query").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"after eof: query");
    server.await.unwrap();
}

/// Two sidecars, in process, as in
/// [`requests_between_sidecars_carry_the_callers_identity`]: `web` (its
/// certificate issued under token `WEB`) calls `payments` (under `PAY`)
/// through the forwarder's HTTP/2 pool; each side has its own revoked set.
struct Pair {
    forwarder: crate::proxy::forward::Forwarder,
    dest: crate::proxy::forward::Dest,
    /// Handshakes the server side accepted.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    server: (Revocations, Metrics),
    client: (Revocations, Metrics),
    _keep: Vec<watch::Sender<Option<Arc<TlsContext>>>>,
    _stop: watch::Sender<bool>,
}

const WEB: &str = "aaaaaaaaaaaaaaaa";
const PAY: &str = "bbbbbbbbbbbbbbbb";

impl Pair {
    async fn start() -> Pair {
        use http_body_util::{BodyExt, Full};

        use crate::proxy::{
            forward::{Dest, Forwarder},
            http::{Body, boxed},
            outbound::{BoxFuture, ClientAddr, answer},
            serve_conn,
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
        tokio::spawn(async move {
            loop {
                let (s, peer) = l.accept().await.unwrap();
                let (server_tls, count, shutdown) =
                    (server_tls.clone(), count.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let Some(a) = server_tls.accept(s, peer).await else {
                        return;
                    };
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let client = ClientAddr::mesh(peer, a.peer, Arc::from(a.service), a.guard);
                    serve_conn(a.stream, client, svc, shutdown).await
                });
            }
        });
        let client_ctx = ctx_granted(&ca, &["web"], "web", Some(WEB), &client.0);
        let (client_tls, keep_client) = tls_with(client_ctx, &client.0, &client.1);
        Pair {
            forwarder: Forwarder::new(CONNECT).with_tls(client_tls),
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
            .body(crate::proxy::http::boxed(
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

fn refusals(metrics: &Metrics, direction: &str, stage: &str) -> u64 {
    let needle =
        format!("isdp_revoked_peer_refusals_total{{direction=\"{direction}\",stage=\"{stage}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(|n| n.parse().unwrap()))
        .unwrap_or(0)
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

/// An accepted tunnel carries its caller's guard, which ends it (as the
/// inbound listener does) once the caller's token is revoked.
#[tokio::test]
async fn an_accepted_tunnel_ends_when_its_caller_is_revoked() {
    let ca = TestCa::new("mesh");
    let server_metrics = Metrics::new();
    let server_revoked = Revocations::new(server_metrics.clone());
    let server_ctx = ctx_granted(&ca, &["db"], "db", Some(PAY), &server_revoked);
    let (server_tls, _keep) = tls_with(server_ctx, &server_revoked, &server_metrics);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, peer) = l.accept().await.unwrap();
        let a = server_tls.accept(s, peer).await.unwrap();
        let guards: Vec<PeerGuard> = a.guard.into_iter().collect();
        let (mut r, mut w) = tokio::io::split(a.stream);
        // What the inbound listener does with a tunnel, its local service
        // an echo.
        tokio::select! {
            _ = tokio::io::copy(&mut r, &mut w) => "finished",
            _ = any_revoked(&guards) => "closed",
        }
    });
    let (client_tls, _, _keep2) = tls_of(ctx_granted(
        &ca,
        &["web"],
        "web",
        Some(WEB),
        &Revocations::new(Metrics::new()),
    ));
    let mut s = client_tls
        .connect(addr, "db", Alpn::Tcp, CONNECT)
        .await
        .unwrap();
    echo(&mut s, b"before").await;
    server_revoked.update(&[WEB.into()]);
    let how = tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("the tunnel ends")
        .unwrap();
    assert_eq!(how, "closed");
    let mut buf = [0u8; 1];
    assert!(
        !matches!(s.read(&mut buf).await, Ok(1)),
        "nothing more comes back"
    );
}

/// A full handshake is refused by the verifier, which tells the client why
/// (`certificate_revoked`); a resumed one, which skips the verifier, by
/// the check after it (see the pair tests above, whose reconnections
/// resume).
#[tokio::test]
async fn a_client_under_a_revoked_token_is_told_so() {
    let ca = TestCa::new("mesh");
    let metrics = Metrics::new();
    let revocations = Revocations::new(metrics.clone());
    revocations.update(&[WEB.into()]);
    let server_ctx = ctx_granted(&ca, &["payments"], "payments", None, &revocations);
    let (server_tls, _keep) = tls_with(server_ctx, &revocations, &metrics);
    let (addr, mut accepted) = server(server_tls).await;
    let name = ServerName::try_from("payments.svc.mesh.test").unwrap();
    let cert = ca.issue(&Leaf::service(TD, "web").granted_by(WEB));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = raw_client(&ca, Some(cert))
        .connect(name.clone(), tcp)
        .await
        .expect("TLS 1.3: the client finishes first");
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 1];
    let err = s.read(&mut buf).await.unwrap_err();
    let alert = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned();
    assert_eq!(
        alert,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRevoked
        )),
        "{err}"
    );
    assert!(accepted.recv().await.unwrap().is_none());
    assert_eq!(count(&metrics, "inbound", "revoked"), 1);

    // Another token's certificate passes.
    let other = ca.issue(&Leaf::service(TD, "web").granted_by(PAY));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = raw_client(&ca, Some(other))
        .connect(name, tcp)
        .await
        .unwrap();
    echo(&mut s, b"fine").await;
    assert!(accepted.recv().await.unwrap().is_some());
}
