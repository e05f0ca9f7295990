use std::sync::Arc;

use isdp_proto::v1::Instance;
use serde_json::json;
use tokio::sync::watch;

use super::*;
use crate::store::embedded::EmbeddedStore;

async fn open(dir: &std::path::Path) -> (Policies, Registry, watch::Sender<bool>) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir).unwrap());
    let (stop, shutdown) = watch::channel(false);
    let registry = Registry::start(store.clone(), "/isdp/", shutdown.clone())
        .await
        .unwrap();
    let policies = Policies::start(store, "/isdp/", registry.clone(), shutdown)
        .await
        .unwrap();
    (policies, registry, stop)
}

fn doc(attempts: u32) -> String {
    json!({"service": "payments", "retries": {"attempts": attempts}}).to_string()
}

#[tokio::test]
async fn put_get_list_delete_with_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (policies, _registry, _stop) = open(dir.path()).await;
    let first = policies.put(&doc(1), Some(0), false).await.unwrap();
    assert!(first.version > 0);
    let read = policies.get("payments").unwrap();
    assert_eq!(read.version, first.version);
    assert_eq!(read.policy.unwrap().retries.unwrap().attempts, 1);

    // Compare-and-set: a writer holding an old version loses and changes
    // nothing.
    let second = policies
        .put(&doc(2), Some(first.version), false)
        .await
        .unwrap();
    assert!(second.version > first.version);
    let stale = policies.put(&doc(3), Some(first.version), false).await;
    assert!(
        matches!(stale, Err(PolicyError::VersionMismatch { expected, actual, .. })
            if expected == first.version && actual == second.version),
        "{stale:?}"
    );
    // Creating what exists fails too.
    assert!(matches!(
        policies.put(&doc(4), Some(0), false).await,
        Err(PolicyError::VersionMismatch { .. })
    ));
    let held = policies.get("payments").unwrap();
    assert_eq!(held.policy.unwrap().retries.unwrap().attempts, 2);

    // A dry run validates and stores nothing.
    let dry = policies.put(&doc(5), None, true).await.unwrap();
    assert_eq!(dry.version, second.version);
    assert_eq!(
        policies
            .get("payments")
            .unwrap()
            .policy
            .unwrap()
            .retries
            .unwrap()
            .attempts,
        2
    );

    assert_eq!(policies.list().len(), 1);
    assert!(matches!(
        policies.delete("payments", Some(first.version)).await,
        Err(PolicyError::VersionMismatch { .. })
    ));
    policies.delete("payments", None).await.unwrap();
    assert!(matches!(
        policies.get("payments"),
        Err(PolicyError::NotFound(_))
    ));
    assert!(matches!(
        policies.delete("payments", None).await,
        Err(PolicyError::NotFound(_))
    ));
}

#[tokio::test]
async fn an_invalid_document_leaves_the_previous_policy_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let (policies, _registry, _stop) = open(dir.path()).await;
    policies.put(&doc(1), None, false).await.unwrap();
    let bad = json!({"service": "payments", "retries": {"attempts": -1, "bogus": 1}}).to_string();
    let Err(PolicyError::Invalid(problems)) = policies.put(&bad, None, false).await else {
        panic!("accepted");
    };
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(matches!(
        policies.put("{not json", None, false).await,
        Err(PolicyError::Invalid(_))
    ));
    let huge = format!(
        "{{\"service\": \"payments\", \"x\": \"{}\"}}",
        "a".repeat(MAX_DOCUMENT_BYTES)
    );
    let Err(PolicyError::Invalid(p)) = policies.put(&huge, None, false).await else {
        panic!("accepted");
    };
    assert!(p[0].rule.contains("at most 65536 bytes"), "{}", p[0]);
    assert_eq!(
        policies
            .get("payments")
            .unwrap()
            .policy
            .unwrap()
            .retries
            .unwrap()
            .attempts,
        1
    );
}

#[tokio::test]
async fn subsets_are_checked_against_current_instances() {
    let dir = tempfile::tempdir().unwrap();
    let (policies, registry, _stop) = open(dir.path()).await;
    let split = json!({
        "service": "payments",
        "subsets": [{"name": "v2", "labels": {"version": "v2"}}],
        "split": [{"subset": "v2", "weight": 100}]
    })
    .to_string();
    assert!(matches!(
        policies.put(&split, None, false).await,
        Err(PolicyError::Invalid(_))
    ));
    registry
        .register(Instance {
            id: "p2".into(),
            service: "payments".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            weight: 1,
            metadata: [("version".to_owned(), "v2".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    policies.put(&split, None, false).await.unwrap();
}
