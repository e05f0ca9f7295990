//! Helpers for the tests of mTLS between in-process sidecars: contexts
//! from a test CA, `Tls` handles over them, and the metrics they count.
//! Used by `transport`'s own tests and by the proxy's request-path tests.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

use super::Tls;
use crate::{
    metrics::Metrics,
    tls::{
        LocalCert, Revocations, TlsContext,
        test_pki::{Leaf, TD, TestCa},
    },
};

/// The connect timeout the tests use.
pub const CONNECT: Duration = Duration::from_secs(2);

/// Tokens the certificates of `web` and `payments` are issued under.
pub const WEB: &str = "aaaaaaaaaaaaaaaa";
pub const PAY: &str = "bbbbbbbbbbbbbbbb";

pub fn ctx(ca: &TestCa, services: &[&str], client_as: &str) -> Arc<TlsContext> {
    let revocations = Revocations::new(Metrics::new());
    ctx_granted(ca, services, client_as, None, &revocations)
}

/// Like [`ctx`], with certificates issued under `grant` and verifiers that
/// read `revocations`.
pub fn ctx_granted(
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

pub fn tls_of(ctx: Arc<TlsContext>) -> (Tls, Metrics, watch::Sender<Option<Arc<TlsContext>>>) {
    let metrics = Metrics::new();
    let (tls, tx) = tls_with(ctx, &Revocations::new(metrics.clone()), &metrics);
    (tls, metrics, tx)
}

pub fn tls_with(
    ctx: Arc<TlsContext>,
    revocations: &Revocations,
    metrics: &Metrics,
) -> (Tls, watch::Sender<Option<Arc<TlsContext>>>) {
    let (tx, rx) = watch::channel(Some(ctx));
    (Tls::new(rx, revocations.clone(), metrics.clone()), tx)
}

pub async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

/// Handshake failures counted for `direction` and `reason`.
pub fn count(metrics: &Metrics, direction: &str, reason: &str) -> u64 {
    let needle = format!(
        "isdp_tls_handshake_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}} "
    );
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(|n| n.parse().unwrap()))
        .unwrap_or(0)
}

/// Refusals of open connections counted for `direction` and `stage`.
pub fn refusals(metrics: &Metrics, direction: &str, stage: &str) -> u64 {
    let needle =
        format!("isdp_revoked_peer_refusals_total{{direction=\"{direction}\",stage=\"{stage}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(|n| n.parse().unwrap()))
        .unwrap_or(0)
}
