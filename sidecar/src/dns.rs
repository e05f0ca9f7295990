//! The optional DNS server (`dns_listen`): answers
//! `<service>.service.<domain>` (A, AAAA, SRV) and
//! `<id>.instance.<domain>` for the upstreams this sidecar follows, from
//! the discovery snapshot it already holds, so no query waits on the
//! control plane. It answers for nothing else: a name outside the domain
//! is REFUSED (no recursion), a service this sidecar does not follow is
//! NXDOMAIN, since its xDS stream reads only its upstreams.
//!
//! # Layout
//! - `zone`: the names and their records, built from the snapshot once
//!   per change; a query looks one name up.
//! - `answer`: one query to one response with hickory-proto (parsing,
//!   sampling, EDNS, TC when a UDP answer does not fit, FORMERR, ...).
//! - `serve`: the UDP task and the TCP connections, and the query counter.
//! - this file: binding both sockets, and [`spawn`].

mod answer;
mod serve;
mod zone;

pub use answer::{
    MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, Outcome, QueryType, Rcode, Responder, Transport,
};
pub use zone::{Lookup, Zone};

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Dns, Limits};
use crate::listener::Gate;
use crate::metrics::Metrics;
use crate::xds::Snapshot;

/// Attempts at finding a port free for both UDP and TCP when the
/// configured port is 0.
const BIND_ATTEMPTS: usize = 16;

/// Why the DNS sockets could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("bind dns listener {addr} ({transport}): {source}")]
pub struct BindError {
    addr: SocketAddr,
    transport: &'static str,
    source: std::io::Error,
}

/// The UDP socket and the TCP listener, on one address and port.
pub struct Listener {
    udp: UdpSocket,
    tcp: TcpListener,
}

// === impl Listener ===

impl Listener {
    /// Binds UDP, then TCP on the port UDP got; with port 0, tries other
    /// ports while TCP finds its port taken.
    pub async fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let udp = UdpSocket::bind(addr).await.map_err(|source| BindError {
                addr,
                transport: "udp",
                source,
            })?;
            let bound = udp.local_addr().map_err(|source| BindError {
                addr,
                transport: "udp",
                source,
            })?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => return Ok(Listener { udp, tcp }),
                Err(e)
                    if addr.port() == 0
                        && e.kind() == std::io::ErrorKind::AddrInUse
                        && attempt < BIND_ATTEMPTS => {}
                Err(source) => {
                    return Err(BindError {
                        addr: bound,
                        transport: "tcp",
                        source,
                    });
                }
            }
        }
    }

    /// The address both sockets are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.udp
            .local_addr()
            .expect("a bound socket has an address")
    }
}

/// Serves `listener` until shutdown: the zone follows `snapshots` (its
/// upstreams being `followed`), UDP is answered by one task, TCP by a task
/// per connection, at most `dns_max_tcp_connections` at once.
pub fn spawn(
    listener: Listener,
    settings: &Dns,
    followed: Vec<String>,
    limits: &Limits,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: &Metrics,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let (zone_tx, zone) = watch::channel(Arc::new(build(settings, &followed, &snapshots.borrow())));
    let shared = serve::Shared {
        zone,
        max_answers: settings.max_answers,
        counters: serve::Counters::new(&metrics.dns()),
    };
    let gate = Gate::dns(settings.max_tcp_connections, limits, metrics);
    let idle_timeouts = metrics.listener("dns").idle_timeouts;
    let follow = follow(
        settings.clone(),
        followed,
        snapshots,
        zone_tx,
        shutdown.clone(),
    );
    let udp = serve::udp(listener.udp, shared.clone(), shutdown.clone());
    let tcp = serve::tcp(
        listener.tcp,
        gate,
        limits.header_read_timeout,
        idle_timeouts,
        shared,
        shutdown,
    );
    tokio::spawn(async move {
        tokio::join!(follow, udp, tcp);
    })
}

fn build(settings: &Dns, followed: &[String], snapshot: &Snapshot) -> Zone {
    Zone::build(
        &settings.domain,
        settings.ttl,
        followed.iter().map(String::as_str),
        &snapshot.upstreams,
    )
}

/// Rebuilds the zone whenever the upstreams' endpoints change (not on
/// every snapshot: most carry acks, policies or connection state).
async fn follow(
    settings: Dns,
    followed: Vec<String>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    zone: watch::Sender<Arc<Zone>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut held = snapshots.borrow_and_update().upstreams.clone();
    loop {
        tokio::select! {
            _ = crate::listener::stopped(&mut shutdown) => return,
            changed = snapshots.changed() => if changed.is_err() { return },
        }
        let snapshot = snapshots.borrow_and_update().clone();
        if snapshot.upstreams != held {
            zone.send_replace(Arc::new(build(&settings, &followed, &snapshot)));
            held = snapshot.upstreams.clone();
        }
    }
}

#[cfg(test)]
mod tests;
