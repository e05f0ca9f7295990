//! Leader election for work that must run on exactly one replica
//! (control-plane health checks of operator-registered instances).
//!
//! Built on the [`Store`] trait alone, so it works on any backend and is
//! tested on the embedded one: a replica leads while it holds the leader
//! key, written with a compare-and-set "key absent" transaction under its
//! own lease. The leader keeps the lease alive; when it dies (or is cut off)
//! the lease expires, the key goes with it, and the next replica to retry
//! the transaction wins. A leader that cannot renew steps down *before* its
//! lease can have expired, so two replicas never believe they lead at once
//! (barring clock jumps larger than a third of the TTL).
//!
//! With the embedded store there is only one control plane, so it simply
//! always leads ([`always`]).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::store::{LeaseId, Store, StoreError, Txn, TxnOutcome};

/// A leadership that never changes: the single control plane of the
/// embedded store.
/// Its sender is gone at once: readers see `true` for ever and
/// `changed()` never fires.
pub fn always() -> watch::Receiver<bool> {
    watch::channel(true).1
}

/// Campaigns for `key` until `shutdown`; the receiver says whether this
/// replica leads right now. On shutdown a leader revokes its lease, so
/// another replica takes over at once instead of after the TTL.
pub fn spawn(
    store: Arc<dyn Store>,
    key: String,
    me: String,
    ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (leading, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut campaign = Campaign {
            store,
            key,
            me: Bytes::from(me),
            ttl,
            leading,
            lease: None,
            renewed: Instant::now(),
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => {}
            _ = campaign.run() => {}
        }
        campaign.leading.send_replace(false);
        if let Some(lease) = campaign.lease.take() {
            let _ = campaign.store.revoke(lease).await;
        }
    });
    (rx, task)
}

struct Campaign {
    store: Arc<dyn Store>,
    key: String,
    /// Written as the key's value, so operators can see who leads.
    me: Bytes,
    ttl: Duration,
    leading: watch::Sender<bool>,
    /// The lease this replica campaigns (or leads) with.
    lease: Option<LeaseId>,
    /// When the lease was last granted or renewed (measured before the
    /// request went out, so it errs early): it lives until at least
    /// `renewed + ttl`.
    renewed: Instant,
}

// === impl Campaign ===

impl Campaign {
    /// How often a leader renews and a follower retries.
    fn period(&self) -> Duration {
        self.ttl / 3
    }

    async fn run(&mut self) {
        loop {
            let lease = match self.lease {
                Some(l) => l,
                None => {
                    let sent = Instant::now();
                    match self.store.grant_lease(self.ttl).await {
                        Ok(l) => {
                            self.lease = Some(l);
                            self.renewed = sent;
                            l
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "leader election: granting a lease");
                            tokio::time::sleep(self.period()).await;
                            continue;
                        }
                    }
                }
            };
            let attempt = self
                .store
                .txn(Txn::default().when_mod_revision(&self.key, 0).put(
                    self.key.clone(),
                    self.me.clone(),
                    Some(lease),
                ))
                .await;
            // A transaction whose outcome was lost (a timeout, a retry by
            // the store) may have written the key under our lease: then the
            // compare fails although we hold it, and we lead.
            let attempt = match attempt {
                Ok(out) if !out.succeeded && self.holds(lease).await => Ok(TxnOutcome {
                    succeeded: true,
                    ..out
                }),
                other => other,
            };
            match attempt {
                Ok(out) if out.succeeded => {
                    tracing::info!(key = %self.key, "leading");
                    self.leading.send_replace(true);
                    self.lead(lease).await;
                    self.leading.send_replace(false);
                    tracing::warn!(key = %self.key, "stepped down as leader");
                    self.lease = None;
                }
                Ok(_) => {
                    // Another replica leads: retry after a period, keeping
                    // our own lease alive meanwhile.
                    tokio::time::sleep(self.period()).await;
                    let sent = Instant::now();
                    match self.store.keep_alive(lease).await {
                        Ok(()) => self.renewed = sent,
                        Err(StoreError::LeaseNotFound(_)) => self.lease = None,
                        Err(_) => {}
                    }
                }
                Err(StoreError::LeaseNotFound(_)) => self.lease = None,
                Err(e) => {
                    tracing::debug!(error = %e, "leader election: campaigning");
                    tokio::time::sleep(self.period()).await;
                }
            }
        }
    }

    /// Whether the leader key is attached to `lease` (ours).
    async fn holds(&self, lease: LeaseId) -> bool {
        match self.store.range(&self.key).await {
            Ok((kvs, _)) => kvs
                .iter()
                .any(|kv| kv.key == self.key && kv.lease == Some(lease)),
            Err(_) => false,
        }
    }

    /// Renews the lease until that fails for long enough that it might
    /// have expired; returns when leadership is lost.
    async fn lead(&mut self, lease: LeaseId) {
        loop {
            tokio::time::sleep(self.period()).await;
            let sent = Instant::now();
            match self.store.keep_alive(lease).await {
                Ok(()) => self.renewed = sent,
                Err(StoreError::LeaseNotFound(_)) => return,
                Err(e) => {
                    // Step down one period before the lease can expire.
                    if self.renewed.elapsed() + self.period() >= self.ttl {
                        tracing::warn!(error = %e, "cannot renew the leader lease");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    const TTL: Duration = Duration::from_millis(600);

    fn both(a: &watch::Receiver<bool>, b: &watch::Receiver<bool>) -> (bool, bool) {
        (*a.borrow(), *b.borrow())
    }

    /// Waits until exactly one leads, checking that two never do.
    async fn one_leader(a: &watch::Receiver<bool>, b: &watch::Receiver<bool>) -> (bool, bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = both(a, b);
            assert!(!(now.0 && now.1), "two leaders at once");
            if now.0 != now.1 {
                return now;
            }
            assert!(Instant::now() < deadline, "no leader within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn one_replica_leads_and_a_dead_leaders_lease_hands_over() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (_stop, shutdown) = watch::channel(false);
        let key = "/isdp/leader/test".to_string();
        let (a, ta) = spawn(
            store.clone(),
            key.clone(),
            "a".into(),
            TTL,
            shutdown.clone(),
        );
        let (b, tb) = spawn(
            store.clone(),
            key.clone(),
            "b".into(),
            TTL,
            shutdown.clone(),
        );
        let first = one_leader(&a, &b).await;
        // Stays stable while the leader renews (several TTLs).
        for _ in 0..20 {
            tokio::time::sleep(TTL / 5).await;
            assert_eq!(both(&a, &b), first, "leadership moved without a failure");
        }
        // Kill the leader without a clean shutdown: its lease must expire.
        let (survivor, dead) = if first.0 { (&b, ta) } else { (&a, tb) };
        dead.abort();
        let killed = Instant::now();
        let mut s = survivor.clone();
        tokio::time::timeout(Duration::from_secs(5), s.wait_for(|l| *l))
            .await
            .expect("the survivor takes over")
            .unwrap();
        assert!(
            killed.elapsed() >= TTL / 2,
            "took over before the lease could expire"
        );
        let (kvs, _) = store.range(&key).await.unwrap();
        let other = if first.0 { "b" } else { "a" };
        assert_eq!(kvs[0].value, Bytes::from(other));
    }

    #[tokio::test]
    async fn a_clean_shutdown_hands_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let key = "/isdp/leader/test".to_string();
        let (stop_a, shut_a) = watch::channel(false);
        let (_stop_b, shut_b) = watch::channel(false);
        let ttl = Duration::from_secs(3);
        let (a, ta) = spawn(store.clone(), key.clone(), "a".into(), ttl, shut_a);
        let mut a2 = a.clone();
        a2.wait_for(|l| *l).await.unwrap();
        let (mut b, _tb) = spawn(store.clone(), key.clone(), "b".into(), ttl, shut_b);
        stop_a.send(true).unwrap();
        ta.await.unwrap();
        assert!(!*a.borrow());
        // Without the revoke this would take the 3 s TTL; b retries every 1 s.
        tokio::time::timeout(Duration::from_secs(2), b.wait_for(|l| *l))
            .await
            .expect("b takes over after a's revoke")
            .unwrap();
    }

    /// Applies transactions but loses the first answer, as a timeout after
    /// etcd applied the write does.
    struct LosesFirstAnswer {
        inner: EmbeddedStore,
        lost: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for LosesFirstAnswer {
        async fn range(
            &self,
            prefix: &str,
        ) -> Result<(Vec<crate::store::KeyValue>, crate::store::Revision), StoreError> {
            self.inner.range(prefix).await
        }
        async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
            let out = self.inner.txn(txn).await?;
            if !self.lost.swap(true, std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Unavailable("etcd at test: timed out".into()));
            }
            Ok(out)
        }
        fn watch(
            &self,
            prefix: &str,
            after: crate::store::Revision,
        ) -> Result<crate::store::WatchStream, StoreError> {
            self.inner.watch(prefix, after)
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
            self.inner.revoke(lease).await
        }
    }

    #[tokio::test]
    async fn a_lost_answer_to_a_winning_campaign_still_leads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LosesFirstAnswer {
            inner: EmbeddedStore::open(dir.path()).unwrap(),
            lost: Default::default(),
        });
        let (_stop, shutdown) = watch::channel(false);
        let (mut leading, _task) = spawn(store, "/isdp/leader/t".into(), "a".into(), TTL, shutdown);
        // Without noticing the key is its own, it would wait for ever for a
        // key that its own keep-alives keep alive.
        tokio::time::timeout(Duration::from_secs(2), leading.wait_for(|l| *l))
            .await
            .expect("leads despite the lost answer")
            .unwrap();
    }
}
