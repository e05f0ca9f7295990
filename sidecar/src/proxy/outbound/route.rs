//! The `Route` layer: which upstream a request is for. On a per-upstream
//! listener every request goes to that upstream; on the shared outbound
//! listener the `Host` / `:authority` (or an absolute-form URI, as HTTP
//! proxies receive) names it. The upstream's current `UpstreamLb` rides
//! down in an extension; an unknown one is answered 404
//! `unknown-upstream`.

use std::sync::Arc;

use http::{Request, header};

use crate::proxy::{
    svc::{Body, BoxFuture, Next, ProxyError, Step, answer, step_layer},
    upstreams::Upstreams,
};

/// How the route layer finds the upstream.
#[derive(Clone, Debug)]
pub enum RouteBy {
    /// A per-upstream listener: every request goes to this upstream.
    Fixed(Arc<str>),
    /// The shared outbound listener: by `Host` / `:authority` (or an
    /// absolute-form URI, as HTTP proxies receive).
    Authority,
}

#[derive(Clone)]
pub struct RouteLayer {
    pub by: RouteBy,
    pub upstreams: Upstreams,
}

step_layer!(RouteLayer => Route);

/// The host a request names, without port, lowercased.
fn authority_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            host.parse::<http::uri::Authority>().ok()?.host().to_owned()
        }
    };
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

impl Step for RouteLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        let name: std::borrow::Cow<'_, str> = match &self.by {
            RouteBy::Fixed(n) => n.as_ref().into(),
            RouteBy::Authority => match authority_host(&req) {
                Some(h) => h.into(),
                None => {
                    return answer(
                        ProxyError::MissingAuthority
                            .response("the request names no Host or :authority to route by"),
                    );
                }
            },
        };
        let Some(lb) = self.upstreams.get(name.as_ref()) else {
            return answer(ProxyError::UnknownUpstream.response(format!(
                "{name:?} is not an upstream of this sidecar (add it as an [[upstream]])"
            )));
        };
        drop(name);
        req.extensions_mut().insert(lb);
        next.call(req)
    }
}
