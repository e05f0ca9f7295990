//! One multiplexed HTTP/2 connection per peer, shared by every request to
//! it. A peer is an address and, for another sidecar, the service asked
//! for: SNI (and the certificate checked) differ per service, so two
//! services behind one sidecar get a connection each.
//!
//! A general-purpose pool checks a connection out and back in per request;
//! with HTTP/2 there is nothing to check out, so this keeps one
//! `SendRequest` per address and clones it (an `Arc` bump) per request. A
//! closed connection is replaced on the next request (a request the dead
//! connection never sent is retried once on the new one), and forgotten
//! as soon as it ends, so peers that are gone leave nothing behind.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use dashmap::DashMap;
use http::{Request, Response};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::{Mesh, SendError};
use crate::proxy::{
    limits::Permit,
    resilience::ConnectLimits,
    svc::{Body, ConnectTimeout},
    transport::{self, Alpn},
};
use crate::tls::{PeerGuard, any_revoked};

/// The peer's address and, over mTLS, the service named in SNI.
type Key = (SocketAddr, Option<Arc<str>>);

#[derive(Clone)]
pub struct H2Pool {
    conns: Arc<DashMap<Key, http2::SendRequest<Body>>>,
    connect_timeout: Duration,
}

impl H2Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        H2Pool {
            conns: Arc::default(),
            connect_timeout,
        }
    }

    pub async fn send(
        &self,
        addr: SocketAddr,
        mesh: Mesh<'_>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let key = (addr, mesh.map(|(_, s)| s.clone()));
        let timeout = req
            .extensions()
            .get::<ConnectTimeout>()
            .map_or(self.connect_timeout, |c| c.0);
        let limits = req.extensions().get::<ConnectLimits>().cloned();
        let mut sender = self.sender(&key, mesh, timeout, limits.as_ref()).await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // Never sent: the connection was closing. Once more, fresh.
                Some(req) => {
                    self.conns.remove_if(&key, |_, s| s.is_closed());
                    let mut sender = self.connect(&key, mesh, timeout, limits.as_ref()).await?;
                    sender.send_request(req).await.map_err(SendError::Request)
                }
                None => Err(SendError::Request(e.into_error())),
            },
        }
    }

    async fn sender(
        &self,
        key: &Key,
        mesh: Mesh<'_>,
        timeout: Duration,
        limits: Option<&ConnectLimits>,
    ) -> Result<http2::SendRequest<Body>, SendError> {
        if let Some(s) = self.conns.get(key)
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        self.connect(key, mesh, timeout, limits).await
    }

    async fn connect(
        &self,
        key: &Key,
        mesh: Mesh<'_>,
        timeout: Duration,
        limits: Option<&ConnectLimits>,
    ) -> Result<http2::SendRequest<Body>, SendError> {
        let addr = key.0;
        // The upstream's breaker caps requests waiting for a connection
        // (given back once it is open) and connections (held while open).
        let (_waiting, open) = match limits {
            Some(ConnectLimits(lb)) => {
                let overflow = |cap| {
                    lb.metrics.overflow(cap);
                    SendError::Overflow(cap)
                };
                let waiting = lb
                    .breaker
                    .try_pending()
                    .ok_or_else(|| overflow("max_pending_requests"))?;
                let open = lb
                    .breaker
                    .try_connection()
                    .ok_or_else(|| overflow("max_connections"))?;
                (Some(waiting), Some(open))
            }
            None => (None, None),
        };
        let sender = match mesh {
            Some((tls, service)) => {
                let stream = tls
                    .connect(addr, service, Alpn::H2, timeout)
                    .await
                    .map_err(SendError::Connect)?;
                let guard = tls.guard_of(&stream);
                handshake(addr, stream, open, guard).await?
            }
            None => {
                let stream = transport::connect(addr, timeout)
                    .await
                    .map_err(SendError::Connect)?;
                handshake(addr, stream, open, None).await?
            }
        };
        self.conns.insert(key.clone(), sender.sender.clone());
        // Forgotten once closed: peers come and go (instances churn), and
        // a closed connection's sender still holds its buffers.
        let (conns, key) = (self.conns.clone(), key.clone());
        tokio::spawn(async move {
            let _ = sender.ended.await;
            conns.remove_if(&key, |_, s| s.is_closed());
        });
        Ok(sender.sender)
    }
}

/// HTTP/2 over `stream`; the connection runs in its own task, which drops
/// it as soon as `guard`'s peer (another sidecar) has its token revoked:
/// the pool then sees it closed and the next request's handshake refuses
/// the peer.
/// A new connection's sender, and what resolves once the connection
/// has ended.
struct Opened {
    sender: http2::SendRequest<Body>,
    ended: oneshot::Receiver<()>,
}

async fn handshake<IO>(
    addr: SocketAddr,
    stream: IO,
    open: Option<Permit>,
    guard: Option<PeerGuard>,
) -> Result<Opened, SendError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Request)?;
        let (ended_tx, ended) = oneshot::channel();
        tokio::spawn(async move {
            let guards: Vec<PeerGuard> = guard.into_iter().collect();
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "http/2 connection to peer ended");
                },
                _ = any_revoked(&guards) => {}
            }
            // The connection counts against its upstream until now.
            drop(open);
            let _ = ended_tx.send(());
        });
        Ok(Opened { sender, ended })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;
    use crate::proxy::svc::empty;

    /// A peer that answers over HTTP/2 for `serve`, then goes away.
    async fn short_lived_peer(serve: Duration) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(
                    http_body_util::Empty::<bytes::Bytes>::new(),
                ))
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(serve, conn).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_connection_that_ends_is_forgotten() {
        let pool = H2Pool::new(Duration::from_secs(2));
        let addr = short_lived_peer(Duration::from_millis(200)).await;
        let req = Request::get(format!("http://{addr}/"))
            .body(empty())
            .unwrap();
        let resp = pool.send(addr, None, req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(pool.conns.len(), 1);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !pool.conns.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the ended connection is forgotten");
    }
}
