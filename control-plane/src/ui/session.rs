//! Dashboard sessions: the login form's token is checked once and never
//! leaves the control plane again; the browser holds an opaque session id
//! in a cookie (`HttpOnly`, `Secure`: the listener is always TLS;
//! `SameSite=Strict`; `Path=/ui/`), which this map resolves to the
//! token's principal.
//!
//! A session ends on logout, after `--ui-session-idle` without a request
//! (a live-update stream counts as requests while it is open), and with
//! its token: each use looks the token up again, so a revocation (on any
//! replica: tokens follow the store) or an expiry ends it at the next
//! request. At most `--ui-max-sessions` are held; a login over it ends
//! the one idle longest. Sessions are per replica and in memory: a
//! restart, or a load balancer moving the browser to another replica,
//! means logging in again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::HeaderMap;
use tokio::time::Instant;

use crate::{
    auth::{Principal, token_principal},
    tokens::{Role, Tokens},
};

/// The cookie's name.
pub const COOKIE: &str = "isdp_session";

/// Why a login is refused: the text the form shows.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("token refused: {0}")]
    Token(String),
    #[error("token refused: the dashboard needs role read or more; this token has {0}")]
    Role(&'static str),
}

#[derive(Clone)]
pub struct Sessions {
    shared: Arc<Shared>,
}

struct Shared {
    tokens: Tokens,
    idle: Duration,
    max: usize,
    by_id: Mutex<HashMap<String, Session>>,
}

struct Session {
    principal: Principal,
    last_seen: Instant,
}

// === impl Sessions ===

impl Sessions {
    pub fn new(tokens: Tokens, idle: Duration, max: usize) -> Self {
        Sessions {
            shared: Arc::new(Shared {
                tokens,
                idle,
                max: max.max(1),
                by_id: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Checks `secret` and opens a session for its principal; returns the
    /// session id.
    pub fn login(&self, secret: &str) -> Result<String, LoginError> {
        let principal = token_principal(&self.shared.tokens, secret.trim())
            .map_err(|s| LoginError::Token(s.message().to_owned()))?;
        if !principal.role.includes(Role::Read) {
            return Err(LoginError::Role(principal.role.name()));
        }
        let id = new_id();
        let now = Instant::now();
        let mut map = self.shared.by_id.lock().expect("sessions lock");
        map.retain(|_, s| now.duration_since(s.last_seen) < self.shared.idle);
        if map.len() >= self.shared.max
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                principal,
                last_seen: now,
            },
        );
        Ok(id)
    }

    /// The principal of the session `id`, if it is open and its token
    /// still valid; the use counts against idleness.
    pub fn resolve(&self, id: &str) -> Option<Principal> {
        let now = Instant::now();
        let mut map = self.shared.by_id.lock().expect("sessions lock");
        let session = map.get_mut(id)?;
        let token_valid = self
            .shared
            .tokens
            .get(&session.principal.id)
            .is_some_and(|t| !t.expired(crate::ca::unix_ms()));
        if !token_valid || now.duration_since(session.last_seen) >= self.shared.idle {
            map.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.principal.clone())
    }

    /// Ends the session `id`.
    pub fn logout(&self, id: &str) {
        self.shared.by_id.lock().expect("sessions lock").remove(id);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shared.by_id.lock().expect("sessions lock").len()
    }
}

/// 256 random bits, hex.
fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session id of the request's cookie, if it sends one.
pub fn cookie_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that gives the browser session `id`: no
/// `Max-Age`, so it also ends with the browser; the server ends it sooner.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/ui/; HttpOnly; Secure; SameSite=Strict")
}

/// The `Set-Cookie` value that removes it.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/ui/; HttpOnly; Secure; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests;
