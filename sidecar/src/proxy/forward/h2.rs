//! One multiplexed HTTP/2 connection per peer, shared by every request to
//! it.
//!
//! A general-purpose pool checks a connection out and back in per request;
//! with HTTP/2 there is nothing to check out, so this keeps one
//! `SendRequest` per address and clones it (an `Arc` bump) per request. A
//! closed connection is replaced on the next request; a request the dead
//! connection never sent is retried once on the new one.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use dashmap::DashMap;
use http::{Request, Response};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::SendError;
use crate::proxy::{http::Body, transport};

#[derive(Clone)]
pub struct H2Pool {
    conns: Arc<DashMap<SocketAddr, http2::SendRequest<Body>>>,
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
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut sender = self.sender(addr).await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // Never sent: the connection was closing. Once more, fresh.
                Some(req) => {
                    self.conns.remove_if(&addr, |_, s| s.is_closed());
                    let mut sender = self.connect(addr).await?;
                    sender.send_request(req).await.map_err(SendError::Request)
                }
                None => Err(SendError::Request(e.into_error())),
            },
        }
    }

    async fn sender(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, SendError> {
        if let Some(s) = self.conns.get(&addr)
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        self.connect(addr).await
    }

    async fn connect(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, SendError> {
        let stream = transport::connect(addr, self.connect_timeout)
            .await
            .map_err(SendError::Connect)?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "http/2 connection to peer ended");
            }
        });
        self.conns.insert(addr, sender.clone());
        Ok(sender)
    }
}
