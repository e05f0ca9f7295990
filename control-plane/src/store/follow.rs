//! A small in-memory copy of everything under one key prefix, kept in step
//! with the store: a range, then the watch from that revision. For the
//! control plane's small collections (authorization rules, traffic
//! policies), each change publishes a whole new map, which readers take
//! with one `Arc` clone.
//!
//! While the store is unreachable the copy keeps its content and the watch
//! resumes from the last revision with backoff; only a compacted revision
//! reloads everything. Writers wait on [`Followed::applied`] for their own
//! revision, so they read their own writes; a revision of another prefix
//! is reached through the watch's progress (`progress.rs`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use super::{
    Event, KeyValue, Revision, Store, StoreError,
    progress::{self, Reporter},
};

/// A value as stored, with the revision of its last write (its version, and
/// what compare-and-set compares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub mod_revision: Revision,
}

/// Keys (without the prefix) to entries.
pub type Entries = BTreeMap<String, Entry>;

/// The live copy of one prefix.
#[derive(Clone)]
pub struct Followed {
    entries: watch::Receiver<Arc<Entries>>,
    applied: progress::Applied,
}

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl Followed {
    /// Loads `prefix` and follows it until `shutdown`.
    pub async fn start(
        store: Arc<dyn Store>,
        prefix: String,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Followed, StoreError> {
        let (entries, rev) = load(&*store, &prefix).await?;
        let (entries_tx, entries) = watch::channel(Arc::new(entries));
        let (applied, reporter) = progress::channel(rev);
        tokio::spawn(follow(store, prefix, rev, entries_tx, reporter, shutdown));
        Ok(Followed { entries, applied })
    }

    pub fn entries(&self) -> Arc<Entries> {
        self.entries.borrow().clone()
    }

    /// Every change, as whole new maps.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Entries>> {
        self.entries.clone()
    }

    /// Waits until the copy has applied `revision`, which may be a
    /// revision of another prefix.
    pub async fn applied(&self, revision: Revision) {
        self.applied.wait(revision).await;
    }
}

async fn load(store: &dyn Store, prefix: &str) -> Result<(Entries, Revision), StoreError> {
    let (kvs, rev) = store.range(prefix).await?;
    let mut entries = Entries::new();
    for kv in kvs {
        put(&mut entries, prefix, kv);
    }
    Ok((entries, rev))
}

fn put(entries: &mut Entries, prefix: &str, kv: KeyValue) {
    if let Some(key) = kv.key.strip_prefix(prefix) {
        entries.insert(
            key.to_owned(),
            Entry {
                value: kv.value,
                mod_revision: kv.mod_revision,
            },
        );
    }
}

async fn follow(
    store: Arc<dyn Store>,
    prefix: String,
    mut rev: Revision,
    entries_tx: watch::Sender<Arc<Entries>>,
    mut reporter: Reporter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = RETRY_MIN;
    loop {
        let failure = match store.watch(&prefix, rev) {
            Err(e) => e,
            Ok(mut stream) => loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = reporter.progress_due(rev) => stream.request_progress(),
                    next = stream.next() => match next {
                        Some(Ok(batch)) if batch.is_progress() => {
                            retry = RETRY_MIN;
                            rev = batch.revision;
                            reporter.applied(rev);
                        }
                        Some(Ok(batch)) => {
                            retry = RETRY_MIN;
                            let mut entries = Entries::clone(&entries_tx.borrow());
                            for e in batch.events {
                                match e {
                                    Event::Put(kv) => put(&mut entries, &prefix, kv),
                                    Event::Delete { key } => {
                                        if let Some(k) = key.strip_prefix(&prefix) {
                                            entries.remove(k);
                                        }
                                    }
                                }
                            }
                            rev = batch.revision;
                            entries_tx.send_replace(Arc::new(entries));
                            reporter.applied(rev);
                        }
                        Some(Err(e)) => break e,
                        None => return,
                    },
                }
            },
        };
        match failure {
            StoreError::Closed => return,
            StoreError::Compacted { .. } => match load(&*store, &prefix).await {
                Ok((entries, r)) => {
                    tracing::info!(%prefix, revision = r, "reloaded after compaction");
                    rev = r;
                    entries_tx.send_replace(Arc::new(entries));
                    reporter.applied(rev);
                    continue;
                }
                Err(e) => tracing::warn!(%prefix, error = %e, "reload failed; retrying"),
            },
            e => tracing::warn!(%prefix, error = %e, revision = rev, "watch interrupted; resuming"),
        }
        let delay = retry;
        retry = (retry * 2).min(RETRY_MAX);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
