//! What every listener of the sidecar holds its clients to (the `[limits]`
//! table), in one place so the data plane's listeners and the admin
//! listener cannot drift apart.
//!
//! # Layout
//! - `cap`: places for connections (per listener) and TLS handshakes (the
//!   inbound listener): one over is closed as it is accepted, counted, and
//!   logged at a bounded rate.
//! - `http`: serving one HTTP connection (HTTP/1.1 or HTTP/2, with
//!   upgrades): the HTTP/2 bounds, and the connection's deadline.
//! - `http/clock`: when an HTTP connection is due to be closed: a request
//!   head that takes too long, or no request in flight for too long.
//! - `tunnel`: byte streams (TCP, tunnels, upgrades) closed once silent
//!   both ways for too long.
//! - this file: [`Gate`], a listener's accept loop with its cap.

mod cap;
pub mod http;
pub mod tunnel;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    config::Limits,
    metrics::{CapMetrics, Metrics},
};

pub use cap::{Cap, Place};
pub use http::HttpServer;
pub use tunnel::Tunnels;

/// Resolves once shutdown has begun (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// One listener's admission and HTTP settings: its connection cap, and the
/// server every HTTP connection it accepts is served with. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    name: Arc<str>,
    cap: Cap,
    http: HttpServer,
}

impl Gate {
    /// A data-plane listener (`inbound`, `outbound`, `upstream.<name>`),
    /// capped at `limits.max_connections`.
    pub fn data(name: &str, limits: &Limits, metrics: &Metrics) -> Self {
        Self::new(
            name,
            "limits.max_connections",
            limits.max_connections,
            limits,
            metrics,
        )
    }

    /// The admin listener, capped at `limits.admin_max_connections`.
    pub fn admin(limits: &Limits, metrics: &Metrics) -> Self {
        Self::new(
            "admin",
            "limits.admin_max_connections",
            limits.admin_max_connections,
            limits,
            metrics,
        )
    }

    /// The DNS server's TCP listener (`dns`), capped at `max`
    /// (`dns_max_tcp_connections`): its own small cap, since DNS is mostly
    /// UDP and every connection holds a task.
    pub fn dns(max: usize, limits: &Limits, metrics: &Metrics) -> Self {
        Self::new("dns", "dns_max_tcp_connections", max, limits, metrics)
    }

    fn new(name: &str, key: &'static str, max: usize, limits: &Limits, metrics: &Metrics) -> Self {
        let counters = metrics.listener(name);
        let name: Arc<str> = Arc::from(name);
        Gate {
            cap: Cap::new(
                name.clone(),
                key,
                "max-connections",
                max,
                counters.connections.clone(),
            ),
            http: HttpServer::new(name.clone(), limits, counters),
            name,
        }
    }

    /// The listener's name, as metrics label it.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn http(&self) -> &HttpServer {
        &self.http
    }

    /// A place for a connection `peer` opened, if one is free (see
    /// [`Cap::admit`]).
    pub fn admit(&self, peer: SocketAddr) -> Option<Place> {
        self.cap.admit(peer)
    }

    /// The next connection that gets a place, with its place; None once
    /// shutdown began. A connection over the cap is closed here, as it is
    /// accepted, so it holds no task and no file descriptor.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(TcpStream, SocketAddr, Place)> {
        loop {
            let accepted = tokio::select! {
                _ = stopped(shutdown) => return None,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(place) = self.admit(peer) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, place));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep
                    // serving.
                    tracing::warn!(listener = %self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The inbound listener's cap on TLS handshakes in progress.
pub fn tls_handshakes(limits: &Limits, metrics: &Metrics) -> Cap {
    let counters: CapMetrics = metrics.tls_handshakes("inbound");
    Cap::new(
        Arc::from("inbound"),
        "limits.max_tls_handshakes",
        "max-tls-handshakes",
        limits.max_tls_handshakes,
        counters,
    )
}
