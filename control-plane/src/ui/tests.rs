//! The dashboard's routes in process, behind the HTTP router's auth
//! middleware, over a real embedded store.

use std::{sync::Arc, time::Duration};

use axum::{Router, body::Body};
use http::{Request, StatusCode, header};
use http_body_util::BodyExt as _;
use isdp_proto::v1::Instance;
use tower::ServiceExt as _;

use super::*;
use crate::{
    api::{
        authorization::AuthorizationApi, policies::PoliciesApi, registry::RegistryApi,
        status::ProxyStatusApi, tokens::TokensApi,
    },
    http::UI_ROUTES,
    metrics::Metrics,
    store::embedded::EmbeddedStore,
    tokens::{Role, Scope},
};

struct Fixture {
    app: Router,
    registry: Registry,
    read: String,
    join: String,
    tokens: Tokens,
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
}

async fn fixture() -> Fixture {
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
    let read = tokens
        .create(Role::Read, Scope::default(), String::new(), None)
        .await
        .unwrap()
        .1;
    let join = tokens
        .create(
            Role::Join,
            Scope::services(vec!["web".into()]),
            String::new(),
            None,
        )
        .await
        .unwrap()
        .1;
    let views = Views {
        registry: registry.clone(),
        proxies: Proxies::default(),
        policies,
        authz,
        traffic: Traffic::default(),
        tokens: tokens.clone(),
    };
    let args = UiArgs {
        ui_session_idle: Duration::from_secs(600),
        ui_max_sessions: 16,
        ui_max_streams: 4,
        ui_max_streams_per_session: 1,
    };
    let services = crate::http::Services {
        registry_api: RegistryApi::new(registry.clone(), Metrics::new(), shutdown.clone()),
        policies_api: PoliciesApi::new(views.policies.clone(), shutdown.clone()),
        authorization_api: AuthorizationApi::new(views.authz.clone()),
        tokens_api: TokensApi::new(tokens.clone()),
        status_api: ProxyStatusApi::new(views.proxies.clone()),
        tokens: tokens.clone(),
        registry: registry.clone(),
    };
    let (api, _index) = crate::http::Api::start(
        services,
        "dc1".into(),
        Duration::from_secs(60),
        shutdown.clone(),
    );
    let (dashboard, _task) = Dashboard::start(views, &args, shutdown);
    // Mounted beside the API, as the server does.
    let mut routes = api.routes();
    let before = routes.mounted().len();
    dashboard.mount(&mut routes);
    let mut mounted: Vec<_> = routes.mounted()[before..].to_vec();
    mounted.sort();
    let mut table: Vec<_> = UI_ROUTES.iter().map(|r| (r.method, r.path)).collect();
    table.sort();
    assert_eq!(mounted, table, "every UI route mounted, and only those");
    let app = routes.router(4096);
    Fixture {
        app,
        registry,
        read,
        join,
        tokens,
        _dir: dir,
        _stop: stop,
    }
}

impl Fixture {
    async fn send(&self, req: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    async fn login(&self, token: &str) -> (StatusCode, http::HeaderMap, String) {
        let req = Request::post("/ui/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={}", token.replace('_', "%5F"))))
            .unwrap();
        self.send(req).await
    }

    async fn cookie(&self) -> String {
        let (status, headers, _) = self.login(&self.read).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(headers[header::LOCATION], "/ui/");
        let set = headers[header::SET_COOKIE].to_str().unwrap();
        set.split(';').next().unwrap().to_owned()
    }

    fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
        let mut req = Request::get(path);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        req.body(Body::empty()).unwrap()
    }
}

#[tokio::test]
async fn the_login_form_and_assets_are_public_and_the_page_is_not() {
    let f = fixture().await;
    let (status, headers, body) = f.send(Fixture::get("/ui/login", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("<form") && body.contains("name=\"token\""),
        "{body}"
    );
    assert!(
        headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let (status, _, body) = f.send(Fixture::get("/ui/assets/app.js", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("EventSource"));
    let (status, _, _) = f.send(Fixture::get("/ui/assets/nothing.js", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Without a session: the page goes to the form, the stream is refused.
    let (status, headers, _) = f.send(Fixture::get("/ui/", None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/ui/login");
    let bogus = format!("isdp_session={}", "a".repeat(64));
    let (status, _, _) = f.send(Fixture::get("/ui/events", Some(&bogus))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A bearer token is no session.
    let req = Request::get("/ui/")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.read))
        .body(Body::empty())
        .unwrap();
    assert_eq!(f.send(req).await.0, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_wrong_or_join_token_is_refused_with_a_reason() {
    let f = fixture().await;
    let (status, headers, body) = f.login("isdp_0123456789abcdef_wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.get(header::SET_COOKIE).is_none());
    assert!(
        body.contains("token refused: unknown or revoked token"),
        "{body}"
    );
    let (status, _, body) = f.login(&f.join).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("needs role read"), "{body}");
    let (status, _, body) = f.login("").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("enter a token"), "{body}");
    // What the form echoes is escaped.
    let (_, _, body) = f.login("<script>").await;
    assert!(!body.contains("<script>"), "{body}");
}

#[tokio::test]
async fn a_login_posted_from_another_site_is_refused() {
    let f = fixture().await;
    let req = Request::post("/ui/login")
        .header(header::HOST, "cp.example:15080")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::from(format!("token={}", f.read)))
        .unwrap();
    let (status, headers, _) = f.send(req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get(header::SET_COOKIE).is_none());
    let req = Request::post("/ui/login")
        .header(header::HOST, "cp.example:15080")
        .header(header::ORIGIN, "https://cp.example:15080")
        .body(Body::from(format!("token={}", f.read)))
        .unwrap();
    assert_eq!(f.send(req).await.0, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_session_reads_the_page_and_a_snapshot_until_logout() {
    let f = fixture().await;
    f.registry
        .register(Instance {
            id: "web-1".into(),
            service: "web".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            metadata: [("zone".to_owned(), "z1".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let cookie = f.cookie().await;
    let (status, _, body) = f.send(Fixture::get("/ui/", Some(&cookie))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("/ui/assets/app.js"));
    // The stream's first frame is the whole snapshot.
    let res = f
        .app
        .clone()
        .oneshot(Fixture::get("/ui/events", Some(&cookie)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let text = std::str::from_utf8(&frame).unwrap();
    let json = text
        .strip_prefix("event: snapshot\ndata: ")
        .and_then(|t| t.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("{text}"));
    let snap: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(snap["services"][0]["name"], "web");
    assert_eq!(snap["services"][0]["instances"][0]["id"], "web-1");
    assert_eq!(
        snap["services"][0]["instances"][0]["metadata"]["zone"],
        "z1"
    );
    assert_eq!(snap["authorization"]["default"], "ACTION_ALLOW");
    // One stream per session here: a second is refused while it is open.
    let (status, _, msg) = f.send(Fixture::get("/ui/events", Some(&cookie))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(msg.contains("--ui-max-streams-per-session"), "{msg}");
    // Logout ends the session, and the open stream with it.
    let req = Request::post("/ui/logout")
        .header(header::COOKIE, &cookie)
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = f.send(req).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the stream ends within a refresh")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(
        std::str::from_utf8(&frame)
            .unwrap()
            .starts_with("event: ended\n")
    );
    assert!(body.frame().await.is_none());
    let (status, _, _) = f.send(Fixture::get("/ui/", Some(&cookie))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_revoked_token_ends_its_sessions() {
    let f = fixture().await;
    let cookie = f.cookie().await;
    assert_eq!(
        f.send(Fixture::get("/ui/", Some(&cookie))).await.0,
        StatusCode::OK
    );
    let id = crate::tokens::id_of_secret(&f.read).unwrap().to_owned();
    f.tokens.revoke(&id).await.unwrap();
    assert_eq!(
        f.send(Fixture::get("/ui/", Some(&cookie))).await.0,
        StatusCode::SEE_OTHER
    );
}

#[test]
fn form_values_are_percent_decoded() {
    use pages::form_value;
    assert_eq!(
        form_value(b"a=1&token=isdp%5Fx+y", "token").as_deref(),
        Some("isdp_x y")
    );
    assert_eq!(form_value(b"token=%zz", "token"), None);
    assert_eq!(form_value(b"other=1", "token"), None);
    assert_eq!(
        pages::escape("<a href=\"x\">&'"),
        "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
    );
}
