//! Byte streams the sidecar copies without reading: TCP connections to an
//! upstream, mTLS tunnels from other sidecars, and upgraded HTTP
//! connections (WebSocket). Each is copied both ways, half-close passed
//! through, and closed on both sides once no byte has moved either way
//! for `limits.tcp_idle_timeout` (Envoy's `tcp_proxy` idle timeout), so a
//! peer that vanished without a FIN, or a client that holds a connection
//! open and silent, does not hold it forever.
//!
//! Activity is read bytes: every byte that moves was read from one side,
//! so wrapping both sides' reads sees all of it. The timer is lazy: it
//! fires at the last activity's deadline as it stood when armed, and
//! re-arms from the latest activity if there was any since.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use crate::metrics::{Direction, IdleTimeouts, Metrics};

/// What a stream carries: a TCP connection or tunnel, or an upgraded HTTP
/// connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Upgrade,
}

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both directions finished (EOF each way), or one side failed.
    Done,
    /// Nothing moved for the idle timeout: both sides were dropped.
    Idle,
}

/// The idle timeout and its counters; a cheap handle.
#[derive(Clone, Debug)]
pub struct Tunnels {
    idle: Duration,
    timeouts: Arc<IdleTimeouts>,
}

impl Tunnels {
    pub fn new(idle: Duration, metrics: &Metrics) -> Self {
        Tunnels {
            idle,
            timeouts: Arc::new(metrics.idle_timeouts()),
        }
    }

    /// Unregistered counters (tests, and forwarders that carry no
    /// upgrades of their own).
    pub fn unregistered(idle: Duration) -> Self {
        Tunnels {
            idle,
            timeouts: Arc::default(),
        }
    }

    fn counter(&self, direction: Direction, kind: Kind) -> &Counter {
        let t = &self.timeouts;
        match (direction, kind) {
            (Direction::Outbound, Kind::Tcp) => &t.outbound_tcp,
            (Direction::Inbound, Kind::Tcp) => &t.inbound_tcp,
            (Direction::Outbound, Kind::Upgrade) => &t.outbound_upgrade,
            (Direction::Inbound, Kind::Upgrade) => &t.inbound_upgrade,
        }
    }

    /// Copies both ways until both directions are done, or until nothing
    /// moved for the idle timeout (counted, and both sides dropped).
    pub async fn splice<A, B>(&self, a: A, b: B, direction: Direction, kind: Kind) -> Ended
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let activity = Arc::new(Activity {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        });
        let mut a = Active {
            io: a,
            activity: activity.clone(),
        };
        let mut b = Active {
            io: b,
            activity: activity.clone(),
        };
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::select! {
            r = copy => {
                match r {
                    Ok((up, down)) => tracing::trace!(up, down, "stream finished"),
                    Err(e) => tracing::debug!(error = %e, "stream ended with an error"),
                }
                Ended::Done
            }
            _ = activity.silent_for(self.idle) => {
                self.counter(direction, kind).inc();
                tracing::debug!(direction = direction.as_str(), ?kind, idle = ?self.idle, "closing a silent stream");
                Ended::Idle
            }
        }
    }
}

/// When a byte last moved, as milliseconds since `origin`.
struct Activity {
    origin: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = Instant::now().duration_since(self.origin).as_millis() as u64;
        self.last.store(ms, Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn silent_for(&self, idle: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last.load(Relaxed));
            let deadline = last + idle;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One side of a splice, noting every read that brought bytes.
struct Active<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.touch();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Bytes each way keep a stream open past the idle timeout; silence
    /// closes both sides at the timeout after the last byte, and counts.
    #[tokio::test(start_paused = true)]
    async fn a_stream_is_closed_after_silence_not_after_age() {
        let tunnels = Tunnels::unregistered(Duration::from_secs(60));
        let (a, mut client) = duplex(1024);
        let (b, mut server) = duplex(1024);
        let started = Instant::now();
        let splice = tokio::spawn({
            let tunnels = tunnels.clone();
            async move {
                let ended = tunnels.splice(a, b, Direction::Inbound, Kind::Tcp).await;
                (ended, Instant::now())
            }
        });
        let mut buf = [0u8; 1];
        for i in 0..5u8 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            // Alternate directions: either way counts.
            let (from, to) = if i % 2 == 0 {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            from.write_all(&[i]).await.unwrap();
            to.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf[0], i);
        }
        let last = Instant::now();
        let (ended, at) = splice.await.unwrap();
        assert_eq!(ended, Ended::Idle);
        assert!(
            at - started > Duration::from_secs(250),
            "open for its traffic"
        );
        assert!(
            at - last >= Duration::from_secs(60) && at - last < Duration::from_secs(61),
            "closed {:?} after the last byte",
            at - last
        );
        assert_eq!(tunnels.timeouts.inbound_tcp.get(), 1);
        // Both sides see the close.
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }

    /// A stream whose both sides finish ends as done, uncounted.
    #[tokio::test(start_paused = true)]
    async fn a_finished_stream_is_done() {
        let tunnels = Tunnels::unregistered(Duration::from_secs(60));
        let (a, mut client) = duplex(1024);
        let (b, mut server) = duplex(1024);
        let splice = tokio::spawn({
            let tunnels = tunnels.clone();
            async move {
                tunnels
                    .splice(a, b, Direction::Outbound, Kind::Upgrade)
                    .await
            }
        });
        client.write_all(b"hi").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hi");
        server.shutdown().await.unwrap();
        assert_eq!(splice.await.unwrap(), Ended::Done);
        assert_eq!(tunnels.timeouts.outbound_upgrade.get(), 0);
    }
}
