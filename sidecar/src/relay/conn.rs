//! One client connection to the relay: HTTP/2 without TLS (h2c), held to
//! what a local xDS client needs.
//!
//! - At most [`MAX_STREAMS_PER_CONNECTION`] streams at once (a gRPC
//!   process holds one ADS stream per xDS server); the relay-wide cap is
//!   `xds_relay_max_streams`, counted in `Relay::admit`.
//! - A connection with no stream is closed after [`IDLE_TIMEOUT`]: from
//!   its accept (a client that never sends the HTTP/2 preface, or never
//!   finishes its headers, holds nothing longer) and from its last
//!   stream's end. gRPC clients reconnect when they next need a stream.
//! - PINGs every 10 s, and a peer that does not answer one in 5 s is
//!   dropped, as the sidecar's own channels to the control plane do.
//! - Headers are bounded at 16 KiB.
//!
//! On shutdown (or when idle) the connection is closed gracefully: a
//! GOAWAY, then its streams end (each relayed stream ends itself on
//! shutdown, `stream::pump`); a peer that never finished its handshake is
//! dropped after [`CLOSE_GRACE`].

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tower::Service as _;

use super::Relay;
use super::activity::Activity;
use super::stream::RelayService;

/// HTTP/2 streams one connection may have open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// How long a connection may hold no stream before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection's peer has to finish its handshake
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// Serves one connection until the client leaves, it idles out, or
/// shutdown.
pub(super) async fn serve<IO>(
    io: IO,
    peer: Arc<str>,
    relay: Relay,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let svc = RelayService::new(relay, peer.clone(), activity.clone());
    let hyper_svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut svc = svc.clone();
        async move { svc.call(req.map(tonic::body::Body::new)).await }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let conn = builder.serve_connection(TokioIo::new(io), hyper_svc);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "xds relay connection ended with an error");
            }
            return;
        }
        _ = activity.idle_for(IDLE_TIMEOUT) => {
            tracing::debug!(%peer, "closing an idle xds relay connection");
        }
        _ = shutdown.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    // A stream that began just before the GOAWAY is served to its end;
    // a handshake that never completes is not waited for.
    let unfinished = async {
        tokio::time::sleep(CLOSE_GRACE).await;
        activity.none_open().await;
    };
    tokio::select! {
        _ = conn => {}
        _ = unfinished => {}
    }
}
