//! The etcd backend of the `Store` trait against a real single-member etcd:
//! the same semantics the embedded store's unit tests pin down
//! (compare-and-set, watch from a revision, compaction -> `Compacted`,
//! lease expiry), plus paging and failing fast when etcd is gone.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use isdp_control_plane::store::{
    Event, Store, StoreError, Txn,
    etcd::{EtcdOptions, EtcdStore},
};
use isdp_proto::etcd::etcdserverpb::{
    AuthEnableRequest, AuthUserAddRequest, AuthUserGrantRoleRequest, CompactionRequest,
};
use isdp_tests::{EtcdCluster, EtcdTls};

fn val(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn store(etcd: &EtcdCluster) -> EtcdStore {
    EtcdStore::connect(&EtcdOptions {
        endpoints: etcd.endpoints(),
        ..Default::default()
    })
    .await
    .expect("connecting to etcd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_compare_mod_revisions_and_ranges_page() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let out = store
        .txn(
            Txn::default()
                .put("/a/1", val("one"), None)
                .put("/a/2", val("two"), None),
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    let first = out.revision;
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
    assert_eq!(out.revision, first);
    let out = store
        .txn(
            Txn::default()
                .when_mod_revision("/a/1", first)
                .put("/a/1", val("uno"), None),
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    assert_eq!(out.revision, first + 1);

    let (kvs, rev) = store.range("/a/").await.unwrap();
    assert_eq!(rev, first + 1);
    let got: Vec<_> = kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.clone(), kv.mod_revision))
        .collect();
    assert_eq!(
        got,
        vec![("/a/1", val("uno"), first + 1), ("/a/2", val("two"), first)]
    );
    assert!(store.range("/b/").await.unwrap().0.is_empty());

    // More keys than one page (1000): the range still returns them all, in
    // order, at one revision.
    for chunk in 0..25 {
        let mut txn = Txn::default();
        for i in 0..100 {
            txn = txn.put(format!("/p/{:05}", chunk * 100 + i), val("v"), None);
        }
        store.txn(txn).await.unwrap();
    }
    let (kvs, _) = store.range("/p/").await.unwrap();
    assert_eq!(kvs.len(), 2500);
    assert!(kvs.windows(2).all(|w| w[0].key < w[1].key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_a_revision_and_a_compacted_one_says_so() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let r1 = store
        .txn(Txn::default().put("/w/a", val("1"), None))
        .await
        .unwrap()
        .revision;
    store
        .txn(Txn::default().put("/other", val("x"), None))
        .await
        .unwrap();
    let r3 = store
        .txn(Txn::default().delete("/w/a"))
        .await
        .unwrap()
        .revision;
    let mut w = store.watch("/w/", r1).unwrap();
    let b = w.next().await.unwrap().unwrap();
    assert_eq!(b.revision, r3);
    assert_eq!(b.events, vec![Event::Delete { key: "/w/a".into() }]);
    let r4 = store
        .txn(
            Txn::default()
                .put("/w/b", val("2"), None)
                .put("/w/c", val("3"), None),
        )
        .await
        .unwrap()
        .revision;
    let b = w.next().await.unwrap().unwrap();
    assert_eq!(b.revision, r4);
    let keys: Vec<&str> = b.events.iter().map(Event::key).collect();
    assert_eq!(keys, ["/w/b", "/w/c"], "one transaction, one batch");
    drop(w);

    // Compact away the history: resuming from before it must resync.
    compact(&store, r4).await;
    let mut w = store.watch("/w/", r1).unwrap();
    match w.next().await {
        Some(Err(StoreError::Compacted { oldest, .. })) => assert_eq!(oldest, r4),
        other => panic!("expected Compacted, got {other:?}"),
    }
    // From the compaction point on, watching works again.
    let mut w = store.watch("/w/", r4).unwrap();
    let r5 = store
        .txn(Txn::default().put("/w/d", val("4"), None))
        .await
        .unwrap()
        .revision;
    assert_eq!(w.next().await.unwrap().unwrap().revision, r5);
}

async fn compact(store: &EtcdStore, revision: u64) {
    store
        .client()
        .kv()
        .compact(CompactionRequest {
            revision: revision as i64,
            physical: false,
        })
        .await
        .expect("compacting etcd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_without_keepalive_and_revoke_deletes_at_once() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let short = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    let long = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(Txn::default().put("/l/short", val("s"), Some(short)).put(
            "/l/long",
            val("l"),
            Some(long),
        ))
        .await
        .unwrap();
    let (kvs, _) = store.range("/l/").await.unwrap();
    assert_eq!(kvs[1].lease, Some(short));
    // A put on an unknown lease fails and writes nothing.
    let err = store
        .txn(
            Txn::default()
                .put("/l/bad", val("b"), Some(999))
                .put("/l/x", val("x"), None),
        )
        .await;
    assert!(
        matches!(err, Err(StoreError::LeaseNotFound(999))),
        "{err:?}"
    );

    // Keep-alives hold the short lease past its TTL (etcd may raise 1 s to
    // its minimum, so hold for 3 s).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.keep_alive(short).await.unwrap();
    }
    assert_eq!(store.range("/l/").await.unwrap().0.len(), 2);
    let stopped = Instant::now();
    isdp_tests::eventually(Duration::from_secs(8), "short lease expired", || async {
        let keys: Vec<String> = store
            .range("/l/")
            .await?
            .0
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        anyhow::ensure!(keys == ["/l/long"], "{keys:?}");
        Ok(())
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(900),
        "expired early"
    );
    assert!(matches!(
        store.keep_alive(short).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    store.revoke(long).await.unwrap();
    assert!(store.range("/l/").await.unwrap().0.is_empty());
    assert!(matches!(
        store.revoke(long).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_calls_fail_fast_naming_etcd_and_resume_when_it_returns() {
    let mut etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    store
        .txn(Txn::default().put("/u/a", val("1"), None))
        .await
        .unwrap();
    let (_, rev) = store.range("/u/").await.unwrap();
    let mut w = store.watch("/u/", rev).unwrap();
    etcd.stop_all().await;

    let start = Instant::now();
    let err = store
        .txn(Txn::default().put("/u/b", val("2"), None))
        .await
        .unwrap_err();
    let took = start.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        msg.contains("etcd") && msg.contains(&etcd.endpoints()[0]),
        "{msg}"
    );
    assert!(took < Duration::from_secs(4), "failed only after {took:?}");
    // The watch ends with the same kind of error, for its owner to resume.
    let next = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the watch notices etcd is gone");
    assert!(
        matches!(next, Some(Err(StoreError::Unavailable(_)))),
        "{next:?}"
    );

    etcd.start_all().await;
    isdp_tests::eventually(Duration::from_secs(10), "writes work again", || async {
        store
            .txn(Txn::default().put("/u/b", val("2"), None))
            .await?;
        Ok(())
    })
    .await;
    // Resuming from the last revision seen misses nothing.
    let mut w = store.watch("/u/", rev).unwrap();
    let b = w.next().await.unwrap().unwrap();
    assert!(matches!(&b.events[0], Event::Put(kv) if kv.key == "/u/b"));
}

/// Killing the raft leader: calls issued meanwhile ride out the election
/// (retried within the 3 s budget), and afterwards the client keeps the
/// dead member in its rotation, whose calls fail to connect and must be
/// retried on another member rather than fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_fails_no_call() {
    let mut etcd = EtcdCluster::start(3).await;
    let store = store(&etcd).await;
    for i in 0..5 {
        store
            .txn(Txn::default().put(format!("/d/{i}"), val("v"), None))
            .await
            .unwrap();
    }
    let leader = etcd.leader().await;
    etcd.kill9(leader).await;
    let start = Instant::now();
    let lease = store
        .grant_lease(Duration::from_secs(10))
        .await
        .expect("a call during the election");
    eprintln!(
        "first call after killing the leader took {:?}",
        start.elapsed()
    );
    for i in 0..30 {
        let start = Instant::now();
        store
            .txn(Txn::default().put(format!("/d/x{i}"), val("v"), Some(lease)))
            .await
            .unwrap_or_else(|e| panic!("write {i} with one member down: {e}"));
        store.keep_alive(lease).await.unwrap();
        assert_eq!(store.range("/d/").await.unwrap().0.len(), 6 + i);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "write {i} took {:?}",
            start.elapsed()
        );
    }
}

/// Writes a CA, a server certificate for 127.0.0.1 signed by it, and a
/// client certificate signed by it, as PEM files in `dir`.
fn certificates(dir: &std::path::Path) -> (EtcdTls, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["isdp-control-plane".into()]);
    let tls = EtcdTls {
        ca_file: write("ca.pem", &ca.pem()),
        cert_file: write("server.pem", &server_cert),
        key_file: write("server-key.pem", &server_key),
    };
    (
        tls,
        write("client.pem", &client_cert),
        write("client-key.pem", &client_key),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, client_cert, client_key) = certificates(dir.path());
    let etcd = EtcdCluster::start_tls(1, tls.clone()).await;
    assert!(etcd.endpoints()[0].starts_with("https://"));
    let options = EtcdOptions {
        endpoints: etcd.endpoints(),
        ca_file: Some(tls.ca_file.clone()),
        cert_file: Some(client_cert),
        key_file: Some(client_key),
        ..Default::default()
    };
    let store = EtcdStore::connect(&options).await.expect("connecting");
    store
        .txn(Txn::default().put("/t/a", val("1"), None))
        .await
        .expect("a write over mutual TLS");
    assert_eq!(store.range("/t/").await.unwrap().0.len(), 1);

    // Without a client certificate etcd refuses; the error names etcd.
    let anonymous = EtcdStore::connect(&EtcdOptions {
        cert_file: None,
        key_file: None,
        ..options
    })
    .await
    .expect("the client connects lazily");
    let err = anonymous.range("/t/").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("etcd at https://")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password() {
    let etcd = EtcdCluster::start(1).await;
    let mut admin = store(&etcd).await.client().auth();
    admin
        .user_add(AuthUserAddRequest {
            name: "root".into(),
            password: "s3cret".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .user_grant_role(AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        })
        .await
        .unwrap();
    admin.auth_enable(AuthEnableRequest {}).await.unwrap();

    let endpoints = etcd.endpoints();
    let options = |password: &str| EtcdOptions {
        endpoints: endpoints.clone(),
        username: Some("root".into()),
        password: Some(password.into()),
        ..Default::default()
    };
    let store = EtcdStore::connect(&options("s3cret")).await.expect("login");
    store
        .txn(Txn::default().put("/auth/a", val("1"), None))
        .await
        .expect("an authenticated write");
    // The test cluster lets a token expire after 2 s idle: the store logs
    // in again instead of failing every call from then on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    store
        .txn(Txn::default().put("/auth/b", val("2"), None))
        .await
        .expect("a write after etcd forgot the token");
    assert_eq!(store.range("/auth/").await.unwrap().0.len(), 2);
    // A wrong password fails at startup, naming etcd.
    let err = EtcdStore::connect(&options("wrong"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("etcd at http://"), "{err}");
}

/// Asked for progress, an etcd watch answers with an empty batch at the
/// cluster's revision, covering writes under other prefixes; unasked, it
/// reports nothing but its own prefix's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_asked_for_progress_reports_the_cluster_revision() {
    let etcd = EtcdCluster::start(1).await;
    let store = store(&etcd).await;
    let start = store.range("/p/").await.unwrap().1;
    let mut w = store.watch("/p/", start).unwrap();
    let elsewhere = store
        .txn(Txn::default().put("/q/x", val("1"), None))
        .await
        .unwrap()
        .revision;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.next())
            .await
            .is_err(),
        "a write elsewhere is not an event of this watch"
    );
    // etcd answers a progress request only once the watch is in sync, so
    // ask until it does.
    let progress = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            w.request_progress();
            if let Ok(Some(b)) = tokio::time::timeout(Duration::from_millis(200), w.next()).await {
                break b.unwrap();
            }
        }
    })
    .await
    .expect("no progress within 5 s");
    assert!(progress.is_progress(), "{progress:?}");
    assert!(progress.revision >= elsewhere, "{progress:?} < {elsewhere}");
    // Events still come as events after progress.
    let mine = store
        .txn(Txn::default().put("/p/a", val("2"), None))
        .await
        .unwrap()
        .revision;
    let b = w.next().await.unwrap().unwrap();
    assert_eq!((b.revision, b.events.len()), (mine, 1));
}
