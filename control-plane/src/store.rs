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

use std::{pin::Pin, time::Duration};

use bytes::Bytes;
use futures::Stream;

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

/// The events of one revision that fall under a watch's prefix.
#[derive(Clone, Debug)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

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
}
