//! Authorization on the inbound side: whether a caller (its SPIFFE ID,
//! proven by its mTLS certificate) may call a local service, per the
//! destination's `isdp.v1.AuthorizationPolicy` from the control plane.
//!
//! Rules are compiled once per policy version into a [`Policy`] so a
//! request pays a few string comparisons and no allocation. Deny wins over
//! allow; when no rule matches, the mesh-wide default decides. A local
//! service whose policy has not arrived yet is refused: the sidecar fails
//! closed rather than guess a default the operator may have set to deny.

use std::{collections::HashMap, sync::Arc};

use isdp_proto::v1::{Action, AuthorizationPolicy, AuthzRule};
use tokio::sync::watch;

use crate::xds::Snapshot;

/// The local services' policies, compiled, by service.
pub type Compiled = HashMap<String, Arc<Policy>>;

/// Compiles the policies in each new snapshot (only when they changed) and
/// publishes them; the inbound path reads the latest with one `Arc` clone.
pub fn follow(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Arc<Compiled>>, tokio::task::JoinHandle<()>) {
    let compile = |s: &Snapshot| -> Compiled {
        s.policies
            .iter()
            .map(|(name, p)| (name.clone(), Arc::new(Policy::compile(p))))
            .collect()
    };
    let first = snapshots.borrow_and_update().clone();
    let (tx, rx) = watch::channel(Arc::new(compile(&first)));
    let task = tokio::spawn(async move {
        let mut held = first.policies.clone();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = snapshots.changed() => if changed.is_err() { return },
            }
            let snap = snapshots.borrow_and_update().clone();
            if snap.policies != held {
                held = snap.policies.clone();
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
    path_prefix: String,
}

/// What is known of the request being checked. TCP connections have no
/// method or path, so rules narrowed by either never match them.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// The caller's SPIFFE ID; `None` for a caller without one (only
    /// possible for traffic that did not come over mesh mTLS).
    pub source: Option<&'a str>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
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
        methods: r.methods.clone(),
        path_prefix: r.path_prefix.clone(),
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
        if !self.path_prefix.is_empty() {
            match call.path {
                Some(p) if p.starts_with(&self.path_prefix) => {}
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
    fn an_unknown_action_is_skipped() {
        let mut odd = rule("odd", &["web"], Action::Allow);
        odd.action = 42;
        let p = policy(Action::Deny, vec![odd]);
        assert_eq!(p.decide(from(WEB)), Decision::Deny { rule: None });
    }
}
