//! `echo-http`: the demo backend, and the server the end-to-end tests
//! misbehave with.
//!
//! Every request other than the health endpoints is answered with a JSON
//! echo of itself plus the instance id, so a caller behind a sidecar can see
//! which instance it reached. The health endpoint can be flipped to 503 at
//! run time, which is how the demo and the tests make an instance unhealthy
//! without killing it.
//!
//! # Layout
//! - [`Args`]: flags (each with an env var).
//! - [`main`]: binds, prints the `echo-http listening: http=ADDR` line the
//!   launcher and test harness wait for, then serves until SIGINT/SIGTERM.
//! - handlers: `GET /healthz`, `POST /admin/health/{fail,pass}`, and the
//!   echo fallback.
//! - test routes: `POST /sink` (counts the body's bytes), `GET /bytes?n=N`
//!   (streams N bytes), `GET /slow?ms=N` (answers after N ms) and `GET /ws`
//!   (WebSocket echo), so tests can push large bodies, hold requests in
//!   flight and upgrade through the mesh.
//! - misbehaviours: `POST /admin/fail?n=N&status=S` makes the next N
//!   requests to this instance (any path but `/healthz` and `/admin/*`)
//!   answer S (default 503); `GET /reset` drops the connection without an
//!   answer; `POST /admin/stall?on=true|false` makes every such request
//!   hang until turned off; `POST /admin/delay?ms=N` delays every such
//!   request by N ms until set back to 0 (a slow instance);
//!   `POST /admin/load?utilization=U` adds an ORCA load report
//!   (`endpoint-load-metrics: TEXT application_utilization=U`) to every
//!   answer, which the inbound sidecar reads and strips (negative: none);
//!   `POST /admin/load?cost=C` reports instead a utilisation of C per
//!   request per second served (C × the recent request rate), as a real
//!   server's utilisation follows its traffic (negative: off);
//!   `POST /admin/capacity?n=N` serves at most N requests at a time and
//!   queues the rest, as a saturated server does (0: no limit). Tests use
//!   them to exercise retries, outlier detection, timeouts, load balancing
//!   and adaptive concurrency.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;

/// Flags. Every flag also reads an env var so containers can configure it.
#[derive(Debug, Parser)]
#[command(version, about = "HTTP echo service for ISDP demos and tests")]
struct Args {
    /// Address to listen on. Port 0 picks a free port; the bound address is
    /// printed on stdout so callers can find it.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Instance id reported in every answer, so a caller can tell instances
    /// apart. Defaults to `<hostname>-<port>`.
    #[arg(long, env = "ECHO_ID")]
    id: Option<String>,
}

/// State shared by the handlers; cheap to clone.
#[derive(Clone)]
struct Echo {
    id: Arc<str>,
    /// Cleared by `POST /admin/health/fail`: lets a test or demo user make the
    /// health check fail while the process keeps serving.
    healthy: Arc<AtomicBool>,
    /// Requests left to fail (`POST /admin/fail`), and with which status.
    failing: Arc<AtomicU64>,
    fail_status: Arc<std::sync::atomic::AtomicU16>,
    /// Set by `POST /admin/stall?on=true`: requests hang until cleared.
    stalled: Arc<AtomicBool>,
    /// Set by `POST /admin/delay?ms=N`: every request waits N ms first.
    delay_ms: Arc<AtomicU64>,
    /// Set by `POST /admin/load?utilization=U`: the ORCA utilisation every
    /// answer reports, as `f64` bits; negative: no report.
    utilization: Arc<AtomicU64>,
    /// Set by `POST /admin/load?cost=C`: the utilisation one request per
    /// second costs, as `f64` bits; negative: off.
    cost: Arc<AtomicU64>,
    /// Requests served (admin and health routes aside), and their recent
    /// rate per second as `f64` bits, which `cost` is charged on.
    served: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
    /// Set by `POST /admin/capacity?n=N`: requests wait for one of N
    /// places (in arrival order) before they are served; None: no limit.
    capacity: Arc<std::sync::RwLock<Option<Arc<tokio::sync::Semaphore>>>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let id = args
        .id
        .unwrap_or_else(|| isdp_examples::default_id(addr.port()));
    let echo = Echo {
        id: id.into(),
        healthy: Arc::new(AtomicBool::new(true)),
        failing: Arc::default(),
        fail_status: Arc::new(std::sync::atomic::AtomicU16::new(503)),
        stalled: Arc::default(),
        delay_ms: Arc::default(),
        utilization: Arc::new(AtomicU64::new((-1.0f64).to_bits())),
        cost: Arc::new(AtomicU64::new((-1.0f64).to_bits())),
        served: Arc::default(),
        rate: Arc::default(),
        capacity: Arc::default(),
    };
    tokio::spawn(measure_rate(echo.clone()));

    // The launcher and the test harness read this exact line to learn the
    // bound port; flush so they see it before the first request arrives.
    let mut out = std::io::stdout().lock();
    writeln!(out, "echo-http listening: http={addr}")?;
    out.flush()?;
    drop(out);

    axum::serve(listener, router(echo))
        .with_graceful_shutdown(isdp_examples::shutdown_signal())
        .await
        .context("serving")
}

fn router(echo: Echo) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/admin/health/fail", post(health_fail))
        .route("/admin/health/pass", post(health_pass))
        .route("/sink", post(sink))
        .route("/bytes", get(bytes))
        .route("/slow", get(slow))
        .route("/ws", get(ws))
        .route("/reset", get(reset))
        .route("/admin/fail", post(fail_next))
        .route("/admin/stall", post(stall))
        .route("/admin/delay", post(delay))
        .route("/admin/load", post(load))
        .route("/admin/capacity", post(capacity))
        .fallback(echo_request)
        .layer(axum::middleware::from_fn_with_state(
            echo.clone(),
            misbehave,
        ))
        .with_state(echo)
}

#[derive(serde::Deserialize)]
struct FailQuery {
    n: u64,
    status: Option<u16>,
}

/// `POST /admin/fail?n=N&status=S`: the next N requests answer S.
async fn fail_next(State(echo): State<Echo>, Query(q): Query<FailQuery>) -> Response {
    let status = q.status.unwrap_or(503);
    if StatusCode::from_u16(status).is_err() {
        return (StatusCode::BAD_REQUEST, "bad status\n").into_response();
    }
    echo.fail_status.store(status, Ordering::Relaxed);
    echo.failing.store(q.n, Ordering::Relaxed);
    with_instance(
        &echo,
        format!("failing the next {} with {status}\n", q.n).into_response(),
    )
}

#[derive(serde::Deserialize)]
struct StallQuery {
    on: bool,
}

/// `POST /admin/stall?on=BOOL`: requests hang while on.
async fn stall(State(echo): State<Echo>, Query(q): Query<StallQuery>) -> Response {
    echo.stalled.store(q.on, Ordering::Relaxed);
    with_instance(&echo, format!("stalled: {}\n", q.on).into_response())
}

#[derive(serde::Deserialize)]
struct DelayQuery {
    ms: u64,
}

/// Longest delay `/admin/delay` accepts: a minute.
const MAX_DELAY_MS: u64 = 60_000;

/// `POST /admin/delay?ms=N`: every request waits N ms before it is served
/// (0 turns it off), so an instance turns slow without failing.
async fn delay(State(echo): State<Echo>, Query(q): Query<DelayQuery>) -> Response {
    if q.ms > MAX_DELAY_MS {
        let resp = (
            StatusCode::BAD_REQUEST,
            format!("ms: at most {MAX_DELAY_MS}, got {}\n", q.ms),
        );
        return with_instance(&echo, resp.into_response());
    }
    echo.delay_ms.store(q.ms, Ordering::Relaxed);
    with_instance(&echo, format!("delay: {} ms\n", q.ms).into_response())
}

#[derive(serde::Deserialize)]
struct LoadQuery {
    utilization: Option<f64>,
    cost: Option<f64>,
}

/// `POST /admin/load?utilization=U`: every answer carries an ORCA report
/// of application utilisation U from now on (negative: none).
/// `POST /admin/load?cost=C`: the report says C × the recent request rate
/// (negative: off; a fixed utilisation set too is reported while off).
async fn load(State(echo): State<Echo>, Query(q): Query<LoadQuery>) -> Response {
    if let Some(u) = q.utilization {
        echo.utilization.store(u.to_bits(), Ordering::Relaxed);
    }
    if let Some(c) = q.cost {
        echo.cost.store(c.to_bits(), Ordering::Relaxed);
    }
    with_instance(
        &echo,
        format!("utilization: {:?} cost: {:?}\n", q.utilization, q.cost).into_response(),
    )
}

/// How often the request rate is measured, and the weight of the newest
/// measure in it.
const RATE_TICK: std::time::Duration = std::time::Duration::from_millis(250);
const RATE_SMOOTHING: f64 = 0.3;

/// Keeps `echo.rate` at the recent requests per second, smoothed.
async fn measure_rate(echo: Echo) {
    let mut tick = tokio::time::interval(RATE_TICK);
    let mut last = 0;
    let mut rate = 0.0;
    loop {
        tick.tick().await;
        let now = echo.served.load(Ordering::Relaxed);
        let sample = (now - last) as f64 / RATE_TICK.as_secs_f64();
        last = now;
        rate = rate * (1.0 - RATE_SMOOTHING) + sample * RATE_SMOOTHING;
        echo.rate.store(f64::to_bits(rate), Ordering::Relaxed);
    }
}

#[derive(serde::Deserialize)]
struct CapacityQuery {
    n: u32,
}

/// Most places `/admin/capacity` accepts.
const MAX_CAPACITY: u32 = 100_000;

/// `POST /admin/capacity?n=N`: at most N requests are served at once, the
/// rest wait their turn (0 turns it off). Requests already waiting keep
/// the old limit.
async fn capacity(State(echo): State<Echo>, Query(q): Query<CapacityQuery>) -> Response {
    if q.n > MAX_CAPACITY {
        let resp = (
            StatusCode::BAD_REQUEST,
            format!("n: at most {MAX_CAPACITY}, got {}\n", q.n),
        );
        return with_instance(&echo, resp.into_response());
    }
    let places = (q.n > 0).then(|| Arc::new(tokio::sync::Semaphore::new(q.n as usize)));
    *echo
        .capacity
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = places;
    with_instance(&echo, format!("capacity: {}\n", q.n).into_response())
}

/// Applies `/admin/fail`, `/admin/stall`, `/admin/delay` and
/// `/admin/capacity` to every request but health checks and the admin
/// routes themselves.
async fn misbehave(
    State(echo): State<Echo>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path.starts_with("/admin/") {
        return next.run(req).await;
    }
    echo.served.fetch_add(1, Ordering::Relaxed);
    while echo.stalled.load(Ordering::Relaxed) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let delay = echo.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let took = echo
        .failing
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok();
    if took {
        let status = StatusCode::from_u16(echo.fail_status.load(Ordering::Relaxed))
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return with_instance(&echo, (status, "failing on purpose\n").into_response());
    }
    let places = echo
        .capacity
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let _place = match places {
        Some(places) => places.acquire_owned().await.ok(),
        None => None,
    };
    next.run(req).await
}

/// `GET /reset`: ends the process's side of the connection without an
/// answer (the handler panics; hyper closes the connection).
async fn reset() -> Response {
    std::panic::resume_unwind(Box::new("reset on purpose"))
}

async fn healthz(State(echo): State<Echo>) -> Response {
    let status = if echo.healthy.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "failing")
    };
    with_instance(&echo, status.into_response())
}

async fn health_fail(State(echo): State<Echo>) -> Response {
    echo.healthy.store(false, Ordering::Relaxed);
    with_instance(&echo, "health: failing\n".into_response())
}

async fn health_pass(State(echo): State<Echo>) -> Response {
    echo.healthy.store(true, Ordering::Relaxed);
    with_instance(&echo, "health: passing\n".into_response())
}

async fn echo_request(
    State(echo): State<Echo>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    // A BTreeMap keeps the output stable, which makes it diffable by eye.
    let headers: BTreeMap<&str, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body = json!({
        "instance": &*echo.id,
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": headers,
    });
    with_instance(&echo, Json(body).into_response())
}

/// `POST /sink`: reads the whole body as it streams in and answers with
/// the number of bytes received, as text.
async fn sink(State(echo): State<Echo>, body: Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut total: u64 = 0;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => total += c.len() as u64,
            Err(e) => {
                let resp = (StatusCode::BAD_REQUEST, format!("body: {e}\n")).into_response();
                return with_instance(&echo, resp);
            }
        }
    }
    with_instance(&echo, total.to_string().into_response())
}

#[derive(serde::Deserialize)]
struct BytesQuery {
    n: u64,
}

/// Chunk size of `GET /bytes`.
const CHUNK: usize = 64 * 1024;

/// `GET /bytes?n=N`: streams N bytes (`b'x'`) in 64 KiB chunks, never
/// holding the whole body.
async fn bytes(State(echo): State<Echo>, Query(q): Query<BytesQuery>) -> Response {
    let chunk = bytes::Bytes::from(vec![b'x'; CHUNK]);
    let chunks = futures::stream::unfold(q.n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK as u64);
            let part = chunk.slice(..n as usize);
            Some((Ok::<_, std::io::Error>(part), left - n))
        }
    });
    let mut resp = Body::from_stream(chunks).into_response();
    if let Ok(v) = HeaderValue::from_str(&q.n.to_string()) {
        resp.headers_mut()
            .insert(axum::http::header::CONTENT_LENGTH, v);
    }
    with_instance(&echo, resp)
}

#[derive(serde::Deserialize)]
struct SlowQuery {
    ms: u64,
}

/// `GET /slow?ms=N`: answers after N ms, to keep a request in flight.
async fn slow(State(echo): State<Echo>, Query(q): Query<SlowQuery>) -> Response {
    tokio::time::sleep(std::time::Duration::from_millis(q.ms)).await;
    with_instance(&echo, format!("slept {} ms\n", q.ms).into_response())
}

/// `GET /ws`: a WebSocket that sends every text or binary message back.
async fn ws(State(echo): State<Echo>, upgrade: WebSocketUpgrade) -> Response {
    let resp = upgrade.on_upgrade(ws_echo);
    with_instance(&echo, resp)
}

async fn ws_echo(mut socket: WebSocket) {
    use axum::extract::ws::Message;
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => return,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

/// Every answer names its instance, so load balancing is visible with
/// curl, and carries the ORCA report `/admin/load` set, if any.
fn with_instance(echo: &Echo, mut resp: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&echo.id) {
        resp.headers_mut().insert("x-instance-id", v);
    }
    let cost = f64::from_bits(echo.cost.load(Ordering::Relaxed));
    let utilization = if cost >= 0.0 {
        cost * f64::from_bits(echo.rate.load(Ordering::Relaxed))
    } else {
        f64::from_bits(echo.utilization.load(Ordering::Relaxed))
    };
    if utilization >= 0.0
        && let Ok(v) = HeaderValue::from_str(&format!("TEXT application_utilization={utilization}"))
    {
        resp.headers_mut().insert("endpoint-load-metrics", v);
    }
    resp
}
