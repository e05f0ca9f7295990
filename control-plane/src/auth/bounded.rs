//! The two bodies of a streaming call, cut off when its credential ends
//! ([`End`], `auth::lifetime`).
//!
//! The request body fails with the end's status, so the handler stops
//! acting on anything the client still sends. The response body ends with
//! the status as its trailers. But hyper polls a response body only when
//! the stream has flow-control window to send what it yields: a client
//! that stops granting window is never polled again, and its handler
//! waits forever in a full channel, reading nothing either. So the end
//! does not wait for a poll: a small watcher task per call drops the
//! handler's body the moment the end comes. Its handler's next send then
//! fails and it stops exactly as when a client goes away (a session
//! starts its grace period, an xDS stream leaves proxy status), and the
//! call's place in its principal's count ([`StreamSlot`]) is given back
//! with it. The trailers still go out when the client grants window again.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::FutureExt as _;
use http_body::{Frame, SizeHint};
use tokio::task::AbortHandle;
use tonic::{Status, body::Body};

use super::{lifetime::End, streams::StreamSlot};

/// The request body of a streaming call: fails with the end's status once
/// it comes (which the handler's `Streaming` reports).
pub struct BoundedRequest {
    inner: Body,
    end: End,
    /// The inner body finished, or the end came: nothing more to poll.
    done: bool,
}

/// What a response body holds while its call runs: the handler's body and
/// the call's place in its principal's count, dropped together.
struct Live {
    body: Body,
    _slot: Option<StreamSlot>,
}

/// The response body of a streaming call: the handler's until the end
/// comes, then the end's status as trailers.
pub struct BoundedResponse {
    /// `None` once the body finished or the end cut it off.
    live: Arc<Mutex<Option<Live>>>,
    end: End,
    /// The task that cuts `live` off at the end; aborted when the body
    /// finishes or is dropped first.
    watcher: AbortHandle,
    done: bool,
}

// === impl BoundedRequest ===

impl BoundedRequest {
    pub fn new(inner: Body, end: End) -> Self {
        BoundedRequest {
            inner,
            end,
            done: false,
        }
    }
}

impl http_body::Body for BoundedRequest {
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
        if let Poll::Ready(status) = this.end.poll_unpin(cx) {
            this.done = true;
            this.inner = Body::empty();
            return Poll::Ready(Some(Err(status)));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if finishes(&polled) {
            this.done = true;
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

// === impl BoundedResponse ===

impl BoundedResponse {
    /// Bounds `inner`, holding `slot` until the call ends. Spawns the
    /// watcher, so it must be called within a tokio runtime.
    pub fn new(inner: Body, end: End, slot: Option<StreamSlot>) -> Self {
        let live = Arc::new(Mutex::new(Some(Live {
            body: inner,
            _slot: slot,
        })));
        let cut = Arc::downgrade(&live);
        let watched = end.clone();
        let watcher = tokio::spawn(async move {
            watched.await;
            let Some(live) = cut.upgrade() else { return };
            // Taken under the lock, dropped after it: dropping the body
            // wakes the handler's task.
            let taken = lock(&live).take();
            drop(taken);
        })
        .abort_handle();
        BoundedResponse {
            live,
            end,
            watcher,
            done: false,
        }
    }

    /// The call is over: the handler's body and the slot go, and the
    /// watcher with them.
    fn finish(&mut self) {
        self.done = true;
        self.watcher.abort();
        let taken = lock(&self.live).take();
        drop(taken);
    }
}

impl http_body::Body for BoundedResponse {
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
        // The end first: once it came, nothing more of the handler's body
        // goes out, not even the OK trailers of a handler that stopped
        // because its request body failed or its body was dropped.
        if let Poll::Ready(status) = this.end.poll_unpin(cx) {
            this.finish();
            return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
        }
        let polled = match lock(&this.live).as_mut() {
            Some(live) => Pin::new(&mut live.body).poll_frame(cx),
            // Cut off by the watcher after the end was polled above: the
            // end is ready now, and the next poll (woken by it) says so.
            None => return Poll::Pending,
        };
        if finishes(&polled) {
            this.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || lock(&self.live)
                .as_ref()
                .is_some_and(|l| l.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        SizeHint::default()
    }
}

impl Drop for BoundedResponse {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Whether a polled frame is the body's last.
fn finishes(polled: &Poll<Option<Result<Frame<bytes::Bytes>, Status>>>) -> bool {
    match polled {
        Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
        Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
        Poll::Pending => false,
    }
}

/// The lock on a response's live body; a panic while it was held (in a
/// body's poll) leaves nothing half-changed in it, so a poisoned lock is
/// used as is.
fn lock(live: &Mutex<Option<Live>>) -> std::sync::MutexGuard<'_, Option<Live>> {
    live.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    use std::{sync::Arc, time::Duration};

    use bytes::Bytes;
    use futures::StreamExt as _;
    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    use tokio::{sync::mpsc, time::Instant};

    use super::*;
    use crate::{
        auth::{Principal, lifetime::Lifetime, streams::OpenStreams},
        ca::rfc3339,
        tokens::{Role, Scope, Tokens},
    };

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

    /// A handler as the control plane's are: a task sending into a small
    /// channel that the response body drains. The task returns when a
    /// send fails (the body was dropped), as handlers do when their client
    /// goes away.
    fn handler() -> (Body, tokio::task::JoinHandle<Instant>) {
        let (tx, rx) = mpsc::channel::<Result<Bytes, Status>>(4);
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r.map(Frame::data));
        let task = tokio::spawn(async move {
            while tx.send(Ok(Bytes::from_static(b"update"))).await.is_ok() {}
            Instant::now()
        });
        (Body::new(http_body_util::StreamBody::new(frames)), task)
    }

    fn join(token: &str) -> Principal {
        Principal {
            id: token.into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: None,
            grant: Some(token.into()),
            grant_expires_at_unix_ms: None,
        }
    }

    /// A call whose client stopped reading (hyper then never polls the
    /// response body: it waits for flow-control window first) is cut off
    /// at its credential's expiry all the same: the handler blocked in its
    /// send is stopped as if the client had gone, the call's place in its
    /// principal's count is given back, and once the body is polled again
    /// it ends with the UNAUTHENTICATED trailer. On the paused clock, at
    /// the expiry.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_call_is_stopped_at_its_credentials_expiry() {
        let (tokens, _dir) = tokens().await;
        let (token, _) = tokens
            .create(
                Role::Join,
                Scope::services(vec!["web".into()]),
                String::new(),
                Some(Duration::from_secs(30)),
            )
            .await
            .unwrap();
        let streams = OpenStreams::new(1);
        let slot = streams.admit(&join(&token.id), "ADS").unwrap();
        let end = Lifetime::token(&token.id, token.expires_at_unix_ms).end(tokens);
        let (body, handler) = handler();
        let started = Instant::now();
        let mut response = BoundedResponse::new(body, end, Some(slot));
        let first = response.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "update");
        // The client reads no more: the body is not polled again.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!handler.is_finished(), "blocked sending, not stopped");
        assert_eq!(streams.open(&token.id, "ADS"), 1);

        let stopped = tokio::time::timeout(Duration::from_secs(60), handler)
            .await
            .expect("stopped at the expiry")
            .unwrap();
        let waited = stopped - started;
        assert!(
            (Duration::from_secs(29)..=Duration::from_secs(30)).contains(&waited),
            "{waited:?}"
        );
        assert_eq!(streams.open(&token.id, "ADS"), 0, "the slot is given back");
        assert!(streams.admit(&join(&token.id), "ADS").is_ok());

        let trailers = response.frame().await.unwrap().unwrap();
        let status = Status::from_header_map(trailers.trailers_ref().unwrap()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status
                .message()
                .starts_with(&format!("token {} expired at ", token.id)),
            "{status:?}"
        );
        assert!(response.frame().await.is_none());
    }

    /// The same for a revocation, which is no timer: the stalled handler
    /// stops when the token is revoked, and only that token's.
    #[tokio::test]
    async fn a_stalled_call_is_stopped_when_its_token_is_revoked() {
        let (tokens, _dir) = tokens().await;
        let join_scope = || Scope::services(vec!["web".into()]);
        let (mine, _) = tokens
            .create(Role::Join, join_scope(), String::new(), None)
            .await
            .unwrap();
        let (other, _) = tokens
            .create(Role::Join, join_scope(), String::new(), None)
            .await
            .unwrap();
        let streams = OpenStreams::new(1);
        let (body, stalled) = handler();
        let _stalled = BoundedResponse::new(
            body,
            Lifetime::token(&mine.id, 0).end(tokens.clone()),
            Some(streams.admit(&join(&mine.id), "Sidecar/Session").unwrap()),
        );
        let (body, kept) = handler();
        let _kept = BoundedResponse::new(
            body,
            Lifetime::token(&other.id, 0).end(tokens.clone()),
            Some(streams.admit(&join(&other.id), "Sidecar/Session").unwrap()),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stalled.is_finished());

        tokens.revoke(&mine.id).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), stalled)
            .await
            .expect("the revocation stops the stalled handler")
            .unwrap();
        assert_eq!(streams.open(&mine.id, "Sidecar/Session"), 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!kept.is_finished(), "another token's call goes on");
        assert_eq!(streams.open(&other.id, "Sidecar/Session"), 1);
    }

    /// A call's place is given back however it ends: its body finishing,
    /// or dropped (the client went away) before the end; and the watcher
    /// goes with it (it holds the end, and through it the token's
    /// revocation wait).
    #[tokio::test]
    async fn a_calls_place_is_given_back_when_it_ends() {
        let (tokens, _dir) = tokens().await;
        let (token, _) = tokens
            .create(Role::Read, Scope::default(), String::new(), None)
            .await
            .unwrap();
        let streams = OpenStreams::new(2);
        let end = Lifetime::token(&token.id, 0).end(tokens.clone());
        let admit = || Some(streams.admit(&join(&token.id), "Policies/Watch").unwrap());
        let mut finished = BoundedResponse::new(
            Body::new(http_body_util::Full::new(Bytes::from_static(b"done"))),
            end.clone(),
            admit(),
        );
        let (body, handler) = handler();
        let gone = BoundedResponse::new(body, end.clone(), admit());
        assert_eq!(streams.open(&token.id, "Policies/Watch"), 2);

        assert!(finished.frame().await.unwrap().unwrap().is_data());
        assert!(finished.frame().await.is_none());
        assert!(finished.is_end_stream());
        assert_eq!(streams.open(&token.id, "Policies/Watch"), 1);
        drop(gone);
        handler.await.unwrap();
        assert_eq!(streams.open(&token.id, "Policies/Watch"), 0);
        tokio::task::yield_now().await;
        assert!(finished.watcher.is_finished(), "the watcher was aborted");
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
        let mut response = BoundedResponse::new(open_stream("hello"), end.clone(), None);
        let mut request = BoundedRequest::new(open_stream("ping"), end);

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
        let mut ended = BoundedResponse::new(
            open_stream("a"),
            Lifetime::token(&mine.id, 0).end(tokens.clone()),
            None,
        );
        let mut kept = BoundedResponse::new(
            open_stream("b"),
            Lifetime::token(&other.id, 0).end(tokens.clone()),
            None,
        );
        let mut finished = BoundedResponse::new(
            Body::new(http_body_util::Full::new(Bytes::from_static(b"done"))),
            Lifetime::token(&mine.id, 0).end(tokens.clone()),
            None,
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
