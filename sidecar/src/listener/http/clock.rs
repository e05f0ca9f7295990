//! When an HTTP connection is due to be closed.
//!
//! Two rules, after Envoy's `request_headers_timeout` and `idle_timeout`:
//! - A request head must arrive within `header_read_timeout`: a new
//!   connection's first head (or its HTTP/2 preface) counted from accept,
//!   so a client that connects and sends nothing, part of a head, or part
//!   of the preface is cut off; a later head on a keep-alive HTTP/1.1
//!   connection from its first byte.
//! - A connection with no request in flight is closed after
//!   `http_idle_timeout`. A request is in flight from the moment its head
//!   is read until both its body and its response's body have ended (or
//!   been dropped), so a long upload, a slow response or a gRPC stream
//!   never counts as idle.
//!
//! hyper's own `header_read_timeout` is not used: hyper 1 runs it whenever
//! it waits for a head, between keep-alive requests too, so it would close
//! every idle HTTP/1.1 connection after a few seconds (the idle timeout
//! could never apply), and it never runs while hyper-util's `auto` server
//! is still reading the first bytes to choose HTTP/1.1 or HTTP/2 (a client
//! that sends nothing, or `PRI * HTTP/2.0` and no more, would never time
//! out).
//!
//! The [`Clock`] is shared by the connection's IO ([`Watched`], which sees
//! every byte read: the first of a head, and the preface that makes it
//! HTTP/2), its requests ([`Flight`], held by both bodies of each) and its
//! [`Deadline`], a future polled beside the connection in its task. The
//! deadline recomputes when it is polled, so nothing wakes it per request:
//! bytes arrive in the same task (a read is followed by a poll of the
//! deadline), and a request ending in another task (HTTP/2 runs each
//! stream in its own) only ever moves the deadline later, which the timer
//! finds when it fires.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use crate::listener::Place;

/// The client preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// `mode` once the connection is known to be HTTP/1.1; below it, the
/// number of preface bytes matched so far.
const MODE_H1: u64 = 100;
const MODE_H2: u64 = 200;
/// `head_since` when no head is being waited for.
const NONE: u64 = u64::MAX;

/// Why a connection's deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A request head (or the HTTP/2 preface) took too long.
    Header,
    /// No request in flight for too long.
    Idle,
}

/// One connection's clock; a cheap handle.
#[derive(Clone)]
pub struct Clock(Arc<Shared>);

struct Shared {
    /// Instants are kept as milliseconds since this one, in atomics.
    origin: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Requests in flight.
    in_flight: AtomicUsize,
    /// When the connection last had no request in flight.
    idle_since: AtomicU64,
    /// When the head being waited for began (or the connection was
    /// accepted), or [`NONE`].
    head_since: AtomicU64,
    /// Preface bytes matched (0..24), [`MODE_H1`] or [`MODE_H2`].
    mode: AtomicU64,
}

impl Clock {
    /// A connection accepted now: its first head is waited for from now.
    pub fn new(header_timeout: Duration, idle_timeout: Duration) -> Self {
        Clock(Arc::new(Shared {
            origin: Instant::now(),
            header_timeout,
            idle_timeout,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            mode: AtomicU64::new(0),
        }))
    }

    /// A request whose head was just read: in flight until every clone of
    /// the returned guard is dropped.
    pub fn begin(&self) -> Arc<Flight> {
        self.0.in_flight.fetch_add(1, Relaxed);
        self.0.head_since.store(NONE, Relaxed);
        Arc::new(Flight(self.0.clone()))
    }

    /// The future that resolves when the connection is due to be closed.
    pub fn deadline(&self) -> Deadline {
        Deadline {
            shared: self.0.clone(),
            sleep: Box::pin(tokio::time::sleep_until(self.0.origin)),
        }
    }
}

impl Shared {
    fn now(&self) -> u64 {
        Instant::now().duration_since(self.origin).as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    /// Bytes just read from the client.
    fn read(&self, bytes: &[u8]) {
        let mut mode = self.mode.load(Relaxed);
        if mode < MODE_H1 {
            let matched = mode as usize;
            let n = bytes.len().min(H2_PREFACE.len() - matched);
            mode = if bytes[..n] != H2_PREFACE[matched..matched + n] {
                MODE_H1
            } else if matched + n == H2_PREFACE.len() {
                // HTTP/2 frames come and go (PINGs, WINDOW_UPDATEs) with
                // nothing in flight: only idleness counts from now on.
                self.head_since.store(NONE, Relaxed);
                self.idle_since.store(self.now(), Relaxed);
                MODE_H2
            } else {
                (matched + n) as u64
            };
            self.mode.store(mode, Relaxed);
        }
        // The first byte of a head, with nothing in flight, starts its
        // clock (a new connection's runs from accept already).
        if mode == MODE_H1
            && self.in_flight.load(Relaxed) == 0
            && self.head_since.load(Relaxed) == NONE
        {
            self.head_since.store(self.now(), Relaxed);
        }
    }

    /// The next deadline and what it is for; None while a request is in
    /// flight.
    fn next(&self) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        match self.head_since.load(Relaxed) {
            NONE => Some((
                self.at(self.idle_since.load(Relaxed)) + self.idle_timeout,
                Expiry::Idle,
            )),
            since => Some((self.at(since) + self.header_timeout, Expiry::Header)),
        }
    }
}

/// One request in flight; the last clone dropped ends it.
pub struct Flight(Arc<Shared>);

impl Drop for Flight {
    fn drop(&mut self) {
        let s = &self.0;
        // Set before the count drops, so the deadline never reads an old
        // idle start with nothing in flight.
        s.idle_since.store(s.now(), Relaxed);
        s.in_flight.fetch_sub(1, Relaxed);
    }
}

// === Deadline ===

/// Resolves when the connection's clock says to close it.
pub struct Deadline {
    shared: Arc<Shared>,
    sleep: Pin<Box<Sleep>>,
}

impl Future for Deadline {
    type Output = Expiry;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Expiry> {
        loop {
            let now = Instant::now();
            match self.shared.next() {
                Some((at, why)) if at <= now => return Poll::Ready(why),
                // Only an earlier deadline re-arms the timer; a later one
                // is found when it fires.
                Some((at, _)) if at < self.sleep.deadline() || self.sleep.deadline() <= now => {
                    self.sleep.as_mut().reset(at);
                }
                Some(_) => {}
                // Busy: look again in an idle timeout's time at the latest.
                None if self.sleep.deadline() <= now => {
                    let at = now + self.shared.idle_timeout;
                    self.sleep.as_mut().reset(at);
                }
                None => {}
            }
            ready!(self.sleep.as_mut().poll(cx));
        }
    }
}

// === Watched: the connection's IO ===

/// The connection's IO, telling the clock of every byte read, and holding
/// the connection's place in its listener's cap for as long as the IO
/// lives (an upgraded connection keeps it after hyper hands it over).
pub struct Watched<IO> {
    io: IO,
    clock: Arc<Shared>,
    _place: Place,
}

impl<IO> Watched<IO> {
    pub fn new(io: IO, clock: &Clock, place: Place) -> Self {
        Watched {
            io,
            clock: clock.0.clone(),
            _place: place,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            self.clock.read(read);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
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

// === Tracked: a body that keeps its request in flight ===

/// A request's or response's body, keeping the request in flight until it
/// ends or is dropped.
pub struct Tracked<B> {
    inner: B,
    _flight: Arc<Flight>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, flight: Arc<Flight>) -> Self {
        Tracked {
            inner,
            _flight: flight,
        }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
