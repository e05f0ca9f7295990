//! Opaque TCP: balanced per connection, copied byte for byte, with
//! half-close passed through (one side's EOF becomes a write shutdown on
//! the other, and the copy goes on in the other direction), and closed
//! once silent both ways for `limits.tcp_idle_timeout`
//! (`listener::tunnel`).
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
    Tracker,
    transport::{self, Alpn, Tls},
    upstreams::Upstreams,
};
use crate::{
    listener::{
        Gate, Place,
        tunnel::{Kind, Tunnels},
    },
    metrics::{Direction, RouteMetrics},
};

/// What a per-upstream TCP listener's connections need.
pub struct TcpOutbound {
    pub upstream: Arc<str>,
    pub upstreams: Upstreams,
    pub connect_timeout: Duration,
    pub tls: Tls,
    pub tunnels: Tunnels,
}

/// Serves a per-upstream TCP listener until shutdown: each connection
/// admitted by `gate` is proxied in its own task, holding its place.
pub async fn serve_outbound(
    listener: TcpListener,
    gate: Gate,
    outbound: TcpOutbound,
    tracker: Tracker,
    mut shutdown: watch::Receiver<bool>,
) {
    let outbound = Arc::new(outbound);
    while let Some((client, peer, place)) = gate.accept(&listener, &mut shutdown).await {
        let outbound = outbound.clone();
        tracker.spawn(async move { connect_outbound(client, peer, place, &outbound).await });
    }
}

/// Proxies one client connection; `_place` (its place in the listener's
/// cap) is held until it ends.
async fn connect_outbound(client: TcpStream, peer: SocketAddr, _place: Place, out: &TcpOutbound) {
    let upstream = &*out.upstream;
    let (tls, connect_timeout) = (&out.tls, out.connect_timeout);
    let Some(lb) = out.upstreams.get(upstream) else {
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
    // A tunnel to a sidecar ends when that sidecar's token is revoked, and
    // any connection once silent for the idle timeout.
    tokio::select! {
        _ = out.tunnels.splice(client, server, Direction::Outbound, Kind::Tcp) => {}
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
