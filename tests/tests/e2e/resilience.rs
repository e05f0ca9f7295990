//! Resilience and traffic policies end to end: real control plane,
//! sidecars and `echo-http` instances on loopback; policies applied with
//! `isdpctl policy apply` and pushed live to the `web` sidecar, which
//! proxies `payments` on a dedicated listener.
//!
//! The instances misbehave on request (`POST /admin/fail?n=&status=`,
//! `/admin/stall`, kill -9) to exercise retries, timeouts, the circuit
//! breaker, outlier detection, splits, header routing and fault
//! injection. Every wait is bounded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually, status_of,
};
use tokio::time::timeout;

const SERVICE: &str = "payments";
const SETUP: Duration = Duration::from_secs(15);
const REQUEST: Duration = Duration::from_secs(5);
const INTERVAL_MS: u64 = 200;

// === Mesh ===

/// `payments` instances behind their own sidecars, each with a `version`
/// label, and a `web` sidecar proxying `payments`.
struct Mesh {
    cp: ControlPlane,
    echoes: Vec<EchoHttp>,
    _sidecars: Vec<Sidecar>,
    web: Sidecar,
    dir: tempfile::TempDir,
}

impl Mesh {
    /// One instance per entry of `versions`, `pay-N`.
    async fn start(versions: &[&str]) -> Self {
        let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
        let mut echoes = Vec::new();
        let mut sidecars = Vec::new();
        for (n, version) in versions.iter().enumerate() {
            let id = format!("pay-{n}");
            let echo = EchoHttp::start(&id).await;
            let sidecar = SidecarToml::new(&id, &cp.grpc_url())
                .raw(&format!(
                    "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
                     check = \"{check}\"\ninterval = \"{INTERVAL_MS}ms\"\n\
                     metadata = {{ version = \"{version}\" }}\n",
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
        let mesh = Mesh {
            cp,
            echoes,
            _sidecars: sidecars,
            web,
            dir: tempfile::tempdir().unwrap(),
        };
        let want = versions.len();
        eventually(
            SETUP,
            "web sees every payments instance healthy",
            || async {
                let eps = mesh.web.endpoints(SERVICE).await?;
                anyhow::ensure!(eps.len() == want, "expected {want} endpoints: {eps:?}");
                for n in 0..want {
                    let id = instance_id(n);
                    anyhow::ensure!(status_of(&eps, &id)? == "healthy", "{id}: {eps:?}");
                }
                Ok(())
            },
        )
        .await;
        mesh
    }

    fn base(&self) -> String {
        format!("http://{}", self.web.upstream_addr(SERVICE))
    }

    /// The policy version `web` has in force for payments (None: defaults).
    async fn policy_version(&self) -> anyhow::Result<Option<String>> {
        let config = self.web.config_json().await?;
        Ok(config["upstreams"][SERVICE]["policy_version"]
            .as_str()
            .map(str::to_owned))
    }

    /// Applies `yaml` and waits until `web` runs on it; returns how long
    /// that took after `isdpctl` returned.
    async fn apply(&self, yaml: &str) -> Duration {
        let before = self.policy_version().await.unwrap();
        let path = self.dir.path().join("policy.yaml");
        std::fs::write(&path, yaml).unwrap();
        self.cp
            .ctl_ok(&["policy", "apply", "-f", &path.display().to_string()])
            .await;
        eventually(
            Duration::from_secs(5),
            "web runs on the new policy",
            || async {
                let now = self.policy_version().await?;
                if now.is_some() && now != before {
                    return Ok(());
                }
                let xds = self.web.config_json().await?["xds"].clone();
                Err(anyhow::anyhow!("still {now:?}; xds: {xds}"))
            },
        )
        .await
    }

    async fn admin(&self, n: usize, path: &str) {
        let resp = isdp_tests::http::post(self.echoes[n].addr(), path)
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{path}");
    }

    async fn endpoint(&self, n: usize) -> serde_json::Value {
        let eps = self.web.endpoints(SERVICE).await.unwrap();
        isdp_tests::find_by_id(&eps, &instance_id(n))
            .cloned()
            .unwrap_or_default()
    }
}

fn instance_id(n: usize) -> String {
    format!("pay-{n}.{SERVICE}")
}

// === HTTP ===

type Body = BoxBody<Bytes, Infallible>;
type HttpClient = Client<HttpConnector, Body>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    took: Duration,
}

impl Answer {
    fn instance(&self) -> String {
        header(&self.headers, "x-instance-id")
    }
    fn error(&self) -> String {
        header(&self.headers, "x-isdp-error")
    }
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn get_with(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut b = Request::get(url);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let req = b.body(Empty::new().boxed()).unwrap();
    let start = Instant::now();
    let resp = timeout(REQUEST, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("GET {url}: no answer within {REQUEST:?}"))
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    let (parts, body) = resp.into_parts();
    let _ = timeout(REQUEST, body.collect()).await;
    Answer {
        status: parts.status,
        headers: parts.headers,
        took: start.elapsed(),
    }
}

async fn get(client: &HttpClient, url: &str) -> Answer {
    get_with(client, url, &[]).await
}

/// Steady load: `workers` loops of GETs until stopped; counts answers and
/// keeps every non-200 one.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(url: String, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let client = client();
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, client, url) =
                    (stop.clone(), ok.clone(), client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let a = get(&client, &url).await;
                        if a.status == StatusCode::OK {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failures.push(format!(
                                "{} {} from {}",
                                a.status,
                                a.error(),
                                a.instance()
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    failures
                })
            })
            .collect();
        Load { stop, ok, tasks }
    }

    /// Stops and returns (successes, failures).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for t in self.tasks {
            failures.extend(t.await.unwrap());
        }
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_failures_into_successes_unless_turned_off() {
    let mesh = Mesh::start(&["v1"]).await;
    let c = client();
    let url = format!("{}/hello", mesh.base());
    // Defaults: two retries on gateway errors.
    mesh.admin(0, "/admin/fail?n=2&status=503").await;
    let a = get(&c, &url).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.headers);

    mesh.apply("service: payments\nretries: { attempts: 3, retry_on: [5xx] }\n")
        .await;
    mesh.admin(0, "/admin/fail?n=3&status=500").await;
    assert_eq!(get(&c, &url).await.status, StatusCode::OK);

    mesh.apply("service: payments\nretries: { attempts: 0 }\n")
        .await;
    mesh.admin(0, "/admin/fail?n=1&status=503").await;
    assert_eq!(get(&c, &url).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&c, &url).await.status, StatusCode::OK);

    let metrics = isdp_tests::http::get(mesh.web.admin_addr(), "/metrics")
        .await
        .unwrap();
    let text = metrics.body;
    assert!(
        text.contains(r#"isdp_retries_total{service="payments",reason="gateway-error"} 2"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_and_retry_avoid_a_stalled_instance() {
    let mesh = Mesh::start(&["v1", "v1"]).await;
    mesh.apply(
        "service: payments\ntimeouts: { per_try: 200ms, request: 3s }\n\
         retries: { attempts: 2, retry_on: [gateway-error] }\n",
    )
    .await;
    mesh.admin(0, "/admin/stall?on=true").await;
    let c = client();
    for _ in 0..6 {
        let a = get(&c, &format!("{}/x", mesh.base())).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.error());
        assert_eq!(a.instance(), "pay-1");
        assert!(a.took < Duration::from_millis(1500), "{:?}", a.took);
    }
    mesh.admin(0, "/admin/stall?on=false").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_504() {
    let mesh = Mesh::start(&["v1"]).await;
    mesh.apply("service: payments\ntimeouts: { request: 300ms }\n")
        .await;
    let a = get(&client(), &format!("{}/slow?ms=2000", mesh.base())).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{:?}", a.headers);
    assert_eq!(a.error(), "request-timeout");
    assert!(a.took < Duration::from_millis(1000), "{:?}", a.took);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_overflow_answers_503_at_once() {
    let mesh = Mesh::start(&["v1"]).await;
    mesh.apply("service: payments\ncircuit_breaker: { max_requests: 1 }\n")
        .await;
    let c = client();
    let slow = {
        let (c, url) = (c.clone(), format!("{}/slow?ms=1500", mesh.base()));
        tokio::spawn(async move { get(&c, &url).await.status })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = get(&c, &format!("{}/x", mesh.base())).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.error(), "overflow");
    assert!(a.took < Duration::from_millis(200), "{:?}", a.took);
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    assert_eq!(
        get(&c, &format!("{}/x", mesh.base())).await.status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_instance_and_brings_it_back() {
    let mesh = Mesh::start(&["v1", "v1", "v1"]).await;
    mesh.apply(
        "service: payments\nretries: { attempts: 0 }\n\
         outlier_detection: { consecutive_5xx: 3, base_ejection_time: 1s, max_ejection_percent: 50 }\n",
    )
    .await;
    mesh.admin(0, "/admin/fail?n=1000&status=500").await;
    let c = client();
    let url = format!("{}/x", mesh.base());
    for _ in 0..12 {
        get(&c, &url).await;
    }
    let ep = mesh.endpoint(0).await;
    assert_eq!(ep["ejected"], true, "{ep}");
    assert_eq!(ep["ejections"], 1, "{ep}");
    // While ejected, nothing goes there.
    for _ in 0..10 {
        let a = get(&c, &url).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_ne!(a.instance(), "pay-0");
    }
    mesh.admin(0, "/admin/fail?n=0").await;
    eventually(Duration::from_secs(5), "pay-0 back in rotation", || async {
        let seen: Vec<String> = {
            let mut v = Vec::new();
            for _ in 0..6 {
                v.push(get(&c, &url).await.instance());
            }
            v
        };
        anyhow::ensure!(seen.iter().any(|i| i == "pay-0"), "{seen:?}");
        Ok(())
    })
    .await;
    assert_eq!(mesh.endpoint(0).await["ejected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_under_load_fails_nothing_with_defaults() {
    let mut mesh = Mesh::start(&["v1", "v1", "v1"]).await;
    let load = Load::start(format!("{}/x", mesh.base()), 4);
    tokio::time::sleep(Duration::from_millis(800)).await;
    mesh.echoes[1].kill9().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(ok > 100, "only {ok} requests made it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_under_load_applies_within_a_second() {
    let mesh = Mesh::start(&["v1", "v2"]).await;
    let load = Load::start(format!("{}/x", mesh.base()), 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = mesh
        .apply(
            "service: payments\nsubsets: [ { name: v2, labels: { version: v2 } } ]\n\
             split: [ { subset: v2, weight: 100 } ]\n",
        )
        .await;
    assert!(took < Duration::from_secs(1), "applied after {took:?}");
    let c = client();
    for _ in 0..20 {
        assert_eq!(
            get(&c, &format!("{}/x", mesh.base())).await.instance(),
            "pay-1"
        );
    }
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_over_subsets_and_header_routing() {
    let mesh = Mesh::start(&["v1", "v2"]).await;
    mesh.apply(
        "service: payments\n\
         subsets: [ { name: v1, labels: { version: v1 } }, { name: v2, labels: { version: v2 } } ]\n\
         split: [ { subset: v1, weight: 90 }, { subset: v2, weight: 10 } ]\n\
         routes:\n  - name: canary\n    match: { headers: { x-canary: \"true\" } }\n    \
         split: [ { subset: v2, weight: 100 } ]\n",
    )
    .await;
    let c = client();
    let url = format!("{}/x", mesh.base());
    for _ in 0..20 {
        let a = get_with(&c, &url, &[("x-canary", "true")]).await;
        assert_eq!(a.instance(), "pay-1", "canary goes to v2");
    }
    const N: usize = 10_000;
    const WORKERS: usize = 16;
    let counts = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (c, url, counts) = (c.clone(), url.clone(), counts.clone());
            tokio::spawn(async move {
                for _ in 0..N / WORKERS {
                    let a = get(&c, &url).await;
                    assert_eq!(a.status, StatusCode::OK);
                    *counts.lock().unwrap().entry(a.instance()).or_default() += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    let total: usize = counts.values().sum();
    let v2 = counts.get("pay-1").copied().unwrap_or(0) as f64 / total as f64;
    assert!((0.08..=0.12).contains(&v2), "v2 share {v2}: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_and_delays() {
    let mesh = Mesh::start(&["v1"]).await;
    let c = client();
    let url = format!("{}/x", mesh.base());
    mesh.apply("service: payments\nfault: { abort: { percent: 100, status: 418 } }\n")
        .await;
    let a = get(&c, &url).await;
    assert_eq!(a.status.as_u16(), 418);
    assert_eq!(a.error(), "fault-injected");

    mesh.apply("service: payments\nfault: { delay: { percent: 100, duration: 400ms } }\n")
        .await;
    let a = get(&c, &url).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.took >= Duration::from_millis(400), "{:?}", a.took);
}
