//! Serving one HTTP connection (HTTP/1.1 or HTTP/2, chosen by its first
//! bytes, with upgrades) under the listener's limits: the HTTP/2 bounds
//! announced in SETTINGS and enforced by hyper, keep-alive PINGs, and the
//! connection's [`clock::Deadline`] (request heads, idleness).
//!
//! The connection ends when the client closes it, when the deadline passes
//! (a head that took too long: dropped at once, nothing being in flight;
//! idle: closed gracefully, an HTTP/2 client told by GOAWAY), when the
//! caller's `abort` resolves (a revoked peer: dropped with whatever is in
//! flight), or on shutdown, after which in-flight requests finish and the
//! deadline still applies to the heads it waits for.

pub mod clock;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};

use super::{Place, stopped};
use crate::{config::Limits, metrics::ListenerMetrics};
pub use clock::Tracked;
use clock::{Clock, Expiry, Watched};

/// The server of one listener's HTTP connections; a cheap handle.
#[derive(Clone)]
pub struct HttpServer {
    shared: Arc<Shared>,
}

struct Shared {
    listener: Arc<str>,
    builder: auto::Builder<TokioExecutor>,
    header_timeout: Duration,
    idle_timeout: Duration,
    metrics: ListenerMetrics,
}

impl HttpServer {
    pub fn new(listener: Arc<str>, limits: &Limits, metrics: ListenerMetrics) -> Self {
        let h2 = &limits.http2;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The clock times heads (see `clock`); hyper's own timer would
        // also close idle keep-alive connections. Set to None explicitly,
        // since hyper turns on a 30 s default once a timer is given.
        builder.http1().header_read_timeout(None);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(h2.keepalive_interval))
            .keep_alive_timeout(h2.keepalive_timeout)
            .max_concurrent_streams(h2.max_concurrent_streams)
            .max_header_list_size(h2.max_header_list_size)
            .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(h2.max_local_error_reset_streams);
        HttpServer {
            shared: Arc::new(Shared {
                listener,
                builder,
                header_timeout: limits.header_read_timeout,
                idle_timeout: limits.http_idle_timeout,
                metrics,
            }),
        }
    }

    /// Serves `io` (which holds `place` for as long as it lives) with
    /// `svc` until the client leaves, the deadline passes, `abort`
    /// resolves, or shutdown has drained it. Every request and response
    /// body is [`Tracked`], which keeps its request in flight.
    pub async fn serve<IO, S, B>(
        &self,
        io: IO,
        place: Place,
        peer: SocketAddr,
        svc: S,
        mut shutdown: watch::Receiver<bool>,
        abort: impl Future<Output = ()>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Tracked<Incoming>>, Response = Response<B>>
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let s = &self.shared;
        let clock = Clock::new(s.header_timeout, s.idle_timeout);
        let io = TokioIo::new(Watched::new(io, &clock, place));
        let requests = clock.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let flight = requests.begin();
            let response = svc.call(req.map(|b| Tracked::new(b, flight.clone())));
            async move { Ok::<_, S::Error>(response.await?.map(|b| Tracked::new(b, flight))) }
        });
        let conn = s.builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn, abort);
        let mut deadline = std::pin::pin!(clock.deadline());
        let expired = tokio::select! {
            // The connection first: bytes it reads move the deadline,
            // which is polled after it in the same turn.
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener = %s.listener, %peer, error = %e, "http connection ended with an error");
                }
                return;
            }
            _ = &mut abort => return,
            _ = stopped(&mut shutdown) => None,
            why = &mut deadline => Some(why),
        };
        match expired {
            Some(why) if self.expired(why, peer) => return,
            _ => {}
        }
        conn.as_mut().graceful_shutdown();
        tokio::select! {
            biased;
            _ = conn => {}
            _ = abort => {}
            why = deadline, if expired.is_none() => { self.expired(why, peer); }
        }
    }

    /// Counts an expiry; true when the connection is to be dropped at once
    /// rather than closed gracefully.
    fn expired(&self, why: Expiry, peer: SocketAddr) -> bool {
        let s = &self.shared;
        match why {
            Expiry::Header => {
                s.metrics.header_timeouts.inc();
                tracing::debug!(listener = %s.listener, %peer, timeout = ?s.header_timeout, "closing a connection whose request head took too long");
                true
            }
            Expiry::Idle => {
                s.metrics.idle_timeouts.inc();
                tracing::debug!(listener = %s.listener, %peer, timeout = ?s.idle_timeout, "closing an idle connection");
                false
            }
        }
    }
}
