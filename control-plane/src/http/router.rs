//! The router under construction: handlers are mounted on the rows of
//! [`super::ROUTES`], and the router is built once every row has one, with
//! authentication and the row's role in front of every handler.

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{MethodFilter, MethodRouter, on},
};

use std::sync::Arc;

use super::routes::{ROUTES, SessionAuth, lookup};
use crate::tokens::Tokens;

/// The routes being mounted; [`Routes::router`] builds the router once
/// every row of [`ROUTES`] has its handler.
pub struct Routes {
    tokens: Tokens,
    sessions: Option<Arc<dyn SessionAuth>>,
    router: Router,
    mounted: Vec<(&'static str, &'static str)>,
}

// === impl Routes ===

impl Routes {
    pub fn new(tokens: Tokens) -> Self {
        Routes {
            tokens,
            sessions: None,
            router: Router::new(),
            mounted: Vec::new(),
        }
    }

    /// Mounts `handler` (its state applied) for `method` on `path`.
    /// Panics when [`ROUTES`] has no row for it: a route without a role is
    /// a programming error that the router's first build shows.
    pub fn add(&mut self, method: &'static str, path: &'static str, handler: MethodRouter) {
        assert!(
            lookup(method, path).is_some(),
            "{method} {path} has no row in http::ROUTES"
        );
        assert!(
            !self.mounted.contains(&(method, path)),
            "{method} {path} mounted twice"
        );
        let filter = MethodFilter::try_from(
            http::Method::from_bytes(method.as_bytes()).expect("a valid method"),
        )
        .expect("a method axum routes");
        let router = std::mem::take(&mut self.router);
        self.router = router.route(path, on(filter, handler));
        self.mounted.push((method, path));
    }

    /// Resolves the session cookie of [`super::Credential::Session`] routes.
    pub fn sessions(&mut self, sessions: Arc<dyn SessionAuth>) {
        self.sessions = Some(sessions);
    }

    /// What was mounted, as (method, path).
    pub fn mounted(&self) -> &[(&'static str, &'static str)] {
        &self.mounted
    }

    /// The router: authentication and the route's row in front of every
    /// handler, bodies over `max_body_bytes` refused with 413, anything
    /// else 404. Panics when a row of [`ROUTES`] has no handler (the
    /// dashboard checks [`super::UI_ROUTES`] where it mounts them).
    pub fn router(self, max_body_bytes: usize) -> Router {
        for r in ROUTES {
            assert!(
                self.mounted.contains(&(r.method, r.path)),
                "http::ROUTES row {} {} has no handler",
                r.method,
                r.path
            );
        }
        super::guarded(self.router, self.tokens, self.sessions)
            .fallback(super::error::no_route)
            .layer(DefaultBodyLimit::max(max_body_bytes))
            .layer(axum::Extension(super::json::BodyLimit(max_body_bytes)))
    }
}
