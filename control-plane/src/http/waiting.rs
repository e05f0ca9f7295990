//! Blocking reads (`?index=N&wait=D`) as the long-lived calls they are.
//!
//! A waiting read holds a task, a connection's stream and a place among
//! the index's waiters for up to `--http-max-wait`, so one credential may
//! hold only so many at a time: each waiting read counts against its
//! principal's `--max-streams-per-principal`, as a streaming gRPC method
//! of its own ([`GROUP`]), and the one over it is answered 429 naming the
//! flag. A read is counted only while it waits: one answered at once
//! (its index is not current) takes no place.
//!
//! A waiting read also lives no longer than its token: it ends with 401
//! as soon as the token is revoked or expires (the same
//! `crate::auth::Lifetime` that ends gRPC streams).

use std::time::Duration;

use crate::{
    auth::{Lifetime, OpenStreams, Principal},
    tokens::Tokens,
};

use super::{HttpError, index::Index};

/// The method group blocking reads are counted under, as refusals name it.
pub const GROUP: &str = "HTTP blocking read";

/// The count of waiting reads per principal, and what ends them.
pub struct Waits {
    streams: OpenStreams,
    tokens: Tokens,
}

// === impl Waits ===

impl Waits {
    /// At most `max` waiting reads per principal.
    pub fn new(tokens: Tokens, max: usize) -> Self {
        Waits {
            streams: OpenStreams::new(max),
            tokens,
        }
    }

    /// [`Index::wait`] for `p`: 429 when `p` already has its limit of
    /// reads waiting, 401 when its token is revoked or expires meanwhile.
    pub async fn wait(
        &self,
        index: &Index,
        p: &Principal,
        service: Option<&str>,
        seen: u64,
        wait: Duration,
    ) -> Result<u64, HttpError> {
        let _slot = self.streams.admit(p, GROUP)?;
        let lifetime = match &p.grant {
            Some(id) => Lifetime::token(id, p.grant_expires_at_unix_ms.unwrap_or(0)),
            None => Lifetime::default(),
        };
        let end = lifetime.end(self.tokens.clone());
        tokio::select! {
            n = index.wait(service, seen, wait) => Ok(n),
            status = end => Err(status.into()),
        }
    }
}
