//! The connection clock on tokio's paused clock: the deadline is awaited,
//! and time jumps straight to it, so each test asserts the exact instant.

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::{listener::Cap, metrics::CapMetrics};

const HEADER: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_secs(300);

/// Awaits the deadline, returning why and how long after `from`.
async fn expires(clock: &Clock, from: Instant) -> (Expiry, Duration) {
    let why = clock.deadline().await;
    (why, Instant::now() - from)
}

async fn sleep(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// A client that connects and sends nothing, or part of a head, or part
/// of the HTTP/2 preface, is cut off at the header timeout from accept.
#[tokio::test(start_paused = true)]
async fn a_new_connection_has_the_header_timeout_for_its_first_head() {
    for sent in [
        &b""[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"PRI * HTTP/2.0\r\n",
    ] {
        let accepted = Instant::now();
        let clock = Clock::new(HEADER, IDLE);
        sleep(3).await;
        if !sent.is_empty() {
            clock.0.read(sent);
        }
        assert_eq!(
            expires(&clock, accepted).await,
            (Expiry::Header, HEADER),
            "{sent:?}"
        );
    }
}

/// Between requests an HTTP/1.1 connection may idle for the idle timeout
/// (not the header timeout, as hyper's own timer would have it); a
/// request in flight, however long, is never idle.
#[tokio::test(start_paused = true)]
async fn keep_alive_idles_for_the_idle_timeout_and_a_request_in_flight_never_does() {
    let clock = Clock::new(HEADER, IDLE);
    clock.0.read(b"GET / HTTP/1.1\r\n\r\n");
    let flight = clock.begin();
    let deadline = tokio::spawn({
        let clock = clock.clone();
        async move { clock.deadline().await }
    });
    // Far past both timeouts, still in flight.
    sleep(2 * IDLE.as_secs()).await;
    assert!(!deadline.is_finished());
    drop(flight);
    let ended = Instant::now();
    assert_eq!(deadline.await.unwrap(), Expiry::Idle);
    assert_eq!(Instant::now() - ended, IDLE);
}

/// On a keep-alive connection the next head is timed from its first byte.
#[tokio::test(start_paused = true)]
async fn a_later_head_is_timed_from_its_first_byte() {
    let clock = Clock::new(HEADER, IDLE);
    clock.0.read(b"GET /a HTTP/1.1\r\n\r\n");
    drop(clock.begin());
    sleep(100).await;
    let first_byte = Instant::now();
    clock.0.read(b"GET /b HT");
    // Bytes of the same head do not restart its clock.
    sleep(5).await;
    clock.0.read(b"TP/1.1\r\n");
    assert_eq!(expires(&clock, first_byte).await, (Expiry::Header, HEADER));
}

/// Once the HTTP/2 preface is complete (however it was split), only
/// idleness counts: frames with nothing in flight (PINGs, SETTINGS) do
/// not start a head's clock.
#[tokio::test(start_paused = true)]
async fn after_the_http2_preface_only_idleness_counts() {
    let clock = Clock::new(HEADER, IDLE);
    clock.0.read(&H2_PREFACE[..5]);
    sleep(4).await;
    clock.0.read(&H2_PREFACE[5..]);
    let preface = Instant::now();
    for _ in 0..20 {
        sleep(5).await;
        clock
            .0
            .read(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00pingping");
    }
    let (why, after) = expires(&clock, preface).await;
    assert_eq!((why, after), (Expiry::Idle, IDLE));
}

/// A request stays in flight until both its bodies are dropped: a
/// response still streaming keeps the connection busy after the request
/// body ended, and the other way round.
#[tokio::test(start_paused = true)]
async fn both_bodies_keep_their_request_in_flight() {
    let clock = Clock::new(HEADER, IDLE);
    clock.0.read(b"POST / HTTP/1.1\r\n\r\n");
    let flight = clock.begin();
    let request = Tracked::new(Full::new(Bytes::from_static(b"up")), flight.clone());
    let response = Tracked::new(Full::new(Bytes::from_static(b"down")), flight);
    let deadline = tokio::spawn({
        let clock = clock.clone();
        async move { clock.deadline().await }
    });
    assert_eq!(request.collect().await.unwrap().to_bytes(), "up");
    sleep(2 * IDLE.as_secs()).await;
    assert!(!deadline.is_finished(), "the response is still in flight");
    assert_eq!(response.collect().await.unwrap().to_bytes(), "down");
    let ended = Instant::now();
    assert_eq!(deadline.await.unwrap(), Expiry::Idle);
    assert_eq!(Instant::now() - ended, IDLE);
}

/// The IO reports what it reads, and holds the connection's place in its
/// cap until it is dropped (an upgraded connection keeps it).
#[tokio::test(start_paused = true)]
async fn the_io_reports_reads_and_holds_the_place() {
    let counters = CapMetrics::default();
    let cap = Cap::new(
        Arc::from("outbound"),
        "k",
        "max-connections",
        1,
        counters.clone(),
    );
    let place = cap.admit("127.0.0.1:1".parse().unwrap()).unwrap();
    let clock = Clock::new(HEADER, IDLE);
    let (io, mut client) = tokio::io::duplex(64);
    let mut io = Watched::new(io, &clock, place);
    drop(clock.begin());
    sleep(60).await;
    let first_byte = Instant::now();
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    assert!(io.read(&mut buf).await.unwrap() > 0);
    assert_eq!(expires(&clock, first_byte).await, (Expiry::Header, HEADER));
    assert_eq!(counters.open.get(), 1);
    drop(io);
    assert_eq!(counters.open.get(), 0);
}
