//! The durable key-value store behind the registry.
//!
//! One trait, shaped after etcd's v3 API (revisions, compare-and-set
//! transactions, prefix watches from a revision, leases), so the embedded
//! backend ([`embedded`], one control plane) and the clustered one
//! ([`etcd`], several replicas) are interchangeable. Everything the control
//! plane keeps lives here as protobuf bytes under a key prefix; the in-memory
//! views (registry, xDS cache) are rebuilt from [`Store::range`] plus
//! [`Store::watch`], never written directly.

pub mod embedded;
pub mod etcd;
pub mod follow;
pub mod health;
pub mod progress;

use std::{pin::Pin, time::Duration};

use bytes::Bytes;
use futures::Stream;

pub use health::StoreHealth;

/// A global, strictly increasing version of the whole store. Every committed
/// transaction that changes something gets the next one.
pub type Revision = u64;

/// Identifies a lease: keys attached to it are deleted when it expires or is
/// revoked. Sidecar sessions use one lease each.
pub type LeaseId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the last write to this key; compare-and-set uses it.
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Bytes,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// A precondition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's mod revision equals this one; 0 means "the key is absent".
    ModRevision { key: String, revision: Revision },
}

/// All-or-nothing: either every compare holds and every op applies under one
/// new revision, or nothing changes.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn put(mut self, key: impl Into<String>, value: Bytes, lease: Option<LeaseId>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            lease,
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    pub fn when_mod_revision(mut self, key: impl Into<String>, revision: Revision) -> Self {
        self.compares.push(Compare::ModRevision {
            key: key.into(),
            revision,
        });
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// False when a compare failed; nothing was written then.
    pub succeeded: bool,
    /// The revision the transaction created, or the current one if it
    /// wrote nothing.
    pub revision: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key } => key,
        }
    }
}

/// The events of one revision that fall under a watch's prefix, or, when
/// `events` is empty, progress: every event under the prefix up to
/// `revision` has been delivered.
///
/// Progress is what lets a view wait for a revision written elsewhere in
/// the store (an authorization rule, a token) without hanging: the view
/// has "reached" that revision once it has seen everything of its own
/// prefix up to it, even if nothing of its prefix changed.
#[derive(Clone, Debug)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

impl WatchBatch {
    pub fn is_progress(&self) -> bool {
        self.events.is_empty()
    }
}

/// A watch: batches in revision order, then an error (or the end, when the
/// store closes). Backends report progress either by themselves (the
/// embedded store, after each commit outside the prefix) or when asked
/// with [`WatchStream::request_progress`] (etcd).
pub struct WatchStream {
    batches: Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>,
    progress: Option<tokio::sync::mpsc::Sender<()>>,
}

impl WatchStream {
    /// A stream whose backend reports progress by itself.
    pub fn new(
        batches: impl Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static,
    ) -> Self {
        WatchStream {
            batches: Box::pin(batches),
            progress: None,
        }
    }

    /// A stream whose backend sends a progress batch for each message on
    /// `progress` (more may be dropped while one is pending).
    pub fn with_progress_requests(
        batches: impl Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static,
        progress: tokio::sync::mpsc::Sender<()>,
    ) -> Self {
        WatchStream {
            batches: Box::pin(batches),
            progress: Some(progress),
        }
    }

    /// Asks for a progress batch at the backend's current revision. The
    /// backend may not answer (etcd does not while the watch is catching
    /// up); ask again later if the revision is still not reached.
    pub fn request_progress(&self) {
        if let Some(progress) = &self.progress {
            let _ = progress.try_send(());
        }
    }

    /// The same stream with its batches passed through `f` (tests and
    /// decorators), keeping the progress requests.
    pub fn map_batches<S>(
        self,
        f: impl FnOnce(Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>) -> S,
    ) -> Self
    where
        S: Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static,
    {
        WatchStream {
            batches: Box::pin(f(self.batches)),
            progress: self.progress,
        }
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchBatch, StoreError>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.batches.as_mut().poll_next(cx)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or written; callers map this to
    /// UNAVAILABLE and must not assume anything was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The requested watch start is older than the history kept; the
    /// watcher must resync with a fresh `range`.
    #[error("revision {requested} is compacted (oldest kept: {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    #[error("store is shutting down")]
    Closed,
}

impl StoreError {
    /// Stable, low-cardinality name for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Compacted { .. } => "compacted",
            StoreError::LeaseNotFound(_) => "lease_not_found",
            StoreError::Closed => "closed",
        }
    }
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every key under `prefix`, and the revision they were read at: a
    /// watch from that revision sees every later change.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;

    /// Applies a transaction durably; returns only once it survives a crash.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Changes under `prefix` with revisions greater than `after`.
    fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError>;

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Deletes every key attached to the lease now.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Whether the store can be written now (`/ready`, metrics). Test
    /// doubles are always healthy.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }
}
