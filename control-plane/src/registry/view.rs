//! The registry's in-memory view, fed only by the store's watch.
//!
//! The view outlives store outages: it is what reads and xDS pushes are
//! served from, so a replica cut off from etcd keeps answering with its
//! last state while the watch reconnects behind it.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use dashmap::DashMap;
use futures::{FutureExt, StreamExt};
use isdp_proto::v1::{HealthStatus, Instance};
use prost::Message;
use tokio::sync::{broadcast, watch};

use super::{Change, RegistryError, quota::Footprint};
use crate::store::{
    Event, KeyValue, LeaseId, Revision, Store, StoreError, WatchBatch, WatchStream, progress,
};

/// An instance as stored, with what compare-and-set needs.
#[derive(Debug)]
pub struct Stored {
    pub instance: Instance,
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
    /// What it weighs against its service's quotas.
    pub footprint: Footprint,
}

#[derive(Clone)]
pub(super) struct View {
    inner: Arc<Inner>,
}

struct Inner {
    instances: DashMap<String, Arc<Stored>>,
    /// service -> ids; the index behind per-service reads.
    services: DashMap<String, BTreeSet<String>>,
    /// service -> the sum of its instances' footprints, for quotas.
    totals: DashMap<String, Footprint>,
}

impl View {
    pub(super) async fn start(
        store: Arc<dyn Store>,
        prefix: &str,
        changes: broadcast::Sender<Change>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(View, progress::Applied), RegistryError> {
        let view = View {
            inner: Arc::new(Inner {
                instances: DashMap::new(),
                services: DashMap::new(),
                totals: DashMap::new(),
            }),
        };
        let prefix = format!("{prefix}instances/");
        let rev = view.load(&*store, &prefix).await?;
        let (applied, reporter) = progress::channel(rev);
        tokio::spawn(follow(
            view.clone(),
            store,
            prefix,
            rev,
            changes,
            reporter,
            shutdown,
        ));
        Ok((view, applied))
    }

    /// Applies every batch already delivered by `stream` after `first`;
    /// returns the services touched, the last revision, and the error that
    /// interrupted the run, if any.
    fn apply_ready(
        &self,
        first: WatchBatch,
        stream: &mut WatchStream,
    ) -> (BTreeSet<String>, Revision, Option<StoreError>) {
        let mut touched = self.apply(&first.events);
        let mut rev = first.revision;
        while let Some(more) = stream.next().now_or_never().flatten() {
            match more {
                Ok(b) => {
                    touched.extend(self.apply(&b.events));
                    rev = b.revision;
                }
                Err(e) => return (touched, rev, Some(e)),
            }
        }
        (touched, rev, None)
    }

    /// Replaces the whole view with the store's content.
    async fn load(&self, store: &dyn Store, prefix: &str) -> Result<Revision, RegistryError> {
        let (kvs, rev) = store.range(prefix).await?;
        let mut seen = HashSet::with_capacity(kvs.len());
        for kv in kvs {
            if let Some(s) = decode(&kv) {
                seen.insert(s.instance.id.clone());
                self.upsert(s);
            }
        }
        let gone: Vec<String> = self
            .inner
            .instances
            .iter()
            .filter(|e| !seen.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for id in gone {
            self.remove(&id);
        }
        Ok(rev)
    }

    /// Applies one revision's events; returns the services they touched.
    fn apply(&self, events: &[Event]) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        for e in events {
            match e {
                Event::Put(kv) => {
                    if let Some(s) = decode(kv) {
                        touched.insert(s.instance.service.clone());
                        if let Some(old) = self.upsert(s) {
                            touched.insert(old);
                        }
                    }
                }
                Event::Delete { key } => {
                    let id = key.rsplit('/').next().unwrap_or_default();
                    if let Some(service) = self.remove(id) {
                        touched.insert(service);
                    }
                }
            }
        }
        touched
    }

    /// Inserts or replaces; returns the previous service if it moved.
    fn upsert(&self, s: Stored) -> Option<String> {
        let id = s.instance.id.clone();
        let service = s.instance.service.clone();
        let footprint = s.footprint;
        let old = self.inner.instances.insert(id.clone(), Arc::new(s));
        if let Some(o) = &old {
            self.uncount(&o.instance.service, o.footprint);
        }
        self.inner
            .totals
            .entry(service.clone())
            .or_default()
            .add(footprint);
        let moved = old
            .map(|o| o.instance.service.clone())
            .filter(|o| *o != service);
        if let Some(o) = &moved {
            self.unindex(o, &id);
        }
        self.inner.services.entry(service).or_default().insert(id);
        moved
    }

    fn remove(&self, id: &str) -> Option<String> {
        let (_, old) = self.inner.instances.remove(id)?;
        self.unindex(&old.instance.service, id);
        self.uncount(&old.instance.service, old.footprint);
        Some(old.instance.service.clone())
    }

    fn uncount(&self, service: &str, footprint: Footprint) {
        if let dashmap::Entry::Occupied(mut e) = self.inner.totals.entry(service.to_owned()) {
            e.get_mut().sub(footprint);
            if e.get().instances == 0 {
                e.remove();
            }
        }
    }

    /// What the instances of `service` weigh against its quotas.
    pub(super) fn totals(&self, service: &str) -> Footprint {
        self.inner
            .totals
            .get(service)
            .map(|t| *t)
            .unwrap_or_default()
    }

    fn unindex(&self, service: &str, id: &str) {
        if let dashmap::Entry::Occupied(mut e) = self.inner.services.entry(service.to_owned()) {
            e.get_mut().remove(id);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Stored>> {
        self.inner.instances.get(id).map(|e| e.value().clone())
    }

    pub(super) fn instances(&self, service: &str) -> Vec<Arc<Stored>> {
        let ids: Vec<String> = match self.inner.services.get(service) {
            Some(ids) => ids.iter().cloned().collect(),
            None => return Vec::new(),
        };
        ids.iter().filter_map(|id| self.get(id)).collect()
    }

    pub(super) fn services(&self) -> BTreeMap<String, (u32, u32)> {
        let names: Vec<String> = self
            .inner
            .services
            .iter()
            .map(|e| e.key().clone())
            .collect();
        names
            .into_iter()
            .map(|name| {
                let all = self.instances(&name);
                let healthy = all
                    .iter()
                    .filter(|s| s.instance.status == HealthStatus::Healthy as i32)
                    .count();
                (name, (all.len() as u32, healthy as u32))
            })
            .filter(|(_, (n, _))| *n > 0)
            .collect()
    }

    pub(super) fn owned_by(&self, node_id: &str) -> Vec<Arc<Stored>> {
        self.inner
            .instances
            .iter()
            .filter(|e| e.value().instance.node_id == node_id)
            .map(|e| e.value().clone())
            .collect()
    }

    pub(super) fn all(&self) -> Vec<Arc<Stored>> {
        self.inner
            .instances
            .iter()
            .map(|e| e.value().clone())
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.inner.instances.len()
    }
}

/// First pause after the watch failed; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between watch attempts while the store is unreachable, so
/// the view catches up soon after it returns.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Follows the store's watch from `rev` until `shutdown`. While the store
/// is unreachable the view keeps its content (reads and xDS pushes go on
/// from it) and the watch is retried with backoff from the last applied
/// revision, so nothing is missed; only a compacted revision (the store no
/// longer has the history) costs a full resync.
async fn follow(
    v: View,
    store: Arc<dyn Store>,
    prefix: String,
    mut rev: Revision,
    changes: broadcast::Sender<Change>,
    mut reporter: progress::Reporter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = RETRY_MIN;
    let mut resync = false;
    loop {
        if resync {
            match v.load(&*store, &prefix).await {
                Ok(r) => {
                    rev = r;
                    resync = false;
                    let _ = changes.send(Change::All);
                    reporter.applied(rev);
                    tracing::info!(revision = rev, "registry resynced");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry resync failed; retrying");
                    if !pause(&mut retry, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let failure = match store.watch(&prefix, rev) {
            Err(e) => e,
            Ok(mut stream) => loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = reporter.progress_due(rev) => stream.request_progress(),
                    next = stream.next() => match next {
                        Some(Ok(batch)) => {
                            // Apply everything already delivered before
                            // waking anyone: under load a commit carries
                            // many revisions, and waking every waiting
                            // writer (and every change listener) once per
                            // revision would cost revisions x waiters.
                            let (touched, last, failed) = v.apply_ready(batch, &mut stream);
                            rev = last;
                            retry = RETRY_MIN;
                            for service in touched {
                                let _ = changes.send(Change::Service(service.into()));
                            }
                            reporter.applied(rev);
                            if let Some(e) = failed {
                                break e;
                            }
                        }
                        Some(Err(e)) => break e,
                        None => return,
                    },
                }
            },
        };
        match failure {
            StoreError::Closed => return,
            StoreError::Compacted { .. } => {
                tracing::warn!(error = %failure, "registry watch fell behind; resyncing");
                resync = true;
            }
            e => {
                tracing::warn!(error = %e, revision = rev, "registry watch interrupted; resuming");
                if !pause(&mut retry, &mut shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps `retry` (then doubles it); false if shutdown came first.
async fn pause(retry: &mut Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let delay = *retry;
    *retry = (*retry * 2).min(RETRY_MAX);
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

fn decode(kv: &KeyValue) -> Option<Stored> {
    match Instance::decode(kv.value.as_ref()) {
        Ok(instance) => Some(Stored {
            footprint: Footprint::of(&instance),
            instance,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }),
        Err(e) => {
            tracing::error!(key = %kv.key, error = %e, "undecodable instance in store; skipped");
            None
        }
    }
}
