//! The `Canonical` layer: an inbound request put in the form authorization
//! rules are written against, before they are asked (`authorize`); the
//! application is then handed that same form, so what was checked is what
//! it sees (Envoy's and Istio's choice too).
//!
//! - The method must be canonical ([`authz::is_canonical_method`]: no lower
//!   case), or the request is refused: `delete` must not pass a rule for
//!   `DELETE` and reach an application that reads it as one.
//! - The target must be a path: origin form (`/a/b?q`), or the absolute
//!   form of a proxy request (`http://host/a/b?q`; the next hop gets the
//!   path), or `*` with `OPTIONS` (which rules see as `*`, covered only by
//!   the prefix `/`). An authority (`CONNECT host:port`) is refused: the
//!   inbound side opens no tunnels for HTTP requests.
//! - The path is normalized ([`authz::path`]) and, when that changed it,
//!   rewritten in place; the query is not part of it and is kept byte for
//!   byte. An empty path (`http://host`, `?q`) is `/`. A path with no
//!   canonical form (`%2F`, `\`, `%zz`, `..;`, ...) is refused.
//!
//! Refusals are 400 with `x-isdp-error` `bad-method` or `bad-path`, and
//! logged like the authorization layer's refusals (they share its log
//! limiter). A request already canonical (the usual case) costs one pass
//! over its path and no allocation.

use std::{borrow::Cow, sync::Arc};

use http::{Method, Request, Response, Uri, uri::PathAndQuery};

use super::{authorize::Authorizer, caller};
use crate::authz;
use crate::proxy::svc::{Body, BoxFuture, Next, ProxyError, Step, answer, step_layer};
use isdp_core::path::{self, PathError};

/// Puts requests to local service `service` in canonical form, or refuses
/// them.
#[derive(Clone)]
pub struct CanonicalLayer {
    pub service: Arc<str>,
    pub authorizer: Authorizer,
}

step_layer!(CanonicalLayer => Canonical);

impl Step for CanonicalLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        if let Err(refusal) = canonicalize(&mut req) {
            let target = req.uri().to_string();
            let method = req.method().as_str();
            self.authorizer.malformed(
                &self.service,
                caller(&req),
                refusal.as_str(),
                method,
                &target,
            );
            return answer(refusal.response());
        }
        next.call(req)
    }
}

/// Why a request was refused before authorization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A method with lower-case letters.
    Method,
    /// Not a path: an authority (CONNECT), or `*` with a method other than
    /// OPTIONS.
    Target,
    Path(PathError),
}

impl Refusal {
    /// A stable name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Method => "method-not-canonical",
            Refusal::Target => "not-a-path",
            Refusal::Path(e) => e.as_str(),
        }
    }

    /// The 400 the caller gets.
    pub fn response(self) -> Response<Body> {
        match self {
            Refusal::Method => ProxyError::BadMethod
                .response("methods are case-sensitive; this one is not in upper case"),
            Refusal::Target => ProxyError::BadPath
                .response("the request target must be a path ('*' only with OPTIONS)"),
            Refusal::Path(e) => ProxyError::BadPath.response(e),
        }
    }
}

/// Checks `req`'s method and target and puts its path in canonical form.
pub fn canonicalize<B>(req: &mut Request<B>) -> Result<(), Refusal> {
    if !authz::is_canonical_method(req.method().as_str()) {
        return Err(Refusal::Method);
    }
    let Some(target) = req.uri().path_and_query() else {
        return Err(Refusal::Target);
    };
    let raw = target.as_str();
    let (raw_path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if raw_path == "*" {
        return match *req.method() {
            Method::OPTIONS => Ok(()),
            _ => Err(Refusal::Target),
        };
    }
    let canonical = match raw_path {
        "" => Cow::Borrowed("/"),
        p => path::normalize(p).map_err(Refusal::Path)?,
    };
    if matches!(&canonical, Cow::Borrowed(p) if p.len() == raw_path.len()) {
        return Ok(());
    }
    let rewritten = match query {
        Some(q) => format!("{canonical}?{q}"),
        None => canonical.into_owned(),
    };
    // A canonical path holds only characters a path may hold, and the
    // query parsed before.
    let target = PathAndQuery::try_from(rewritten).map_err(|_| Refusal::Target)?;
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(target);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Refusal::Target)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    fn request(method: &str, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    fn canonical(method: &str, uri: &str) -> Result<String, Refusal> {
        let mut req = request(method, uri);
        canonicalize(&mut req)?;
        Ok(req.uri().to_string())
    }

    #[test]
    fn a_canonical_request_is_left_as_it_is() {
        for uri in ["/", "/api/v1/users?id=1", "/pkg.Service/Method"] {
            assert_eq!(canonical("GET", uri).as_deref(), Ok(uri));
        }
    }

    #[test]
    fn the_path_is_rewritten_and_the_query_kept() {
        let cases = [
            ("//admin", "/admin"),
            ("/x/../admin?next=/x/../y", "/admin?next=/x/../y"),
            ("/%61dmin?q=%2F%zz&x=%2e", "/admin?q=%2F%zz&x=%2e"),
            ("/admin/.?", "/admin/?"),
        ];
        for (uri, want) in cases {
            assert_eq!(canonical("GET", uri).as_deref(), Ok(want), "{uri}");
        }
        // An HTTP/2 `:path` may be a bare query; a URI string may not.
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(PathAndQuery::from_static("?q=1"));
        let mut req = request("GET", "/");
        *req.uri_mut() = Uri::from_parts(parts).unwrap();
        canonicalize(&mut req).unwrap();
        assert_eq!(req.uri(), "/?q=1");
    }

    #[test]
    fn absolute_form_keeps_its_authority_and_gets_a_canonical_path() {
        assert_eq!(
            canonical("GET", "http://payments//x/../admin?q").as_deref(),
            Ok("http://payments/admin?q")
        );
        assert_eq!(
            canonical("GET", "http://payments").as_deref(),
            Ok("http://payments/")
        );
    }

    #[test]
    fn options_star_passes_and_nothing_else_does_without_a_path() {
        assert_eq!(canonical("OPTIONS", "*").as_deref(), Ok("*"));
        assert_eq!(canonical("GET", "*"), Err(Refusal::Target));
        assert_eq!(canonical("CONNECT", "payments:443"), Err(Refusal::Target));
    }

    #[test]
    fn non_canonical_methods_and_paths_are_refused() {
        for method in ["get", "delete", "Delete", "pOST"] {
            assert_eq!(canonical(method, "/"), Err(Refusal::Method), "{method}");
        }
        assert_eq!(
            canonical("GET", "/admin%2fx"),
            Err(Refusal::Path(PathError::EncodedSlash))
        );
        assert_eq!(
            canonical("GET", "/public/..;/admin?x"),
            Err(Refusal::Path(PathError::DotWithParameters))
        );
        let resp = Refusal::Path(PathError::BadEscape).response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()["x-isdp-error"], "bad-path");
        assert_eq!(
            Refusal::Method.response().headers()["x-isdp-error"],
            "bad-method"
        );
    }
}
