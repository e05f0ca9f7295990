//! A [`Store`] decorator that times every operation and counts failures by
//! kind, whatever the backend.

use std::{sync::Arc, time::Duration, time::Instant};

use crate::store::{KeyValue, LeaseId, Revision, Store, StoreError, Txn, TxnOutcome, WatchStream};

use super::Metrics;

pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
    metrics: Metrics,
}

impl InstrumentedStore {
    pub fn new(inner: Arc<dyn Store>, metrics: Metrics) -> Self {
        InstrumentedStore { inner, metrics }
    }

    fn record<T>(&self, op: &'static str, start: Instant, r: &Result<T, StoreError>) {
        self.metrics
            .store_op(op, start.elapsed().as_secs_f64(), r.as_ref().err());
    }
}

#[async_trait::async_trait]
impl Store for InstrumentedStore {
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let start = Instant::now();
        let r = self.inner.range(prefix).await;
        self.record("range", start, &r);
        r
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let start = Instant::now();
        let r = self.inner.txn(txn).await;
        self.record("txn", start, &r);
        r
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        let start = Instant::now();
        let r = self.inner.watch(prefix, after);
        self.record("watch", start, &r);
        r
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let start = Instant::now();
        let r = self.inner.grant_lease(ttl).await;
        self.record("grant_lease", start, &r);
        r
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let start = Instant::now();
        let r = self.inner.keep_alive(lease).await;
        self.record("keep_alive", start, &r);
        r
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let start = Instant::now();
        let r = self.inner.revoke(lease).await;
        self.record("revoke", start, &r);
        r
    }
}
