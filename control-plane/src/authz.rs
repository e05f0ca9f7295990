//! Authorization rules: which services may call which, per destination,
//! optionally narrowed by HTTP method and path prefix. Deny wins over
//! allow; a request no rule matches gets the mesh-wide default.
//!
//! The control plane only stores and distributes rules; each destination's
//! sidecar enforces them on its inbound listener, where the caller's SPIFFE
//! ID is known from its mTLS certificate. Rules live in the store under
//! `<prefix>authz/` and, like registrations, reach the in-memory view only
//! through the store's watch ([`crate::store::follow`]), so every replica
//! serves the same rules and a writer reads its own write.
//! [`crate::publish::authorization`] turns them into one
//! `isdp.v1.AuthorizationPolicy` xDS resource per destination.

pub mod validate;

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use isdp_proto::v1::{Action, AuthorizationPolicy, AuthzRule, GetDefaultResponse};
use prost::Message;
use tokio::sync::watch;

use crate::{
    registry::validate::FieldError,
    store::{Store, StoreError, Txn, follow::Entries, follow::Followed},
};

/// Key of the mesh-wide default, under `<prefix>authz/`.
const DEFAULT_KEY: &str = "default";
/// Folder of the rules, under `<prefix>authz/`: `rules/<destination>/<name>`.
const RULES_DIR: &str = "rules/";

/// The mesh-wide default before an operator sets one. Allow, as Istio does
/// without an AuthorizationPolicy: every hop is still mutually
/// authenticated, and a fresh mesh works before anyone writes rules.
/// Operators who want default-deny run `isdpctl authz default deny`.
pub const INITIAL_DEFAULT: Action = Action::Allow;

/// Every rule and the default, as the store holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    pub default: Action,
    /// destination -> rule name -> rule.
    pub by_destination: BTreeMap<String, BTreeMap<String, AuthzRule>>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            default: INITIAL_DEFAULT,
            by_destination: BTreeMap::new(),
        }
    }
}

impl Rules {
    /// The rules in `entries` (keys under `<prefix>authz/`). Undecodable
    /// values are logged and skipped: one bad key must not take every
    /// destination's policy with it.
    pub fn from_entries(entries: &Entries) -> Rules {
        let mut rules = Rules::default();
        for (key, entry) in entries {
            if key == DEFAULT_KEY {
                match GetDefaultResponse::decode(entry.value.as_ref())
                    .map(|d| Action::try_from(d.action))
                {
                    Ok(Ok(a @ (Action::Allow | Action::Deny))) => rules.default = a,
                    _ => {
                        tracing::error!(%key, "undecodable authorization default in store; ignored")
                    }
                }
            } else if key.starts_with(RULES_DIR) {
                match AuthzRule::decode(entry.value.as_ref()) {
                    Ok(rule) => {
                        rules
                            .by_destination
                            .entry(rule.destination.clone())
                            .or_default()
                            .insert(rule.name.clone(), rule);
                    }
                    Err(e) => {
                        tracing::error!(%key, error = %e, "undecodable authorization rule in store; skipped")
                    }
                }
            }
        }
        rules
    }

    /// What `destination`'s sidecars enforce.
    pub fn policy(&self, destination: &str, trust_domain: &str) -> AuthorizationPolicy {
        AuthorizationPolicy {
            destination: destination.to_owned(),
            default_action: self.default as i32,
            rules: self
                .by_destination
                .get(destination)
                .map(|r| r.values().cloned().collect())
                .unwrap_or_default(),
            trust_domain: trust_domain.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("invalid rule: {}", crate::registry::validate::describe(.0))]
    Invalid(Vec<FieldError>),
    #[error("no rule {name:?} for destination {destination:?}")]
    NotFound { destination: String, name: String },
    #[error(
        "destination {destination:?} already has {limit} rules, the most allowed; delete one first"
    )]
    TooMany { destination: String, limit: usize },
    #[error("default: must be allow or deny")]
    InvalidDefault,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cheap handle on the rules; clones share one view.
#[derive(Clone)]
pub struct Authz {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    /// `<prefix>authz/`.
    prefix: String,
    followed: Followed,
}

impl Authz {
    /// Loads the rules and follows the store until `shutdown`.
    pub async fn start(
        store: Arc<dyn Store>,
        key_prefix: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, AuthzError> {
        let prefix = format!("{key_prefix}authz/");
        let followed = Followed::start(store.clone(), prefix.clone(), shutdown).await?;
        Ok(Authz {
            shared: Arc::new(Shared {
                store,
                prefix,
                followed,
            }),
        })
    }

    pub fn rules(&self) -> Rules {
        Rules::from_entries(&self.shared.followed.entries())
    }

    /// Every change under `<prefix>authz/`; read with [`Rules::from_entries`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Entries>> {
        self.shared.followed.subscribe()
    }

    /// Rules for `destination`, or for every destination when `None`,
    /// sorted by destination then name.
    pub fn list(&self, destination: Option<&str>) -> Vec<AuthzRule> {
        let rules = self.rules();
        rules
            .by_destination
            .iter()
            .filter(|(d, _)| destination.is_none_or(|want| want == d.as_str()))
            .flat_map(|(_, r)| r.values().cloned())
            .collect()
    }

    /// Stores `rule`, replacing one of the same destination and name.
    pub async fn put_rule(&self, rule: AuthzRule) -> Result<AuthzRule, AuthzError> {
        let errors = validate::rule(&rule);
        if !errors.is_empty() {
            return Err(AuthzError::Invalid(errors));
        }
        let existing = self.rules();
        let held = existing.by_destination.get(&rule.destination);
        let replaces = held.is_some_and(|r| r.contains_key(&rule.name));
        if !replaces && held.map_or(0, |r| r.len()) >= validate::MAX_RULES_PER_DESTINATION {
            return Err(AuthzError::TooMany {
                destination: rule.destination,
                limit: validate::MAX_RULES_PER_DESTINATION,
            });
        }
        let key = self.rule_key(&rule.destination, &rule.name);
        let out = self
            .shared
            .store
            .txn(Txn::default().put(key, Bytes::from(rule.encode_to_vec()), None))
            .await?;
        self.applied(out.revision).await;
        Ok(rule)
    }

    pub async fn delete_rule(&self, destination: &str, name: &str) -> Result<(), AuthzError> {
        let found = self
            .rules()
            .by_destination
            .get(destination)
            .is_some_and(|r| r.contains_key(name));
        if !found {
            return Err(AuthzError::NotFound {
                destination: destination.to_owned(),
                name: name.to_owned(),
            });
        }
        let out = self
            .shared
            .store
            .txn(Txn::default().delete(self.rule_key(destination, name)))
            .await?;
        self.applied(out.revision).await;
        Ok(())
    }

    pub fn default_action(&self) -> Action {
        self.rules().default
    }

    pub async fn set_default(&self, action: Action) -> Result<(), AuthzError> {
        if !matches!(action, Action::Allow | Action::Deny) {
            return Err(AuthzError::InvalidDefault);
        }
        let value = GetDefaultResponse {
            action: action as i32,
        };
        let out = self
            .shared
            .store
            .txn(Txn::default().put(
                format!("{}{}", self.shared.prefix, DEFAULT_KEY),
                Bytes::from(value.encode_to_vec()),
                None,
            ))
            .await?;
        self.applied(out.revision).await;
        Ok(())
    }

    fn rule_key(&self, destination: &str, name: &str) -> String {
        format!("{}{}{destination}/{name}", self.shared.prefix, RULES_DIR)
    }

    /// Waits until the view has applied `revision`, so the caller reads its
    /// own write.
    async fn applied(&self, revision: crate::store::Revision) {
        self.shared.followed.applied(revision).await;
    }
}

#[cfg(test)]
mod tests;
