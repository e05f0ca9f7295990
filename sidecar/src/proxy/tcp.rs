//! Opaque TCP: balanced per connection, copied byte for byte, with
//! half-close passed through (one side's EOF becomes a write shutdown on
//! the other, and the copy goes on in the other direction).
//!
//! Between sidecars a TCP connection starts with a one-line preamble,
//! `ISDP-TCP/1 <service>\n`, so the receiving sidecar's single inbound port
//! knows which local service the bytes are for.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{Tracker, stopped, transport, upstreams::Upstreams};
use crate::metrics::RouteMetrics;

pub const PREAMBLE: &[u8] = b"ISDP-TCP/1 ";
/// A service name is a DNS label; the line can never be longer than this.
const MAX_PREAMBLE: usize = PREAMBLE.len() + 64;

pub fn preamble(service: &str) -> Vec<u8> {
    let mut p = PREAMBLE.to_vec();
    p.extend_from_slice(service.as_bytes());
    p.push(b'\n');
    p
}

/// Reads the preamble line (the caller has seen that it starts with
/// [`PREAMBLE`]) and returns the service it names.
pub async fn read_preamble(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(MAX_PREAMBLE);
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > MAX_PREAMBLE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "tcp preamble too long",
            ));
        }
    }
    let name = line
        .strip_prefix(PREAMBLE)
        .and_then(|n| std::str::from_utf8(n).ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed tcp preamble")
        })?;
    Ok(name.to_owned())
}

/// Copies both ways until both directions are done.
pub async fn splice(mut a: TcpStream, mut b: TcpStream) {
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
        tracker.spawn(async move {
            let _ = client.set_nodelay(true);
            connect_outbound(client, peer, &upstream, &upstreams, connect_timeout).await;
        });
    }
}

async fn connect_outbound(
    client: TcpStream,
    peer: SocketAddr,
    upstream: &str,
    upstreams: &Upstreams,
    connect_timeout: Duration,
) {
    let Some(lb) = upstreams.get(upstream) else {
        return;
    };
    let Some((target, guard)) = lb.pick_connection(Some(peer.ip())) else {
        // Nothing to send to: close at once so the client fails fast.
        tracing::debug!(upstream, "no healthy endpoints; closing tcp connection");
        return;
    };
    let started = std::time::Instant::now();
    let mut server = match transport::connect(target.dest.addr, connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(upstream, endpoint = %target.dest.addr, error = %e, "tcp connect failed");
            guard.failed();
            return;
        }
    };
    // Connect time is the latency signal TCP offers.
    target.load.record_latency(started.elapsed());
    if target.via_sidecar
        && let Err(e) = server.write_all(&preamble(upstream)).await
    {
        tracing::debug!(upstream, error = %e, "writing tcp preamble");
        return;
    }
    let _open = OpenConnection::new(&lb.metrics);
    splice(client, server).await;
    drop(guard);
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn preamble_round_trips_and_rejects_garbage() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&preamble("payments")).await.unwrap();
            c.write_all(b"rest").await.unwrap();
            let mut c2 = TcpStream::connect(addr).await.unwrap();
            c2.write_all(&[b'x'; 200]).await.unwrap();
        });
        let (mut s, _) = l.accept().await.unwrap();
        assert_eq!(read_preamble(&mut s).await.unwrap(), "payments");
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");
        let (mut s2, _) = l.accept().await.unwrap();
        assert!(read_preamble(&mut s2).await.is_err());
        client.await.unwrap();
    }
}
