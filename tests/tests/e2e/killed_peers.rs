//! Killed peers under load: `web`'s sidecar sends steady load to two
//! `payments` instances, each behind its own sidecar, and one of those
//! sidecars is killed with SIGKILL mid-load.
//!
//! Every request is counted by how it ended: a full 200 response; a
//! response cut short after its headers had started (the caller sees an
//! incomplete body: allowed, but only for requests already streaming on
//! the killed connection, so bounded by what was in flight); or a
//! failure without any response started (an error status from a sidecar,
//! or no response at all), which must never happen: a request the dead
//! peer had not started answering is retried on the other instance (by
//! default: connect failures and resets before response headers, for
//! idempotent methods). Every request started after the kill succeeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, SidecarToml, eventually, status_of};
use tokio::time::timeout;

const SERVICE: &str = "payments";
const SETUP: Duration = Duration::from_secs(15);
/// Longest one request may take, retries included.
const REQUEST: Duration = Duration::from_secs(10);
/// Each streamed response: long enough to be mid-body when the kill
/// lands, short enough for many requests per second.
const STREAM_BYTES: usize = 4 * 1024 * 1024;
const WORKERS: usize = 6;

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// A 200 whose body ended early.
    Truncated,
    /// No response started: an error status (and `x-isdp-error`), or the
    /// request failed before any header.
    Failed,
}

struct Done {
    started: Instant,
    path: &'static str,
    outcome: Outcome,
    /// What went wrong, for the assertions' messages.
    detail: String,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn one(client: &HttpClient, base: &str, path: &'static str) -> Done {
    let started = Instant::now();
    let req = Request::get(format!("{base}{path}"))
        .body(Empty::new())
        .unwrap();
    let (outcome, detail) = match timeout(REQUEST, client.request(req)).await {
        Err(_) => (Outcome::Failed, format!("no response within {REQUEST:?}")),
        Ok(Err(e)) => (Outcome::Failed, format!("before any response: {e:?}")),
        Ok(Ok(resp)) if resp.status() != StatusCode::OK => {
            let error = resp
                .headers()
                .get("x-isdp-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (Outcome::Failed, format!("{} {error}", resp.status()))
        }
        Ok(Ok(resp)) => {
            let want: usize = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            let mut body = resp.into_body();
            let mut got = 0;
            let mut error = None;
            while let Some(frame) = timeout(REQUEST, body.frame()).await.transpose() {
                match frame {
                    Ok(Ok(f)) => got += f.data_ref().map_or(0, Bytes::len),
                    Ok(Err(e)) => {
                        error = Some(format!("{e:?}"));
                        break;
                    }
                    Err(_) => {
                        error = Some(format!("body stalled for {REQUEST:?}"));
                        break;
                    }
                }
            }
            match error {
                None if got == want => (Outcome::Ok, String::new()),
                None => (
                    Outcome::Truncated,
                    format!("ended after {got} of {want} bytes"),
                ),
                Some(e) => (
                    Outcome::Truncated,
                    format!("after {got} of {want} bytes: {e}"),
                ),
            }
        }
    };
    Done {
        started,
        path,
        outcome,
        detail,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_peer_sidecar_under_load_fails_only_responses_already_streaming() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let mut echoes = Vec::new();
    let mut sidecars = Vec::new();
    for n in 0..2 {
        let id = format!("pay-{n}");
        let echo = EchoHttp::start(&id).await;
        let sidecar = SidecarToml::new(&id, &cp.grpc_url())
            .raw(&format!(
                "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
                 check = \"{check}\"\ninterval = \"200ms\"\n",
                port = echo.port(),
                check = echo.health_url(),
            ))
            .start()
            .await;
        echoes.push(echo);
        sidecars.push(sidecar);
    }
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .start()
        .await;
    eventually(
        SETUP,
        "web sees both payments instances healthy",
        || async {
            let eps = web.endpoints(SERVICE).await?;
            anyhow::ensure!(eps.len() == 2, "expected 2 endpoints: {eps:?}");
            for n in 0..2 {
                let id = format!("pay-{n}.{SERVICE}");
                anyhow::ensure!(status_of(&eps, &id)? == "healthy", "{id}: {eps:?}");
            }
            Ok(())
        },
    )
    .await;

    // Half the workers stream large bodies (in flight when the kill
    // lands), half make short requests that wait before their headers.
    let base = format!("http://{}", web.upstream_addr(SERVICE));
    let stream_path: &'static str = Box::leak(format!("/bytes?n={STREAM_BYTES}").into_boxed_str());
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
            let path = if w % 2 == 0 {
                stream_path
            } else {
                "/slow?ms=20"
            };
            tokio::spawn(async move {
                let mut done = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    done.push(one(&client, &base, path).await);
                }
                done
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    sidecars[1].kill9().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }

    let of = |o: Outcome| all.iter().filter(move |d| d.outcome == o);
    let ok = of(Outcome::Ok).count();
    let truncated: Vec<&Done> = of(Outcome::Truncated).collect();
    let failed: Vec<&Done> = of(Outcome::Failed).collect();
    let after = all.iter().filter(|d| d.started > killed_at);
    let after_not_ok: Vec<&Done> = after.clone().filter(|d| d.outcome != Outcome::Ok).collect();
    let show = |ds: &[&Done]| {
        ds.iter()
            .map(|d| format!("{} {:?}: {}", d.path, d.outcome, d.detail))
            .collect::<Vec<_>>()
    };
    // What `web` retried, by reason: the requests the dead peer had not
    // answered, and those sent to it before it was ejected or removed.
    let metrics = isdp_tests::http::get(web.admin_addr(), "/metrics")
        .await
        .unwrap()
        .body;
    let retries: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("isdp_retries_total{"))
        .collect();
    println!(
        "killed peer: {} requests, {ok} ok, {} truncated after their headers, {} failed without a response, {} started after the kill; retries: {retries:?}",
        all.len(),
        truncated.len(),
        failed.len(),
        after.count(),
    );
    assert!(
        failed.is_empty(),
        "{} requests failed without any response started: {:?}",
        failed.len(),
        show(&failed)
    );
    assert!(
        truncated.len() <= WORKERS / 2,
        "more truncated responses ({}) than streams that can have been in flight ({}): {:?}",
        truncated.len(),
        WORKERS / 2,
        show(&truncated)
    );
    assert!(
        truncated.iter().all(|d| d.path == stream_path),
        "only streamed responses can be cut: {:?}",
        show(&truncated)
    );
    assert!(
        after_not_ok.is_empty(),
        "requests started after the kill did not all succeed: {:?}",
        show(&after_not_ok)
    );
    assert!(ok > 50, "only {ok} requests made it");
    assert!(
        !retries.is_empty(),
        "the kill cost no retry: the load did not reach the killed peer"
    );
    drop(echoes);
}
