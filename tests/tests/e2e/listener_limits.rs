//! The control plane's gRPC listener bounds what a client can hold without
//! a credential: every connection takes one of `--max-connections` places
//! (one over is closed as it is accepted, and counted), a connection must
//! carry its first authenticated request within `--first-request-timeout`
//! (a client that finishes TLS and sends no HTTP/2 preface, a preface and
//! no request, or only calls without a credential, is cut off), and the server's HTTP/2 SETTINGS announce
//! `--max-concurrent-streams`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use isdp_tests::{ControlPlane, ControlPlaneOpts, eventually};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{io::AsyncReadExt as _, net::TcpStream};
use tokio_rustls::client::TlsStream;

async fn start(args: &[&str]) -> ControlPlane {
    ControlPlane::start(ControlPlaneOpts {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .await
}

/// A TLS connection to the gRPC port offering h2, as gRPC clients do.
async fn tls(cp: &ControlPlane) -> std::io::Result<TlsStream<TcpStream>> {
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
    let tcp = TcpStream::connect(cp.grpc_addr()).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// How long until the server closes `conn` (reading nothing from it).
async fn closed_after(mut conn: TlsStream<TcpStream>, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, conn.read(&mut buf)).await {
            Err(_) => panic!("the connection was still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            // The server's SETTINGS and the like: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

async fn refused(cp: &ControlPlane, reason: &str) -> u64 {
    let metrics = isdp_tests::http::get(cp.admin_addr(), "/metrics")
        .await
        .expect("GET /metrics")
        .body;
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "isdp_grpc_connections_refused_total{{reason=\"{reason}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Makes one `ListServices` call on a new connection (with `token` as its
/// bearer, if any) and waits up to `wait` for the server to close the
/// connection: the call's HTTP status, and `Ok` if it was closed.
async fn one_call(
    cp: &ControlPlane,
    token: Option<&str>,
    wait: Duration,
) -> (http::StatusCode, Result<(), tokio::time::error::Elapsed>) {
    let used = tls(cp).await.expect("TLS");
    let (send, mut conn) = h2::client::handshake(used).await.unwrap();
    let mut req = http::Request::post("https://localhost/isdp.v1.Registry/ListServices")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(()).unwrap();
    let mut send = send.ready().await.unwrap();
    let (response, _body) = send.send_request(req, true).unwrap();
    let status = tokio::select! {
        _ = &mut conn => panic!("the connection ended before its answer"),
        r = response => r.unwrap().status(),
    };
    let closed = tokio::time::timeout(wait, async {
        let _ = (&mut conn).await;
    })
    .await;
    (status, closed)
}

/// A client that finishes TLS and then sends nothing, or the HTTP/2
/// preface and nothing more, is cut off at the first-request deadline;
/// one whose first request came stays connected past it.
#[tokio::test]
async fn a_connection_without_a_request_is_closed_at_the_deadline() {
    let cp = start(&["--first-request-timeout", "1s"]).await;

    let silent = tls(&cp).await.expect("TLS");
    let after = closed_after(silent, Duration::from_secs(10)).await;
    assert!(
        after >= Duration::from_millis(800),
        "closed after {after:?}"
    );

    let preface_only = tls(&cp).await.expect("TLS");
    let (_send, conn) = h2::client::handshake(preface_only)
        .await
        .expect("HTTP/2 handshake");
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "the preface-only connection stayed open");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A connection that carried only calls without a credential keeps its
    // deadline: refused calls must not buy anyone a connection place.
    let (status, stayed) = one_call(&cp, None, Duration::from_secs(5)).await;
    assert_eq!(status, 200, "a gRPC answer (UNAUTHENTICATED in trailers)");
    assert!(
        stayed.is_ok(),
        "a connection that carried only an unauthenticated call outlived the deadline"
    );

    // One that carried an authenticated call is past the deadline's reach.
    let (status, stayed) = one_call(&cp, Some(cp.admin_token()), Duration::from_secs(3)).await;
    assert_eq!(status, 200);
    assert!(
        stayed.is_err(),
        "a connection that carried an authenticated request was closed: {stayed:?}"
    );
    assert!(refused(&cp, "no-request").await >= 3);
}

/// With every place taken, a new connection is closed as it is accepted
/// (and counted); once one ends, the next is served.
#[tokio::test]
async fn connections_over_the_cap_are_closed_and_counted() {
    let cp = start(&["--max-connections", "3", "--first-request-timeout", "60s"]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tls(&cp).await.expect("a place"));
    }
    // The fourth is closed before or during its handshake.
    match tls(&cp).await {
        Err(_) => {}
        Ok(conn) => {
            closed_after(conn, Duration::from_secs(2)).await;
        }
    }
    assert!(refused(&cp, "max-connections").await >= 1);
    drop(held.pop());
    eventually(Duration::from_secs(5), "a place is free again", || async {
        let mut conn = tls(&cp).await?;
        let mut buf = [0u8; 16];
        // Served: the connection stays open (the server's SETTINGS, or
        // nothing, to read), where a refused one ends at once.
        match tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await {
            Err(_) | Ok(Ok(1..)) => Ok(()),
            Ok(r) => anyhow::bail!("closed at once: {r:?}"),
        }
    })
    .await;
}

/// The server's SETTINGS announce the stream limit per connection, by
/// default and as configured.
#[tokio::test]
async fn settings_announce_the_stream_limit() {
    for (args, expected) in [(&[][..], 200), (&["--max-concurrent-streams", "7"][..], 7)] {
        let cp = start(args).await;
        let (send, mut conn) = h2::client::handshake(tls(&cp).await.unwrap())
            .await
            .unwrap();
        let req = http::Request::post("https://localhost/isdp.v1.Registry/ListServices")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut send = send.ready().await.unwrap();
        let (response, _body) = send.send_request(req, true).unwrap();
        tokio::select! {
            _ = &mut conn => panic!("connection ended"),
            r = response => { r.unwrap(); }
        }
        assert_eq!(conn.max_concurrent_send_streams(), expected, "{args:?}");
    }
}
