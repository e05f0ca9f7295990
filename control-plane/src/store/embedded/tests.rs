use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::EmbeddedStore;
use crate::store::{Event, Store, StoreError, Txn};

fn val(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test]
async fn writes_survive_reopen_and_failed_compares_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let out = store
            .txn(
                Txn::default()
                    .put("/a/1", val("one"), None)
                    .put("/a/2", val("two"), None),
            )
            .await
            .unwrap();
        assert!(out.succeeded);
        assert_eq!(out.revision, 1);
        // Expecting the key to be absent fails: nothing is written.
        let out = store
            .txn(
                Txn::default()
                    .when_mod_revision("/a/1", 0)
                    .put("/a/1", val("x"), None)
                    .delete("/a/2"),
            )
            .await
            .unwrap();
        assert!(!out.succeeded);
        assert_eq!(out.revision, 1);
        let out = store
            .txn(
                Txn::default()
                    .when_mod_revision("/a/1", 1)
                    .put("/a/1", val("uno"), None),
            )
            .await
            .unwrap();
        assert!(out.succeeded);
        assert_eq!(out.revision, 2);
        store.close().await;
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let (kvs, rev) = store.range("/a/").await.unwrap();
    assert_eq!(rev, 2);
    let got: Vec<_> = kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.clone(), kv.mod_revision))
        .collect();
    assert_eq!(got, vec![("/a/1", val("uno"), 2), ("/a/2", val("two"), 1)]);
    let (other, _) = store.range("/b/").await.unwrap();
    assert!(other.is_empty());
}

#[tokio::test]
async fn concurrent_writes_are_batched_and_each_gets_a_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                s.txn(Txn::default().put(format!("/k/{i:04}"), val("v"), None))
                    .await
            })
        })
        .collect();
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.unwrap().unwrap().revision);
    }
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 500, "every transaction has its own revision");
    assert_eq!(store.range("/k/").await.unwrap().0.len(), 500);
}

#[tokio::test]
async fn watch_resumes_from_a_revision_and_filters_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    store
        .txn(Txn::default().put("/w/a", val("1"), None))
        .await
        .unwrap();
    store
        .txn(Txn::default().put("/other", val("x"), None))
        .await
        .unwrap();
    store.txn(Txn::default().delete("/w/a")).await.unwrap();
    let mut w = store.watch("/w/", 1).unwrap();
    let b = w.next().await.unwrap().unwrap();
    assert_eq!(b.revision, 3);
    assert_eq!(b.events, vec![Event::Delete { key: "/w/a".into() }]);
    store
        .txn(Txn::default().put("/w/b", val("2"), None))
        .await
        .unwrap();
    let b = w.next().await.unwrap().unwrap();
    assert_eq!(b.revision, 4);
    assert!(matches!(&b.events[0], Event::Put(kv) if kv.key == "/w/b"));

    // After a reopen the history is gone: resuming from before it must resync.
    drop(w);
    store.close().await;
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert!(matches!(
        store.watch("/w/", 1),
        Err(StoreError::Compacted { .. })
    ));
    assert!(store.watch("/w/", 4).is_ok());
}

/// Commits outside a watch's prefix come back as progress (an empty batch
/// at their revision) once the watcher has caught up, so a view can tell it
/// has reached a revision written elsewhere; a burst is folded into one.
#[tokio::test]
async fn commits_elsewhere_are_reported_as_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let mut w = store.watch("/w/", 0).unwrap();
    let r1 = store
        .txn(Txn::default().put("/other/a", val("x"), None))
        .await
        .unwrap()
        .revision;
    let b = w.next().await.unwrap().unwrap();
    assert!(b.is_progress(), "{b:?}");
    assert_eq!(b.revision, r1);

    // A burst elsewhere, then a change under the prefix: whatever progress
    // comes first, the change arrives with its own revision, in order.
    for i in 0..10 {
        store
            .txn(Txn::default().put(format!("/other/{i}"), val("x"), None))
            .await
            .unwrap();
    }
    let mine = store
        .txn(Txn::default().put("/w/b", val("2"), None))
        .await
        .unwrap()
        .revision;
    let mut last = r1;
    loop {
        let b = w.next().await.unwrap().unwrap();
        assert!(
            b.revision > last,
            "revisions go forward: {b:?} after {last}"
        );
        last = b.revision;
        if !b.is_progress() {
            assert_eq!(b.revision, mine);
            assert!(matches!(&b.events[0], Event::Put(kv) if kv.key == "/w/b"));
            break;
        }
    }
}

#[tokio::test]
async fn leases_expire_without_keepalive_and_revoke_deletes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let short = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    let long = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(Txn::default().put("/l/short", val("s"), Some(short)).put(
            "/l/long",
            val("l"),
            Some(long),
        ))
        .await
        .unwrap();
    // A put on an unknown lease fails and writes nothing.
    let err = store
        .txn(
            Txn::default()
                .put("/l/bad", val("b"), Some(999))
                .put("/l/x", val("x"), None),
        )
        .await;
    assert!(matches!(err, Err(StoreError::LeaseNotFound(999))));

    // Keep-alives hold the short lease past its TTL.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.keep_alive(short).await.unwrap();
    }
    assert_eq!(store.range("/l/").await.unwrap().0.len(), 2);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let keys: Vec<String> = store
        .range("/l/")
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, vec!["/l/long".to_string()]);
    assert!(matches!(
        store.keep_alive(short).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    store.revoke(long).await.unwrap();
    assert!(store.range("/l/").await.unwrap().0.is_empty());
}

async fn keys(store: &EmbeddedStore, prefix: &str) -> Vec<String> {
    let (kvs, _) = store.range(prefix).await.unwrap();
    kvs.into_iter().map(|kv| kv.key).collect()
}

/// Revoking a lease deletes the keys put under it now: a key re-put under
/// another lease, or under none, or deleted, is left alone; the index that
/// finds them (no scan of the table) follows every write, across reopens.
#[tokio::test]
async fn revoke_deletes_exactly_the_keys_the_lease_holds_now() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let a = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let b = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store
            .txn(
                Txn::default()
                    .put("/r/moved", val("1"), Some(a))
                    .put("/r/freed", val("1"), Some(a))
                    .put("/r/gone", val("1"), Some(a))
                    .put("/r/kept", val("1"), Some(a)),
            )
            .await
            .unwrap();
        store
            .txn(
                Txn::default()
                    .put("/r/moved", val("2"), Some(b))
                    .put("/r/freed", val("2"), None)
                    .delete("/r/gone"),
            )
            .await
            .unwrap();
        store.close().await;
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    // Lease ids restart their TTL on open; revoke the first one.
    store.revoke(1).await.unwrap();
    assert_eq!(keys(&store, "/r/").await, ["/r/freed", "/r/moved"]);
    // Re-putting a deleted key under a lease indexes it again.
    store
        .txn(Txn::default().put("/r/gone", val("3"), Some(2)))
        .await
        .unwrap();
    store.revoke(2).await.unwrap();
    assert_eq!(keys(&store, "/r/").await, ["/r/freed"]);
}

/// A store written before the lease index existed gets it built when it
/// opens, so revoking still deletes the lease's keys.
#[tokio::test]
async fn a_store_without_the_lease_index_is_indexed_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store
            .txn(
                Txn::default()
                    .put("/old/a", val("1"), Some(lease))
                    .put("/old/b", val("1"), None),
            )
            .await
            .unwrap();
        store.close().await;
    }
    {
        // As an earlier version left it: no index, no marker.
        let db = redb::Database::open(dir.path().join(crate::data_dir::STORE_FILE)).unwrap();
        let w = db.begin_write().unwrap();
        w.delete_multimap_table(super::LEASE_KEYS).unwrap();
        w.open_table(super::META)
            .unwrap()
            .remove("lease_index")
            .unwrap();
        w.commit().unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    store.revoke(1).await.unwrap();
    assert_eq!(keys(&store, "/old/").await, ["/old/b"]);
}
