//! Pooled HTTP/1.1 connections to local services (and to instances
//! without a sidecar).
//!
//! HTTP/1.1 carries one exchange at a time, so a connection is checked out
//! for a request and comes back when the response body has been read to
//! its end. A body dropped half-read takes its connection with it: what is
//! left of that response would otherwise be read as the next one's.
//!
//! hyper-util's general-purpose client does the same, but keys its pool by
//! URI, resolves names and spawns a task per returned connection; here the
//! key is a socket address and a returned connection is simply pushed back.
//!
//! Between sidecars HTTP/1.1 only carries upgrades (WebSocket): each gets a
//! fresh mTLS connection, which it keeps for the upgrade's life, so those
//! are never pooled.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::FutureExt;
use http::{Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;

use super::{Mesh, SendError};
use crate::proxy::{
    svc::{Body, BoxError, ConnectTimeout, IdleTimeout, boxed},
    transport::{self, Alpn},
};
use crate::tls::{PeerGuard, any_revoked};

/// Idle connections older than this are closed rather than reused: the
/// service may have timed them out already.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per address; more are closed when they come back.
const MAX_IDLE_PER_ADDR: usize = 256;

#[derive(Clone)]
pub struct H1Pool {
    shared: Arc<Shared>,
}

struct Shared {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

impl H1Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        H1Pool {
            shared: Arc::new(Shared {
                idle: Mutex::default(),
                connect_timeout,
            }),
        }
    }

    /// Sends `req` (origin-form URI) to `addr`. A 101 response keeps its
    /// connection for the upgrade; every other response returns its
    /// connection to the pool when its body ends.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mesh: Mesh<'_>,
        req: Request<Body>,
    ) -> Result<Response<Body>, SendError> {
        let timeout = req
            .extensions()
            .get::<ConnectTimeout>()
            .map_or(self.shared.connect_timeout, |c| c.0);
        if let Some((tls, service)) = mesh {
            let stream = tls
                .connect(addr, service, Alpn::Http1, timeout)
                .await
                .map_err(SendError::Connect)?;
            let guard = tls.guard_of(&stream);
            let mut sender = handshake(addr, stream, guard.clone()).await?;
            let mut resp = sender.send_request(req).await.map_err(SendError::Request)?;
            // An upgraded connection leaves the connection's task: the
            // splice watches the server's token from here on.
            if let Some(guard) = guard
                && resp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                resp.extensions_mut().insert(guard);
            }
            return Ok(resp.map(boxed));
        }
        let max_idle = req
            .extensions()
            .get::<IdleTimeout>()
            .map_or(IDLE_TIMEOUT, |t| t.0.min(IDLE_TIMEOUT));
        let (mut sender, reused) = match self.checkout(addr, max_idle) {
            Some(s) => (s, true),
            None => (self.connect(addr, timeout).await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // A reused connection the service closed while idle: the
                // request never left, so it goes once more on a new one.
                Some(req) if reused => {
                    sender = self.connect(addr, timeout).await?;
                    sender.send_request(req).await.map_err(SendError::Request)?
                }
                _ => return Err(SendError::Request(e.into_error())),
            },
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp.map(boxed));
        }
        let pool = Arc::downgrade(&self.shared);
        Ok(resp.map(|body| {
            Body::new(Pooled {
                body,
                home: Some((sender, addr, pool)),
            })
        }))
    }

    /// The most recently returned connection to `addr` that can take a
    /// request now. One still busy (its request body still uploading after
    /// an early response) is passed over, never waited for: waiting would
    /// put this request behind someone else's upload.
    fn checkout(&self, addr: SocketAddr, max_idle: Duration) -> Option<http1::SendRequest<Body>> {
        let mut map = self.shared.idle.lock().expect("h1 pool lock");
        let list = map.get_mut(&addr)?;
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(mut idle) = list.pop() {
            if idle.sender.is_closed() || idle.since.elapsed() > max_idle {
                continue;
            }
            // The connection's task has had a turn since the body ended
            // (the next request had to arrive first), so a healthy one
            // reports ready at once.
            match idle.sender.ready().now_or_never() {
                Some(Ok(())) => {
                    found = Some(idle.sender);
                    break;
                }
                Some(Err(_)) => {}
                None => busy.push(idle),
            }
        }
        // Busy ones go back under the rest, to be tried last.
        busy.append(list);
        *list = busy;
        if list.is_empty() {
            map.remove(&addr);
        }
        found
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<http1::SendRequest<Body>, SendError> {
        let stream = transport::connect(addr, timeout)
            .await
            .map_err(SendError::Connect)?;
        handshake(addr, stream, None).await
    }
}

/// HTTP/1.1 (with upgrades) over `stream`; the connection runs in its own
/// task.
/// HTTP/1.1 over `stream`; the connection runs in its own task, which
/// ends early if `guard`'s peer (another sidecar) has its token revoked.
async fn handshake<IO>(
    addr: SocketAddr,
    stream: IO,
    guard: Option<PeerGuard>,
) -> Result<http1::SendRequest<Body>, SendError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Request)?;
    tokio::spawn(async move {
        let guards: Vec<PeerGuard> = guard.into_iter().collect();
        tokio::select! {
            r = conn.with_upgrades() => if let Err(e) = r {
                tracing::debug!(%addr, error = %e, "http/1.1 connection ended");
            },
            _ = any_revoked(&guards) => {}
        }
    });
    Ok(sender)
}

impl Shared {
    fn checkin(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut map = self.idle.lock().expect("h1 pool lock");
        let list = map.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A response body that hands its connection back to the pool once read
/// to the end.
struct Pooled {
    body: Incoming,
    home: Option<(http1::SendRequest<Body>, SocketAddr, Weak<Shared>)>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some((sender, addr, pool)) = self.home.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.checkin(addr, sender);
        }
    }
}

impl Drop for Pooled {
    /// An empty body may never be polled (the server sees it is at its
    /// end), yet its connection is as good as one read to the end.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

impl http_body::Body for Pooled {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            // A broken body leaves the connection in an unknown state.
            Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::{server::conn::http1 as server, service::service_fn};
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP/1.1 server answering `size` bytes per request; counts the
    /// connections it accepts.
    async fn server(size: usize, keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; size]))))
                });
                tokio::spawn(
                    server::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<Body> {
        Request::get("/")
            .header(http::header::HOST, "svc")
            .body(boxed(Empty::<Bytes>::new().map_err(|e| match e {})))
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_reused() {
        let (addr, accepted) = server(2, true).await;
        let pool = H1Pool::new(Duration::from_secs(1));
        for _ in 0..3 {
            let resp = pool.send(addr, None, get()).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"xx");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_takes_its_connection_along() {
        let (addr, accepted) = server(1 << 20, true).await;
        let pool = H1Pool::new(Duration::from_secs(1));
        let mut body = pool.send(addr, None, get()).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        let resp = pool.send(addr, None, get()).await.unwrap();
        let len = resp.into_body().collect().await.unwrap().to_bytes().len();
        assert_eq!(len, 1 << 20);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_service_closes_are_replaced() {
        let (addr, accepted) = server(2, false).await;
        let pool = H1Pool::new(Duration::from_secs(1));
        for _ in 0..3 {
            let resp = pool.send(addr, None, get()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_still_uploading_is_passed_over_not_waited_for() {
        let (addr, accepted) = server(2, true).await;
        let pool = H1Pool::new(Duration::from_secs(1));
        // A request body that never ends; the service answers at once.
        let (_tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let upload = Request::post("/")
            .header(http::header::HOST, "svc")
            .body(Body::new(http_body_util::StreamBody::new(rx)))
            .unwrap();
        let resp = pool.send(addr, None, upload).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(2), pool.send(addr, None, get()))
            .await
            .expect("the second request must not wait for the first upload")
            .unwrap();
        assert_eq!(second.status(), StatusCode::OK);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let pool = H1Pool::new(Duration::from_secs(1));
        match pool.send(addr, None, get()).await {
            Err(SendError::Connect(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
