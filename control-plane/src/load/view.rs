//! Every replica's copy of the load summaries (`<prefix>loads/`), followed
//! like the registry follows instances, so each computes the same weights
//! whichever replica holds the session the reports came on.

use std::collections::BTreeSet;
use std::sync::Arc;

use isdp_proto::v1::LoadSummary;
use prost::Message;
use tokio::sync::watch;

use super::sink;
use crate::store::{Store, StoreError, follow::Entries, follow::Followed};

/// A cheap handle to the followed summaries.
#[derive(Clone)]
pub struct LoadView {
    followed: Followed,
}

// === impl LoadView ===

impl LoadView {
    /// Loads the summaries under `mesh_prefix` and follows them until
    /// `shutdown`.
    pub async fn start(
        store: Arc<dyn Store>,
        mesh_prefix: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<LoadView, StoreError> {
        let followed = Followed::start(store, sink::prefix(mesh_prefix), shutdown).await?;
        Ok(LoadView { followed })
    }

    /// Instance `id`'s latest summary.
    pub fn get(&self, id: &str) -> Option<LoadSummary> {
        decode(self.followed.entries().get(id)?.value.as_ref(), id)
    }

    /// The summaries as they are now, for reading several at once.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.followed.entries())
    }

    /// Every change, as whole new copies.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Entries>> {
        self.followed.subscribe()
    }
}

/// The summaries at one moment.
pub struct Snapshot(Arc<Entries>);

impl Snapshot {
    pub fn get(&self, id: &str) -> Option<LoadSummary> {
        decode(self.0.get(id)?.value.as_ref(), id)
    }
}

/// The instance ids whose summary differs between `old` and `new`.
pub fn changed(old: &Entries, new: &Entries) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for (k, v) in new {
        if old.get(k).map(|o| o.mod_revision) != Some(v.mod_revision) {
            ids.insert(k.clone());
        }
    }
    ids.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
    ids
}

/// Summaries whose blackout (`blackout_ms` after they turned usable) ends
/// within `(after, until]` (Unix ms): their weights change then, with no
/// write to say so.
pub fn leaving_blackout(
    entries: &Entries,
    blackout_ms: i64,
    after: i64,
    until: i64,
) -> Vec<String> {
    entries
        .iter()
        .filter_map(|(id, e)| {
            let s = decode(e.value.as_ref(), id)?;
            let end = s.usable_since_unix_ms.checked_add(blackout_ms)?;
            (s.usable_since_unix_ms != 0 && end > after && end <= until).then(|| id.clone())
        })
        .collect()
}

fn decode(bytes: &[u8], id: &str) -> Option<LoadSummary> {
    match LoadSummary::decode(bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(instance = %id, error = %e, "undecodable load summary in store; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::store::{Txn, embedded::EmbeddedStore};

    fn summary(id: &str, rps: f64, since: i64) -> Bytes {
        Bytes::from(
            LoadSummary {
                instance_id: id.into(),
                rps,
                eps: 0.0,
                utilization: 0.5,
                usable_since_unix_ms: since,
            }
            .encode_to_vec(),
        )
    }

    /// What one replica writes, another's view reads; a revoked lease
    /// takes the summary away; blackout ends are found.
    #[tokio::test]
    async fn replicas_read_what_the_session_replica_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (_stop, shutdown) = watch::channel(false);
        let view = LoadView::start(store.clone(), "/isdp/", shutdown.clone())
            .await
            .unwrap();
        let other = LoadView::start(store.clone(), "/isdp/", shutdown)
            .await
            .unwrap();
        let mut changes = other.subscribe();
        let before = changes.borrow_and_update().clone();
        let lease = store
            .grant_lease(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        store
            .txn(Txn::default().put(
                "/isdp/loads/n1.web",
                summary("n1.web", 120.0, 1_000),
                Some(lease),
            ))
            .await
            .unwrap();
        changes.changed().await.unwrap();
        let after = changes.borrow_and_update().clone();
        assert_eq!(
            changed(&before, &after),
            BTreeSet::from(["n1.web".to_owned()])
        );
        assert_eq!(other.get("n1.web").unwrap().rps, 120.0);
        assert_eq!(leaving_blackout(&after, 10_000, 10_000, 11_000), ["n1.web"]);
        assert!(leaving_blackout(&after, 10_000, 11_000, 12_000).is_empty());
        store.revoke(lease).await.unwrap();
        changes.changed().await.unwrap();
        assert!(
            other.get("n1.web").is_none(),
            "gone with the session's lease"
        );
        let _ = view;
    }
}
