//! The dashboard's handlers: the login form, logout, the page, its static
//! assets (embedded in the binary) and the live-update stream.

use std::convert::Infallible;

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::time::Instant;

use super::{Dashboard, session, sse};
use crate::http::{Routes, UI_ROUTES};

const LOGIN_HTML: &str = include_str!("assets/login.html");
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Scripts and styles only from this origin (no inline code), no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn mount(routes: &mut Routes, d: &Dashboard) {
    routes.add("GET", "/ui/login", get(login_page));
    routes.add("POST", "/ui/login", post(login).with_state(d.clone()));
    routes.add("POST", "/ui/logout", post(logout).with_state(d.clone()));
    routes.add("GET", "/ui/assets/{file}", get(asset));
    routes.add("GET", "/ui/", get(index));
    routes.add("GET", "/ui/events", get(events).with_state(d.clone()));
    debug_assert!(
        UI_ROUTES
            .iter()
            .all(|r| routes.mounted().contains(&(r.method, r.path)))
    );
}

/// A page with the dashboard's security headers.
fn page(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut res = (status, body.into()).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}

fn login_form(status: StatusCode, message: &str) -> Response {
    let body = LOGIN_HTML.replace("{{message}}", &escape(message));
    page(status, "text/html; charset=utf-8", body)
}

async fn login_page() -> Response {
    login_form(StatusCode::OK, "")
}

/// `token=<secret>` from the form: a session and its cookie, then the
/// page; or the form again, 401, saying why.
async fn login(
    State(d): State<Dashboard>,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !same_origin(&headers, &uri) {
        return login_form(
            StatusCode::FORBIDDEN,
            "login refused: the form was posted from another site",
        );
    }
    let Some(secret) = form_value(&body, "token").filter(|t| !t.trim().is_empty()) else {
        return login_form(StatusCode::UNAUTHORIZED, "enter a token");
    };
    match d.inner.sessions.login(&secret) {
        Ok(id) => with_cookie(
            Redirect::to("/ui/").into_response(),
            &session::set_cookie(&id),
        ),
        Err(e) => login_form(StatusCode::UNAUTHORIZED, &e.to_string()),
    }
}

async fn logout(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(id) = session::cookie_id(&headers) {
        d.inner.sessions.logout(id);
    }
    with_cookie(
        Redirect::to("/ui/login").into_response(),
        &session::clear_cookie(),
    )
}

fn with_cookie(mut res: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

async fn index() -> Response {
    page(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "app.js" => page(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        "app.css" => page(StatusCode::OK, "text/css; charset=utf-8", APP_CSS),
        _ => page(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "no such asset",
        ),
    }
}

/// The live-update stream: a snapshot now, then whenever it changes.
async fn events(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    // The auth middleware resolved the cookie already.
    let Some(id) = session::cookie_id(&headers).map(str::to_owned) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let permit = match d.inner.streams.acquire(&id) {
        Ok(p) => p,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let changes = d.inner.views.registry.subscribe();
    let state = Stream {
        d,
        id,
        _permit: permit,
        changes,
        last: None,
        last_sent: Instant::now(),
        ended: false,
    };
    let body = futures::stream::unfold(state, |mut s| async move {
        let frame = s.next().await?;
        Some((Ok::<_, Infallible>(frame), s))
    });
    let mut res = page(StatusCode::OK, "text/event-stream", Body::from_stream(body));
    res.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// One open stream's state.
struct Stream {
    d: Dashboard,
    id: String,
    _permit: sse::Permit,
    changes: tokio::sync::broadcast::Receiver<crate::registry::Change>,
    /// The last snapshot sent.
    last: Option<std::sync::Arc<str>>,
    last_sent: Instant,
    ended: bool,
}

impl Stream {
    /// The next frame, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Bytes> {
        if self.ended {
            return None;
        }
        let mut shutdown = self.d.inner.shutdown.clone();
        loop {
            if self.d.inner.sessions.resolve(&self.id).is_none() {
                self.ended = true;
                return Some(sse::frame("ended", "\"session ended\""));
            }
            if self.last.is_some() {
                let outcome = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return None,
                    o = sse::wait(&mut self.changes, self.last_sent) => o,
                };
                match outcome {
                    sse::WaitOutcome::Closed => return None,
                    sse::WaitOutcome::Keepalive => {
                        self.last_sent = Instant::now();
                        return Some(sse::keepalive());
                    }
                    sse::WaitOutcome::Look => {}
                }
            }
            let json = self.d.snapshot();
            if self.last.as_deref() != Some(&*json) {
                let frame = sse::frame("snapshot", &json);
                self.last = Some(json);
                self.last_sent = Instant::now();
                return Some(frame);
            }
        }
    }
}

/// Whether the request's `Origin` (when sent) is this listener's: its
/// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
fn same_origin(headers: &HeaderMap, uri: &http::Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    match (origin.to_str(), host) {
        (Ok(origin), Some(host)) => origin.strip_prefix("https://") == Some(host),
        _ => false,
    }
}

/// The first value of `name` in an `application/x-www-form-urlencoded`
/// body.
pub fn form_value(body: &[u8], name: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
