//! Keeps the [`TlsContext`] in force current: rebuilt whenever the
//! identities or the trust bundle's roots change, published in a `watch`
//! that each new connection reads. The bundle's revoked tokens go to
//! [`Revocations`] instead, which the verifiers and open connections read
//! live: a revocation rebuilds nothing.

use std::sync::Arc;

use isdp_proto::v1::TrustBundle;
use rustls::pki_types::CertificateDer;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    identity::Identities,
    tls::{LocalCert, Revocations, TlsContext},
    xds::Snapshot,
};

/// Builds the context from what is known now; None while there is no
/// primary identity (the sidecar cannot speak mTLS yet) or on a bad bundle
/// (logged; the previous context stays in force).
pub fn build(
    ids: &Identities,
    bundle: Option<&TrustBundle>,
    revocations: &Revocations,
) -> Option<Arc<TlsContext>> {
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
    match TlsContext::new(
        trust_domain,
        &local,
        primary.key.clone(),
        &roots,
        revocations,
    ) {
        Ok(ctx) => Some(Arc::new(ctx)),
        Err(error) => {
            tracing::warn!(%error, "cannot build the TLS context; keeping the previous one");
            None
        }
    }
}

/// Whether two bundles hold the same roots (the revoked tokens aside).
fn same_roots(a: Option<&TrustBundle>, b: Option<&TrustBundle>) -> bool {
    a.map(|a| (&a.trust_domain, &a.roots_der)) == b.map(|b| (&b.trust_domain, &b.roots_der))
}

/// Follows identities and snapshots until shutdown, keeping `revocations`
/// in step with the bundle.
pub fn follow(
    mut identities: watch::Receiver<Arc<Identities>>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    revocations: Revocations,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Option<Arc<TlsContext>>>, JoinHandle<()>) {
    let mut bundle = snapshots.borrow_and_update().trust_bundle.clone();
    if let Some(b) = &bundle {
        revocations.update(&b.revoked_grants);
    }
    let first = build(
        &identities.borrow_and_update(),
        bundle.as_ref(),
        &revocations,
    );
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
                    if let Some(b) = &next {
                        revocations.update(&b.revoked_grants);
                    }
                    let rebuild = !same_roots(next.as_ref(), bundle.as_ref());
                    bundle = next;
                    if !rebuild {
                        continue;
                    }
                }
            }
            let ids = identities.borrow_and_update().clone();
            match build(&ids, bundle.as_ref(), &revocations) {
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        identity::Identity,
        tls::test_pki::{TD, TestCa},
    };

    fn identities(ca: &TestCa, service: &str) -> Arc<Identities> {
        let key = ca.service(TD, service).key;
        let id = Identity {
            service: service.into(),
            spiffe_id: format!("spiffe://{TD}/svc/{service}"),
            trust_domain: TD.into(),
            key,
            pem: None,
            not_after: SystemTime::now() + Duration::from_secs(3600),
            grant: None,
        };
        Arc::new(Identities {
            by_service: [(service.to_owned(), Arc::new(id))].into(),
            primary: Some(service.into()),
            trust_bundle: vec![ca.root.clone()],
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn rebuilds_on_new_identities_and_bundles_only() {
        let ca = TestCa::new("mesh");
        let (ids_tx, ids_rx) = watch::channel(Arc::new(Identities {
            primary: Some("web".into()),
            ..Default::default()
        }));
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (_stop, shutdown) = watch::channel(false);
        let revocations = Revocations::new(crate::metrics::Metrics::new());
        let (mut ctx, _task) = follow(ids_rx, snap_rx, revocations.clone(), shutdown);
        assert!(ctx.borrow().is_none(), "no certificate, no mTLS");

        ids_tx.send(identities(&ca, "web")).unwrap();
        ctx.changed().await.unwrap();
        let first = ctx.borrow_and_update().clone().expect("context");
        assert_eq!(&*first.trust_domain, TD);

        // An endpoint update does not rebuild.
        snap_tx.send_modify(|s| Arc::make_mut(s).acks += 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!ctx.has_changed().unwrap());

        // The bundle from xDS takes over from the SignResponse's.
        snap_tx.send_modify(|s| {
            Arc::make_mut(s).trust_bundle = Some(TrustBundle {
                trust_domain: "other.test".into(),
                roots_der: vec![ca.root.to_vec()],
                ..Default::default()
            })
        });
        ctx.changed().await.unwrap();
        let second = ctx.borrow_and_update().clone().expect("context");
        assert_eq!(&*second.trust_domain, "other.test");

        // A revocation reaches the revoked set, and rebuilds nothing.
        snap_tx.send_modify(|s| {
            let bundle = Arc::make_mut(s).trust_bundle.as_mut().unwrap();
            bundle.revoked_grants = vec!["aaaaaaaaaaaaaaaa".into()];
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(revocations.is_revoked("aaaaaaaaaaaaaaaa"));
        assert!(!ctx.has_changed().unwrap());

        // The certificate expired unrenewed: no context.
        ids_tx
            .send(Arc::new(Identities {
                primary: Some("web".into()),
                ..Default::default()
            }))
            .unwrap();
        ctx.changed().await.unwrap();
        assert!(ctx.borrow().is_none());
    }
}
