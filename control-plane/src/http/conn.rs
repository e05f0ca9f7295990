//! Serving the HTTP listener's TLS connections (`crate::tls::incoming`,
//! as on the gRPC port: the same certificate following root rotation, the
//! same connection cap and first-request deadline): HTTP/1.1 or HTTP/2 by
//! what the client speaks, headers read within `--http-header-timeout`
//! and at most [`MAX_HEADER_BYTES`], a connection with no request in flight
//! closed after `--http-idle-timeout` (a blocking read in flight is not
//! idle), and on shutdown every connection told to finish its requests,
//! waited for at most [`SHUTDOWN_DRAIN`].

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::Router;
use futures::StreamExt;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic::transport::server::Connected as _;
use tower::ServiceExt as _;

use crate::tls::{self, PeerInfo};

/// Largest request head (request line and headers) a client may send: a
/// token and a few headers need a fraction of it.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Requests one HTTP/2 connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// How long shutdown waits for requests in flight (a blocking read ends at
/// once on shutdown; a client that stops reading cannot hold it up longer).
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// The listener's limits (from the `--http-*` flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Serves `incoming` with `app` until `shutdown`, then drains.
pub fn spawn(
    mut incoming: tls::Incoming,
    app: Router,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut open = tokio::task::JoinSet::new();
        loop {
            let conn = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                c = incoming.next() => match c {
                    Some(Ok(c)) => c,
                    Some(Err(_)) => continue,
                    None => break,
                },
            };
            open.spawn(serve(conn, app.clone(), settings.clone(), shutdown.clone()));
            // Reap finished connections so the set does not grow.
            while open.try_join_next().is_some() {}
        }
        let drained = async { while open.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_DRAIN, drained).await.is_err() {
            tracing::info!("HTTP connections still open after the drain; closing them");
        }
    })
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn idle_since(&self) -> Option<Instant> {
        let last = *self.last.lock().expect("activity lock");
        (self.in_flight.load(Ordering::Acquire) == 0).then_some(last)
    }
}

/// Ends a request's place in [`Activity`] however its future ends.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().expect("activity lock") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve(
    conn: tls::Conn,
    app: Router,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) {
    let peer: PeerInfo = conn.connect_info();
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            activity.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(activity.clone());
            req.extensions_mut().insert(peer.clone());
            let app = app.clone();
            async move {
                let res = app.oneshot(req.map(axum::body::Body::new)).await;
                drop(guard);
                res
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let connection = builder.serve_connection(TokioIo::new(conn), service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        let idle_at = activity
            .idle_since()
            .map_or(Instant::now() + settings.idle_timeout, |t| {
                t + settings.idle_timeout
            });
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = shutdown.wait_for(|s| *s), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_at), if !closing => {
                if activity
                    .idle_since()
                    .is_some_and(|t| t + settings.idle_timeout <= Instant::now())
                {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
