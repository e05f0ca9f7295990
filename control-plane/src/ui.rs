//! The dashboard: a read-only web view of the mesh at `/ui/` on the HTTP
//! listener (`crate::http`), behind the same tokens (role read or more).
//!
//! The login form takes a token once; the browser then holds only an
//! opaque session id in a cookie (`session`). One page (`assets/`: plain
//! HTML, CSS and JavaScript embedded in the binary, no build step, no
//! CDN) renders the topology graph, services and instances, sidecars'
//! proxy status, traffic policies, authorization rules and recent health
//! transitions from JSON snapshots (`snapshot`) pushed over one
//! Server-Sent Events stream (`sse`).
//!
//! Nothing here writes: every route is a GET but the login and logout
//! forms, which change only the caller's own session; a forged
//! cross-site request can therefore change nothing of the mesh, and the
//! cookie is `SameSite=Strict` besides. The login form also refuses a
//! POST whose `Origin` is another site's.
//!
//! # Layout
//! - `session`: session ids -> principals, idle and token expiry, cookie.
//! - `sse`: event framing, the streams' bounds and their wait.
//! - `snapshot`: the JSON document the page renders.
//! - `transitions`: the ring of recent health transitions.
//! - `pages`: the handlers, mounted on [`crate::http::UI_ROUTES`].

mod pages;
mod session;
mod snapshot;
mod sse;
mod transitions;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::Request,
    response::{IntoResponse as _, Redirect, Response},
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    auth::Principal,
    authz::Authz,
    config::UiArgs,
    http::{Routes, SessionAuth},
    policy::Policies,
    proxies::Proxies,
    registry::Registry,
    tokens::Tokens,
    traffic::Traffic,
};

/// How long a built snapshot is shared by every open page.
pub const SNAPSHOT_TTL: Duration = Duration::from_millis(250);

/// What the dashboard reads.
pub struct Views {
    pub registry: Registry,
    pub proxies: Proxies,
    pub policies: Policies,
    pub authz: Authz,
    pub traffic: Traffic,
    pub tokens: Tokens,
}

#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

struct Inner {
    views: Views,
    /// The last snapshot and when it was built: however many pages are
    /// open, it is built at most once per [`SNAPSHOT_TTL`].
    cache: Mutex<Option<(Instant, Arc<str>)>>,
    sessions: session::Sessions,
    streams: sse::Streams,
    transitions: transitions::Transitions,
    shutdown: watch::Receiver<bool>,
}

// === impl Dashboard ===

impl Dashboard {
    /// The dashboard over `views`, and the task that records health
    /// transitions (until `shutdown`).
    pub fn start(
        views: Views,
        args: &UiArgs,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (transitions, task) =
            transitions::Transitions::spawn(views.registry.clone(), shutdown.clone());
        let sessions = session::Sessions::new(
            views.tokens.clone(),
            args.ui_session_idle,
            args.ui_max_sessions,
        );
        let dashboard = Dashboard {
            inner: Arc::new(Inner {
                views,
                cache: Mutex::new(None),
                sessions,
                streams: sse::Streams::new(args.ui_max_streams, args.ui_max_streams_per_session),
                transitions,
                shutdown,
            }),
        };
        (dashboard, task)
    }

    /// Mounts every route of [`crate::http::UI_ROUTES`] and the session
    /// cookie's resolver on `routes`.
    pub fn mount(&self, routes: &mut Routes) {
        routes.sessions(Arc::new(self.clone()));
        pages::mount(routes, self);
    }

    /// The snapshot as the page receives it (JSON), at most
    /// [`SNAPSHOT_TTL`] old.
    fn snapshot(&self) -> Arc<str> {
        let now = Instant::now();
        if let Some((at, json)) = &*self.inner.cache.lock().expect("snapshot cache lock")
            && now.duration_since(*at) < SNAPSHOT_TTL
        {
            return json.clone();
        }
        let json: Arc<str> = snapshot::build(
            &self.inner.views,
            &self.inner.transitions.recent(),
            crate::ca::unix_ms(),
        )
        .to_string()
        .into();
        *self.inner.cache.lock().expect("snapshot cache lock") = Some((now, json.clone()));
        json
    }
}

impl SessionAuth for Dashboard {
    /// A page without a session goes to the login form; anything else
    /// is refused 401.
    fn principal(&self, req: &Request) -> Result<Principal, Box<Response>> {
        session::cookie_id(req.headers())
            .and_then(|id| self.inner.sessions.resolve(id))
            .ok_or_else(|| {
                Box::new(if req.uri().path() == "/ui/" {
                    Redirect::to("/ui/login").into_response()
                } else {
                    (
                        http::StatusCode::UNAUTHORIZED,
                        "no dashboard session: log in at /ui/login",
                    )
                        .into_response()
                })
            })
    }
}

#[cfg(test)]
mod tests;
