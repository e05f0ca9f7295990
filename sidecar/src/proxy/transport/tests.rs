//! Handshakes between in-process sidecars with rcgen-made CAs.

use std::sync::Arc;

use rustls::{ClientConfig, pki_types::ServerName, sign::CertifiedKey};
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::testing::{CONNECT, PAY, WEB, count, ctx, ctx_granted, echo, tls_of, tls_with};
use super::*;
use crate::tls::{
    ALPN_H2, LocalCert, PeerGuard, Revocations, TlsContext, any_revoked, provider,
    test_pki::{Leaf, TD, TestCa, self_signed},
    verify,
};

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

/// Checks the server's chain against the CA and nothing else: the SNI a
/// proxyless client sends (its target's bare name) is not the name in the
/// certificate, and such a client checks the SPIFFE ID instead (gRFC A29).
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let named = ServerName::try_from("payments.svc.mesh.test").unwrap();
        self.0
            .verify_server_cert(end_entity, intermediates, &named, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A proxyless gRPC client names the service bare in its SNI (grpc-js
/// sends its target's name): the sidecar serves that service's
/// certificate and routes to it, as for `<service>.svc.<trust-domain>`;
/// a bare name it does not front gets no handshake.
#[tokio::test]
async fn a_bare_service_name_as_sni_picks_that_service() {
    let ca = TestCa::new("mesh");
    let (server_tls, _, _keep) = tls_of(ctx(&ca, &["payments", "ledger"], "payments"));
    let (addr, mut accepted) = server(server_tls).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root.clone()).unwrap();
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
    let web = ca.issue(&Leaf::service(TD, "web"));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
        .with_client_cert_resolver(Arc::new(Fixed(web)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let connector = TlsConnector::from(Arc::new(config));

    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = connector
        .connect(ServerName::try_from("payments").unwrap(), tcp)
        .await
        .expect("a bare service name is served");
    let presented = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(
        isdp_core::cert::uri_san(&presented).unwrap(),
        "spiffe://mesh.test/svc/payments"
    );
    echo(&mut s, b"hi").await;
    let (peer, service, _) = accepted.recv().await.unwrap().unwrap();
    assert_eq!(&*peer.0, "spiffe://mesh.test/svc/web");
    assert_eq!(service, "payments");

    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(
        connector
            .connect(ServerName::try_from("orders").unwrap(), tcp)
            .await
            .is_err()
    );
    assert!(accepted.recv().await.unwrap().is_none());
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
