//! The tokens the control plane revoked, enforced on the wire.
//!
//! Every mesh certificate names the token it was issued under (its grant,
//! [`isdp_core::grant`]); the trust bundle lists the revoked ones that may
//! still have live certificates. A certificate whose grant is listed is
//! refused at the handshake, inbound (a client) and outbound (a server),
//! by the verifiers in `verify.rs`, which read [`Revocations`] live, so a
//! revocation needs no rebuilt TLS configuration. A resumed TLS session
//! skips the verifiers, so `Tls::accept` and `Tls::connect` check the
//! peer's grant again once the handshake is done. A connection that was
//! already open when its peer's token was revoked would outlive that
//! check: each holds a [`PeerGuard`], which refuses its requests and closes
//! it as soon as the grant is listed.
//!
//! Refusals are counted (`isdp_tls_handshake_failures_total{reason=
//! "revoked"}` for handshakes, `isdp_revoked_peer_refusals_total` on open
//! connections) and logged at warn once per revoked token, then at debug:
//! a revoked peer retrying must not flood the log.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use rustls::{CertificateError, Error};
use tokio::sync::watch;

use crate::metrics::{Direction, Metrics};

/// The revoked grants of the latest trust bundle; a cheap handle.
#[derive(Clone)]
pub struct Revocations {
    shared: Arc<Shared>,
}

struct Shared {
    grants: watch::Sender<Arc<HashSet<String>>>,
    /// Grants whose refusal was logged at warn already.
    logged: Mutex<HashSet<String>>,
    metrics: Metrics,
}

/// Where a revoked peer was refused: the label of
/// `isdp_revoked_peer_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Handshake,
    /// A request on a connection opened before the revocation.
    Request,
    /// A connection opened before the revocation, closed.
    Connection,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Handshake => "handshake",
            Stage::Request => "request",
            Stage::Connection => "connection",
        }
    }
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("revoked", &self.shared.grants.borrow().len())
            .finish()
    }
}

// === impl Revocations ===

impl Revocations {
    pub fn new(metrics: Metrics) -> Self {
        Revocations {
            shared: Arc::new(Shared {
                grants: watch::Sender::new(Arc::default()),
                logged: Mutex::default(),
                metrics,
            }),
        }
    }

    /// Replaces the revoked grants with those of a new trust bundle;
    /// returns whether anything changed.
    pub fn update(&self, grants: &[String]) -> bool {
        let changed = self.shared.grants.send_if_modified(|cur| {
            let same = cur.len() == grants.len() && grants.iter().all(|g| cur.contains(g));
            if !same {
                *cur = Arc::new(grants.iter().cloned().collect());
            }
            !same
        });
        if changed {
            tracing::info!(revoked = grants.len(), "revoked tokens updated");
            // Forget the log marks of grants no longer listed (pruned), so
            // the set stays as small as the list.
            if let Ok(mut logged) = self.shared.logged.lock() {
                logged.retain(|g| grants.contains(g));
            }
        }
        changed
    }

    pub fn is_revoked(&self, grant: &str) -> bool {
        self.shared.grants.borrow().contains(grant)
    }

    pub fn is_empty(&self) -> bool {
        self.shared.grants.borrow().is_empty()
    }

    /// The revoked grants, sorted (for `/config`).
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.shared.grants.borrow().iter().cloned().collect();
        ids.sort();
        ids
    }

    /// The handshake's check, after the chain verified: a certificate
    /// issued under a revoked token is refused with `certificate_revoked`.
    /// `spiffe_id` names the peer in the log.
    pub fn check(
        &self,
        end_entity: &[u8],
        spiffe_id: &str,
        direction: Direction,
    ) -> Result<(), Error> {
        // Nothing revoked (the usual case): no need to parse the grant.
        if self.shared.grants.borrow().is_empty() {
            return Ok(());
        }
        let Some(grant) = isdp_core::grant::of_certificate(end_entity).map(|g| g.token) else {
            return Ok(());
        };
        if !self.is_revoked(&grant) {
            return Ok(());
        }
        self.refused(&grant, spiffe_id, direction, Stage::Handshake);
        Err(Error::InvalidCertificate(CertificateError::Revoked))
    }

    /// The guard of an established connection whose peer (`spiffe_id`)
    /// holds a certificate issued under `grant`; none without a grant
    /// (nothing could revoke it).
    pub fn guard(
        &self,
        grant: Option<String>,
        spiffe_id: &str,
        direction: Direction,
    ) -> Option<PeerGuard> {
        Some(PeerGuard(Arc::new(Guarded {
            grant: grant?,
            peer: spiffe_id.to_owned(),
            direction,
            revocations: self.clone(),
        })))
    }

    /// Counts a refusal (handshakes are counted with the other handshake
    /// failures, by the caller) and logs it: at warn the first time for
    /// this grant.
    fn refused(&self, grant: &str, peer: &str, direction: Direction, stage: Stage) {
        if stage != Stage::Handshake {
            self.shared.metrics.revoked_peer(direction, stage.as_str());
        }
        let first = self
            .shared
            .logged
            .lock()
            .is_ok_and(|mut logged| logged.insert(grant.to_owned()));
        let (direction, stage) = (direction.as_str(), stage.as_str());
        if first {
            tracing::warn!(%peer, token = %grant, direction, stage, "refusing a peer whose token was revoked (logged once per token)");
        } else {
            tracing::debug!(%peer, token = %grant, direction, stage, "refusing a peer whose token was revoked");
        }
    }
}

/// The revocation state of one established connection's peer; a cheap
/// handle, cloned into each request of the connection.
#[derive(Clone)]
pub struct PeerGuard(Arc<Guarded>);

struct Guarded {
    grant: String,
    /// The peer's SPIFFE ID, for the log.
    peer: String,
    direction: Direction,
    revocations: Revocations,
}

impl std::fmt::Debug for PeerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGuard")
            .field("peer", &self.0.peer)
            .field("grant", &self.0.grant)
            .finish()
    }
}

// === impl PeerGuard ===

impl PeerGuard {
    /// Right after a handshake: whether to refuse the connection. A resumed
    /// TLS session skips the certificate verifiers (the peer proved it
    /// holds the session, not that its certificate is still good), so the
    /// grant is checked again here. Logs a refusal; the caller counts it
    /// with the other handshake failures.
    pub fn refuses_handshake(&self) -> bool {
        self.0.refuses(Stage::Handshake)
    }

    /// For each request on the connection: whether to refuse it. Counts
    /// and logs a refusal.
    pub fn refuses_request(&self) -> bool {
        self.0.refuses(Stage::Request)
    }

    /// Resolves once the peer's token is revoked (at once if it already
    /// is); the connection is then to be closed, which this counts.
    pub async fn revoked(&self) {
        let g = &self.0;
        let mut grants = g.revocations.shared.grants.subscribe();
        loop {
            if grants.borrow_and_update().contains(&g.grant) {
                break;
            }
            if grants.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        g.revocations
            .refused(&g.grant, &g.peer, g.direction, Stage::Connection);
    }
}

impl Guarded {
    /// Whether the grant is revoked now; logs and counts a refusal at
    /// `stage` if so.
    fn refuses(&self, stage: Stage) -> bool {
        let revoked = self.revocations.is_revoked(&self.grant);
        if revoked {
            self.revocations
                .refused(&self.grant, &self.peer, self.direction, stage);
        }
        revoked
    }
}

/// Resolves once the token of one of `guards`' peers is revoked; never
/// without guards. Connection tasks select on it and drop their
/// connection when it resolves.
pub async fn any_revoked(guards: &[PeerGuard]) {
    match guards {
        [] => std::future::pending().await,
        [one] => one.revoked().await,
        many => {
            futures::future::select_all(many.iter().map(|g| Box::pin(g.revoked()))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::test_pki::{Leaf, TD, TestCa};

    fn count(metrics: &Metrics, direction: &str, stage: &str) -> u64 {
        let needle = format!(
            "isdp_revoked_peer_refusals_total{{direction=\"{direction}\",stage=\"{stage}\"}} "
        );
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&needle).map(|n| n.parse().unwrap()))
            .unwrap_or(0)
    }

    #[test]
    fn a_certificate_under_a_revoked_token_is_refused() {
        let ca = TestCa::new("mesh");
        let revoked = ca.issue(&Leaf::service(TD, "web").granted_by("aaaaaaaaaaaaaaaa"));
        let other = ca.issue(&Leaf::service(TD, "web").granted_by("bbbbbbbbbbbbbbbb"));
        let ungranted = ca.service(TD, "web").key;
        let der = |k: &rustls::sign::CertifiedKey| k.end_entity_cert().unwrap().to_vec();
        let r = Revocations::new(Metrics::new());
        assert!(
            r.check(&der(&revoked), "web", Direction::Inbound).is_ok(),
            "nothing revoked yet"
        );

        assert!(r.update(&["aaaaaaaaaaaaaaaa".into()]));
        assert!(!r.update(&["aaaaaaaaaaaaaaaa".into()]), "no change");
        let err = r
            .check(&der(&revoked), "web", Direction::Inbound)
            .unwrap_err();
        assert_eq!(err, Error::InvalidCertificate(CertificateError::Revoked));
        assert!(r.check(&der(&other), "web", Direction::Outbound).is_ok());
        assert!(
            r.check(&der(&ungranted), "web", Direction::Outbound)
                .is_ok()
        );

        // Pruned from the bundle: accepted again (it has expired by then).
        assert!(r.update(&[]));
        assert!(r.check(&der(&revoked), "web", Direction::Inbound).is_ok());
    }

    /// An open connection's guard refuses requests and fires as soon as
    /// its peer's token is revoked, not before, and never for another.
    #[tokio::test(start_paused = true)]
    async fn a_guard_fires_when_its_peer_is_revoked() {
        let metrics = Metrics::new();
        let r = Revocations::new(metrics.clone());
        let guard = r
            .guard(
                Some("aaaaaaaaaaaaaaaa".into()),
                "spiffe://mesh.test/svc/web",
                Direction::Inbound,
            )
            .unwrap();
        assert!(
            r.guard(None, "spiffe://mesh.test/svc/web", Direction::Inbound)
                .is_none()
        );
        let served = tokio::spawn({
            let guards = [guard.clone()];
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => "finished",
                    _ = any_revoked(&guards) => "dropped",
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!guard.refuses_request());
        r.update(&["bbbbbbbbbbbbbbbb".into()]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!served.is_finished(), "another token's revocation");
        assert!(!guard.refuses_request());

        r.update(&["bbbbbbbbbbbbbbbb".into(), "aaaaaaaaaaaaaaaa".into()]);
        let out = tokio::time::timeout(Duration::from_millis(1), served)
            .await
            .expect("the connection is closed at once")
            .unwrap();
        assert_eq!(out, "dropped");
        assert!(guard.refuses_request());
        assert_eq!(count(&metrics, "inbound", "connection"), 1);
        assert_eq!(count(&metrics, "inbound", "request"), 1);

        // A guard made after the revocation fires at once.
        let late = r
            .guard(
                Some("aaaaaaaaaaaaaaaa".into()),
                "spiffe://mesh.test/svc/web",
                Direction::Outbound,
            )
            .unwrap();
        tokio::time::timeout(Duration::from_millis(1), late.revoked())
            .await
            .expect("already revoked");
        assert_eq!(count(&metrics, "outbound", "connection"), 1);
        // No guard: nothing to wait for.
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), any_revoked(&[]))
                .await
                .is_err()
        );
    }
}
