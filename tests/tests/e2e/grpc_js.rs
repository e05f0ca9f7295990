//! Node's `@grpc/grpc-js-xds` as a proxyless client, a second xDS client
//! written by other hands than ISDP's (`tests/node/client.js`, run with
//! `node`). grpc-js can authenticate to no xDS server, so it reads through
//! a sidecar's xDS relay on loopback, under the sidecar's join token
//! (scoped to `--upstream echo`); the echo-grpc instances are registered
//! by the operator, so the client reaches them in plaintext.
//!
//! What grpc-js does with what the control plane sends: it spreads calls
//! over every instance, follows a deregistration, a `kill -9` and a new
//! instance while calling, and accepts (ACKs, and keeps calling under)
//! every policy feature the translation writes. Instances behind a
//! sidecar it reaches over mTLS once its bootstrap has the `isdp`
//! certificate provider; without it, it NACKs their cluster. Priorities
//! reach it without gaps, and it fails over to a standby priority.

use std::time::Duration;

use isdp_control_plane::publish::standard::CLUSTER;
use isdp_tests::node::bootstrap;
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, Counts, CreatedToken, EchoGrpc, EchoHttp, NodeClient, NodeRun,
    Sidecar, SidecarToml, eventually, status_of,
};

const SERVICE: &str = "echo";
/// The control plane's default trust domain.
const TRUST_DOMAIN: &str = "isdp.local";
/// Setting up: processes starting, instances turning healthy.
const SETUP: Duration = Duration::from_secs(30);
/// The bound for a change to reach a calling grpc-js client through the
/// relay (a deregistration, a new instance) or for it to give up a dead
/// one: about a second on an idle machine, generous for a loaded 2-core
/// one.
const FOLLOW: Duration = Duration::from_secs(10);
/// How long a state must then hold.
const HOLD: Duration = Duration::from_secs(3);
/// The client's report window.
const WINDOW: Duration = Duration::from_millis(250);
/// A continuous client's run: longer than any test takes.
const RUN: Duration = Duration::from_secs(300);

// === The mesh ===

/// A control plane, echo-grpc instances `echo-1`... registered by the
/// operator with a gRPC health check, and a sidecar relaying xDS under a
/// join token for `web` that reads `echo` only.
struct Mesh {
    cp: ControlPlane,
    /// The sidecar's join token (web, reading echo).
    token: CreatedToken,
    echoes: Vec<EchoGrpc>,
    sidecar: Sidecar,
}

impl Mesh {
    /// `labels(n)` is instance `n`'s metadata (`--meta` values).
    async fn start(instances: usize, labels: impl Fn(usize) -> Vec<String>) -> Self {
        isdp_tests::node::require();
        let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
        let token = cp
            .create_token(&["--role", "join", "--service", "web", "--upstream", SERVICE])
            .await;
        let sidecar = SidecarToml::new("web", &cp.grpc_url())
            .join_token(&token.secret)
            .xds_relay("127.0.0.1:0", None)
            .start()
            .await;
        let mut mesh = Self {
            cp,
            token,
            echoes: Vec::new(),
            sidecar,
        };
        for n in 1..=instances {
            mesh.add(n, &labels(n)).await;
        }
        mesh
    }

    /// Starts `echo-N`, registers it and waits until it is healthy.
    async fn add(&mut self, n: usize, labels: &[String]) {
        let flags: Vec<String> = labels
            .iter()
            .flat_map(|l| ["--meta".to_owned(), l.clone()])
            .collect();
        self.add_with(n, None, &flags).await;
    }

    /// As [`Mesh::add`], with `flags` for `isdpctl register`, and checked
    /// at `check` when given rather than at its own health service.
    async fn add_with(&mut self, n: usize, check: Option<String>, flags: &[String]) {
        let id = format!("echo-{n}");
        let echo = EchoGrpc::start(&id).await;
        let check = check.unwrap_or_else(|| echo.health_target());
        let mut args = vec!["--id", &id, "--check", &check, "--interval", "500ms"];
        args.extend(flags.iter().map(String::as_str));
        self.cp
            .register(SERVICE, "127.0.0.1", echo.port(), &args)
            .await;
        self.echoes.push(echo);
        eventually(SETUP, &format!("{id} healthy"), || async {
            let list = self.cp.instances(SERVICE).await?;
            anyhow::ensure!(status_of(&list, &id)? == "healthy", "{list:?}");
            Ok(())
        })
        .await;
    }

    /// The bootstrap of a grpc-js client of the relay.
    fn bootstrap(&self, node_id: &str) -> serde_json::Value {
        bootstrap(self.sidecar.relay_addr(), node_id)
    }

    /// The `proxy-status` entry of `node_id`, if its stream is open.
    async fn proxy_status(&self, node_id: &str) -> Option<serde_json::Value> {
        let out = self.cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
        let all: serde_json::Value = serde_json::from_str(&out).expect("proxy-status JSON");
        all.as_array()?
            .iter()
            .find(|p| p["node_id"] == node_id)
            .cloned()
    }

    /// Waits until `node_id` has ACKed the four standard types, under the
    /// sidecar's principal; then asserts it NACKed nothing.
    async fn acked_everything(&self, node_id: &str) {
        eventually(
            FOLLOW,
            &format!("{node_id}'s ACKs in proxy-status"),
            || async {
                let p = self
                    .proxy_status(node_id)
                    .await
                    .ok_or_else(|| anyhow::anyhow!("{node_id} not listed"))?;
                anyhow::ensure!(p["principal"] == self.token.id.as_str(), "{p}");
                let types = p["types"].as_array().cloned().unwrap_or_default();
                anyhow::ensure!(types.len() == 4, "four types: {p}");
                for t in &types {
                    anyhow::ensure!(t["acks"].as_u64() >= Some(1), "{p}");
                }
                Ok(())
            },
        )
        .await;
        assert_no_nacks(
            &self
                .proxy_status(node_id)
                .await
                .expect("the client's stream is still open"),
        );
    }
}

fn assert_no_nacks(entry: &serde_json::Value) {
    for t in entry["types"].as_array().into_iter().flatten() {
        assert!(
            t["nacks"] == 0 && t["last_nack"] == "",
            "grpc-js rejected {}: {}",
            t["type_url"],
            t["last_nack"]
        );
    }
}

/// The calls of `c` all succeeded and went to `to` only (each at least
/// once).
fn answered_by(c: &Counts, to: &[&str]) -> anyhow::Result<()> {
    anyhow::ensure!(c.calls > 0, "no calls finished");
    anyhow::ensure!(c.failed() == 0, "calls failed: {:?}", c.errors);
    for id in to {
        anyhow::ensure!(c.of(id) > 0, "{id} answered none: {:?}", c.instances);
    }
    for id in c.instances.keys() {
        anyhow::ensure!(
            to.contains(&id.as_str()),
            "{id} answered: {:?}",
            c.instances
        );
    }
    Ok(())
}

// === Tests ===

/// 600 calls at concurrency 8 through `xds:///echo` reach all three
/// instances, each a fair share (round robin: about a third; at least a
/// sixth is asked), and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_js_spreads_calls_over_every_instance() {
    let m = Mesh::start(3, |_| Vec::new()).await;
    const CALLS: u64 = 600;
    let counts = NodeClient::calls(
        &m.bootstrap("grpc-js-spread"),
        &NodeRun::new(SERVICE).concurrency(8),
        CALLS,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(counts.calls, CALLS, "{counts:?}");
    assert_eq!(counts.failed(), 0, "{counts:?}");
    assert_eq!(counts.instances.len(), 3, "{counts:?}");
    for id in ["echo-1", "echo-2", "echo-3"] {
        assert!(counts.of(id) >= CALLS / 6, "{id}: {counts:?}");
    }
}

/// While a grpc-js client calls without pause: a deregistered instance
/// (still running) stops receiving calls within [`FOLLOW`]; after a
/// `kill -9` of another, calls succeed again, on the survivor only,
/// within [`FOLLOW`]; a new instance receives calls within [`FOLLOW`].
/// Each state then holds for [`HOLD`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_js_follows_instances_leaving_dying_and_joining() {
    let mut m = Mesh::start(3, |_| Vec::new()).await;
    let mut client = NodeClient::start(
        &m.bootstrap("grpc-js-failover"),
        &NodeRun::new(SERVICE).concurrency(4),
        RUN,
        WINDOW,
    );
    client
        .until_window(SETUP, "calls on all three instances", |c| {
            answered_by(c, &["echo-1", "echo-2", "echo-3"])
        })
        .await;
    m.acked_everything("grpc-js-failover").await;

    // Deregistered, still running: only the client's view can stop it.
    m.cp.ctl_ok(&["deregister", "echo-1"]).await;
    let left = client
        .until_window(FOLLOW, "echo-1 (deregistered) to get no calls", |c| {
            answered_by(c, &["echo-2", "echo-3"])
        })
        .await;
    client
        .every_window_for(HOLD, "echo-1 getting no calls", |c| {
            answered_by(c, &["echo-2", "echo-3"])
        })
        .await;

    // Killed: calls in flight on it fail; then every call succeeds on
    // the one left.
    m.echoes[1].kill9().await;
    let mark = client.mark();
    let recovered = client
        .until_window(FOLLOW, "calls to succeed without echo-2 (killed)", |c| {
            answered_by(c, &["echo-3"])
        })
        .await;
    client
        .every_window_for(HOLD, "calls succeeding on echo-3 only", |c| {
            answered_by(c, &["echo-3"])
        })
        .await;
    let failed: u64 = client
        .windows_since(mark)
        .iter()
        .map(|w| w.counts.failed())
        .sum();

    // A new instance takes its share.
    m.add(4, &[]).await;
    let joined = client
        .until_window(FOLLOW, "echo-4 (new) to get calls", |c| {
            answered_by(c, &["echo-3", "echo-4"])
        })
        .await;
    client
        .every_window_for(HOLD, "echo-3 and echo-4 sharing the calls", |c| {
            answered_by(c, &["echo-3", "echo-4"])
        })
        .await;
    assert_no_nacks(
        &m.proxy_status("grpc-js-failover")
            .await
            .expect("the client's stream is still open"),
    );
    eprintln!(
        "grpc-js: a deregistered instance got no calls after {left:?}; calls all \
         succeeded again {recovered:?} after a kill -9 ({failed} failed meanwhile); \
         a new instance got calls {joined:?} after it was healthy"
    );
}

/// Instances at priorities 0 and 3 reach grpc-js as priorities 0 and 1
/// (it refuses gaps): it ACKs them and calls priority 0 only. When both
/// priority-0 instances fail their checks (they keep serving), 1 of 3
/// healthy is under the panic threshold, but the standby can carry the
/// calls: the primaries are sent UNHEALTHY rather than every endpoint
/// UNKNOWN, and the calls move to the standby, none failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_js_fails_over_by_priority() {
    let mut m = Mesh::start(0, |_| Vec::new()).await;
    // The primaries' check: an HTTP echo whose health the test turns off.
    let gate = EchoHttp::start("gate").await;
    let flags = |p: &str| vec!["--priority".to_owned(), p.to_owned()];
    for n in 1..=2 {
        m.add_with(n, Some(gate.health_url()), &flags("0")).await;
    }
    m.add_with(3, None, &flags("3")).await;
    let mut client = NodeClient::start(
        &m.bootstrap("grpc-js-priority"),
        &NodeRun::new(SERVICE).concurrency(4),
        RUN,
        WINDOW,
    );
    client
        .until_window(SETUP, "calls on the priority-0 instances", |c| {
            answered_by(c, &["echo-1", "echo-2"])
        })
        .await;
    m.acked_everything("grpc-js-priority").await;
    client
        .every_window_for(HOLD, "the standby getting no calls", |c| {
            answered_by(c, &["echo-1", "echo-2"])
        })
        .await;

    gate.fail_health().await;
    let moved = client
        .until_window(FOLLOW, "calls to move to the standby", |c| {
            answered_by(c, &["echo-3"])
        })
        .await;
    client
        .every_window_for(HOLD, "calls on the standby only", |c| {
            answered_by(c, &["echo-3"])
        })
        .await;
    assert_no_nacks(
        &m.proxy_status("grpc-js-priority")
            .await
            .expect("the client's stream is still open"),
    );
    eprintln!(
        "grpc-js: calls moved to the standby priority {moved:?} after the primaries' checks failed"
    );
}

/// Policy documents covering every feature the translation writes into
/// routes and clusters (balancers and hash keys, timeouts, retries of
/// every kind, breakers, outlier detection, fault injection, subsets,
/// splits and routes matching headers, methods and paths), each as JSON.
fn policies() -> Vec<serde_json::Value> {
    use serde_json::json;
    let mut docs = Vec::new();
    for algorithm in [
        "round_robin",
        "weighted_round_robin",
        "least_request",
        "peak_ewma",
        "random",
    ] {
        docs.push(json!({"load_balancer": {"algorithm": algorithm}}));
    }
    for algorithm in ["ring_hash", "maglev"] {
        for key in ["header:x-user", "cookie:session", "source_ip"] {
            docs.push(json!({"load_balancer": {"algorithm": algorithm, "hash_key": key}}));
        }
    }
    docs.extend([
        json!({"timeouts": {"request": "5s", "per_try": "1s", "idle": "60s"}}),
        json!({"retries": {
            "attempts": 2,
            "retry_on": ["connect-failure", "reset", "gateway-error", "5xx"],
            "backoff": {"base": "25ms", "max": "250ms"},
            "budget": {"ratio": 0.2, "min_per_second": 10},
        }}),
        json!({"timeouts": {"request": "5s", "per_try": "1s"}, "retries": {
            "attempts": 10,
            "retry_on": ["retriable-grpc-codes"],
            "grpc_codes": ["cancelled", "unknown", "deadline-exceeded", "resource-exhausted",
                           "aborted", "internal", "unavailable"],
            "backoff": {"base": "25ms"},
        }}),
        // Only codes gRPC cannot retry on: an empty condition list.
        json!({"retries": {
            "attempts": 1, "retry_on": ["retriable-grpc-codes"], "grpc_codes": ["unknown", "aborted"],
        }}),
        json!({"retries": {
            "attempts": 3, "retry_on": ["retriable-status-codes"], "status_codes": [503],
            "methods": ["GET"], "buffer": 1024, "backoff": {"max": "250ms"},
        }}),
        json!({"circuit_breaker": {
            "max_connections": 1024, "max_pending_requests": 256, "max_requests": 1024,
        }}),
        json!({"outlier_detection": {
            "consecutive_5xx": 5, "interval": "1s", "base_ejection_time": "30s",
            "max_ejection_percent": 50,
        }}),
        json!({"outlier_detection": {"consecutive_gateway_errors": 3}}),
        json!({"fault": {
            "delay": {"percent": 10, "duration": "1ms"}, "abort": {"percent": 1, "status": 503},
        }}),
        json!({
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
            "split": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
            "routes": [
                {"name": "by-method", "match": {"method": "POST"},
                 "split": [{"subset": "v2", "weight": 100}]},
                {"name": "by-header", "match": {"headers": {"x-canary": "true"}},
                 "split": [{"subset": "v1", "weight": 0}, {"subset": "v2", "weight": 100}],
                 "retries": {"attempts": 1, "retry_on": ["reset"]}},
                {"name": "by-path", "match": {"path_prefix": "/isdp.examples.echo.v1.Echo/"},
                 "timeouts": {"request": "2s"}},
            ],
        }),
    ]);
    docs
}

/// A running grpc-js client is sent each policy of [`policies`] in turn:
/// it ACKs every one (nothing in `proxy-status` shows a NACK) and its
/// calls keep succeeding under each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_js_accepts_every_policy_feature() {
    let m = Mesh::start(3, |n| {
        let version = if n == 3 { "v2" } else { "v1" };
        vec![format!("version={version}"), format!("zone=z{n}")]
    })
    .await;
    const NODE: &str = "grpc-js-policies";
    let mut client = NodeClient::start(
        &m.bootstrap(NODE),
        &NodeRun::new(SERVICE).concurrency(2),
        RUN,
        WINDOW,
    );
    client
        .until_window(SETUP, "calls on all three instances", |c| {
            answered_by(c, &["echo-1", "echo-2", "echo-3"])
        })
        .await;
    m.acked_everything(NODE).await;

    let dir = tempfile::tempdir().expect("a temp dir");
    for (i, mut doc) in policies().into_iter().enumerate() {
        doc["service"] = SERVICE.into();
        // A connect timeout of its own makes every document change the
        // cluster, so each is a new version the client must take.
        let timeouts = &mut doc["timeouts"];
        if timeouts.is_null() {
            *timeouts = serde_json::json!({});
        }
        timeouts["connect"] = format!("{}ms", 100 + i).into();
        let path = dir.path().join(format!("policy-{i}.json"));
        std::fs::write(&path, doc.to_string()).expect("writing the policy");
        let before = acked(&m.proxy_status(NODE).await.expect("the client is listed"));
        m.cp.ctl_ok(&["policy", "apply", "-f", &path.display().to_string()])
            .await;
        eventually(FOLLOW, &format!("grpc-js's answer to {doc}"), || async {
            let p = m.proxy_status(NODE).await.expect("the client is listed");
            let nacked = p["types"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["nacks"] != 0);
            anyhow::ensure!(nacked || acked(&p) != before, "no new version acked: {p}");
            Ok(())
        })
        .await;
        let p = m.proxy_status(NODE).await.expect("the client is listed");
        assert_no_nacks(&p);
        client
            .until_window(FOLLOW, &format!("calls succeeding under {doc}"), |c| {
                anyhow::ensure!(c.calls > 0 && c.failed() == 0, "{c:?}");
                Ok(())
            })
            .await;
    }
}

/// The versions each type has acknowledged, from a `proxy-status` entry.
fn acked(entry: &serde_json::Value) -> Vec<String> {
    entry["types"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t["acked"].to_string())
        .collect()
}

/// Instances behind a sidecar are reached over mTLS (gRFC A29), with the
/// certificates of the bootstrap's `isdp` certificate provider. A relay
/// client whose bootstrap has no such provider cannot take that cluster:
/// grpc-js NACKs it naming the provider, `proxy-status` shows the NACK,
/// and its calls fail. With the files `isdpctl bootstrap grpc` writes as
/// the provider and xDS credentials, every call succeeds over mTLS (the
/// target's bare name or the sidecar's server name as SNI); with plaintext credentials none does
/// (the sidecar takes only TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_js_reaches_sidecar_instances_over_mtls_with_the_isdp_certificate_provider() {
    let m = Mesh::start(0, |_| Vec::new()).await;
    let backend = EchoGrpc::start("echo-meshed").await;
    let token =
        m.cp.create_token(&["--role", "join", "--service", SERVICE])
            .await;
    let _echo_sidecar = SidecarToml::new("echo-side", &m.cp.grpc_url())
        .join_token(&token.secret)
        .raw(&format!(
            "[[service]]\nname = \"{SERVICE}\"\nport = {}\nprotocol = \"grpc\"\n\
             check = \"{}\"\ninterval = \"500ms\"",
            backend.port(),
            backend.health_target()
        ))
        .start()
        .await;
    eventually(SETUP, "echo-side.echo healthy", || async {
        let list = m.cp.instances(SERVICE).await?;
        anyhow::ensure!(status_of(&list, "echo-side.echo")? == "healthy", "{list:?}");
        Ok(())
    })
    .await;

    // No certificate provider: the cluster is refused.
    const BARE: &str = "grpc-js-no-provider";
    let mut client = NodeClient::start(&m.bootstrap(BARE), &NodeRun::new(SERVICE), RUN, WINDOW);
    eventually(FOLLOW, "grpc-js's NACK of the mTLS cluster", || async {
        let p = m
            .proxy_status(BARE)
            .await
            .ok_or_else(|| anyhow::anyhow!("{BARE} not listed"))?;
        let cluster = p["types"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["type_url"] == CLUSTER)
            .ok_or_else(|| anyhow::anyhow!("no Cluster entry: {p}"))?;
        anyhow::ensure!(cluster["nacks"].as_u64() >= Some(1), "{p}");
        let nack = cluster["last_nack"].as_str().unwrap_or_default();
        anyhow::ensure!(
            nack.contains(
                "Unmatched UpstreamTlsContext.tls_certificate_provider_instance.instance_name: isdp"
            ),
            "{nack}"
        );
        Ok(())
    })
    .await;
    client
        .until_window(FOLLOW, "the calls to fail", |c| {
            anyhow::ensure!(c.calls > 0 && c.failed() == c.calls, "{c:?}");
            Ok(())
        })
        .await;
    drop(client);

    // The files `isdpctl bootstrap grpc` writes, as the provider.
    let dir = tempfile::tempdir().expect("a temp dir");
    let out = dir.path().join("web");
    m.cp.ctl_ok(&[
        "bootstrap",
        "grpc",
        "--service",
        "web",
        "--join-token",
        &m.token.secret,
        "--out",
        &out.display().to_string(),
    ])
    .await;
    let written: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("bootstrap.json")).expect("reading bootstrap.json"),
    )
    .expect("bootstrap.json is JSON");
    let mut bootstrap = m.bootstrap("grpc-js-mtls");
    bootstrap["certificate_providers"] = written["certificate_providers"].clone();

    // grpc-js sends the target's bare name as SNI, which the sidecar takes
    // as well as its own `<service>.svc.<trust-domain>`.
    let server_name = isdp_core::names::server_name(TRUST_DOMAIN, SERVICE);
    for run in [
        NodeRun::new(SERVICE).mtls(),
        NodeRun::new(SERVICE).mtls().server_name(&server_name),
    ] {
        let counts = NodeClient::calls(&bootstrap, &run, 40, Duration::from_secs(60)).await;
        assert_eq!(counts.of("echo-meshed"), 40, "{counts:?}");
        assert_eq!(counts.failed(), 0, "{counts:?}");
    }

    let counts = NodeClient::calls(
        &bootstrap,
        &NodeRun::new(SERVICE),
        4,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(counts.errors.get("UNAVAILABLE"), Some(&4), "{counts:?}");
}
