//! Workload identity: one short-lived certificate per local service (plus
//! the sidecar's own `identity` when it fronts none), keys made here and
//! never sent anywhere.
//!
//! For each name a task generates an ECDSA P-256 key, sends a CSR through a
//! [`Signer`] (`isdp.v1.Certificates/Sign` in production, a fake in tests),
//! and publishes the result in a `watch` of [`Identities`]. It renews at
//! about two thirds of the certificate's life (±10 % jitter, so a fleet
//! issued together does not renew together); a failed renewal is retried
//! with [`isdp_core::backoff`] while the old certificate keeps serving, until
//! it expires and is withdrawn. A refusal (the token the certificate was
//! issued under was revoked, say) will not pass by itself: it is retried
//! with a slower backoff (up to a minute) and recorded in
//! [`Identities::refused`], which `/ready` reports. The data plane never
//! waits on any of this: it reads the current identities when it builds a
//! TLS context.

pub mod grpc;
mod renew;

use isdp_core::pem::ChainPem;
use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use isdp_proto::v1::{SignRequest, SignResponse};
use rustls::{pki_types::CertificateDer, sign::CertifiedKey};
use tokio::{sync::watch, task::JoinHandle};

/// Signs CSRs: the CA's `Sign` call, behind a trait so tests (and a future
/// transport) can stand in for it. Object-safe: `Arc<dyn Signer>`.
pub trait Signer: Send + Sync + 'static {
    fn sign(
        &self,
        request: SignRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SignResponse, tonic::Status>> + Send + '_>>;
}

/// Why a certificate could not be obtained; the renewal task logs it and
/// retries.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("generating key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("signing: {}: {}", .0.code(), .0.message())]
    Sign(#[from] tonic::Status),
    #[error("signed certificate refused: {0}")]
    BadResponse(String),
}

/// One certified identity.
#[derive(Debug)]
pub struct Identity {
    /// The service the certificate is for.
    pub service: String,
    /// `spiffe://<trust-domain>/svc/<service>`.
    pub spiffe_id: String,
    pub trust_domain: String,
    /// Chain and private key, ready for rustls.
    pub key: Arc<CertifiedKey>,
    /// The same chain and key as PEM, for tonic's client TLS: the sidecar
    /// presents its certificate when it dials the control plane.
    pub pem: Option<ChainPem>,
    pub not_after: SystemTime,
    /// The token the certificate was issued under (its grant), if it names
    /// one: when the trust bundle lists it as revoked, peers refuse this
    /// certificate.
    pub grant: Option<String>,
}

/// Every identity currently held, published after each change.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    /// By service name; a service whose certificate expired without renewal
    /// is absent.
    pub by_service: BTreeMap<String, Arc<Identity>>,
    /// The service whose certificate this sidecar presents as a client.
    pub primary: Option<String>,
    /// The roots from the latest `SignResponse`: trusted until the trust
    /// bundle arrives over xDS, so the first handshake need not wait for it.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// Services whose latest certificate request the control plane refused
    /// (UNAUTHENTICATED or PERMISSION_DENIED, e.g. their token was
    /// revoked), with its message; cleared by the next certificate.
    pub refused: BTreeMap<String, String>,
}

impl Identities {
    /// The identity presented to other sidecars.
    pub fn primary(&self) -> Option<&Arc<Identity>> {
        self.by_service.get(self.primary.as_deref()?)
    }

    /// True once the primary identity is certified: readiness needs it.
    pub fn ready(&self) -> bool {
        self.primary().is_some()
    }
}

/// What to certify.
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    /// Local services, then (if not among them) the sidecar's `identity`.
    pub services: Vec<String>,
    /// The client identity; None when the sidecar has neither services nor
    /// an `identity` (it then cannot call other sidecars).
    pub primary: Option<String>,
    /// Requested lifetime; None for the control plane's default.
    pub lifetime: Option<Duration>,
}

/// Starts one renewal task per service. The receiver starts empty and
/// fills as certificates arrive.
pub fn spawn(
    settings: IdentitySettings,
    signer: Arc<dyn Signer>,
    shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<Identities>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Identities {
        primary: settings.primary.clone(),
        ..Default::default()
    }));
    let tx = Arc::new(tx);
    let tasks: Vec<_> = settings
        .services
        .iter()
        .map(|service| {
            tokio::spawn(
                renew::Renewer {
                    service: service.clone(),
                    lifetime: settings.lifetime,
                    signer: signer.clone(),
                    tx: tx.clone(),
                    backoff: isdp_core::backoff::Backoff::default(),
                    refused_backoff: renew::refused_backoff(),
                }
                .run(shutdown.clone()),
            )
        })
        .collect();
    let mut shutdown = shutdown;
    let task = tokio::spawn(async move {
        // Keep the sender alive until shutdown so readers never see it closed.
        let _ = shutdown.wait_for(|stop| *stop).await;
        for t in tasks {
            let _ = t.await;
        }
        drop(tx);
    });
    (rx, task)
}

#[cfg(test)]
mod tests;
