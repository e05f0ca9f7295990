//! Traffic policies: how callers' sidecars treat one destination service
//! (timeouts, retries, circuit breaking, outlier detection, balancing,
//! splits, fault injection), one versioned document per service.
//!
//! `document.rs` reads what operators write (every problem at once, with
//! its field path; unknown fields are errors) using `walk.rs`. Policies
//! are stored under `<prefix>policies/<service>` as `StoredPolicy` bytes;
//! the version is the key's store revision, so compare-and-set is one
//! store transaction. Like everything else, the in-memory copy follows the
//! store's watch ([`crate::store::follow`]);
//! [`crate::publish::traffic`] serves each policy over xDS as
//! `isdp.v1.TrafficPolicy`.

pub mod document;
mod walk;

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use isdp_proto::v1::{StoredPolicy, TrafficPolicy};
use prost::Message;
use tokio::sync::watch;

use crate::{
    registry::{Registry, validate::FieldError},
    store::{
        Store, StoreError, Txn,
        follow::{Entries, Followed},
    },
};

/// Largest policy document accepted, in bytes of JSON.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid policy: {}", crate::registry::validate::describe(.0))]
    Invalid(Vec<FieldError>),
    #[error("no policy for service {0:?}")]
    NotFound(String),
    #[error(
        "the policy for {service:?} is at version {actual}, not the expected {expected}; read it again and reapply"
    )]
    VersionMismatch {
        service: String,
        expected: u64,
        actual: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cheap handle on the policies; clones share one copy.
#[derive(Clone)]
pub struct Policies {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    /// `<prefix>policies/`.
    prefix: String,
    followed: Followed,
    /// A split may only name subsets that have instances now.
    registry: Registry,
}

/// Decodes every stored policy, by service, each with its version.
/// Undecodable values are logged and skipped.
pub fn decode_all(entries: &Entries) -> BTreeMap<String, StoredPolicy> {
    entries
        .iter()
        .filter_map(|(key, e)| match StoredPolicy::decode(e.value.as_ref()) {
            Ok(mut p) => {
                p.version = e.mod_revision;
                Some((key.clone(), p))
            }
            Err(err) => {
                tracing::error!(%key, error = %err, "undecodable policy in store; skipped");
                None
            }
        })
        .collect()
}

impl Policies {
    pub async fn start(
        store: Arc<dyn Store>,
        key_prefix: &str,
        registry: Registry,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, PolicyError> {
        let prefix = format!("{key_prefix}policies/");
        let followed = Followed::start(store.clone(), prefix.clone(), shutdown).await?;
        Ok(Policies {
            shared: Arc::new(Shared {
                store,
                prefix,
                followed,
                registry,
            }),
        })
    }

    pub fn list(&self) -> Vec<StoredPolicy> {
        decode_all(&self.shared.followed.entries())
            .into_values()
            .collect()
    }

    pub fn get(&self, service: &str) -> Result<StoredPolicy, PolicyError> {
        decode_all(&self.shared.followed.entries())
            .remove(service)
            .ok_or_else(|| PolicyError::NotFound(service.to_owned()))
    }

    /// Every change, as whole new sets; read with [`decode_all`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Entries>> {
        self.shared.followed.subscribe()
    }

    /// Reads a document: the policy it describes and its normalized JSON,
    /// or every problem.
    pub fn check(&self, document_json: &str) -> Result<(TrafficPolicy, String), PolicyError> {
        let invalid = |rule: String| {
            PolicyError::Invalid(vec![FieldError {
                field: "document".into(),
                rule,
            }])
        };
        if document_json.len() > MAX_DOCUMENT_BYTES {
            return Err(invalid(format!(
                "at most {MAX_DOCUMENT_BYTES} bytes, got {}",
                document_json.len()
            )));
        }
        let value: serde_json::Value = serde_json::from_str(document_json)
            .map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let registry = &self.shared.registry;
        let has_instances = |service: &str, labels: &BTreeMap<String, String>| {
            registry.instances(service).iter().any(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.instance.metadata.get(k) == Some(v))
            })
        };
        let policy =
            document::parse(&value, &has_instances).map_err(|p| PolicyError::Invalid(p.0))?;
        Ok((policy, value.to_string()))
    }

    fn version_of(&self, service: &str) -> u64 {
        self.shared
            .followed
            .entries()
            .get(service)
            .map_or(0, |e| e.mod_revision)
    }

    /// Validates and (unless `dry_run`) stores a document. With `expected`,
    /// stores only if the policy is at that version (0: absent); the store
    /// transaction makes that check, so two writers cannot both win.
    pub async fn put(
        &self,
        document_json: &str,
        expected: Option<u64>,
        dry_run: bool,
    ) -> Result<StoredPolicy, PolicyError> {
        let (policy, normalized) = self.check(document_json)?;
        let service = policy.service.clone();
        let current = self.version_of(&service);
        let mismatch = |expected, actual| PolicyError::VersionMismatch {
            service: service.clone(),
            expected,
            actual,
        };
        if let Some(e) = expected
            && e != current
        {
            return Err(mismatch(e, current));
        }
        let mut stored = StoredPolicy {
            policy: Some(policy),
            version: current,
            document_json: normalized,
        };
        if dry_run {
            return Ok(stored);
        }
        let key = format!("{}{service}", self.shared.prefix);
        let mut txn = Txn::default().put(&key, Bytes::from(stored.encode_to_vec()), None);
        if expected.is_some() {
            txn = txn.when_mod_revision(&key, current);
        }
        let out = self.shared.store.txn(txn).await?;
        self.shared.followed.applied(out.revision).await;
        if !out.succeeded {
            return Err(mismatch(current, self.version_of(&service)));
        }
        stored.version = out.revision;
        Ok(stored)
    }

    /// Deletes a policy; with `expected`, only at that version.
    pub async fn delete(&self, service: &str, expected: Option<u64>) -> Result<(), PolicyError> {
        let current = self.version_of(service);
        if current == 0 {
            return Err(PolicyError::NotFound(service.to_owned()));
        }
        let mismatch = |expected, actual| PolicyError::VersionMismatch {
            service: service.to_owned(),
            expected,
            actual,
        };
        if let Some(e) = expected
            && e != current
        {
            return Err(mismatch(e, current));
        }
        let key = format!("{}{service}", self.shared.prefix);
        let txn = Txn::default().delete(&key).when_mod_revision(&key, current);
        let out = self.shared.store.txn(txn).await?;
        self.shared.followed.applied(out.revision).await;
        if !out.succeeded {
            return match self.version_of(service) {
                0 => Err(PolicyError::NotFound(service.to_owned())),
                actual => Err(mismatch(current, actual)),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
