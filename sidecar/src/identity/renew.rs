//! One service's certificate: obtain, hold, renew, withdraw on expiry.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use isdp_proto::v1::SignRequest;
use rand::Rng;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::CertificateDer;
use tokio::{sync::watch, time::Instant};

use isdp_core::pem::ChainPem;

use super::{Identities, Identity, IdentityError, Signer};
use isdp_core::backoff::Backoff;

use crate::tls::certified_key;

/// How long one `Sign` call may take before it counts as failed.
pub const SIGN_TIMEOUT: Duration = Duration::from_secs(10);
/// Renew when this share of the remaining life has passed...
const RENEW_AT: f64 = 2.0 / 3.0;
/// ...give or take this much, so certificates issued together (a fleet
/// restarted together) are not renewed together.
const JITTER: f64 = 0.1;
/// Longest wait between requests the control plane refused (a revoked or
/// out-of-scope token): such a refusal lasts, so asking every few seconds
/// would only load the control plane and the log. Growing from the same
/// 100 ms as other failures, it still retries at once a token that was
/// minted on another replica a moment ago.
pub const REFUSED_CAP: Duration = Duration::from_secs(60);

/// A renewal that moves the certificate's end by no more than this did
/// not extend it: the control plane caps certificates at the expiry of the
/// join token they are issued under, and renewing again would only ask
/// more often as that instant nears.
const NOT_EXTENDED: Duration = Duration::from_secs(1);

/// The backoff between refused requests.
pub fn refused_backoff() -> Backoff {
    use isdp_core::backoff::{BASE, FACTOR, STABLE_AFTER};
    Backoff::new(BASE, FACTOR, REFUSED_CAP, STABLE_AFTER)
}

/// When to renew a certificate with `remaining` life left, given a jitter
/// factor in `[1 - JITTER, 1 + JITTER]`.
pub fn renew_after(remaining: Duration, jitter: f64) -> Duration {
    remaining.mul_f64(RENEW_AT * jitter.clamp(1.0 - JITTER, 1.0 + JITTER))
}

pub(super) struct Renewer {
    pub service: String,
    pub lifetime: Option<Duration>,
    pub signer: Arc<dyn Signer>,
    pub tx: Arc<watch::Sender<Arc<Identities>>>,
    /// Between failures that may pass (the control plane unreachable).
    pub backoff: Backoff,
    /// Between refusals ([`REFUSED_CAP`]).
    pub refused_backoff: Backoff,
}

// === impl Renewer ===

impl Renewer {
    pub(super) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // When the certificate held now expires.
        let mut expires: Option<Instant> = None;
        // Its notAfter, to tell whether a renewal extended it.
        let mut held_until: Option<SystemTime> = None;
        loop {
            let obtained = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                r = self.obtain() => r,
            };
            let wake = match obtained {
                Ok((identity, bundle)) => {
                    self.backoff.reset();
                    self.refused_backoff.reset();
                    let remaining = identity
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let jitter = rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER);
                    let extended =
                        held_until.is_none_or(|prev| identity.not_after > prev + NOT_EXTENDED);
                    held_until = Some(identity.not_after);
                    let renew_in = if extended {
                        renew_after(remaining, jitter)
                    } else {
                        // Held to its end; the request after it is refused
                        // (the token expired), which `/ready` reports.
                        tracing::warn!(service = %self.service, ?remaining, "the workload certificate was renewed without being extended: the join token it is issued under expires then; not renewed again before it expires (restart the sidecar with a new join token)");
                        remaining
                    };
                    tracing::info!(service = %self.service, spiffe_id = %identity.spiffe_id, ?remaining, ?renew_in, "workload certificate issued");
                    expires = Some(Instant::now() + remaining);
                    self.publish(|ids| {
                        ids.by_service.insert(self.service.clone(), identity);
                        ids.refused.remove(&self.service);
                        if !bundle.is_empty() {
                            ids.trust_bundle = bundle;
                        }
                    });
                    Instant::now() + renew_in
                }
                Err(IdentityError::Sign(status)) if refusal(&status) => {
                    let delay = self.refused_backoff.next_delay();
                    let message = status.message().to_owned();
                    // Logged at warn when it starts or changes, not per retry.
                    let known = self.tx.borrow().refused.get(&self.service) == Some(&message);
                    if known {
                        tracing::debug!(service = %self.service, %message, retry_in = ?delay, "the control plane still refuses a workload certificate");
                    } else {
                        tracing::warn!(service = %self.service, code = ?status.code(), %message, retry_in = ?delay, "the control plane refuses a workload certificate");
                        self.publish(|ids| {
                            ids.refused.insert(self.service.clone(), message);
                        });
                    }
                    Instant::now() + delay
                }
                Err(error) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(service = %self.service, %error, retry_in = ?delay, "workload certificate request failed");
                    Instant::now() + delay
                }
            };
            // Sleep until `wake`, withdrawing the certificate if it expires
            // first: an expired certificate would only fail handshakes.
            if let Some(at) = expires.filter(|at| *at <= wake) {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep_until(at) => {}
                }
                tracing::warn!(service = %self.service, "workload certificate expired without renewal; withdrawn");
                expires = None;
                held_until = None;
                self.publish(|ids| {
                    ids.by_service.remove(&self.service);
                });
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn publish(&self, update: impl FnOnce(&mut Identities)) {
        self.tx.send_modify(|ids| update(Arc::make_mut(ids)));
    }

    /// A new key, its CSR signed, the response checked.
    async fn obtain(&self) -> Result<(Arc<Identity>, Vec<CertificateDer<'static>>), IdentityError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, self.service.as_str());
        let csr = params.serialize_request(&key)?;
        let request = SignRequest {
            service: self.service.clone(),
            csr_der: csr.der().to_vec(),
            lifetime_seconds: self.lifetime.map_or(0, |l| l.as_secs()),
        };
        let response = tokio::time::timeout(SIGN_TIMEOUT, self.signer.sign(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("sign timed out"))??;
        let bad = |why: String| IdentityError::BadResponse(why);
        let chain: Vec<CertificateDer<'static>> = response
            .chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let spiffe_id = isdp_core::cert::uri_san(leaf).map_err(|e| bad(e.to_string()))?;
        let grant = isdp_core::grant::of_certificate(leaf).map(|g| g.token);
        let trust_domain = spiffe_id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.strip_suffix(&format!("/svc/{}", self.service)))
            .filter(|td| !td.is_empty() && !td.contains('/'))
            .ok_or_else(|| {
                bad(format!(
                    "{spiffe_id:?} is not the SPIFFE ID of {:?}",
                    self.service
                ))
            })?
            .to_owned();
        if spiffe_id != response.spiffe_id {
            return Err(bad(format!(
                "certificate says {spiffe_id:?}, response says {:?}",
                response.spiffe_id
            )));
        }
        let pem = ChainPem {
            chain: chain
                .iter()
                .map(|c| isdp_core::pem::cert_to_pem(c))
                .collect(),
            key: key.serialize_pem(),
        };
        let key = certified_key(chain, key.serialize_der()).map_err(|e| bad(e.to_string()))?;
        key.keys_match()
            .map_err(|e| bad(format!("certificate is not for our key: {e}")))?;
        let not_after = UNIX_EPOCH
            + Duration::from_millis(u64::try_from(response.not_after_unix_ms).unwrap_or_default());
        let bundle = response
            .trust_bundle_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let identity = Identity {
            service: self.service.clone(),
            spiffe_id,
            trust_domain,
            key,
            pem: Some(pem),
            not_after,
            grant,
        };
        Ok((Arc::new(identity), bundle))
    }
}

/// Whether the control plane refused the caller rather than failed: it
/// will answer the same until something changes on its side.
fn refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_within_the_jitter() {
        let life = Duration::from_secs(3000);
        let secs = |j| renew_after(life, j).as_secs_f64().round();
        assert_eq!(secs(1.0), 2000.0);
        assert_eq!(secs(0.9), 1800.0);
        assert_eq!(secs(5.0), 2200.0, "jitter is clamped");
    }
}
