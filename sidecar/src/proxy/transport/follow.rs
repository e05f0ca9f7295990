//! Keeps the [`TlsContext`] in force current: rebuilt whenever the
//! identities or the trust bundle change, published in a `watch` that each
//! new connection reads.

use std::sync::Arc;

use isdp_proto::v1::TrustBundle;
use rustls::pki_types::CertificateDer;
use tokio::{sync::watch, task::JoinHandle};

use super::{LocalCert, TlsContext};
use crate::{identity::Identities, xds::Snapshot};

/// Builds the context from what is known now; None while there is no
/// primary identity (the sidecar cannot speak mTLS yet) or on a bad bundle
/// (logged; the previous context stays in force).
pub fn build(ids: &Identities, bundle: Option<&TrustBundle>) -> Option<Arc<TlsContext>> {
    let primary = ids.primary()?;
    let (trust_domain, roots): (&str, Vec<CertificateDer<'static>>) = match bundle {
        Some(b) => (
            &b.trust_domain,
            b.roots_der
                .iter()
                .map(|r| CertificateDer::from(r.clone()))
                .collect(),
        ),
        None => (&primary.trust_domain, ids.trust_bundle.clone()),
    };
    let local: Vec<LocalCert> = ids
        .by_service
        .values()
        .map(|i| LocalCert {
            service: i.service.clone(),
            key: i.key.clone(),
        })
        .collect();
    match TlsContext::new(trust_domain, &local, primary.key.clone(), &roots) {
        Ok(ctx) => Some(Arc::new(ctx)),
        Err(error) => {
            tracing::warn!(%error, "cannot build the TLS context; keeping the previous one");
            None
        }
    }
}

/// Follows identities and snapshots until shutdown.
pub fn follow(
    mut identities: watch::Receiver<Arc<Identities>>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Option<Arc<TlsContext>>>, JoinHandle<()>) {
    let mut bundle = snapshots.borrow_and_update().trust_bundle.clone();
    let first = build(&identities.borrow_and_update(), bundle.as_ref());
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = identities.changed() => if changed.is_err() { return },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Endpoint updates are frequent; only the bundle matters.
                    let next = snapshots.borrow_and_update().trust_bundle.clone();
                    if next == bundle {
                        continue;
                    }
                    bundle = next;
                }
            }
            let ids = identities.borrow_and_update().clone();
            match build(&ids, bundle.as_ref()) {
                Some(ctx) => {
                    tracing::info!(trust_domain = %ctx.trust_domain, "tls context updated");
                    tx.send_replace(Some(ctx));
                }
                // No identity any more (expired): stop offering mTLS.
                None if !ids.ready() => {
                    tx.send_replace(None);
                }
                None => {}
            }
        }
    });
    (rx, task)
}
