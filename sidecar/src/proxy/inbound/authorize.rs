//! The `Authorize` layer and the check behind it (the [`Authorizer`], which
//! tunnels use too): the local service's compiled policy
//! (from [`crate::authz::follow`]) asked about the caller's SPIFFE ID, the
//! method and the path. Refusals are counted with the calling service and
//! the rule, and logged (at info at most once a second; the rest at debug,
//! so a denied caller in a loop cannot flood the log). Requests refused
//! before the rules are asked, for a method or path they could not be
//! matched against ([`Authorizer::malformed`]), are logged the same way;
//! the route's metrics count them in `isdp_proxy_errors_total`
//! (`bad-path`, `bad-method`). A tunnel to an HTTP or gRPC service is
//! refused whatever the rules say ([`Authorizer::refuse_tunnel`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use http::Request;
use tokio::sync::watch;

use super::caller;
use crate::{
    authz::{Call, Decision, Policies},
    metrics::Metrics,
    proxy::svc::{Body, BoxFuture, Next, ProxyError, Step, answer, step_layer},
};

/// Asks local service `service`'s policy about each request; a refusal
/// is 403 `denied-by-policy`.
#[derive(Clone)]
pub struct AuthorizeLayer {
    pub service: Arc<str>,
    pub authorizer: Authorizer,
}

step_layer!(AuthorizeLayer => Authorize);

impl Step for AuthorizeLayer {
    fn call<S: Next>(&self, next: &mut S, req: Request<Body>) -> BoxFuture {
        let call = Call {
            source: caller(&req),
            method: Some(req.method().as_str()),
            path: Some(req.uri().path()),
        };
        if let Decision::Deny { .. } = self.authorizer.check(&self.service, call) {
            return answer(
                ProxyError::DeniedByPolicy
                    .response(format!("{} does not allow this caller", self.service)),
            );
        }
        next.call(req)
    }
}

/// A cheap handle; clones share the policies and the log limiter.
#[derive(Clone)]
pub struct Authorizer {
    policies: watch::Receiver<Arc<Policies>>,
    metrics: Metrics,
    /// Second (since the epoch) of the last denial logged at info.
    last_logged: Arc<AtomicU64>,
}

impl Authorizer {
    pub fn new(policies: watch::Receiver<Arc<Policies>>, metrics: Metrics) -> Self {
        Authorizer {
            policies,
            metrics,
            last_logged: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether `call` may reach local service `service`. A service whose
    /// policy has not arrived yet is refused: the default may be deny.
    pub fn check(&self, service: &str, call: Call<'_>) -> Decision {
        let policy = self.policies.borrow().get(service).cloned();
        let decision = match policy {
            Some(p) => p.decide(call),
            None => Decision::Deny {
                rule: Some(Arc::from("no-policy-yet")),
            },
        };
        if !decision.is_allowed() {
            self.denied(service, call, &decision);
        }
        decision
    }

    /// Refuses a TCP tunnel to a local HTTP or gRPC service: its requests
    /// would reach the service with no method or path for the rules to
    /// see, so no method- or path-scoped deny rule could stop them.
    /// Counted as denied by the rule `tunnel-to-http`.
    pub fn refuse_tunnel(&self, service: &str, peer: &str) {
        let rule = TUNNEL_TO_HTTP;
        self.metrics
            .authz_denied(service, caller_service(peer), rule);
        if self.first_this_second() {
            tracing::info!(%service, %peer, rule, "tcp tunnel to an http service refused");
        } else {
            tracing::debug!(%service, %peer, rule, "tcp tunnel to an http service refused");
        }
    }

    /// Logs a request refused with 400 before the rules were asked: its
    /// method or path has no form they could be matched against.
    pub fn malformed(
        &self,
        service: &str,
        peer: Option<&str>,
        reason: &str,
        method: &str,
        target: &str,
    ) {
        let peer = peer.unwrap_or("-");
        if self.first_this_second() {
            tracing::info!(%service, %peer, %reason, %method, %target, "request refused before authorization");
        } else {
            tracing::debug!(%service, %peer, %reason, %method, %target, "request refused before authorization");
        }
    }

    fn denied(&self, service: &str, call: Call<'_>, decision: &Decision) {
        let source = call.source.map_or("anonymous", caller_service);
        let rule = decision.rule_label();
        self.metrics.authz_denied(service, source, rule);
        let peer = call.source.unwrap_or("-");
        let method = call.method.unwrap_or("-");
        let path = call.path.unwrap_or("-");
        if self.first_this_second() {
            tracing::info!(%service, %peer, %rule, %method, %path, "call denied by policy");
        } else {
            tracing::debug!(%service, %peer, %rule, %method, %path, "call denied by policy");
        }
    }

    /// Whether this is the first refusal logged this second (at info).
    fn first_this_second(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_logged.swap(now, Ordering::Relaxed) != now
    }
}

/// The `rule` label of a refused tunnel to an HTTP or gRPC service.
pub const TUNNEL_TO_HTTP: &str = "tunnel-to-http";

/// The service name in a mesh SPIFFE ID (`spiffe://td/svc/NAME`), for
/// metric labels; anything else is `other`.
fn caller_service(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once("/svc/"))
        .map(|(_, name)| name)
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use isdp_proto::v1::{Action, AuthorizationPolicy, AuthzRule};

    use super::*;
    use crate::authz::Policy;

    fn authorizer(policies: Policies) -> (Authorizer, Metrics) {
        let metrics = Metrics::new();
        let (_tx, rx) = watch::channel(Arc::new(policies));
        (Authorizer::new(rx, metrics.clone()), metrics)
    }

    const WEB: &str = "spiffe://isdp.local/svc/web";

    #[test]
    fn a_missing_policy_refuses() {
        let (a, metrics) = authorizer(HashMap::new());
        let call = Call {
            source: Some(WEB),
            method: Some("GET"),
            path: Some("/"),
        };
        assert!(!a.check("payments", call).is_allowed());
        let page = metrics.render();
        assert!(
            page.contains(
                "isdp_authz_denied_total{service=\"payments\",source=\"web\",rule=\"no-policy-yet\"} 1"
            ),
            "{page}"
        );
    }

    #[test]
    fn refusals_are_counted_by_source_and_rule() {
        let policy = Policy::compile(&AuthorizationPolicy {
            destination: "payments".into(),
            default_action: Action::Allow as i32,
            rules: vec![AuthzRule {
                name: "no-web".into(),
                destination: "payments".into(),
                sources: vec!["web".into()],
                action: Action::Deny as i32,
                methods: vec![],
                path_prefix: String::new(),
            }],
            trust_domain: "isdp.local".into(),
        });
        let (a, metrics) = authorizer(HashMap::from([("payments".to_owned(), Arc::new(policy))]));
        let from = |source| Call {
            source: Some(source),
            method: None,
            path: None,
        };
        assert!(!a.check("payments", from(WEB)).is_allowed());
        assert!(!a.check("payments", from(WEB)).is_allowed());
        assert!(
            a.check("payments", from("spiffe://isdp.local/svc/batch"))
                .is_allowed()
        );
        let page = metrics.render();
        assert!(
            page.contains(
                "isdp_authz_denied_total{service=\"payments\",source=\"web\",rule=\"no-web\"} 2"
            ),
            "{page}"
        );
    }

    #[test]
    fn caller_names_come_from_mesh_ids_only() {
        assert_eq!(caller_service(WEB), "web");
        assert_eq!(caller_service("spiffe://isdp.local/ns/x/sa/y"), "other");
        assert_eq!(caller_service("spiffe://isdp.local/svc/a/b"), "other");
    }
}
