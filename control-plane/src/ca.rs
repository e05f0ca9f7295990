//! The mesh certificate authority: its roots live in the store so every
//! replica signs with the same one, and sidecars send CSRs and get back
//! short-lived leaves whose only identity is
//! `spiffe://<trust-domain>/svc/<service>`.
//!
//! # Layout
//! - `issue`: pure issuance (roots, leaves from CSRs, the server cert).
//! - `roots`: the stored form of the roots and the rotate/prune rules.
//! - `grant`: the token a leaf was issued under and its read scope.
//!
//! Replicas follow `<prefix>ca/roots` by re-reading it every second (one
//! small key; simpler than a watch stream with resync, and a rotation is
//! rare). The private keys never leave the control plane: API responses
//! carry certificates only.

pub mod grant;
mod issue;
mod roots;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use isdp_proto::v1::{SignResponse, TrustBundle};
use time::OffsetDateTime;
use tokio::{sync::watch, task::JoinHandle};

pub use issue::{RootPair, der_to_pem, load_root, pem_to_der, service_of, sni_name, spiffe_id};
pub use roots::Roots;

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
    #[error("the CA changed concurrently; retry")]
    Contended,
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
    roots: watch::Sender<Arc<Roots>>,
}

// === impl Ca ===

impl Ca {
    /// Loads the roots from the store, creating them on first start (from
    /// `operator` when given). [`Ca::follow`] keeps them current.
    pub async fn load(
        store: Arc<dyn Store>,
        prefix: &str,
        settings: CaSettings,
        operator: Option<RootPair>,
    ) -> Result<Ca, CaError> {
        let key = format!("{prefix}{ROOTS_KEY}");
        let roots = match read(store.as_ref(), &key).await? {
            Some(r) => {
                if let Some(op) = &operator
                    && op.cert_der != r.signer().cert_der
                {
                    tracing::warn!(
                        "--ca-cert differs from the root already in the store; the stored one is kept (rotate to change it)"
                    );
                }
                r
            }
            None => {
                let root = match operator {
                    Some(r) => r,
                    None => issue::generate_root(&settings.trust_domain, now())?,
                };
                let fresh = Roots::new(root);
                let put = Txn::default()
                    .when_mod_revision(&key, 0)
                    .put(&key, fresh.encode(), None);
                if store.txn(put).await?.succeeded {
                    tracing::info!("created the mesh root CA");
                }
                // Winner or loser of a first-start race: the store decides.
                read(store.as_ref(), &key)
                    .await?
                    .ok_or_else(|| CaError::Load("the CA vanished from the store".into()))?
            }
        };
        let (tx, _) = watch::channel(Arc::new(roots));
        let ca = Ca {
            shared: Arc::new(Shared {
                settings,
                store,
                key,
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

    /// Signs a sidecar's CSR for `service`.
    pub fn sign(
        &self,
        service: &str,
        csr_der: &[u8],
        lifetime_seconds: u64,
        grant: Option<&grant::Grant>,
    ) -> Result<SignResponse, CaError> {
        isdp_sidecar::config::check_dns_label(service)
            .map_err(|e| CaError::Invalid(format!("service: {e}")))?;
        let s = &self.shared.settings;
        let lifetime = match lifetime_seconds {
            0 => s.default_lifetime,
            n => Duration::from_secs(n).min(s.max_lifetime),
        };
        if lifetime < MIN_LIFETIME {
            return Err(CaError::Invalid(format!(
                "lifetime_seconds: {lifetime_seconds} is below the minimum of {}s",
                MIN_LIFETIME.as_secs()
            )));
        }
        let roots = self.roots();
        let leaf = issue::sign_leaf(
            roots.signer(),
            &s.trust_domain,
            service,
            csr_der,
            lifetime,
            grant,
            now(),
        )?;
        Ok(SignResponse {
            chain_der: vec![leaf.cert_der],
            spiffe_id: spiffe_id(&s.trust_domain, service),
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
            let current = read(self.shared.store.as_ref(), &self.shared.key)
                .await?
                .ok_or_else(|| CaError::Load("the CA vanished from the store".into()))?;
            let root = issue::generate_root(&s.trust_domain, now())?;
            let next = current.rotated(root, unix_ms() + prune_after.as_millis() as i64);
            let put = Txn::default()
                .when_mod_revision(&self.shared.key, current.mod_revision)
                .put(&self.shared.key, next.encode(), None);
            if self.shared.store.txn(put).await?.succeeded {
                tracing::info!(prune_after = %humantime::format_duration(prune_after), "rotated the mesh root CA");
                self.refresh().await?;
                return Ok(self.bundle());
            }
        }
        Err(CaError::Contended)
    }

    /// Re-reads the roots, prunes them when due and publishes a change.
    async fn refresh(&self) -> Result<(), CaError> {
        let store = self.shared.store.as_ref();
        let Some(mut roots) = read(store, &self.shared.key).await? else {
            return Ok(());
        };
        if roots.prune_due(unix_ms()) {
            let pruned = roots.pruned();
            let put = Txn::default()
                .when_mod_revision(&self.shared.key, roots.mod_revision)
                .put(&self.shared.key, pruned.encode(), None);
            if store.txn(put).await?.succeeded {
                tracing::info!("pruned the previous mesh root CA from the trust bundle");
            }
            match read(store, &self.shared.key).await? {
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

async fn read(store: &dyn Store, key: &str) -> Result<Option<Roots>, CaError> {
    let (kvs, _) = store.range(key).await?;
    let Some(kv) = kvs.into_iter().find(|kv| kv.key == key) else {
        return Ok(None);
    };
    Roots::decode(&kv.value, kv.mod_revision)
        .map(Some)
        .map_err(|reason| CaError::Corrupt {
            key: key.to_owned(),
            reason,
        })
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
