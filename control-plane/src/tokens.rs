//! Bearer tokens: who may call the control plane and with which role.
//!
//! A token is stored under `<prefix>tokens/<id>` as JSON holding only the
//! SHA-256 of its secret, so a store dump grants nothing. The secret is
//! `isdp_<id>_<43 chars of base64url>`: the id inside it makes a lookup one
//! map access. Every replica keeps all tokens in memory, re-read from the
//! store every second (revocation on another replica lands within that) and
//! updated at once by its own create/revoke.
//!
//! Revoking deletes the token and, in the same transaction, writes its
//! tombstone (`revoked`), so the certificates issued under it are refused
//! by sidecars too until the last of them has expired; the same re-read
//! prunes the tombstones that are due.
//!
//! # Layout
//! - `revoked`: tombstones, their prune rule and the set in force.

pub mod revoked;

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

pub use isdp_core::role::Role;
pub use revoked::{MAX_REVOKED, REVOKED_PREFIX, Revoked, Tombstone};

use base64::Engine as _;
use isdp_proto::v1::TokenInfo;
use sha2::{Digest, Sha256};
use std::sync::RwLock;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    ca::{rfc3339, unix_ms},
    store::{Store, StoreError, Txn},
};

/// Key prefix (under the store prefix) of the tokens.
pub const TOKENS_PREFIX: &str = "tokens/";
/// How often the in-memory copy is re-read from the store.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
use crate::data_dir::ADMIN_TOKEN_FILE;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("token {0} not found")]
    NotFound(String),
    #[error(
        "{limit} revoked tokens are remembered for the sidecars already (the limit); \
         the next is forgotten at {next_prune} (unix ms). Rotating the mesh root with a \
         short prune (`isdpctl ca rotate --prune-after 10m`) cuts off every certificate \
         issued so far"
    )]
    TooManyRevoked { limit: usize, next_prune: i64 },
    #[error("stored token at {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Why a secret authenticates no one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    /// No such token (never minted, or revoked: revoking deletes it), or
    /// the secret does not match: told apart from nothing, so a guess
    /// learns nothing.
    #[error("unknown or revoked token")]
    Unknown,
    /// The secret matches a token past its expiry.
    #[error("token {id} expired at {}", rfc3339(*at_unix_ms))]
    Expired { id: String, at_unix_ms: i64 },
}

/// A token as stored: never the secret.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Token {
    pub id: String,
    pub role: Role,
    #[serde(default)]
    pub services: Vec<String>,
    /// Join tokens: the services the holder may discover besides its own;
    /// empty reads every service (as before the field existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    #[serde(default)]
    pub description: String,
    pub created_at_unix_ms: i64,
    /// 0: never expires.
    #[serde(default)]
    pub expires_at_unix_ms: i64,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
}

impl Token {
    pub fn expired(&self, now_unix_ms: i64) -> bool {
        self.expires_at_unix_ms != 0 && self.expires_at_unix_ms <= now_unix_ms
    }

    pub fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            role: self.role.to_proto() as i32,
            services: self.services.clone(),
            upstreams: self.upstreams.clone(),
            description: self.description.clone(),
            created_at_unix_ms: self.created_at_unix_ms,
            expires_at_unix_ms: self.expires_at_unix_ms,
        }
    }
}

/// SHA-256 of a secret, hex.
pub fn hash_secret(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `id` has the form of a minted token id (16 lowercase hex
/// digits), so no other key under `tokens/` can be named by one.
pub fn is_token_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The id embedded in a well-formed secret.
pub fn id_of_secret(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix("isdp_")?;
    let (id, tail) = rest.split_once('_')?;
    (id.len() == 16 && !tail.is_empty()).then_some(id)
}

/// What a join token may act as and read; empty for other roles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// The services the holder may sign for, register and own sessions of.
    pub services: Vec<String>,
    /// The services it may discover besides its own; empty: every one.
    pub upstreams: Vec<String>,
}

impl Scope {
    /// A join scope over `services`, reading every service.
    pub fn services(services: Vec<String>) -> Self {
        Scope {
            services,
            upstreams: Vec::new(),
        }
    }
}

/// Mints a token and its secret; nothing is stored.
pub fn mint(
    role: Role,
    scope: Scope,
    description: String,
    ttl: Option<Duration>,
    now_unix_ms: i64,
) -> Result<(Token, String), TokenError> {
    let Scope {
        services,
        upstreams,
    } = scope;
    if role == Role::Join {
        if services.is_empty() {
            return Err(TokenError::Invalid(
                "a join token needs at least one service".into(),
            ));
        }
    } else if !services.is_empty() || !upstreams.is_empty() {
        return Err(TokenError::Invalid(format!(
            "services and upstreams apply to join tokens only (role is {})",
            role.name()
        )));
    }
    for s in &services {
        isdp_core::names::check_dns_label(s)
            .map_err(|e| TokenError::Invalid(format!("service: {e}")))?;
    }
    for s in &upstreams {
        isdp_core::names::check_dns_label(s)
            .map_err(|e| TokenError::Invalid(format!("upstream: {e}")))?;
    }
    let id_bytes: [u8; 8] = rand::random();
    let id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret_bytes: [u8; 32] = rand::random();
    let secret = format!(
        "isdp_{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes)
    );
    let token = Token {
        id,
        role,
        services,
        upstreams,
        description,
        created_at_unix_ms: now_unix_ms,
        expires_at_unix_ms: ttl.map_or(0, |t| now_unix_ms + t.as_millis() as i64),
        secret_sha256: hash_secret(&secret),
    };
    Ok((token, secret))
}

/// Every token, in memory, following the store.
#[derive(Clone)]
pub struct Tokens {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    prefix: String,
    /// The longest certificate lifetime: how long a tombstone must last.
    max_cert_lifetime: Duration,
    by_id: RwLock<HashMap<String, Token>>,
    /// Sent whenever a token disappears (revoked here or on another
    /// replica), so open streams authenticated by it can end.
    removed: watch::Sender<()>,
    /// The revoked tokens whose certificates may still be alive; the
    /// trust bundle publishes them.
    revoked: watch::Sender<Arc<Revoked>>,
}

// === impl Tokens ===

impl Tokens {
    /// Loads every token and tombstone; [`Tokens::follow`] keeps them
    /// fresh. `max_cert_lifetime` is the CA's longest leaf lifetime, which
    /// tombstones outlast.
    pub async fn load(
        store: Arc<dyn Store>,
        prefix: &str,
        max_cert_lifetime: Duration,
    ) -> Result<Tokens, TokenError> {
        let tokens = Tokens {
            shared: Arc::new(Shared {
                store,
                prefix: format!("{prefix}{TOKENS_PREFIX}"),
                max_cert_lifetime,
                by_id: RwLock::default(),
                removed: watch::Sender::new(()),
                revoked: watch::Sender::new(Arc::default()),
            }),
        };
        tokens.refresh().await?;
        Ok(tokens)
    }

    /// Spawns the task that re-reads the tokens every second.
    pub fn follow(&self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(self.clone().follow_loop(shutdown))
    }

    /// The token a secret belongs to, if it is known, unexpired and the
    /// secret matches. Only a caller that holds the secret learns that its
    /// token expired (and when); anyone else learns nothing of the id.
    pub fn verify(&self, secret: &str) -> Result<Token, Unverified> {
        let id = id_of_secret(secret).ok_or(Unverified::Unknown)?;
        let token = self.get(id).ok_or(Unverified::Unknown)?;
        let hash = hash_secret(secret);
        // Both are hex of equal length: compare without an early exit.
        let same = hash.len() == token.secret_sha256.len()
            && hash
                .bytes()
                .zip(token.secret_sha256.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(Unverified::Unknown);
        }
        if token.expired(unix_ms()) {
            return Err(Unverified::Expired {
                id: token.id,
                at_unix_ms: token.expires_at_unix_ms,
            });
        }
        Ok(token)
    }

    /// The stored token `id`, expired or not.
    pub fn get(&self, id: &str) -> Option<Token> {
        self.shared.by_id.read().ok()?.get(id).cloned()
    }

    /// Resolves once the token `id` is revoked (within a second of the
    /// revocation on any replica): the end of every stream it opened.
    pub async fn revoked(&self, id: &str) {
        let mut removed = self.shared.removed.subscribe();
        while self.exists(id) {
            if removed.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Whether a token with this id is stored, expired or not: revoking
    /// deletes it.
    pub fn exists(&self, id: &str) -> bool {
        self.shared.by_id.read().is_ok_and(|m| m.contains_key(id))
    }

    /// The revoked tokens in force, updated as tokens are revoked (here
    /// or elsewhere) and tombstones pruned.
    pub fn subscribe_revoked(&self) -> watch::Receiver<Arc<Revoked>> {
        self.shared.revoked.subscribe()
    }

    pub fn list(&self) -> Vec<Token> {
        let mut all: Vec<Token> = self
            .shared
            .by_id
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| (a.created_at_unix_ms, &a.id).cmp(&(b.created_at_unix_ms, &b.id)));
        all
    }

    /// Mints and stores a token; returns it with its secret.
    pub async fn create(
        &self,
        role: Role,
        scope: Scope,
        description: String,
        ttl: Option<Duration>,
    ) -> Result<(Token, String), TokenError> {
        let (token, secret) = mint(role, scope, description, ttl, unix_ms())?;
        let key = format!("{}{}", self.shared.prefix, token.id);
        let value = serde_json::to_vec(&token).unwrap_or_default();
        let outcome = self
            .shared
            .store
            .txn(
                Txn::default()
                    .when_mod_revision(&key, 0)
                    .put(key.clone(), value.into(), None),
            )
            .await?;
        if !outcome.succeeded {
            // 64 random bits collided: vanishingly rare, but never overwrite.
            return Err(TokenError::Invalid("token id collision; retry".into()));
        }
        if let Ok(mut m) = self.shared.by_id.write() {
            m.insert(token.id.clone(), token.clone());
        }
        Ok((token, secret))
    }

    /// Deletes the token and writes its tombstone, in one transaction;
    /// returns the tombstone (when it will be pruned).
    pub async fn revoke(&self, id: &str) -> Result<Tombstone, TokenError> {
        if !is_token_id(id) {
            return Err(TokenError::Invalid(format!(
                "id: {id:?} is not a token id (16 hex digits, as `token list` shows)"
            )));
        }
        // The store, not this replica's copy, says whether it exists: a
        // token minted on another replica a moment ago may not be here yet.
        let key = format!("{}{}", self.shared.prefix, id);
        let (kvs, _) = self.shared.store.range(&key).await?;
        let Some(kv) = kvs.iter().find(|kv| kv.key == key) else {
            return Err(TokenError::NotFound(id.to_owned()));
        };
        let now = unix_ms();
        {
            let in_force = self.shared.revoked.borrow();
            if in_force.len() >= MAX_REVOKED {
                return Err(TokenError::TooManyRevoked {
                    limit: MAX_REVOKED,
                    next_prune: in_force.next_prune_unix_ms().unwrap_or(now),
                });
            }
        }
        let tombstone = Tombstone::new(id, now, self.shared.max_cert_lifetime);
        let value = serde_json::to_vec(&tombstone).unwrap_or_default();
        let outcome = self
            .shared
            .store
            .txn(
                Txn::default()
                    .when_mod_revision(&key, kv.mod_revision)
                    .delete(key.clone())
                    .put(self.tombstone_key(id), value.into(), None),
            )
            .await?;
        if !outcome.succeeded {
            // Revoked concurrently (here or on another replica).
            return Err(TokenError::NotFound(id.to_owned()));
        }
        if let Ok(mut m) = self.shared.by_id.write() {
            m.remove(id);
        }
        self.shared
            .revoked
            .send_modify(|r| Arc::make_mut(r).insert(&tombstone));
        self.shared.removed.send_replace(());
        Ok(tombstone)
    }

    fn tombstone_key(&self, id: &str) -> String {
        format!("{}{REVOKED_PREFIX}{id}", self.shared.prefix)
    }

    /// On first start (no unexpired admin token in the store), creates one
    /// and writes its secret to `<data_dir>/admin.token`, mode 0600.
    pub async fn bootstrap_admin(&self, data_dir: &Path) -> Result<(), TokenError> {
        let now = unix_ms();
        if self
            .list()
            .iter()
            .any(|t| t.role == Role::Admin && !t.expired(now))
        {
            return Ok(());
        }
        let (token, secret) = self
            .create(
                Role::Admin,
                Scope::default(),
                "bootstrap admin".into(),
                None,
            )
            .await?;
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        write_secret(&path, &secret).map_err(|source| TokenError::Write {
            path: path.display().to_string(),
            source,
        })?;
        tracing::info!(id = %token.id, path = %path.display(), "created the bootstrap admin token");
        Ok(())
    }

    async fn refresh(&self) -> Result<(), TokenError> {
        self.refresh_at(unix_ms()).await
    }

    /// Re-reads tokens and tombstones as of `now` (a parameter so tests
    /// can move past a tombstone's prune time), prunes the tombstones that
    /// are due and publishes what changed.
    async fn refresh_at(&self, now: i64) -> Result<(), TokenError> {
        let (kvs, _) = self.shared.store.range(&self.shared.prefix).await?;
        let tombstones_prefix = self.tombstone_key("");
        let mut fresh = HashMap::with_capacity(kvs.len());
        let mut tombstones = Vec::new();
        for kv in kvs {
            if kv.key.starts_with(&tombstones_prefix) {
                match serde_json::from_slice::<Tombstone>(&kv.value) {
                    Ok(t) => tombstones.push((kv.key, t)),
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable tombstone")
                    }
                }
                continue;
            }
            match serde_json::from_slice::<Token>(&kv.value) {
                Ok(t) => {
                    fresh.insert(t.id.clone(), t);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping an unreadable token")
                }
            }
        }
        let gone = match self.shared.by_id.write() {
            Ok(mut m) => {
                let gone = m.keys().any(|id| !fresh.contains_key(id));
                *m = fresh;
                gone
            }
            Err(_) => false,
        };
        if gone {
            self.shared.removed.send_replace(());
        }
        let revoked = Revoked::in_force(tombstones.iter().map(|(_, t)| t), now);
        self.shared.revoked.send_if_modified(|cur| {
            if **cur == revoked {
                return false;
            }
            *cur = Arc::new(revoked);
            true
        });
        // Every replica prunes what is due; deleting twice is harmless.
        let due: Vec<_> = tombstones.into_iter().filter(|(_, t)| t.due(now)).collect();
        if !due.is_empty() {
            let txn = due
                .iter()
                .fold(Txn::default(), |txn, (key, _)| txn.delete(key.clone()));
            self.shared.store.txn(txn).await?;
            for (_, t) in &due {
                tracing::info!(id = %t.id, "pruned the tombstone of a revoked token: its certificates have expired");
            }
        }
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
                tracing::warn!(error = %e, "re-reading tokens failed; keeping the last ones");
            }
        }
    }
}

/// The secret and a newline, 0600 whatever the umask, replacing any
/// earlier file whole.
fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    crate::data_dir::write_secret(path, format!("{secret}\n").as_bytes())
}

#[cfg(test)]
mod tests;
