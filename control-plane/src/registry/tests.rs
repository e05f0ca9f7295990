use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use isdp_proto::v1::{HealthStatus, Instance};
use tokio::sync::watch;

use super::{
    Change, Quotas, Registry, RegistryError, SessionTimeouts,
    quota::Quota,
    session::{Opener, Sessions},
};
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

/// An instance as a sidecar registers it: reached through its inbound port.
fn sidecar(service: &str, port: u32) -> Instance {
    Instance {
        inbound_port: 15006,
        ..inst(service, "", port)
    }
}

async fn registry(dir: &std::path::Path) -> (Registry, watch::Sender<bool>) {
    registry_with(dir, Quotas::default()).await
}

async fn registry_with(dir: &std::path::Path, quotas: Quotas) -> (Registry, watch::Sender<bool>) {
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
        Registry::start_with(Arc::new(store), "/isdp/", quotas, rx)
            .await
            .unwrap(),
        tx,
    )
}

/// A join principal for `services`, counted as `token`.
fn join(token: &str, services: &[&str]) -> Opener {
    Opener {
        principal: Some(token.into()),
        services: Some(services.iter().map(|s| s.to_string()).collect()),
    }
}

const TIMEOUTS: SessionTimeouts = SessionTimeouts {
    grace: Duration::from_millis(200),
    timeout: Duration::from_millis(800),
};

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
    let anyone = Opener::anyone();
    r.register(inst("ops", "ops-1", 80)).await.unwrap();
    r.register(inst("ops", "node-a.ops", 80)).await.unwrap();

    // A session may not take over an operator's instance, even one whose
    // id is the session's own form.
    let taken = sessions
        .open("node-a", vec![sidecar("ops", 80)], &anyone)
        .await;
    assert!(
        matches!(taken, Err(RegistryError::PermissionDenied(_))),
        "{taken:?}"
    );

    let s = sessions
        .open("node-a", vec![sidecar("web", 8080)], &anyone)
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
        .open("node-b", vec![sidecar("web", 8081)], &anyone)
        .await
        .unwrap();
    s.report("node-b.web", HealthStatus::Healthy).await.unwrap();
    drop(s);
    until(|| status(&r, "node-b.web") != Some(HealthStatus::Healthy as i32)).await;
    assert_eq!(
        r.get("node-b.web").unwrap().instance.status,
        HealthStatus::Unhealthy as i32
    );
    until(|| r.get("node-b.web").is_none()).await;
    assert!(r.get("node-b.web").is_none());

    // Reconnecting inside the grace period keeps the instance healthy.
    let s = sessions
        .open("node-c", vec![sidecar("web", 8082)], &anyone)
        .await
        .unwrap();
    s.report("node-c.web", HealthStatus::Healthy).await.unwrap();
    drop(s);
    let back = sessions
        .open(
            "node-c",
            vec![Instance {
                status: HealthStatus::Healthy as i32,
                ..sidecar("web", 8082)
            }],
            &anyone,
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

/// What a session's epochs are kept for ends with it: a clean close
/// forgets them at once, a broken stream after its grace period, so nodes
/// that come and go leave nothing behind.
// A real clock: the store's writer is a thread of its own, which a
// paused clock would not wait for.
#[tokio::test]
async fn session_epochs_are_forgotten_once_the_session_is_over() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let grace = Duration::from_millis(300);
    let timeouts = SessionTimeouts {
        grace,
        timeout: Duration::from_secs(60),
    };
    let sessions = Sessions::new(r.clone(), timeouts);
    let anyone = Opener::anyone();
    for n in 0..10 {
        let s = sessions
            .open(
                &format!("node-{n}"),
                vec![sidecar("web", 8000 + n)],
                &anyone,
            )
            .await
            .unwrap();
        if n % 2 == 0 {
            s.close().await.unwrap();
        } else {
            drop(s);
        }
    }
    let kept = sessions
        .open("node-1", vec![sidecar("web", 8001)], &anyone)
        .await
        .unwrap();
    tokio::time::sleep(grace + Duration::from_millis(400)).await;
    assert_eq!(sessions.epochs_kept(), 1, "only the reopened session's");
    drop(kept);
    tokio::time::sleep(grace + Duration::from_millis(400)).await;
    assert_eq!(sessions.epochs_kept(), 0);
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
        ..sidecar("web", 8080)
    };
    // The sidecar joined with its token on A and reconnects to B on its
    // certificate: another principal of the same service.
    let on_a = a
        .open("node-x", vec![healthy()], &join("token-1", &["web"]))
        .await
        .unwrap();
    let old_lease = ra.get("node-x.web").unwrap().lease;
    drop(on_a); // the stream to A broke
    let on_b = b
        .open(
            "node-x",
            vec![healthy()],
            &join("spiffe://isdp.local/svc/web", &["web"]),
        )
        .await
        .unwrap();
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

fn status(r: &Registry, id: &str) -> Option<i32> {
    r.get(id).map(|s| s.instance.status)
}

/// A join principal's session never touches another service's instances,
/// whichever sidecar took the node id first.
#[tokio::test]
async fn a_join_principal_acts_only_as_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let sessions = Sessions::new(r.clone(), TIMEOUTS);
    let (web, pay) = (join("tw", &["web"]), join("tp", &["payments"]));

    // web squats node-b before the payments sidecar connects.
    let squat = sessions
        .open("node-b", vec![sidecar("web", 8080)], &web)
        .await
        .unwrap();
    let victim = sessions
        .open("node-b", vec![sidecar("payments", 9090)], &pay)
        .await
        .expect("another service's session on the same node id");
    victim
        .report("node-b.payments", HealthStatus::Healthy)
        .await
        .unwrap();
    assert_eq!(
        victim
            .instances()
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        ["node-b.payments"],
        "a session answers with its own instances only"
    );

    // web can neither report for payments' instance ...
    let refused = squat
        .report("node-b.payments", HealthStatus::Unhealthy)
        .await;
    assert!(
        matches!(&refused, Err(RegistryError::PermissionDenied(m)) if m.contains("not among them") && !m.contains("payments")),
        "{refused:?}"
    );
    // ... nor register its id, nor its service ...
    let squatted = Instance {
        id: "node-b.payments".into(),
        ..sidecar("web", 8080)
    };
    let refused = sessions.open("node-b", vec![squatted], &web).await;
    assert!(
        matches!(&refused, Err(RegistryError::Invalid(e)) if e[0].field == "open.instances[0].id"),
        "{refused:?}"
    );
    let refused = sessions
        .open("node-b", vec![sidecar("payments", 9090)], &web)
        .await;
    assert!(
        matches!(refused, Err(RegistryError::PermissionDenied(_))),
        "{refused:?}"
    );
    // ... and, its session over, reopening the node (with nothing)
    // replaces only web's own.
    drop(squat);
    let emptied = sessions.open("node-b", vec![], &web).await.unwrap();
    assert!(
        r.get("node-b.web").is_none(),
        "web's own stale instance goes"
    );
    assert_eq!(
        status(&r, "node-b.payments"),
        Some(HealthStatus::Healthy as i32)
    );
    emptied.close().await.unwrap();

    // web's session breaking: its grace timer leaves payments alone.
    let again = sessions
        .open("node-b", vec![sidecar("web", 8080)], &web)
        .await
        .unwrap();
    drop(again);
    until(|| status(&r, "node-b.web") == Some(HealthStatus::Unhealthy as i32)).await;
    assert_eq!(
        status(&r, "node-b.web"),
        Some(HealthStatus::Unhealthy as i32)
    );
    assert_eq!(
        status(&r, "node-b.payments"),
        Some(HealthStatus::Healthy as i32),
        "another service's grace timer marked payments"
    );
    // And payments' clean close removes only its own.
    victim.close().await.unwrap();
    assert!(r.get("node-b.payments").is_none());
    assert!(r.get("node-b.web").is_some());
}

#[tokio::test]
async fn session_instances_are_reached_through_their_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let sessions = Sessions::new(r.clone(), TIMEOUTS);
    for port in [0, 65536] {
        let plaintext = Instance {
            inbound_port: port,
            ..sidecar("web", 8080)
        };
        let refused = sessions
            .open(
                "node-a",
                vec![sidecar("db", 5432), plaintext],
                &Opener::anyone(),
            )
            .await;
        match refused {
            Err(RegistryError::Invalid(e)) => {
                assert_eq!(e.len(), 1, "{e:?}");
                assert_eq!(e[0].field, "open.instances[1].inbound_port");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    assert!(r.is_empty(), "a refused open stores nothing");
    // An operator may register a sidecar-less (plaintext) endpoint.
    r.register(inst("legacy", "legacy-1", 8080)).await.unwrap();
}

#[tokio::test]
async fn an_operator_registration_does_not_take_over_a_session_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let sessions = Sessions::new(r.clone(), TIMEOUTS);
    let s = sessions
        .open("node-a", vec![sidecar("web", 8080)], &Opener::anyone())
        .await
        .unwrap();
    let refused = r.register(inst("web", "node-a.web", 9999)).await;
    assert!(
        matches!(&refused, Err(RegistryError::OwnedBySession(m)) if m.contains("node-a")),
        "{refused:?}"
    );
    let kept = r.get("node-a.web").unwrap();
    assert_eq!(kept.instance.node_id, "node-a");
    assert_eq!(kept.instance.port, 8080);
    // Deregistering first makes it the operator's.
    r.deregister("node-a.web").await.unwrap();
    r.register(inst("web", "node-a.web", 9999)).await.unwrap();
    assert_eq!(r.get("node-a.web").unwrap().instance.node_id, "");
    drop(s);
}

#[tokio::test]
async fn quotas_refuse_growth_naming_the_limit_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let quotas = Quotas {
        instances_per_service: 2,
        instances_per_session: 1,
        sessions_per_principal: 1,
        ..Quotas::default()
    };
    let (r, _stop) = registry_with(dir.path(), quotas).await;
    fn quota<T>(e: Result<T, RegistryError>) -> (Quota, String) {
        match e {
            Err(RegistryError::Quota(q)) => (q.quota, q.to_string()),
            Err(other) => panic!("expected a quota error, got {other:?}"),
            Ok(_) => panic!("expected a quota error, got Ok"),
        }
    }

    r.register(inst("web", "web-1", 80)).await.unwrap();
    r.register(inst("web", "web-2", 80)).await.unwrap();
    let (q, msg) = quota(r.register(inst("web", "web-3", 80)).await);
    assert_eq!(q, Quota::InstancesPerService);
    assert!(msg.contains("--max-instances-per-service (2)"), "{msg}");
    assert!(r.get("web-3").is_none());
    // Replacing one is no growth.
    r.register(inst("web", "web-2", 81)).await.unwrap();

    let sessions = Sessions::new(r.clone(), TIMEOUTS);
    let t = join("t", &["web", "db"]);
    let (q, _) = quota(
        sessions
            .open("node-a", vec![sidecar("db", 1), sidecar("web", 2)], &t)
            .await,
    );
    assert_eq!(q, Quota::InstancesPerSession);
    let (q, _) = quota(sessions.open("node-a", vec![sidecar("web", 2)], &t).await);
    assert_eq!(q, Quota::InstancesPerService, "sessions count too");
    assert!(r.get("node-a.web").is_none());

    let first = sessions
        .open("node-a", vec![sidecar("db", 1)], &t)
        .await
        .unwrap();
    let (q, msg) = quota(sessions.open("node-b", vec![sidecar("db", 1)], &t).await);
    assert_eq!(q, Quota::SessionsPerPrincipal);
    assert!(msg.contains("--max-sessions-per-principal (1)"), "{msg}");
    assert!(r.get("node-b.db").is_none());
    // Another principal has its own count; the first's frees on close.
    let other = sessions
        .open("node-c", vec![sidecar("db", 1)], &join("u", &["db"]))
        .await
        .unwrap();
    first.close().await.unwrap();
    let second = sessions
        .open("node-b", vec![sidecar("db", 1)], &t)
        .await
        .unwrap();
    drop((other, second));
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
    let empty = within(
        "opening an empty session",
        sessions.open("web-1", vec![], &Opener::anyone()),
    )
    .await
    .unwrap();
    elsewhere("/isdp/tokens/abc").await;
    within("closing an empty session", empty.close())
        .await
        .unwrap();

    // A session with an instance, closed after another outside write.
    let session = within(
        "opening a session",
        sessions.open("pay-1", vec![sidecar("pay", 80)], &Opener::anyone()),
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

/// A lease the store expired while the session stayed open (the replica
/// cut off from etcd past the session timeout) takes the instances with
/// it: the keep-alive notices and the session says so, so the stream ends
/// and the sidecar registers again. A session whose lease lives never
/// says so.
#[tokio::test]
async fn a_session_whose_lease_the_store_lost_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let sessions = Sessions::new(r.clone(), TIMEOUTS);
    let anyone = Opener::anyone();
    let lost = sessions
        .open("node-a", vec![sidecar("web", 8080)], &anyone)
        .await
        .unwrap();
    let kept = sessions
        .open("node-b", vec![sidecar("web", 8081)], &anyone)
        .await
        .unwrap();
    let lease = r.get("node-a.web").unwrap().lease.expect("a session lease");
    r.store().revoke(lease).await.unwrap();

    // The keep-alive runs every third of the timeout.
    tokio::time::timeout(TIMEOUTS.timeout * 2, lost.lease_lost())
        .await
        .expect("the lost lease is noticed within a keep-alive period");
    assert!(
        tokio::time::timeout(TIMEOUTS.timeout, kept.lease_lost())
            .await
            .is_err(),
        "a live lease is not reported lost"
    );
    assert!(r.get("node-b.web").is_some());
}

/// A session that registers nothing (what a stopping sidecar opens to
/// deregister) removes the node's instances left by sessions that are
/// over, but not those of a session still open: a sidecar started with
/// the same node id while the old one was stopping keeps its instance.
#[tokio::test]
async fn an_empty_session_leaves_an_open_sessions_instances_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let sessions = Sessions::new(r.clone(), TIMEOUTS);
    let anyone = Opener::anyone();
    let newer = sessions
        .open("host9", vec![sidecar("web", 8080)], &anyone)
        .await
        .unwrap();
    let farewell = sessions.open("host9", vec![], &anyone).await.unwrap();
    farewell.close().await.unwrap();
    assert!(
        r.get("host9.web").is_some(),
        "the open session's instance went"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), newer.superseded())
            .await
            .is_err(),
        "an empty session takes nothing from an open one"
    );

    // Once that session is over, an empty one removes what it left.
    drop(newer);
    let farewell = sessions.open("host9", vec![], &anyone).await.unwrap();
    farewell.close().await.unwrap();
    assert!(r.get("host9.web").is_none());
}

/// A newer session of the same node takes the instances; the older one
/// is told (its stream then ends, so a sidecar that still runs finds out)
/// and, once dropped, leaves the newer one's instances alone.
#[tokio::test]
async fn a_newer_session_of_the_node_supersedes_the_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _stop) = registry(dir.path()).await;
    let sessions = Sessions::new(r.clone(), TIMEOUTS);
    let anyone = Opener::anyone();
    let older = sessions
        .open("node-a", vec![sidecar("web", 8080)], &anyone)
        .await
        .unwrap();
    let other = sessions
        .open("node-b", vec![sidecar("web", 8081)], &anyone)
        .await
        .unwrap();
    let newer = sessions
        .open("node-a", vec![sidecar("web", 8080)], &anyone)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), older.superseded())
        .await
        .expect("the older session is told");
    for (s, who) in [(&newer, "the newer session"), (&other, "another node's")] {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.superseded())
                .await
                .is_err(),
            "{who} is not superseded"
        );
    }
    newer
        .report("node-a.web", HealthStatus::Healthy)
        .await
        .unwrap();
    drop(older);
    tokio::time::sleep(TIMEOUTS.grace * 2).await;
    let kept = r.get("node-a.web").expect("the newer session's instance");
    assert_eq!(kept.instance.status(), HealthStatus::Healthy);
}

/// Waits until `done` holds or 10 s pass: the session timers (TIMEOUTS)
/// run on real time, so a loaded machine gets room instead of a fixed
/// sleep; the caller's assertion says what was expected.
async fn until(mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
