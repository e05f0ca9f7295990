use std::sync::Arc;

use isdp_proto::v1::{Action, AuthzRule};
use tokio::sync::watch;

use super::*;
use crate::store::embedded::EmbeddedStore;

fn rule(destination: &str, name: &str, sources: &[&str], action: Action) -> AuthzRule {
    AuthzRule {
        name: name.into(),
        destination: destination.into(),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        action: action as i32,
        methods: vec![],
        path_prefix: String::new(),
    }
}

async fn open(dir: &std::path::Path) -> (Authz, EmbeddedStore, watch::Sender<bool>) {
    let store = EmbeddedStore::open(dir).unwrap();
    let (stop, shutdown) = watch::channel(false);
    let authz = Authz::start(Arc::new(store.clone()), "/isdp/", shutdown)
        .await
        .unwrap();
    (authz, store, stop)
}

#[tokio::test]
async fn rules_are_stored_listed_replaced_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (authz, store, stop) = open(dir.path()).await;
    assert_eq!(authz.default_action(), Action::Allow);
    authz
        .put_rule(rule("payments", "web", &["web"], Action::Allow))
        .await
        .unwrap();
    authz
        .put_rule(rule("payments", "no-batch", &["batch"], Action::Deny))
        .await
        .unwrap();
    authz
        .put_rule(rule("orders", "any", &["*"], Action::Allow))
        .await
        .unwrap();
    // A writer reads its own write at once.
    let names: Vec<String> = authz
        .list(Some("payments"))
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["no-batch", "web"]);
    assert_eq!(authz.list(None).len(), 3);

    authz
        .put_rule(rule("payments", "web", &["web", "admin"], Action::Allow))
        .await
        .unwrap();
    assert_eq!(authz.list(Some("payments")).len(), 2);
    authz.delete_rule("payments", "no-batch").await.unwrap();
    assert!(matches!(
        authz.delete_rule("payments", "no-batch").await,
        Err(AuthzError::NotFound { .. })
    ));
    authz.set_default(Action::Deny).await.unwrap();

    let policy = authz.rules().policy("payments", "isdp.local");
    assert_eq!(policy.default_action, Action::Deny as i32);
    assert_eq!(policy.rules.len(), 1);
    assert_eq!(policy.rules[0].sources, ["web", "admin"]);

    // Everything survives a restart on the same data.
    stop.send_replace(true);
    store.close().await;
    let (again, _store, _stop) = open(dir.path()).await;
    assert_eq!(again.default_action(), Action::Deny);
    assert_eq!(again.list(None).len(), 2);
}

#[tokio::test]
async fn an_invalid_rule_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (authz, _store, _stop) = open(dir.path()).await;
    authz
        .put_rule(rule("payments", "web", &["web"], Action::Allow))
        .await
        .unwrap();
    let mut bad = rule("payments", "web", &["not valid"], Action::Deny);
    bad.path_prefix = "nope".into();
    let err = authz.put_rule(bad).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("rule.sources[0]"), "{text}");
    assert!(text.contains("rule.path_prefix"), "{text}");
    let held = authz.list(Some("payments"));
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].action, Action::Allow as i32);
    assert!(matches!(
        authz.set_default(Action::Unspecified).await,
        Err(AuthzError::InvalidDefault)
    ));
    assert_eq!(authz.default_action(), Action::Allow);
}

#[tokio::test]
async fn a_destination_holds_a_bounded_number_of_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (authz, _store, _stop) = open(dir.path()).await;
    for i in 0..validate::MAX_RULES_PER_DESTINATION {
        authz
            .put_rule(rule("payments", &format!("r{i}"), &["web"], Action::Allow))
            .await
            .unwrap();
    }
    let err = authz
        .put_rule(rule("payments", "one-more", &["web"], Action::Allow))
        .await
        .unwrap_err();
    assert!(matches!(err, AuthzError::TooMany { .. }), "{err}");
    // Replacing an existing rule is still allowed.
    authz
        .put_rule(rule("payments", "r0", &["batch"], Action::Deny))
        .await
        .unwrap();
}
