//! Opaque TCP: balanced per connection, copied byte for byte, with
//! half-close passed through (one side's EOF becomes a write shutdown on
//! the other, and the copy goes on in the other direction).
//!
//! Between sidecars a tunnel is an mTLS connection with ALPN `isdp-tcp/1`
//! whose SNI names the service (see `transport`): the receiving sidecar's
//! single inbound port knows where the bytes go without a preamble, and
//! the server certificate proves the destination.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    Tracker, stopped,
    transport::{self, Alpn, Tls},
    upstreams::Upstreams,
};
use crate::metrics::RouteMetrics;

/// Copies both ways until both directions are done.
pub async fn splice<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((up, down)) => tracing::trace!(up, down, "tcp connection finished"),
        Err(e) => tracing::debug!(error = %e, "tcp connection ended with an error"),
    }
}

/// Serves a per-upstream TCP listener until shutdown.
pub async fn serve_outbound(
    listener: TcpListener,
    upstream: Arc<str>,
    upstreams: Upstreams,
    connect_timeout: Duration,
    tls: Tls,
    tracker: Tracker,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (client, peer) = tokio::select! {
            _ = stopped(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let upstreams = upstreams.clone();
        let upstream = upstream.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _ = client.set_nodelay(true);
            connect_outbound(client, peer, &upstream, &upstreams, connect_timeout, &tls).await;
        });
    }
}

async fn connect_outbound(
    client: TcpStream,
    peer: SocketAddr,
    upstream: &str,
    upstreams: &Upstreams,
    connect_timeout: Duration,
    tls: &Tls,
) {
    let Some(lb) = upstreams.get(upstream) else {
        return;
    };
    let Some((target, guard)) = lb.pick_connection(Some(peer.ip())) else {
        // Nothing to send to: close at once so the client fails fast.
        tracing::debug!(upstream, "no healthy endpoints; closing tcp connection");
        return;
    };
    // One proxied connection, counted against the upstream's breaker for as
    // long as it is open; over the cap the client is closed at once.
    let Some(_open) = lb.breaker.try_connection() else {
        lb.metrics.overflow("max_connections");
        tracing::debug!(upstream, "at max_connections; closing tcp connection");
        return;
    };
    let started = std::time::Instant::now();
    let addr = target.dest.addr;
    let mut guards = Vec::new();
    let server = if target.via_sidecar {
        tls.connect(addr, upstream, Alpn::Tcp, connect_timeout)
            .await
            .map(|s| {
                guards.extend(tls.guard_of(&s));
                Box::new(s) as Box<dyn Stream>
            })
    } else {
        transport::connect(addr, connect_timeout)
            .await
            .map(|s| Box::new(s) as Box<dyn Stream>)
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(upstream, endpoint = %addr, error = %e, "tcp connect failed");
            guard.failed();
            return;
        }
    };
    // Connect time is the latency signal TCP offers.
    target.load.record_latency(started.elapsed());
    let _open = OpenConnection::new(&lb.metrics);
    // A tunnel to a sidecar ends when that sidecar's token is revoked.
    tokio::select! {
        _ = splice(client, server) => {}
        _ = crate::tls::any_revoked(&guards) => {}
    }
    drop(guard);
}

/// Either side of a tunnel: plain TCP or TLS over it. Boxed once per
/// connection, not per read.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Counts a proxied TCP connection: opened now, open until dropped.
pub struct OpenConnection(Arc<RouteMetrics>);

impl OpenConnection {
    pub fn new(metrics: &Arc<RouteMetrics>) -> Self {
        metrics.tcp_opened.inc();
        metrics.tcp_open.inc();
        OpenConnection(metrics.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.tcp_open.dec();
    }
}
