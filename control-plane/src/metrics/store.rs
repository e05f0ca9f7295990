//! A [`Store`] decorator that times every operation and counts failures by
//! kind, whatever the backend.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
    time::Instant,
};

use crate::store::{
    KeyValue, LeaseId, Revision, Store, StoreError, StoreHealth, Txn, TxnOutcome, WatchStream,
};

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

    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
}

/// The store's health, read at scrape time: `isdp_store_up` (1 while the
/// store can be written) and `isdp_store_failures_total` (times it could
/// not be any more). Reports nothing until a store is set.
#[derive(Clone, Default)]
pub(super) struct StoreHealthCollector(pub(super) Arc<OnceLock<Arc<dyn Store>>>);

impl std::fmt::Debug for StoreHealthCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreHealthCollector")
    }
}

impl prometheus_client::collector::Collector for StoreHealthCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{TypedMetric, counter::ConstCounter, gauge::ConstGauge},
        };
        let Some(store) = self.0.get() else {
            return Ok(());
        };
        let health = store.health();
        let up = ConstGauge::new(i64::from(health.is_healthy()));
        up.encode(encoder.encode_descriptor(
            "store_up",
            "1 while the store can be written; 0 while it is failed (see /ready for why)",
            None,
            ConstGauge::<i64>::TYPE,
        )?)?;
        let failures = ConstCounter::new(health.failures);
        failures.encode(encoder.encode_descriptor(
            "store_failures",
            "Times the store stopped accepting writes (an I/O error, etcd unreachable)",
            None,
            ConstCounter::<u64>::TYPE,
        )?)
    }
}
