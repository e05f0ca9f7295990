//! Authorization on the inbound side: whether a caller (its SPIFFE ID,
//! proven by its mTLS certificate) may call a local service, per the
//! destination's `isdp.v1.AuthorizationPolicy` from the control plane.
//!
//! Rules are compiled once per policy version into a [`Policy`] so a
//! request pays a few string comparisons and no allocation. Deny wins over
//! allow; when no rule matches, the mesh-wide default decides. A local
//! service whose policy has not arrived yet is refused: the sidecar fails
//! closed rather than guess a default the operator may have set to deny.
//!
//! Rules see a request as the application will: its path in canonical form
//! and matched on whole segments (`path`), its method as sent (methods are
//! case-sensitive, and the inbound side refuses one in lower case, see
//! [`is_canonical_method`]).

use std::{collections::HashMap, sync::Arc};

use isdp_proto::v1::{Action, AuthorizationPolicy, AuthzRule};
use tokio::sync::watch;

use crate::xds::Snapshot;

/// The local services' policies, compiled, by service.
pub type Policies = HashMap<String, Arc<Policy>>;

/// Compiles the policies in each new snapshot (only when they changed) and
/// publishes them; the inbound path reads the latest with one `Arc` clone.
pub fn follow(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<Policies>>, tokio::task::JoinHandle<()>) {
    let compile = |s: &Snapshot| -> Policies {
        s.authz_policies
            .iter()
            .map(|(name, p)| (name.clone(), Arc::new(Policy::compile(p))))
            .collect()
    };
    let first = snapshots.borrow_and_update().clone();
    let (tx, rx) = watch::channel(Arc::new(compile(&first)));
    let task = tokio::spawn(async move {
        let mut held = first.authz_policies.clone();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = snapshots.changed() => if changed.is_err() { return },
            }
            let snap = snapshots.borrow_and_update().clone();
            if snap.authz_policies != held {
                held = snap.authz_policies.clone();
                tx.send_replace(Arc::new(compile(&snap)));
            }
        }
    });
    (rx, task)
}

/// The outcome for one request or connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; `rule` names the deny rule that matched, or is `None` when
    /// the default (or a missing policy) refused.
    Deny {
        rule: Option<Arc<str>>,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// The label metrics and logs use for what refused the call.
    pub fn rule_label(&self) -> &str {
        match self {
            Decision::Allow => "",
            Decision::Deny { rule: Some(r) } => r,
            Decision::Deny { rule: None } => "default",
        }
    }
}

/// One destination's rules, ready to evaluate.
#[derive(Debug)]
pub struct Policy {
    default_allow: bool,
    /// Deny rules first, so the first match decides.
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    allow: bool,
    /// Full SPIFFE IDs; `any` stands for "*".
    sources: Vec<String>,
    any: bool,
    methods: Vec<String>,
    /// None: any path.
    path: Option<isdp_core::path::Prefix>,
}

/// What is known of the request being checked. TCP connections have no
/// method or path, so rules narrowed by either never match them (the
/// inbound side tunnels only to TCP services, so no HTTP request gets past
/// such a rule that way).
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// The caller's SPIFFE ID; `None` for a caller without one (only
    /// possible for traffic that did not come over mesh mTLS).
    pub source: Option<&'a str>,
    pub method: Option<&'a str>,
    /// In canonical form ([`isdp_core::path::normalize`]), or `*` for `OPTIONS *`.
    pub path: Option<&'a str>,
}

/// Whether `method` is one rules can be matched against: methods are
/// case-sensitive (RFC 9110), rules name them in upper case, and an
/// application that reads `delete` as `DELETE` would make a lower-case
/// method a way around a rule. Every standard method is upper case.
pub fn is_canonical_method(method: &str) -> bool {
    !method.bytes().any(|b| b.is_ascii_lowercase())
}

impl Policy {
    pub fn compile(policy: &AuthorizationPolicy) -> Policy {
        let td = &policy.trust_domain;
        let mut rules: Vec<Rule> = policy
            .rules
            .iter()
            .filter_map(|r| compile_rule(r, td))
            .collect();
        rules.sort_by_key(|r| r.allow);
        Policy {
            default_allow: policy.default_action != Action::Deny as i32,
            rules,
        }
    }

    pub fn decide(&self, call: Call<'_>) -> Decision {
        for rule in &self.rules {
            if rule.matches(call) {
                return if rule.allow {
                    Decision::Allow
                } else {
                    Decision::Deny {
                        rule: Some(rule.name.clone()),
                    }
                };
            }
        }
        if self.default_allow {
            Decision::Allow
        } else {
            Decision::Deny { rule: None }
        }
    }
}

fn compile_rule(r: &AuthzRule, trust_domain: &str) -> Option<Rule> {
    let allow = match Action::try_from(r.action) {
        Ok(Action::Allow) => true,
        Ok(Action::Deny) => false,
        // The control plane validates actions; one this sidecar does not
        // know is skipped rather than guessed at.
        _ => return None,
    };
    let path = match r.path_prefix.as_str() {
        "" => None,
        prefix => match isdp_core::path::Prefix::new(prefix) {
            Ok(p) => Some(p),
            // The control plane refuses such a prefix; one stored before it
            // did fails closed: an allow rule is dropped, a deny rule covers
            // every path.
            Err(e) => {
                tracing::warn!(
                    rule = %r.name, %prefix, error = %e, allow,
                    "authorization rule with an invalid path prefix: \
                     an allow rule is dropped, a deny rule covers every path"
                );
                if allow {
                    return None;
                }
                None
            }
        },
    };
    let mut methods = r.methods.clone();
    // HEAD is GET without the body (RFC 9110), and servers answer it with
    // their GET handler: a deny for GET must not let HEAD through.
    if !allow && methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
        methods.push("HEAD".to_owned());
    }
    Some(Rule {
        name: r.name.as_str().into(),
        allow,
        any: r.sources.iter().any(|s| s == "*"),
        sources: r
            .sources
            .iter()
            .filter(|s| *s != "*")
            .map(|s| format!("spiffe://{trust_domain}/svc/{s}"))
            .collect(),
        methods,
        path,
    })
}

impl Rule {
    fn matches(&self, call: Call<'_>) -> bool {
        let source_ok = match call.source {
            Some(id) => self.any || self.sources.iter().any(|s| s == id),
            None => false,
        };
        if !source_ok {
            return false;
        }
        if !self.methods.is_empty() {
            match call.method {
                Some(m) if self.methods.iter().any(|x| x == m) => {}
                _ => return false,
            }
        }
        if let Some(prefix) = &self.path {
            match call.path {
                Some(p) if prefix.matches(p) => {}
                _ => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, sources: &[&str], action: Action) -> AuthzRule {
        AuthzRule {
            name: name.into(),
            destination: "payments".into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            action: action as i32,
            methods: vec![],
            path_prefix: String::new(),
        }
    }

    fn policy(default: Action, rules: Vec<AuthzRule>) -> Policy {
        Policy::compile(&AuthorizationPolicy {
            destination: "payments".into(),
            default_action: default as i32,
            rules,
            trust_domain: "isdp.local".into(),
        })
    }

    fn from(source: &str) -> Call<'_> {
        Call {
            source: Some(source),
            method: Some("GET"),
            path: Some("/api/charge"),
        }
    }

    const WEB: &str = "spiffe://isdp.local/svc/web";
    const BATCH: &str = "spiffe://isdp.local/svc/batch";

    #[test]
    fn the_default_decides_when_nothing_matches() {
        assert!(policy(Action::Allow, vec![]).decide(from(WEB)).is_allowed());
        let d = policy(Action::Deny, vec![]).decide(from(WEB));
        assert_eq!(d, Decision::Deny { rule: None });
        assert_eq!(d.rule_label(), "default");
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policy(
            Action::Deny,
            vec![
                rule("everyone", &["*"], Action::Allow),
                rule("no-batch", &["batch"], Action::Deny),
            ],
        );
        assert!(p.decide(from(WEB)).is_allowed());
        assert_eq!(p.decide(from(BATCH)).rule_label(), "no-batch");
    }

    #[test]
    fn sources_match_whole_spiffe_ids_of_the_trust_domain() {
        let p = policy(Action::Deny, vec![rule("web", &["web"], Action::Allow)]);
        assert!(p.decide(from(WEB)).is_allowed());
        assert!(!p.decide(from("spiffe://other.domain/svc/web")).is_allowed());
        assert!(!p.decide(from("spiffe://isdp.local/svc/webx")).is_allowed());
        // "*" means any authenticated caller, never an anonymous one.
        let any = policy(Action::Deny, vec![rule("any", &["*"], Action::Allow)]);
        let anonymous = Call {
            source: None,
            method: Some("GET"),
            path: Some("/"),
        };
        assert!(!any.decide(anonymous).is_allowed());
    }

    #[test]
    fn methods_and_path_prefixes_narrow_a_rule() {
        let mut reads = rule("web-reads", &["web"], Action::Allow);
        reads.methods = vec!["GET".into(), "HEAD".into()];
        reads.path_prefix = "/api/".into();
        let p = policy(Action::Deny, vec![reads]);
        assert!(p.decide(from(WEB)).is_allowed());
        let post = Call {
            method: Some("POST"),
            ..from(WEB)
        };
        assert!(!p.decide(post).is_allowed());
        let admin = Call {
            path: Some("/admin"),
            ..from(WEB)
        };
        assert!(!p.decide(admin).is_allowed());
        // A TCP connection has neither, so a narrowed rule cannot allow it.
        let tcp = Call {
            source: Some(WEB),
            method: None,
            path: None,
        };
        assert!(!p.decide(tcp).is_allowed());
    }

    #[test]
    fn path_prefixes_match_canonical_paths_on_whole_segments() {
        let mut no_admin = rule("no-admin", &["*"], Action::Deny);
        no_admin.path_prefix = "/admin".into();
        let p = policy(Action::Allow, vec![no_admin]);
        let get = |path| Call {
            path: Some(path),
            ..from(WEB)
        };
        for path in ["/admin", "/admin/", "/admin/users", "/admin;x"] {
            assert_eq!(p.decide(get(path)).rule_label(), "no-admin", "{path}");
        }
        for path in ["/administrator", "/api/admin", "/", "*"] {
            assert!(p.decide(get(path)).is_allowed(), "{path}");
        }
    }

    #[test]
    fn methods_are_case_sensitive_and_lower_case_is_not_canonical() {
        let mut no_delete = rule("no-delete", &["web"], Action::Deny);
        no_delete.methods = vec!["DELETE".into()];
        let mut reads = rule("reads", &["web"], Action::Allow);
        reads.methods = vec!["GET".into()];
        let p = policy(Action::Deny, vec![no_delete, reads]);
        let call = |method| Call {
            method: Some(method),
            ..from(WEB)
        };
        assert_eq!(p.decide(call("DELETE")).rule_label(), "no-delete");
        assert!(p.decide(call("GET")).is_allowed());
        // `get` is another method: the GET rule does not allow it...
        assert!(!p.decide(call("get")).is_allowed());
        // ...and `delete` is not DELETE either: under a default allow it
        // would pass the DELETE rule, which is why the inbound side
        // refuses a method that is not canonical before rules are asked.
        let mut no_delete = rule("no-delete", &["web"], Action::Deny);
        no_delete.methods = vec!["DELETE".into()];
        let open = policy(Action::Allow, vec![no_delete]);
        assert!(open.decide(call("delete")).is_allowed());
        for m in ["delete", "Delete", "gET", "get"] {
            assert!(!is_canonical_method(m), "{m}");
        }
        for m in ["GET", "DELETE", "PROPFIND", "M-SEARCH", "X_1"] {
            assert!(is_canonical_method(m), "{m}");
        }
    }

    #[test]
    fn a_deny_rule_for_get_also_covers_head() {
        let mut no_get = rule("no-get", &["web"], Action::Deny);
        no_get.methods = vec!["GET".into()];
        let mut head_ok = rule("head-ok", &["web"], Action::Allow);
        head_ok.methods = vec!["GET".into()];
        let p = policy(Action::Allow, vec![no_get]);
        let head = Call {
            method: Some("HEAD"),
            ..from(WEB)
        };
        assert_eq!(p.decide(head).rule_label(), "no-get");
        // An allow rule is not widened.
        let p = policy(Action::Deny, vec![head_ok]);
        assert!(!p.decide(head).is_allowed());
    }

    /// A prefix the control plane would refuse today (stored before it
    /// did) fails closed: the deny rule covers every path, the allow rule
    /// none.
    #[test]
    fn an_invalid_stored_prefix_fails_closed() {
        let mut deny = rule("no-admin", &["web"], Action::Deny);
        deny.path_prefix = "/admin%2Fx".into();
        let p = policy(Action::Allow, vec![deny]);
        assert_eq!(p.decide(from(WEB)).rule_label(), "no-admin");
        let mut allow = rule("admin", &["web"], Action::Allow);
        allow.path_prefix = "/%zz".into();
        let p = policy(Action::Deny, vec![allow]);
        assert!(!p.decide(from(WEB)).is_allowed());
        // A non-canonical one means what it says once normalized.
        let mut dotted = rule("no-admin", &["web"], Action::Deny);
        dotted.path_prefix = "/x/..//admin".into();
        let p = policy(Action::Allow, vec![dotted]);
        let admin = Call {
            path: Some("/admin/x"),
            ..from(WEB)
        };
        assert!(!p.decide(admin).is_allowed());
        assert!(p.decide(from(WEB)).is_allowed());
    }

    #[test]
    fn an_unknown_action_is_skipped() {
        let mut odd = rule("odd", &["web"], Action::Allow);
        odd.action = 42;
        let p = policy(Action::Deny, vec![odd]);
        assert_eq!(p.decide(from(WEB)), Decision::Deny { rule: None });
    }
}
