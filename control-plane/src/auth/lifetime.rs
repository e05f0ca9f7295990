//! A streaming call lives no longer than the credential that opened it.
//!
//! A unary call is authenticated once and is over in moments; a stream
//! (xDS, a sidecar's session, the watches) may last for days, long past
//! the revocation or expiry of the token it was opened with. So the auth
//! layer gives every streaming call a [`Lifetime`]: the token whose
//! revocation ends it (the caller's own, or the grant of its client
//! certificate) and the instant it expires (the token's expiry, or the
//! earlier of the certificate's and its grant's), a timer rather than a
//! poll. [`Lifetime::end`] turns it into one future per call, shared by
//! the call's two bodies (`auth::bounded`): the response ends with an
//! UNAUTHENTICATED trailer saying why, the request body fails, and the
//! handler is stopped even if its client stopped reading.
//!
//! Being in the layer, this holds for every streaming method, including
//! one added later: `methods::STREAMING` lists them, checked against the
//! descriptors by its tests.

use std::time::Duration;

use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use tonic::Status;

use crate::{
    ca::{rfc3339, unix_ms},
    tokens::Tokens,
};

/// What ends a credential: a token's revocation, an expiry, or both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// The token whose revocation ends the credential.
    pub revoked_with: Option<String>,
    /// The earliest expiry of what the credential stands on.
    pub expiry: Option<Expiry>,
}

/// An expiry, and what expires then (for the status that says so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub at_unix_ms: i64,
    /// "token 0123456789abcdef", "the client certificate of spiffe://...".
    pub what: String,
}

/// Resolves, with the status that ends the call, when the credential is
/// revoked or expires; one per call, cloned into both of its bodies.
pub type End = Shared<BoxFuture<'static, Status>>;

// === impl Lifetime ===

impl Lifetime {
    /// A bearer token's: revoked with it, expiring with it (`0`: never).
    pub fn token(id: &str, expires_at_unix_ms: i64) -> Self {
        Lifetime {
            revoked_with: Some(id.to_owned()),
            expiry: None,
        }
        .expiring(expires_at_unix_ms, || format!("token {id}"))
    }

    /// Also expiring at `at_unix_ms` (`0`: never), if that is earlier.
    pub fn expiring(mut self, at_unix_ms: i64, what: impl FnOnce() -> String) -> Self {
        let earlier = self
            .expiry
            .as_ref()
            .is_none_or(|e| at_unix_ms < e.at_unix_ms);
        if at_unix_ms != 0 && earlier {
            self.expiry = Some(Expiry {
                at_unix_ms,
                what: what(),
            });
        }
        self
    }

    /// The future that ends a call: at the revocation (within a re-read
    /// of the tokens on any replica) or on a timer at the expiry,
    /// whichever comes first; never when neither applies.
    pub fn end(self, tokens: Tokens) -> End {
        // The timer is set now, from the wall clock: a later change of the
        // wall clock moves no deadline, and tokio's paused clock drives it
        // in tests.
        let deadline = self.expiry.map(|e| {
            let left = e.at_unix_ms.saturating_sub(unix_ms()).max(0) as u64;
            (tokio::time::Instant::now() + Duration::from_millis(left), e)
        });
        let revoked_with = self.revoked_with;
        async move {
            let revoked = async {
                match &revoked_with {
                    Some(id) => tokens.revoked(id).await,
                    None => std::future::pending().await,
                }
            };
            let expired = async {
                match &deadline {
                    Some((at, _)) => tokio::time::sleep_until(*at).await,
                    None => std::future::pending().await,
                }
            };
            let message = tokio::select! {
                () = revoked => format!(
                    "token {} was revoked",
                    revoked_with.as_deref().unwrap_or_default()
                ),
                () = expired => {
                    let e = deadline.map(|(_, e)| e).expect("only with a deadline");
                    format!("{} expired at {}", e.what, rfc3339(e.at_unix_ms))
                }
            };
            tracing::info!(%message, "ending a stream: its credential ended");
            Status::unauthenticated(message)
        }
        .boxed()
        .shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_expiry_names_what_expires() {
        let l = Lifetime::token("t", 0);
        assert_eq!(l.expiry, None, "a token without expiry never expires");
        let l = Lifetime::token("t", 5_000);
        assert_eq!(l.expiry.as_ref().unwrap().what, "token t");
        let cert_first = l.clone().expiring(4_000, || "the certificate".into());
        assert_eq!(cert_first.expiry.unwrap().what, "the certificate");
        let token_first = l.clone().expiring(6_000, || "the certificate".into());
        assert_eq!(token_first.expiry.unwrap().what, "token t");
        assert_eq!(l.clone().expiring(0, || "never".into()), l);
    }
}
