//! A request body that can be sent more than once, without buffering
//! large bodies whole.
//!
//! The first try streams the original body and keeps a copy of each chunk
//! while the total stays within the limit. When a try's body is dropped
//! before its end (the try failed, or never connected), the rest of the
//! original goes back to the shared state, so the next try replays the
//! copies and then continues with the rest. Past the limit the copies are
//! dropped and the request can no longer be retried: a large upload goes
//! through once, streamed.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;

use crate::proxy::svc::{Body, BoxError};

#[derive(Default)]
struct State {
    /// Copies of the chunks read so far (none once `overflowed`).
    buf: Vec<Bytes>,
    len: usize,
    overflowed: bool,
    /// The unread rest of the original, while no try holds it.
    rest: Option<Body>,
    trailers: Option<HeaderMap>,
    /// The original has been read to its end.
    ended: bool,
}

/// Hands out one body per try.
#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<State>>,
    limit: usize,
}

// === impl Replay ===

impl Replay {
    pub fn new(body: Body, limit: usize) -> Self {
        Replay {
            state: Arc::new(Mutex::new(State {
                rest: Some(body),
                ..Default::default()
            })),
            limit,
        }
    }

    /// A body for the next try.
    pub fn body(&self) -> Body {
        Body::new(ReplayBody {
            state: self.state.clone(),
            limit: self.limit,
            pos: 0,
            inner: None,
            trailers_sent: false,
        })
    }

    /// Whether another try can send the whole body again: nothing was lost
    /// to the limit, and no earlier try still holds the original.
    pub fn can_replay(&self) -> bool {
        let s = self.state.lock().expect("replay lock");
        !s.overflowed && (s.ended || s.rest.is_some())
    }
}

struct ReplayBody {
    state: Arc<Mutex<State>>,
    limit: usize,
    /// Copies already replayed by this try.
    pos: usize,
    /// The original, while this try reads it.
    inner: Option<Body>,
    trailers_sent: bool,
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.inner.is_none() {
            let mut s = this.state.lock().expect("replay lock");
            if let Some(chunk) = s.buf.get(this.pos) {
                this.pos += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
            }
            if s.ended {
                if !this.trailers_sent
                    && let Some(t) = s.trailers.clone()
                {
                    this.trailers_sent = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                return Poll::Ready(None);
            }
            match s.rest.take() {
                Some(rest) => this.inner = Some(rest),
                None => {
                    return Poll::Ready(Some(Err(
                        "request body is still held by an earlier try".into()
                    )));
                }
            }
        }
        let inner = this.inner.as_mut().expect("set above");
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        let mut s = this.state.lock().expect("replay lock");
        match frame {
            None => {
                s.ended = true;
                this.inner = None;
                Poll::Ready(None)
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflowed {
                        s.len += data.len();
                        if s.len > this.limit {
                            s.overflowed = true;
                            s.buf = Vec::new();
                        } else {
                            s.buf.push(data.clone());
                        }
                    }
                    this.pos = s.buf.len();
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                // A broken upload cannot be replayed either.
                s.overflowed = true;
                this.inner = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(rest) = self.inner.take()
            && let Ok(mut s) = self.state.lock()
        {
            s.rest = Some(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_body_cut_short_is_replayed_then_continued() {
        let replay = Replay::new(chunks(&["ab", "cd", "ef"]), 1024);
        let mut first = replay.body();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(first);
        assert!(replay.can_replay());
        let all = replay.body().collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdef");
        let again = replay.body().collect().await.unwrap().to_bytes();
        assert_eq!(again, "abcdef");
    }

    #[tokio::test]
    async fn past_the_limit_no_replay() {
        let replay = Replay::new(chunks(&["abcd", "efgh"]), 6);
        let all = replay.body().collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdefgh", "the first try streams it all");
        assert!(!replay.can_replay());
    }

    #[tokio::test]
    async fn a_try_still_holding_the_body_blocks_replay() {
        let replay = Replay::new(chunks(&["ab", "cd"]), 1024);
        let mut first = replay.body();
        let _ = first.frame().await;
        assert!(!replay.can_replay());
        drop(first);
        assert!(replay.can_replay());
    }
}
