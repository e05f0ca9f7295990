//! An HTTP/2 client of the control plane's HTTP/JSON API for the
//! registration bench: `n` TLS connections (ALPN `h2`, trusting the
//! control plane's roots), each multiplexing calls as the gRPC channels do,
//! so the two APIs are compared over the same transport.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isdp_proto::v1::Instance;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::Bulk;

pub type Conn = SendRequest<Full<Bytes>>;

/// `n` HTTP/2 connections to `addr`.
pub async fn connect(
    addr: SocketAddr,
    roots_der: &[Vec<u8>],
    n: usize,
) -> anyhow::Result<Vec<Conn>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in roots_der {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS handshake with the HTTP listener")?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        out.push(send);
    }
    Ok(out)
}

/// [`crate::support::register_bulk`] over `POST /v1/instances`, the
/// instance as protobuf JSON.
pub async fn register_bulk(
    conns: &[Conn],
    token: &str,
    concurrency: usize,
    total: usize,
    budget: Duration,
    make: impl Fn(usize) -> Instance + Send + Sync + 'static,
) -> anyhow::Result<Bulk> {
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let auth: Arc<str> = format!("Bearer {token}").into();
    let start = Instant::now();
    let deadline = start + budget;
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let mut conn = conns[w % conns.len()].clone();
        let (next, make, auth) = (next.clone(), make.clone(), auth.clone());
        workers.push(tokio::spawn(async move {
            let mut done = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    return Ok::<_, anyhow::Error>(done);
                }
                let body = json(&make(i));
                let req = http::Request::post("https://localhost/v1/instances")
                    .header("authorization", &*auth)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                conn.ready().await?;
                let res = conn.send_request(req).await?;
                let status = res.status();
                let bytes = res.into_body().collect().await?.to_bytes();
                anyhow::ensure!(
                    status == http::StatusCode::OK,
                    "registering #{i}: {status} {}",
                    String::from_utf8_lossy(&bytes)
                );
                done += 1;
            }
        }));
    }
    let mut done = 0;
    for w in workers {
        done += w.await.context("register worker panicked")??;
    }
    Ok(Bulk {
        done,
        elapsed: start.elapsed(),
    })
}

/// The protobuf JSON of an instance the bench registers (id, service,
/// address, port: all it sets).
fn json(i: &Instance) -> String {
    serde_json::json!({
        "id": i.id,
        "service": i.service,
        "address": i.address,
        "port": i.port,
    })
    .to_string()
}
