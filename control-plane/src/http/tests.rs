//! The router in process, over a real embedded store: the route table
//! against the mounted routes and the gRPC table, refusals, limits, and
//! blocking reads.

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body};
use http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use super::*;
use crate::{
    api::{
        authorization::AuthorizationApi, policies::PoliciesApi, registry::RegistryApi,
        status::ProxyStatusApi, tokens::TokensApi,
    },
    auth::Need,
    authz::Authz,
    metrics::Metrics,
    policy::Policies,
    proxies::Proxies,
    store::embedded::EmbeddedStore,
    tokens::{Role, Scope},
};

const LIMIT: usize = 4096;

/// `--max-streams-per-principal` for blocking reads.
const MAX_WAITS: usize = 2;

struct Fixture {
    app: Router,
    admin: String,
    read: String,
    join: String,
    /// A join token for web that may discover db only.
    scoped: String,
    registry: Registry,
    tokens: crate::tokens::Tokens,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

async fn fixture() -> (Fixture, Routes) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn crate::store::Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let (stop, shutdown) = watch::channel(false);
    let registry = Registry::start(store.clone(), "", shutdown.clone())
        .await
        .unwrap();
    let tokens = Tokens::load(store.clone(), "", Duration::from_secs(86400))
        .await
        .unwrap();
    let authz = Authz::start(store.clone(), "", shutdown.clone())
        .await
        .unwrap();
    let policies = Policies::start(store.clone(), "", registry.clone(), shutdown.clone())
        .await
        .unwrap();
    let mint = |role, services: Vec<String>, upstreams: Vec<String>| {
        let tokens = tokens.clone();
        async move {
            let scope = Scope {
                services,
                upstreams,
            };
            tokens
                .create(role, scope, String::new(), None)
                .await
                .unwrap()
                .1
        }
    };
    let admin = mint(Role::Admin, vec![], vec![]).await;
    let read = mint(Role::Read, vec![], vec![]).await;
    let join = mint(Role::Join, vec!["web".into()], vec![]).await;
    let scoped = mint(Role::Join, vec!["web".into()], vec!["db".into()]).await;
    let services = Services {
        registry_api: RegistryApi::new(registry.clone(), Metrics::new(), shutdown.clone()),
        policies_api: PoliciesApi::new(policies, shutdown.clone()),
        authorization_api: AuthorizationApi::new(authz),
        tokens_api: TokensApi::new(tokens.clone()),
        status_api: ProxyStatusApi::new(Proxies::default()),
        tokens: tokens.clone(),
        registry: registry.clone(),
    };
    let (api, _task) = Api::start(services, "dc1".into(), Duration::from_secs(60), shutdown);
    let api = api.max_waits_per_principal(MAX_WAITS);
    let routes = api.routes();
    let app = api.routes().router(LIMIT);
    let f = Fixture {
        app,
        admin,
        read,
        join,
        scoped,
        registry,
        tokens,
        _dir: dir,
        _stop: stop,
    };
    (f, routes)
}

impl Fixture {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let res = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }
}

/// A concrete path for a route's pattern.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn the_router_serves_exactly_the_table_with_the_grpc_roles() {
    let (_f, routes) = fixture().await;
    let mut mounted: Vec<_> = routes.mounted().to_vec();
    mounted.sort();
    let mut table: Vec<_> = ROUTES.iter().map(|r| (r.method, r.path)).collect();
    table.sort();
    assert_eq!(mounted, table, "mounted routes and http::ROUTES differ");
    for r in ROUTES {
        if let Some(grpc) = r.grpc {
            assert_eq!(
                crate::auth::lookup(grpc),
                Some(r.need),
                "{} {} needs what {grpc} needs",
                r.method,
                r.path
            );
        }
    }
}

#[tokio::test]
async fn every_route_authenticates_and_checks_its_role() {
    let (f, _) = fixture().await;
    for r in ROUTES {
        let path = concrete(r.path);
        let (status, headers, body) = f.call(r.method, &path, None, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{} {path}", r.method);
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert!(body["message"].as_str().unwrap().contains("bearer token"));
        let (status, _, body) = f.call(r.method, &path, Some("isdp_0000_nope"), "").await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{} {path}: {body}",
            r.method
        );
        let (status, _, body) = f.call(r.method, &path, Some(&f.join), "").await;
        match r.need {
            Need::Role(want) => {
                assert_eq!(status, StatusCode::FORBIDDEN, "{} {path}", r.method);
                let msg = body["message"].as_str().unwrap();
                assert!(msg.contains(want.name()) && msg.contains("join"), "{msg}");
            }
            Need::JoinOr(_) => assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::NOT_FOUND
                    || r.path.contains('{'),
                "{} {path}: {status}",
                r.method
            ),
        }
    }
    let (status, _, body) = f.call("GET", "/v1/nothing", Some(&f.admin), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["message"].as_str().unwrap().contains("/v1/nothing"));
    let (status, _, _) = f.call("PATCH", "/v1/instances", Some(&f.admin), "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = f.call("POST", "/v1/tokens", Some(&f.read), "{}").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "tokens need admin");
}

#[tokio::test]
async fn bad_bodies_are_refused_naming_the_field_and_change_nothing() {
    let (f, _) = fixture().await;
    let big = format!(r#"{{"service": "web", "id": "{}"}}"#, "a".repeat(LIMIT));
    let (status, _, body) = f.call("POST", "/v1/instances", Some(&f.admin), &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&LIMIT.to_string())
    );
    let unknown = r#"{"service": "web", "address": "10.0.0.1", "port": 80, "colour": "red"}"#;
    let (status, _, body) = f
        .call("POST", "/v1/instances", Some(&f.admin), unknown)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().contains("colour"),
        "{body}"
    );
    // The registry's own validation text, as gRPC answers it.
    let bad_port = r#"{"service": "web", "address": "10.0.0.1", "port": 0}"#;
    let (status, _, body) = f
        .call("POST", "/v1/instances", Some(&f.admin), bad_port)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("port"), "{body}");
    let (_, _, list) = f.call("GET", "/v1/services", Some(&f.admin), "").await;
    assert_eq!(
        list["services"],
        serde_json::json!([]),
        "nothing was stored"
    );
}

/// `priority` rides ISDP's own JSON both ways; over the limit it is
/// refused naming the field and the limit, and nothing is stored.
#[tokio::test]
async fn the_priority_is_taken_and_bounded_in_json() {
    let (f, _) = fixture().await;
    let over = r#"{"service": "web", "address": "10.0.0.1", "port": 80, "priority": 8}"#;
    let (status, _, body) = f.call("POST", "/v1/instances", Some(&f.admin), over).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("instance.priority: must be 0..=7, got 8"),
        "{body}"
    );
    let (_, _, list) = f.call("GET", "/v1/services", Some(&f.admin), "").await;
    assert_eq!(list["services"], serde_json::json!([]), "nothing stored");

    let standby =
        r#"{"id": "web-dr", "service": "web", "address": "10.0.0.2", "port": 80, "priority": 2}"#;
    let (status, _, body) = f
        .call("POST", "/v1/instances", Some(&f.admin), standby)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["priority"], 2, "{body}");
    let (_, _, list) = f
        .call("GET", "/v1/services/web/instances", Some(&f.read), "")
        .await;
    assert_eq!(list["instances"][0]["priority"], 2, "{list}");
}

#[tokio::test]
async fn a_blocking_read_returns_soon_after_a_change() {
    let (f, _) = fixture().await;
    let path = "/v1/services/web/instances";
    let (status, headers, _) = f.call("GET", path, Some(&f.read), "").await;
    assert_eq!(status, StatusCode::OK);
    let index: u64 = headers["x-isdp-index"].to_str().unwrap().parse().unwrap();
    let waiting = {
        let app = f.app.clone();
        let read = f.read.clone();
        tokio::spawn(async move {
            let req = Request::get(format!("{path}?index={index}&wait=30s"))
                .header("authorization", format!("Bearer {read}"))
                .body(Body::empty())
                .unwrap();
            let res = app.oneshot(req).await.unwrap();
            let at = tokio::time::Instant::now();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            (
                at,
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "the read blocks while nothing changes"
    );
    let instance = r#"{"id": "web-1", "service": "web", "address": "10.0.0.1", "port": 80}"#;
    let (status, _, _) = f
        .call("POST", "/v1/instances", Some(&f.admin), instance)
        .await;
    let changed = tokio::time::Instant::now();
    assert_eq!(status, StatusCode::OK);
    let (at, body) = waiting.await.unwrap();
    assert!(
        at.duration_since(changed) < Duration::from_millis(100),
        "answered {:?} after the change",
        at.duration_since(changed)
    );
    assert_eq!(body["instances"][0]["id"], "web-1");
    let (status, _, body) = f
        .call("GET", &format!("{path}?wait=soon"), Some(&f.read), "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().starts_with("wait:"),
        "{body}"
    );
}

/// The Prometheus targets: one group per instance in service and id
/// order, `?passing` and `?service=` filters, and a join token's scope.
#[tokio::test]
async fn prometheus_targets_follow_the_registry_within_the_callers_scope() {
    let (f, _) = fixture().await;
    for (id, service, zone) in [
        ("web-2", "web", ""),
        ("web-1", "web", "z1"),
        ("api-1", "api", ""),
    ] {
        let mut i = isdp_proto::v1::Instance {
            id: id.into(),
            service: service.into(),
            address: "10.0.0.1".into(),
            port: 9100,
            ..Default::default()
        };
        if !zone.is_empty() {
            i.metadata.insert("zone".into(), zone.into());
        }
        f.registry.register(i).await.unwrap();
    }
    f.registry
        .set_status("web-2", isdp_proto::v1::HealthStatus::Unhealthy)
        .await
        .unwrap();
    let ids = |body: &serde_json::Value| -> Vec<String> {
        body.as_array()
            .unwrap()
            .iter()
            .map(|g| {
                g["labels"]["__meta_isdp_instance_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let path = "/v1/prometheus/targets";
    let (status, headers, all) = f.call("GET", path, Some(&f.read), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(ids(&all), ["api-1", "web-1", "web-2"]);
    assert_eq!(all[1]["targets"], serde_json::json!(["10.0.0.1:9100"]));
    assert_eq!(all[1]["labels"]["__meta_isdp_zone"], "z1");
    assert_eq!(all[2]["labels"]["__meta_isdp_health"], "critical");
    let (_, _, passing) = f
        .call("GET", &format!("{path}?passing"), Some(&f.read), "")
        .await;
    assert_eq!(ids(&passing), ["api-1", "web-1"]);
    let (_, _, web) = f
        .call("GET", &format!("{path}?service=web"), Some(&f.read), "")
        .await;
    assert_eq!(ids(&web), ["web-1", "web-2"]);
    // A join token for web (upstream db) reads web only, and is refused
    // api by name; one without upstreams reads everything.
    let (_, _, unscoped) = f.call("GET", path, Some(&f.join), "").await;
    assert_eq!(ids(&unscoped), ids(&all));
    let (status, _, scoped) = f.call("GET", path, Some(&f.scoped), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&scoped), ["web-1", "web-2"]);
    let (status, _, body) = f
        .call("GET", &format!("{path}?service=api"), Some(&f.scoped), "")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["message"].as_str().unwrap().contains("api"), "{body}");
    let (status, _, body) = f
        .call("GET", &format!("{path}?dc=dc1"), Some(&f.read), "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("dc: unknown parameter"),
        "{body}"
    );
}

/// A waiting blocking read counts against its principal's
/// `--max-streams-per-principal` (429 past it, others unaffected) and
/// ends with 401 as soon as its token is revoked.
#[tokio::test]
async fn blocking_reads_count_per_principal_and_end_with_their_token() {
    let (f, _) = fixture().await;
    let (token, secret) = f
        .tokens
        .create(Role::Read, Scope::default(), String::new(), None)
        .await
        .unwrap();
    let path = "/v1/services/web/instances";
    let (_, headers, _) = f.call("GET", path, Some(&secret), "").await;
    let index: u64 = headers["x-isdp-index"].to_str().unwrap().parse().unwrap();
    let waiting = format!("{path}?index={index}&wait=30s");
    let waiters: Vec<_> = (0..MAX_WAITS)
        .map(|_| {
            let (app, secret, uri) = (f.app.clone(), secret.clone(), waiting.clone());
            tokio::spawn(async move {
                let req = Request::get(uri)
                    .header("authorization", format!("Bearer {secret}"))
                    .body(Body::empty())
                    .unwrap();
                let res = app.oneshot(req).await.unwrap();
                let status = res.status();
                let bytes = res.into_body().collect().await.unwrap().to_bytes();
                (
                    status,
                    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
                )
            })
        })
        .collect();
    // The waiters take their places (a third read waits 30 s if not).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let over = tokio::time::timeout(
        Duration::from_secs(5),
        f.call("GET", &waiting, Some(&secret), ""),
    );
    let (status, _, body) = over.await.expect("answered at once");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("--max-streams-per-principal (2)"),
        "{message}"
    );
    let (status, _, _) = f
        .call(
            "GET",
            &format!("{path}?index={index}&wait=10ms"),
            Some(&f.read),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "another principal still reads");
    f.tokens.revoke(&token.id).await.unwrap();
    for w in waiters {
        let (status, body) = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("a revoked token's read ends at once")
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("revoked"),
            "{body}"
        );
    }
}
