//! The mesh certificate authority: its roots live in the store so every
//! replica signs with the same one, and sidecars send CSRs and get back
//! short-lived leaves whose only identity is
//! `spiffe://<trust-domain>/svc/<service>`.
//!
//! # Layout
//! - `issue`: pure issuance (roots, leaves from CSRs, the server cert).
//! - `roots`: the stored form of the roots and the rotate/prune rules.
//! - `grant`: the token a leaf was issued under and its read scope.
//! - `seal`: the signer's private key at rest, sealed under the KEK.
//! - `kek`: where the KEK comes from (a file, a variable, `<data-dir>/kek`).
//!
//! Replicas follow `<prefix>ca/roots` by re-reading it every second (one
//! small key; simpler than a watch stream with resync, and a rotation is
//! rare). The private keys never leave the control plane: API responses
//! carry certificates only, and the store holds the signer's key sealed.

pub mod grant;
mod issue;
pub mod kek;
mod roots;
pub mod seal;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use isdp_proto::v1::{SignResponse, TrustBundle};
use time::OffsetDateTime;
use tokio::{sync::watch, task::JoinHandle};

pub use issue::{RootPair, load_root};
pub use kek::{KekError, KekSources};
pub use roots::{Reseal, Roots};
pub use seal::{Kek, Keyring, SealError};

use crate::store::{Store, StoreError, Txn};

/// Key (under the prefix) of the roots.
pub const ROOTS_KEY: &str = "ca/roots";
/// Shortest leaf lifetime accepted; tests rotate certificates in seconds.
pub const MIN_LIFETIME: Duration = Duration::from_secs(5);
/// How often a replica re-reads the roots (and prunes when due).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Lifetime of the control plane's own server certificate. It is reissued
/// on every root rotation and restart, so it need not be short.
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("loading the CA: {0}")]
    Load(String),
    #[error("invalid CSR: {0}")]
    Csr(String),
    #[error("{0}")]
    Invalid(String),
    #[error("issuing a certificate: {0}")]
    Issue(String),
    #[error("stored CA at {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the CA key stored at {key} {source}{hint}", hint = sealed_hint(source))]
    Sealed { key: String, source: SealError },
    #[error("the CA changed concurrently; retry")]
    Contended,
    /// A certificate lives no longer than the token it is issued under.
    #[error(
        "token {token}, under which the certificate would be issued, expired at {}; \
         a certificate lives no longer than its token: join with a new token",
        rfc3339(*at_unix_ms)
    )]
    GrantExpired { token: String, at_unix_ms: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the CA signs with and for.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// The SPIFFE trust domain, e.g. `isdp.local`.
    pub trust_domain: String,
    /// Leaf lifetime when a CSR asks for none.
    pub default_lifetime: Duration,
    /// Longest leaf lifetime; longer requests are capped to it.
    pub max_lifetime: Duration,
}

/// A cheap-to-clone handle on the CA.
#[derive(Clone)]
pub struct Ca {
    shared: Arc<Shared>,
}

struct Shared {
    settings: CaSettings,
    store: Arc<dyn Store>,
    key: String,
    keys: Keyring,
    roots: watch::Sender<Arc<Roots>>,
}

// === impl Ca ===

impl Ca {
    /// Loads the roots from the store, creating them on first start (from
    /// `operator` when given). A signer key stored in plain PEM (by an
    /// earlier version) or under the previous KEK is sealed again under the
    /// current one, with a compare-and-set write so racing replicas agree.
    /// [`Ca::follow`] keeps them current.
    pub async fn load(
        store: Arc<dyn Store>,
        prefix: &str,
        settings: CaSettings,
        operator: Option<RootPair>,
        keys: Keyring,
    ) -> Result<Ca, CaError> {
        let key = format!("{prefix}{ROOTS_KEY}");
        let mut operator = operator;
        let mut roots = None;
        // Each pass either returns or follows a write (ours or a racing
        // replica's); a few passes settle any first-start race.
        for _ in 0..5 {
            match read(store.as_ref(), &key, &keys).await? {
                Some(r) if r.reseal.is_some() => {
                    reseal(store.as_ref(), &key, &keys, &r).await?;
                }
                Some(r) => {
                    if let Some(op) = &operator
                        && op.cert_der != r.signer().cert_der
                    {
                        tracing::warn!(
                            "--ca-cert differs from the root already in the store; the stored one is kept (rotate to change it)"
                        );
                    }
                    roots = Some(r);
                    break;
                }
                None => {
                    let root = match operator.take() {
                        Some(r) => r,
                        None => issue::generate_root(&settings.trust_domain, now())?,
                    };
                    let put = Txn::default().when_mod_revision(&key, 0).put(
                        &key,
                        Roots::new(root).encode(&key, &keys)?,
                        None,
                    );
                    // Winner or loser of a first-start race: the next read
                    // sees what the store decided.
                    if store.txn(put).await?.succeeded {
                        tracing::info!(kek = keys.current().id(), "created the mesh root CA");
                    }
                }
            }
        }
        let roots = roots.ok_or(CaError::Contended)?;
        let (tx, _) = watch::channel(Arc::new(roots));
        let ca = Ca {
            shared: Arc::new(Shared {
                settings,
                store,
                key,
                keys,
                roots: tx,
            }),
        };
        ca.refresh().await?;
        Ok(ca)
    }

    /// Spawns the task that re-reads the roots every second.
    pub fn follow(&self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(self.clone().follow_loop(shutdown))
    }

    pub fn settings(&self) -> &CaSettings {
        &self.shared.settings
    }

    /// The current roots; changes on rotation and prune.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Roots>> {
        self.shared.roots.subscribe()
    }

    pub fn roots(&self) -> Arc<Roots> {
        self.shared.roots.borrow().clone()
    }

    pub fn bundle(&self) -> TrustBundle {
        self.roots().bundle(&self.shared.settings.trust_domain)
    }

    /// Signs a sidecar's CSR for `service`, under `grant` (the token that
    /// vouches for the caller) when there is one. A token's expiry is its
    /// credential's: the certificate ends no later than
    /// `grant_expires_at_unix_ms`, and past it nothing is signed.
    pub fn sign(
        &self,
        service: &str,
        csr_der: &[u8],
        lifetime_seconds: u64,
        grant: Option<&grant::Grant>,
        grant_expires_at_unix_ms: Option<i64>,
    ) -> Result<SignResponse, CaError> {
        isdp_core::names::check_dns_label(service)
            .map_err(|e| CaError::Invalid(format!("service: {e}")))?;
        let s = &self.shared.settings;
        let mut lifetime = match lifetime_seconds {
            0 => s.default_lifetime,
            n => Duration::from_secs(n).min(s.max_lifetime),
        };
        if lifetime < MIN_LIFETIME {
            return Err(CaError::Invalid(format!(
                "lifetime_seconds: {lifetime_seconds} is below the minimum of {}s",
                MIN_LIFETIME.as_secs()
            )));
        }
        let now = now();
        if let Some(until) = grant_expires_at_unix_ms {
            let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
            // Whole seconds, as X.509 encodes notAfter: rounding up would
            // outlive the token by a fraction of a second.
            let left = (until - until.rem_euclid(1000)).saturating_sub(now_ms);
            if left <= 0 {
                return Err(CaError::GrantExpired {
                    token: grant.map(|g| g.token.clone()).unwrap_or_default(),
                    at_unix_ms: until,
                });
            }
            lifetime = lifetime.min(Duration::from_millis(left as u64));
        }
        let roots = self.roots();
        let leaf = issue::sign_leaf(
            roots.signer(),
            &s.trust_domain,
            service,
            csr_der,
            lifetime,
            grant,
            now,
        )?;
        Ok(SignResponse {
            chain_der: vec![leaf.cert_der],
            spiffe_id: isdp_core::names::service_spiffe_id(&s.trust_domain, service),
            not_after_unix_ms: (leaf.not_after.unix_timestamp_nanos() / 1_000_000) as i64,
            trust_bundle_der: roots.bundle_der(),
        })
    }

    /// A TLS server certificate (DER) and its PKCS#8 key for `names`.
    pub fn server_cert(&self, names: &[String]) -> Result<(Vec<u8>, Vec<u8>), CaError> {
        issue::server_cert(self.roots().signer(), names, SERVER_CERT_LIFETIME, now())
    }

    /// Makes a new signing root; the old ones stay trusted for
    /// `prune_after` (zero: the longest leaf lifetime).
    pub async fn rotate(&self, prune_after: Duration) -> Result<TrustBundle, CaError> {
        let s = &self.shared.settings;
        let prune_after = if prune_after.is_zero() {
            s.max_lifetime
        } else {
            prune_after
        };
        for _ in 0..5 {
            let current = read(
                self.shared.store.as_ref(),
                &self.shared.key,
                &self.shared.keys,
            )
            .await?
            .ok_or_else(|| CaError::Load("the CA vanished from the store".into()))?;
            let root = issue::generate_root(&s.trust_domain, now())?;
            let next = current.rotated(root, unix_ms() + prune_after.as_millis() as i64);
            let put = Txn::default()
                .when_mod_revision(&self.shared.key, current.mod_revision)
                .put(
                    &self.shared.key,
                    next.encode(&self.shared.key, &self.shared.keys)?,
                    None,
                );
            if self.shared.store.txn(put).await?.succeeded {
                tracing::info!(prune_after = %humantime::format_duration(prune_after), "rotated the mesh root CA");
                self.refresh().await?;
                return Ok(self.bundle());
            }
        }
        Err(CaError::Contended)
    }

    /// Re-reads the roots, prunes them when due (and seals a key that an
    /// older replica wrote in plain PEM) and publishes a change.
    async fn refresh(&self) -> Result<(), CaError> {
        let (store, key, keys) = (
            self.shared.store.as_ref(),
            &self.shared.key,
            &self.shared.keys,
        );
        let Some(mut roots) = read(store, key, keys).await? else {
            return Ok(());
        };
        // Only plain PEM: a key under the previous KEK is re-sealed at
        // start, so replicas midway through a KEK rotation (each sealing
        // with its own current KEK) never take turns rewriting it.
        let wrote = if roots.reseal == Some(Reseal::Plaintext) {
            reseal(store, key, keys, &roots).await?;
            true
        } else if roots.prune_due(unix_ms()) {
            let put = Txn::default()
                .when_mod_revision(key, roots.mod_revision)
                .put(key, roots.pruned().encode(key, keys)?, None);
            if store.txn(put).await?.succeeded {
                tracing::info!("pruned the previous mesh root CA from the trust bundle");
            }
            true
        } else {
            false
        };
        if wrote {
            match read(store, key, keys).await? {
                Some(r) => roots = r,
                None => return Ok(()),
            }
        }
        self.shared.roots.send_if_modified(|cur| {
            if cur.mod_revision == roots.mod_revision {
                return false;
            }
            *cur = Arc::new(roots);
            true
        });
        Ok(())
    }

    async fn follow_loop(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(REFRESH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "re-reading the mesh CA failed; keeping the last roots");
            }
        }
    }
}

async fn read(store: &dyn Store, key: &str, keys: &Keyring) -> Result<Option<Roots>, CaError> {
    let (kvs, _) = store.range(key).await?;
    let Some(kv) = kvs.into_iter().find(|kv| kv.key == key) else {
        return Ok(None);
    };
    Roots::decode(&kv.value, kv.mod_revision, key, keys).map(Some)
}

/// Writes `roots` again with the signer's key sealed under the current KEK,
/// if the stored value is still the one they were read from.
async fn reseal(
    store: &dyn Store,
    key: &str,
    keys: &Keyring,
    roots: &Roots,
) -> Result<(), CaError> {
    let put = Txn::default()
        .when_mod_revision(key, roots.mod_revision)
        .put(key, roots.encode(key, keys)?, None);
    if store.txn(put).await?.succeeded {
        let kek = keys.current().id();
        match roots.reseal {
            Some(Reseal::PreviousKek) => tracing::info!(
                kek,
                "re-sealed the mesh CA key under the current KEK; the previous KEK is no longer needed"
            ),
            _ => tracing::info!(kek, "sealed the mesh CA key that was stored in plain text"),
        }
    }
    Ok(())
}

/// The id of the KEK that sealed the CA key in the store, if a sealed key
/// is there: the embedded store generates `<data-dir>/kek` only when none is.
pub async fn stored_kek_id(store: &dyn Store, prefix: &str) -> Result<Option<String>, StoreError> {
    let key = format!("{prefix}{ROOTS_KEY}");
    let (kvs, _) = store.range(&key).await?;
    Ok(kvs
        .into_iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| Roots::sealed_with(&kv.value)))
}

/// What to do about a key that does not open.
fn sealed_hint(e: &SealError) -> &'static str {
    match e {
        SealError::UnknownKek { .. } => {
            "; start with the KEK that sealed it (--kek-file or ISDP_KEK; after a \
             rotation, the old one as --previous-kek-file or ISDP_PREVIOUS_KEK)"
        }
        _ => "",
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An instant as RFC 3339 (UTC, whole seconds), as refusals name expiries.
pub(crate) fn rfc3339(unix_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}
