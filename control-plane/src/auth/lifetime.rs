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
//! the call's two bodies ([`Bounded`]): the response ends with an
//! UNAUTHENTICATED trailer saying why, and the request body fails, so the
//! handler stops acting on anything the client still sends.
//!
//! Being in the layer, this holds for every streaming method, including
//! one added later: `methods::STREAMING` lists them, checked against the
//! descriptors by its tests.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use http_body::{Frame, SizeHint};
use tonic::{Status, body::Body};

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

/// Which body of a call [`Bounded`] wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// One body of a streaming call, cut off when its [`End`] resolves: the
/// response with the end's status as its trailers, the request with the
/// status as an error (which the handler's `Streaming` reports).
pub struct Bounded {
    inner: Body,
    end: End,
    side: Side,
    /// The inner body finished, or the end came: nothing more to poll.
    done: bool,
}

// === impl Bounded ===

impl Bounded {
    pub fn request(inner: Body, end: End) -> Self {
        Bounded {
            inner,
            end,
            side: Side::Request,
            done: false,
        }
    }

    pub fn response(inner: Body, end: End) -> Self {
        Bounded {
            inner,
            end,
            side: Side::Response,
            done: false,
        }
    }
}

impl http_body::Body for Bounded {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // The end first: once it came, nothing more of the inner body goes
        // out, not even the OK trailers of a handler that stopped because
        // its request body failed.
        if let Poll::Ready(status) = this.end.poll_unpin(cx) {
            this.done = true;
            // Dropped: the handler's stream (and the task feeding it) stops.
            this.inner = Body::empty();
            return Poll::Ready(Some(match this.side {
                Side::Response => Ok(Frame::trailers(trailers(&status))),
                Side::Request => Err(status),
            }));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.done = true,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.done = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        SizeHint::default()
    }
}

/// The trailers that end a call with `status`.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only a message that cannot be encoded fails; the code alone then.
        headers.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    headers
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body::Body as _;
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::tokens::{Role, Scope};

    async fn tokens() -> (Tokens, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let tokens = Tokens::load(Arc::new(store), "/isdp/", Duration::from_secs(60))
            .await
            .unwrap();
        (tokens, dir)
    }

    /// A body that yields `first`, then waits forever: an open stream.
    fn open_stream(first: &'static str) -> Body {
        let frames = futures::stream::once(async move {
            Ok::<_, Status>(Frame::data(Bytes::from_static(first.as_bytes())))
        })
        .chain(futures::stream::pending());
        Body::new(http_body_util::StreamBody::new(frames))
    }

    use futures::StreamExt as _;

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

    /// The response streams until the credential expires, then ends with
    /// an UNAUTHENTICATED trailer naming the token and its expiry; the
    /// request body fails at the same moment. On the paused clock: the
    /// timer fires at the expiry, not a poll later.
    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_at_its_tokens_expiry() {
        let (tokens, _dir) = tokens().await;
        let (token, _) = tokens
            .create(
                Role::Read,
                Scope::default(),
                String::new(),
                Some(Duration::from_secs(30)),
            )
            .await
            .unwrap();
        let expires = token.expires_at_unix_ms;
        let end = Lifetime::token(&token.id, expires).end(tokens);
        let mut response = Bounded::response(open_stream("hello"), end.clone());
        let mut request = Bounded::request(open_stream("ping"), end);

        let first = response.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "hello");
        assert_eq!(
            request.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ping"
        );
        let started = tokio::time::Instant::now();
        let trailers = response
            .frame()
            .await
            .expect("a frame")
            .expect("no error")
            .into_trailers()
            .expect("trailers");
        let waited = started.elapsed();
        assert!(
            (Duration::from_secs(29)..=Duration::from_secs(30)).contains(&waited),
            "{waited:?}"
        );
        let status = Status::from_header_map(&trailers).expect("a grpc-status");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let message = status.message();
        assert!(
            message.starts_with(&format!("token {} expired at ", token.id)),
            "{message}"
        );
        assert!(message.contains(&rfc3339(expires)), "{message}");
        assert!(
            response.frame().await.is_none(),
            "nothing after the trailer"
        );
        assert!(response.is_end_stream());

        let failed = request.frame().await.unwrap().unwrap_err();
        assert_eq!(failed.code(), tonic::Code::Unauthenticated);
        assert!(request.frame().await.is_none());
    }

    /// Revoking the token ends its streams (and only its streams); a
    /// stream whose body finishes first keeps its own trailers.
    #[tokio::test]
    async fn a_stream_ends_when_its_token_is_revoked() {
        let (tokens, _dir) = tokens().await;
        let join = || Scope::services(vec!["web".into()]);
        let (mine, _) = tokens
            .create(Role::Join, join(), String::new(), None)
            .await
            .unwrap();
        let (other, _) = tokens
            .create(Role::Join, join(), String::new(), None)
            .await
            .unwrap();
        let mut ended = Bounded::response(
            open_stream("a"),
            Lifetime::token(&mine.id, 0).end(tokens.clone()),
        );
        let mut kept = Bounded::response(
            open_stream("b"),
            Lifetime::token(&other.id, 0).end(tokens.clone()),
        );
        let mut finished = Bounded::response(
            Body::new(http_body_util::Full::new(Bytes::from_static(b"done"))),
            Lifetime::token(&mine.id, 0).end(tokens.clone()),
        );
        assert!(ended.frame().await.unwrap().unwrap().is_data());
        assert!(kept.frame().await.unwrap().unwrap().is_data());
        assert!(finished.frame().await.unwrap().unwrap().is_data());
        assert!(
            finished.frame().await.is_none(),
            "ended before the revocation"
        );

        tokens.revoke(&mine.id).await.unwrap();
        let trailers = tokio::time::timeout(Duration::from_secs(1), ended.frame())
            .await
            .expect("the revocation ends the stream at once")
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), format!("token {} was revoked", mine.id));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), kept.frame())
                .await
                .is_err(),
            "another token's stream goes on"
        );
    }
}
