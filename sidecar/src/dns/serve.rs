//! The DNS server's sockets: one task answering UDP in turn with buffers
//! reused across queries, and a task per TCP connection (capped by the
//! listener's `Gate`) answering its length-prefixed queries in order.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use super::answer::{Outcome, QueryType, Rcode, Responder, Transport};
use super::zone::Zone;
use crate::listener::{Gate, Place, stopped};
use crate::metrics::DnsMetrics;

/// Largest UDP query read; longer datagrams are cut, fail to parse and
/// get FORMERR. Queries are tens of bytes.
const UDP_READ_BUFFER: usize = 4096;

/// What every query path shares.
#[derive(Clone)]
pub struct Shared {
    pub zone: watch::Receiver<Arc<Zone>>,
    pub max_answers: usize,
    pub counters: Counters,
}

/// `isdp_dns_queries_total`, every (type, rcode) pair resolved once.
#[derive(Clone)]
pub struct Counters(Arc<[[Counter; Rcode::ALL.len()]; QueryType::ALL.len()]>);

// === impl Counters ===

impl Counters {
    pub fn new(metrics: &DnsMetrics) -> Self {
        Counters(Arc::new(QueryType::ALL.map(|t| {
            Rcode::ALL.map(|r| metrics.queries(t.as_str(), r.as_str()))
        })))
    }

    fn count(&self, outcome: Outcome) {
        let t = QueryType::ALL
            .iter()
            .position(|t| *t == outcome.qtype)
            .expect("listed");
        let r = Rcode::ALL
            .iter()
            .position(|r| *r == outcome.rcode)
            .expect("listed");
        self.0[t][r].inc();
    }
}

/// Answers UDP queries until shutdown: one receive and one send buffer,
/// no task per query.
pub async fn udp(socket: UdpSocket, shared: Shared, mut shutdown: watch::Receiver<bool>) {
    let mut responder = Responder::new(shared.max_answers, rand::random());
    let mut query = vec![0u8; UDP_READ_BUFFER];
    let mut response = Vec::with_capacity(usize::from(super::answer::MAX_UDP_PAYLOAD));
    loop {
        let received = tokio::select! {
            _ = stopped(&mut shutdown) => return,
            r = socket.recv_from(&mut query) => r,
        };
        let (len, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                // An ICMP error for an earlier reply, and the like: keep serving.
                tracing::debug!(error = %e, "dns: udp receive failed");
                continue;
            }
        };
        let zone = shared.zone.borrow().clone();
        let outcome = responder.respond(&query[..len], &zone, Transport::Udp, &mut response);
        shared.counters.count(outcome);
        if !response.is_empty()
            && let Err(e) = socket.send_to(&response, peer).await
        {
            tracing::debug!(%peer, error = %e, "dns: udp send failed");
        }
    }
}

/// Accepts TCP connections under `gate` until shutdown; each is served
/// by its own task, closed once no whole query arrived within `idle` of
/// its opening or its last answer.
pub async fn tcp(
    listener: TcpListener,
    gate: Gate,
    idle: Duration,
    idle_timeouts: Counter,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, _peer, place)) = gate.accept(&listener, &mut shutdown).await {
        let shared = shared.clone();
        let idle_timeouts = idle_timeouts.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stopped(&mut shutdown) => {}
                timed_out = connection(stream, place, idle, shared) => {
                    if timed_out {
                        idle_timeouts.inc();
                    }
                }
            }
        });
    }
}

/// Serves one connection's queries in order; true when it was closed for
/// idleness.
async fn connection(mut stream: TcpStream, _place: Place, idle: Duration, shared: Shared) -> bool {
    let mut responder = Responder::new(shared.max_answers, rand::random());
    let mut query = Vec::new();
    let mut response = Vec::new();
    let mut framed = Vec::new();
    loop {
        let read = tokio::time::timeout(idle, read_message(&mut stream, &mut query)).await;
        match read {
            Err(_) => return true,
            Ok(Err(_)) => return false,
            Ok(Ok(())) => {}
        }
        let zone = shared.zone.borrow().clone();
        let outcome = responder.respond(&query, &zone, Transport::Tcp, &mut response);
        shared.counters.count(outcome);
        if response.is_empty() {
            // Nothing to say to a message that is not a query: the stream
            // cannot be trusted to be in step any more.
            return false;
        }
        // The length and the message in one write, so one segment.
        let len = u16::try_from(response.len()).expect("responses fit a TCP message");
        framed.clear();
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&response);
        match tokio::time::timeout(idle, stream.write_all(&framed)).await {
            Err(_) => return true,
            Ok(Err(_)) => return false,
            Ok(Ok(())) => {}
        }
    }
}

/// One length-prefixed message into `buf`, which grows as its bytes
/// arrive: a connection that announces 64 KiB and sends nothing holds
/// no 64 KiB buffer.
async fn read_message<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let len = u16::from_be_bytes(len);
    buf.clear();
    let read = stream.take(u64::from(len)).read_to_end(buf).await?;
    if read < usize::from(len) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tcp_query_buffer_grows_with_what_arrives() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        // 64 KiB announced, 3 bytes sent, then the client goes away.
        client.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        drop(client);
        let mut buf = Vec::new();
        let e = read_message(&mut server, &mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(buf.capacity() < 4096, "{}", buf.capacity());

        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[0, 3, 7, 8, 9, 0, 1, 5]).await.unwrap();
        read_message(&mut server, &mut buf).await.unwrap();
        assert_eq!(buf, [7, 8, 9]);
        read_message(&mut server, &mut buf).await.unwrap();
        assert_eq!(buf, [5], "the next message starts where the first ended");
    }
}
