use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use isdp_proto::v1::{HealthStatus, Instance};
use tokio::sync::watch;

use super::{Change, Registry, RegistryError, SessionTimeouts, session::Sessions};
use crate::store::{Store, StoreError, Txn, embedded::EmbeddedStore};

fn inst(service: &str, id: &str, port: u32) -> Instance {
    Instance {
        id: id.into(),
        service: service.into(),
        address: "127.0.0.1".into(),
        port,
        ..Default::default()
    }
}

async fn registry(dir: &std::path::Path) -> (Registry, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    // A registry dropped just before still holds the file until its tasks
    // have seen the shutdown and let go of the store.
    let mut attempts = 0;
    let store = loop {
        match EmbeddedStore::open(dir) {
            Ok(store) => break store,
            Err(_) if attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reopening the store: {e}"),
        }
    };
    (
        Registry::start(Arc::new(store), "/isdp/", rx)
            .await
            .unwrap(),
        tx,
    )
}

#[tokio::test]
async fn register_is_visible_at_once_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (r, _stop) = registry(dir.path()).await;
        let mut changes = r.subscribe();
        let a = r.register(inst("pay", "pay-1", 80)).await.unwrap();
        assert_eq!(a.weight, 1, "weight defaults to 1");
        let generated = r.register(inst("pay", "", 81)).await.unwrap();
        assert!(generated.id.starts_with("pay-"), "{}", generated.id);
        assert_eq!(r.instances("pay").len(), 2);
        assert_eq!(changes.recv().await.unwrap(), Change::Service("pay".into()));
        r.set_status("pay-1", HealthStatus::Healthy).await.unwrap();
        // Re-registering keeps the health it had.
        r.register(inst("pay", "pay-1", 80)).await.unwrap();
        assert_eq!(
            r.get("pay-1").unwrap().instance.status,
            HealthStatus::Healthy as i32
        );
    }
    let (r, _stop) = registry(dir.path()).await;
    assert_eq!(r.instances("pay").len(), 2);
    assert_eq!(r.services().get("pay"), Some(&(2, 1)));
}

#[tokio::test]
async fn rejected_writes_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    r.register(inst("pay", "pay-1", 80)).await.unwrap();
    let bad = r.register(inst("Bad_Name", "x", 0)).await;
    match bad {
        Err(RegistryError::Invalid(errs)) => {
            let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(fields, ["instance.service", "instance.port"]);
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(matches!(
        r.deregister("nope").await,
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(r.len(), 1);
    r.deregister("pay-1").await.unwrap();
    assert!(r.is_empty());
    assert!(r.services().is_empty());
}

#[tokio::test]
async fn sessions_own_their_instances() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let timeouts = SessionTimeouts {
        grace: Duration::from_millis(200),
        timeout: Duration::from_millis(800),
    };
    let sessions = Sessions::new(r.clone(), timeouts);
    r.register(inst("ops", "ops-1", 80)).await.unwrap();

    // A session may not take over an operator's instance.
    let taken = sessions
        .open("node-a", vec![inst("ops", "ops-1", 80)])
        .await;
    assert!(matches!(taken, Err(RegistryError::PermissionDenied(_))));

    let s = sessions
        .open("node-a", vec![inst("web", "", 8080)])
        .await
        .unwrap();
    assert_eq!(r.get("node-a.web").unwrap().instance.node_id, "node-a");
    s.report("node-a.web", HealthStatus::Healthy).await.unwrap();
    assert!(matches!(
        s.report("ops-1", HealthStatus::Unhealthy).await,
        Err(RegistryError::PermissionDenied(_))
    ));
    s.close().await.unwrap();
    assert!(
        r.get("node-a.web").is_none(),
        "a clean close deregisters at once"
    );

    // A broken stream: unhealthy after the grace period, gone after the timeout.
    let s = sessions
        .open("node-b", vec![inst("web", "", 8081)])
        .await
        .unwrap();
    s.report("node-b.web", HealthStatus::Healthy).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        r.get("node-b.web").unwrap().instance.status,
        HealthStatus::Unhealthy as i32
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(r.get("node-b.web").is_none());

    // Reconnecting inside the grace period keeps the instance healthy.
    let s = sessions
        .open("node-c", vec![inst("web", "", 8082)])
        .await
        .unwrap();
    s.report("node-c.web", HealthStatus::Healthy).await.unwrap();
    drop(s);
    let back = sessions
        .open(
            "node-c",
            vec![Instance {
                status: HealthStatus::Healthy as i32,
                ..inst("web", "", 8082)
            }],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        r.get("node-c.web").unwrap().instance.status,
        HealthStatus::Healthy as i32
    );
    drop(back);
}

/// A store whose watches break (Unavailable) after one batch, as an etcd
/// watch does when its member dies, and which counts full reloads.
struct Flaky {
    inner: EmbeddedStore,
    ranges: std::sync::atomic::AtomicUsize,
    watches: std::sync::Mutex<Vec<crate::store::Revision>>,
}

#[async_trait::async_trait]
impl Store for Flaky {
    async fn range(
        &self,
        prefix: &str,
    ) -> Result<(Vec<crate::store::KeyValue>, crate::store::Revision), StoreError> {
        self.ranges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.range(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<crate::store::TxnOutcome, StoreError> {
        self.inner.txn(txn).await
    }
    fn watch(
        &self,
        prefix: &str,
        after: crate::store::Revision,
    ) -> Result<crate::store::WatchStream, StoreError> {
        self.watches.lock().unwrap().push(after);
        let stream = self.inner.watch(prefix, after)?;
        let broken = futures::stream::once(async {
            Err(StoreError::Unavailable("etcd at test: member died".into()))
        });
        Ok(stream.map_batches(|batches| batches.take(1).chain(broken)))
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<crate::store::LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: crate::store::LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: crate::store::LeaseId) -> Result<(), StoreError> {
        self.inner.revoke(lease).await
    }
}

#[tokio::test]
async fn a_broken_watch_resumes_from_its_revision_without_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Flaky {
        inner: EmbeddedStore::open(dir.path()).unwrap(),
        ranges: Default::default(),
        watches: Default::default(),
    });
    let (_stop, rx) = watch::channel(false);
    let r = Registry::start(store.clone(), "/isdp/", rx).await.unwrap();
    let mut changes = r.subscribe();
    // Every write breaks the watch once; each must still be seen, and the
    // view must resume after the last revision it applied, not reload.
    for i in 0..5 {
        r.register(inst("pay", &format!("pay-{i}"), 80))
            .await
            .unwrap();
    }
    assert_eq!(r.instances("pay").len(), 5);
    let starts = store.watches.lock().unwrap().clone();
    assert!(starts.len() >= 5, "{starts:?}");
    assert!(
        starts.windows(2).all(|w| w[0] < w[1]),
        "each watch resumes after the last applied revision: {starts:?}"
    );
    assert_eq!(
        store.ranges.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "only the initial load"
    );
    while let Ok(c) = changes.try_recv() {
        assert_ne!(c, Change::All, "no resync");
    }
}

/// Two replicas over one store: a sidecar whose stream to A broke reopens
/// on B. A's grace timer must leave the instance alone (it now hangs on
/// B's lease), and A's old lease expiring must not delete it.
#[tokio::test]
async fn a_session_reopened_on_another_replica_survives_the_old_ones_timers() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let (_stop, rx) = watch::channel(false);
    let ra = Registry::start(store.clone(), "/isdp/", rx.clone())
        .await
        .unwrap();
    let rb = Registry::start(store, "/isdp/", rx).await.unwrap();
    let timeouts = SessionTimeouts {
        grace: Duration::from_millis(200),
        timeout: Duration::from_millis(600),
    };
    let (a, b) = (
        Sessions::replica(ra.clone(), timeouts),
        Sessions::replica(rb.clone(), timeouts),
    );
    let healthy = || Instance {
        status: HealthStatus::Healthy as i32,
        ..inst("web", "", 8080)
    };
    let on_a = a.open("node-x", vec![healthy()]).await.unwrap();
    let old_lease = ra.get("node-x.web").unwrap().lease;
    drop(on_a); // the stream to A broke
    let on_b = b.open("node-x", vec![healthy()]).await.unwrap();
    let moved = rb.get("node-x.web").unwrap();
    assert_ne!(moved.lease, old_lease, "re-put under B's lease");
    // Past A's grace period and its lease's expiry.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for r in [&ra, &rb] {
        let s = r.get("node-x.web").expect("still registered");
        assert_eq!(s.instance.status, HealthStatus::Healthy as i32);
    }
    drop(on_b);
}

/// A write under another prefix (an authorization rule, a token, the CA)
/// moves the store's revision past anything the registry view sees; the
/// session calls that wait for "the current revision" must still return.
#[tokio::test]
async fn sessions_open_and_close_after_writes_outside_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let timeouts = SessionTimeouts {
        grace: Duration::from_secs(10),
        timeout: Duration::from_secs(60),
    };
    let sessions = Sessions::new(r.clone(), timeouts);
    let store = r.store().clone();
    let elsewhere = |key: &'static str| {
        let store = store.clone();
        async move {
            store
                .txn(Txn::default().put(key, bytes::Bytes::from_static(b"x"), None))
                .await
                .unwrap();
        }
    };

    // A client-only sidecar: a session with no instances.
    elsewhere("/isdp/authz/rules/payments/allow-web").await;
    let empty = within("opening an empty session", sessions.open("web-1", vec![]))
        .await
        .unwrap();
    elsewhere("/isdp/tokens/abc").await;
    within("closing an empty session", empty.close())
        .await
        .unwrap();

    // A session with an instance, closed after another outside write.
    let session = within(
        "opening a session",
        sessions.open("pay-1", vec![inst("pay", "", 80)]),
    )
    .await
    .unwrap();
    elsewhere("/isdp/policies/pay").await;
    within("closing a session", session.close()).await.unwrap();
    assert!(r.instances("pay").is_empty());
}

/// `f`, or a panic naming `what` if it takes longer than 5 s.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung after a write outside the registry"))
}
