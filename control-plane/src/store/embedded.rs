//! The default store: a redb file in the data directory.
//!
//! One writer thread owns the database. Callers queue transactions; the
//! writer takes everything queued, applies it in a single redb write
//! transaction and commits once (fsync), then answers each caller. That group
//! commit is what lets durable writes scale with concurrency instead of with
//! the disk's fsync rate. Watchers are served from an in-memory history of
//! recent revisions plus a broadcast of new ones.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use redb::{Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    Event, KeyValue, LeaseId, Revision, Store, StoreError, Txn, TxnOutcome, WatchBatch, WatchStream,
};

/// key -> [mod_revision u64 LE][lease u64 LE, 0 = none][value].
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// "revision", "next_lease".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// lease id -> ttl in milliseconds. Leases restart their full TTL when the
/// store opens, as etcd's do on a leader change.
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
/// lease id -> the keys put under it: revoking a lease (a session ending)
/// reads its keys here instead of scanning every key in the writer thread.
/// Written in the same transactions as the keys; built once from the keys
/// when a store written before it existed is opened ("lease_index" in
/// META says it is complete).
const LEASE_KEYS: MultimapTableDefinition<u64, &str> = MultimapTableDefinition::new("lease_keys");

/// Revisions kept for watchers that resume from the past.
const HISTORY: usize = 16_384;
/// Most transactions folded into one commit.
const MAX_BATCH: usize = 4_096;
/// A watcher behind a steady stream of commits outside its prefix reports
/// progress at least this often, so a writer waiting on it is not starved.
const PROGRESS_EVERY: usize = 64;

#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Request>,
    /// Turns true once the writer thread has released the database file.
    closed: tokio::sync::watch::Receiver<bool>,
}

struct Shared {
    /// Taken out by [`EmbeddedStore::close`], so the file is released even
    /// while other handles (timers, tasks) still exist.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Recent revisions, oldest first, plus the revision before the oldest
    /// one kept (watching from earlier than that needs a resync).
    history: Mutex<History>,
    events: broadcast::Sender<Arc<WatchBatch>>,
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
}

struct History {
    batches: VecDeque<Arc<WatchBatch>>,
    start: Revision,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

enum Request {
    Txn(Txn, oneshot::Sender<Result<TxnOutcome, StoreError>>),
    Grant(Duration, oneshot::Sender<Result<LeaseId, StoreError>>),
    Revoke(LeaseId, oneshot::Sender<Result<(), StoreError>>),
    /// Finish what is queued before this, then release the database.
    Close,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// Opens (or creates) `<dir>/store.redb` and starts the writer thread and
    /// the lease reaper. The reaper stops when the last handle is dropped.
    /// A new directory is made 0700 and a new file 0600 (redb itself would
    /// create it with the umask's mode).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        crate::data_dir::create_dir(dir).map_err(unavailable)?;
        let path = dir.join(crate::data_dir::STORE_FILE);
        crate::data_dir::create_secret_file(&path).map_err(unavailable)?;
        let db = Database::builder()
            .set_cache_size(16 << 20)
            .create(path)
            .map_err(unavailable)?;
        let (revision, leases) = {
            let w = db.begin_write().map_err(unavailable)?;
            let rev;
            let mut leases = HashMap::new();
            {
                index_leases(&w)?;
                w.open_table(KV).map_err(unavailable)?;
                let meta = w.open_table(META).map_err(unavailable)?;
                rev = meta
                    .get("revision")
                    .map_err(unavailable)?
                    .map(|g| g.value())
                    .unwrap_or(0);
                let table = w.open_table(LEASES).map_err(unavailable)?;
                let now = Instant::now();
                for row in table.iter().map_err(unavailable)? {
                    let (id, ttl) = row.map_err(unavailable)?;
                    let ttl = Duration::from_millis(ttl.value());
                    leases.insert(
                        id.value(),
                        LeaseState {
                            ttl,
                            deadline: now + ttl,
                        },
                    );
                }
            }
            w.commit().map_err(unavailable)?;
            (rev, leases)
        };
        let (events, _) = broadcast::channel(HISTORY);
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            db: std::sync::RwLock::new(Some(db.clone())),
            history: Mutex::new(History {
                batches: VecDeque::new(),
                start: revision,
            }),
            events,
            leases: Mutex::new(leases),
        });
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let writer_shared = shared.clone();
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        std::thread::Builder::new()
            .name("isdp-store-writer".into())
            .spawn(move || {
                Writer::new(writer_shared, db, revision).run(rx);
                let _ = closed_tx.send(true);
            })
            .map_err(unavailable)?;
        let store = EmbeddedStore {
            shared,
            writer: tx,
            closed,
        };
        tokio::spawn(reap_leases(
            Arc::downgrade(&store.shared),
            store.writer.downgrade(),
        ));
        Ok(store)
    }

    /// Commits what is queued, then closes the database file so it can be
    /// opened again; every handle fails with [`StoreError::Closed`] after.
    pub async fn close(self) {
        self.shared.db.write().expect("db lock").take();
        let _ = self.writer.send(Request::Close).await;
        let mut closed = self.closed.clone();
        drop(self);
        let _ = closed.wait_for(|c| *c).await;
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Revokes leases whose keep-alives stopped; their keys go with them.
async fn reap_leases(shared: std::sync::Weak<Shared>, writer: mpsc::WeakSender<Request>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let (Some(shared), Some(writer)) = (shared.upgrade(), writer.upgrade()) else {
            return;
        };
        let now = Instant::now();
        let expired: Vec<LeaseId> = shared
            .leases
            .lock()
            .expect("lease lock")
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let (tx, rx) = oneshot::channel();
            if writer.send(Request::Revoke(id, tx)).await.is_err() {
                return;
            }
            match rx.await {
                Ok(Ok(())) => tracing::info!(lease = id, "lease expired; its keys were deleted"),
                Ok(Err(e)) => tracing::warn!(lease = id, error = %e, "revoking expired lease"),
                Err(_) => return,
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let db = self
            .shared
            .db
            .read()
            .expect("db lock")
            .clone()
            .ok_or(StoreError::Closed)?;
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let r = db.begin_read().map_err(unavailable)?;
            let rev = r
                .open_table(META)
                .map_err(unavailable)?
                .get("revision")
                .map_err(unavailable)?
                .map(|g| g.value())
                .unwrap_or(0);
            let table = r.open_table(KV).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in table.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                out.push(decode_kv(k.value(), v.value()));
            }
            Ok((out, rev))
        })
        .await
        .map_err(unavailable)?
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.request(|tx| Request::Txn(txn, tx)).await
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        let (backlog, rx) = {
            let history = self.shared.history.lock().expect("history lock");
            if after < history.start {
                return Err(StoreError::Compacted {
                    requested: after,
                    oldest: history.start,
                });
            }
            let backlog: VecDeque<Arc<WatchBatch>> = history
                .batches
                .iter()
                .filter(|b| b.revision > after)
                .cloned()
                .collect();
            (backlog, self.shared.events.subscribe())
        };
        let prefix = prefix.to_owned();
        let state = (backlog, rx, prefix, after, false);
        Ok(WatchStream::new(futures::stream::unfold(
            state,
            |(mut backlog, mut rx, prefix, mut last, done)| async move {
                if done {
                    return None;
                }
                // Commits outside the prefix seen since the last batch:
                // reported as progress once nothing more is queued (or
                // every PROGRESS_EVERY of them, under a steady stream).
                let mut skipped = 0usize;
                loop {
                    let batch = match backlog.pop_front() {
                        Some(b) => b,
                        None => match rx.recv().await {
                            Ok(b) => b,
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                let err = StoreError::Compacted {
                                    requested: last,
                                    oldest: last + 1,
                                };
                                return Some((Err(err), (backlog, rx, prefix, last, true)));
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                    };
                    if batch.revision <= last {
                        continue;
                    }
                    last = batch.revision;
                    let events: Vec<Event> = batch
                        .events
                        .iter()
                        .filter(|e| e.key().starts_with(&prefix))
                        .cloned()
                        .collect();
                    let caught_up = backlog.is_empty() && rx.is_empty();
                    if events.is_empty() {
                        skipped += 1;
                        if !caught_up && skipped < PROGRESS_EVERY {
                            continue;
                        }
                    }
                    let out = WatchBatch {
                        revision: batch.revision,
                        events,
                    };
                    return Some((Ok(out), (backlog, rx, prefix, last, false)));
                }
            },
        )))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.request(|tx| Request::Grant(ttl, tx)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut leases = self.shared.leases.lock().expect("lease lock");
        let state = leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        state.deadline = Instant::now() + state.ttl;
        Ok(())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.request(|tx| Request::Revoke(lease, tx)).await
    }
}

/// Builds the lease index of a store written before it existed: one scan,
/// at startup, outside any caller's wait.
fn index_leases(w: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = w.open_table(META).map_err(unavailable)?;
    if meta.get("lease_index").map_err(unavailable)?.is_some() {
        return Ok(());
    }
    let kv = w.open_table(KV).map_err(unavailable)?;
    let mut by_lease = w.open_multimap_table(LEASE_KEYS).map_err(unavailable)?;
    for row in kv.iter().map_err(unavailable)? {
        let (k, v) = row.map_err(unavailable)?;
        if let Some(lease) = lease_of(v.value()) {
            by_lease.insert(lease, k.value()).map_err(unavailable)?;
        }
    }
    meta.insert("lease_index", 1).map_err(unavailable)?;
    Ok(())
}

/// The lease of a stored value, without copying the value.
fn lease_of(raw: &[u8]) -> Option<LeaseId> {
    let lease = u64::from_le_bytes(raw.get(8..16)?.try_into().ok()?);
    (lease != 0).then_some(lease)
}

fn decode_kv(key: &str, raw: &[u8]) -> KeyValue {
    let rev = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
    let lease = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
    KeyValue {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(&raw[16..]),
        mod_revision: rev,
        lease: (lease != 0).then_some(lease),
    }
}

fn encode_kv(rev: Revision, lease: Option<LeaseId>, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&rev.to_le_bytes());
    out.extend_from_slice(&lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

mod writer;
use writer::Writer;

#[cfg(test)]
mod tests;
