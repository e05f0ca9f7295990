//! Sidecar sessions: the instances a sidecar registers live as long as its
//! stream does, plus a grace period.
//!
//! Each session holds a store lease (TTL = the session timeout) that a
//! background task keeps alive while the stream is up. When the stream goes
//! away without a close, the keep-alives stop: after the grace period a timer
//! marks the instances unhealthy, and when the lease expires the store
//! deletes them. A clean close revokes the lease, removing them at once.
//! Leases make the cleanup the store's job, so it happens even if this
//! control plane dies.
//!
//! With several replicas (etcd store) a sidecar whose stream breaks reopens
//! its session on another replica, which re-puts its instances under a new
//! lease in one transaction: they never disappear from the registry. The
//! old replica's grace timer then finds no instance left on the old lease
//! and does nothing. A replica does not start grace timers for sessions it
//! finds at startup ([`Sessions::replica`]): those may be alive on another
//! replica, and their leases clean them up if they are not.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use dashmap::DashMap;
use isdp_proto::v1::{HealthStatus, Instance};
use prost::Message;
use tokio::task::JoinHandle;

use super::{Registry, RegistryError, SessionTimeouts, normalise, validate};
use crate::store::{LeaseId, Txn};

#[derive(Clone)]
pub struct Sessions {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Registry,
    timeouts: SessionTimeouts,
    /// node id -> epoch of its newest session. A grace timer acts only if
    /// no newer session for the node has opened since it started.
    epochs: DashMap<String, u64>,
    next_epoch: AtomicU64,
}

/// One sidecar's open session. Dropping it without [`Session::close`] means
/// the stream broke: the grace period starts.
pub struct Session {
    sessions: Sessions,
    node_id: String,
    epoch: u64,
    lease: LeaseId,
    keepalive: JoinHandle<()>,
    closed: bool,
}

// === impl Sessions ===

impl Sessions {
    /// Sessions of the only control plane (embedded store): starts grace
    /// timers for instances whose sidecar has not reconnected since it
    /// started.
    pub fn new(registry: Registry, timeouts: SessionTimeouts) -> Self {
        Self::build(registry, timeouts, true)
    }

    /// Sessions of one replica among several sharing a store: sessions
    /// found at startup may be open on another replica, so they are left to
    /// their leases.
    pub fn replica(registry: Registry, timeouts: SessionTimeouts) -> Self {
        Self::build(registry, timeouts, false)
    }

    fn build(registry: Registry, timeouts: SessionTimeouts, orphan_grace: bool) -> Self {
        let sessions = Sessions {
            shared: Arc::new(Shared {
                registry,
                timeouts,
                epochs: DashMap::new(),
                next_epoch: AtomicU64::new(1),
            }),
        };
        if !orphan_grace {
            return sessions;
        }
        let orphans: HashSet<(String, Option<LeaseId>)> = sessions
            .shared
            .registry
            .all()
            .into_iter()
            .filter(|s| !s.instance.node_id.is_empty())
            .map(|s| (s.instance.node_id.clone(), s.lease))
            .collect();
        for (node, lease) in orphans {
            sessions.start_grace(node, 0, lease);
        }
        sessions
    }

    /// Opens (or re-opens) the session of `node_id` with its instances,
    /// replacing whatever the node had registered before.
    pub async fn open(
        &self,
        node_id: &str,
        instances: Vec<Instance>,
    ) -> Result<Session, RegistryError> {
        let mut errors = Vec::new();
        if !validate::is_valid_id(node_id) {
            errors.push(validate::FieldError {
                field: "open.node_id".into(),
                rule: "must be 1 to 128 characters of letters, digits, '.', '_', '-' or ':'".into(),
            });
        }
        let mut ids = HashSet::new();
        let mut prepared = Vec::with_capacity(instances.len());
        for (n, mut i) in instances.into_iter().enumerate() {
            if let Err(mut e) = validate::instance(&i, &format!("open.instances[{n}]")) {
                errors.append(&mut e);
                continue;
            }
            if i.id.is_empty() {
                i.id = format!("{node_id}.{}", i.service);
            }
            normalise(&mut i);
            i.node_id = node_id.to_owned();
            if !ids.insert(i.id.clone()) {
                errors.push(validate::FieldError {
                    field: format!("open.instances[{n}].id"),
                    rule: format!("duplicate id {:?}", i.id),
                });
            }
            prepared.push(i);
        }
        if !errors.is_empty() {
            return Err(RegistryError::Invalid(errors));
        }
        let registry = &self.shared.registry;
        for i in &prepared {
            if let Some(cur) = registry.get(&i.id)
                && cur.instance.node_id != node_id
            {
                return Err(RegistryError::PermissionDenied(format!(
                    "instance {:?} belongs to {}; node {node_id:?} may not replace it",
                    i.id,
                    owner(&cur.instance)
                )));
            }
        }

        let epoch = self.shared.next_epoch.fetch_add(1, Ordering::Relaxed);
        self.shared.epochs.insert(node_id.to_owned(), epoch);
        let store = registry.store().clone();
        let lease = store.grant_lease(self.shared.timeouts.timeout).await?;
        let mut txn = Txn::default();
        for old in registry.owned_by(node_id) {
            if !ids.contains(&old.instance.id) {
                txn = txn.delete(registry.key(&old.instance.id));
            }
        }
        for i in &prepared {
            txn = txn.put(
                registry.key(&i.id),
                Bytes::from(i.encode_to_vec()),
                Some(lease),
            );
        }
        let out = store.txn(txn).await?;
        registry.visible(out.revision).await;

        let period = self.shared.timeouts.timeout / 3;
        let keepalive = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if let Err(e) = store.keep_alive(lease).await {
                    tracing::warn!(lease, error = %e, "session keep-alive failed");
                }
            }
        });
        tracing::info!(
            node = node_id,
            instances = prepared.len(),
            "sidecar session opened"
        );
        Ok(Session {
            sessions: self.clone(),
            node_id: node_id.to_owned(),
            epoch,
            lease,
            keepalive,
            closed: false,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// After the grace period, marks unhealthy the node's instances still
    /// on `lease`, unless the node opened a newer session here meanwhile.
    /// Instances re-put under another lease belong to a newer session
    /// (possibly on another replica) and are left alone.
    fn start_grace(&self, node_id: String, epoch: u64, lease: Option<LeaseId>) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(shared.timeouts.grace).await;
            let current = shared.epochs.get(&node_id).map(|e| *e);
            if current.unwrap_or(0) != epoch {
                return; // the sidecar came back
            }
            tracing::warn!(node = %node_id, grace = ?shared.timeouts.grace, "sidecar gone past its grace period; marking its instances unhealthy");
            for s in shared.registry.owned_by(&node_id) {
                if s.lease != lease {
                    continue;
                }
                if let Err(e) = shared
                    .registry
                    .set_status(&s.instance.id, HealthStatus::Unhealthy)
                    .await
                {
                    tracing::warn!(id = %s.instance.id, error = %e, "marking instance unhealthy");
                }
            }
        });
    }
}

fn owner(i: &Instance) -> String {
    if i.node_id.is_empty() {
        "an operator registration".into()
    } else {
        format!("node {:?}", i.node_id)
    }
}

// === impl Session ===

impl Session {
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Records a health transition seen by the sidecar's probes.
    pub async fn report(
        &self,
        instance_id: &str,
        status: HealthStatus,
    ) -> Result<(), RegistryError> {
        let registry = &self.sessions.shared.registry;
        match registry.get(instance_id) {
            None => Err(RegistryError::NotFound(instance_id.to_owned())),
            Some(s) if s.instance.node_id != self.node_id => {
                Err(RegistryError::PermissionDenied(format!(
                    "instance {instance_id:?} belongs to {}, not node {:?}",
                    owner(&s.instance),
                    self.node_id
                )))
            }
            Some(_) => registry.set_status(instance_id, status).await,
        }
    }

    /// Clean shutdown: the instances go at once.
    pub async fn close(mut self) -> Result<(), RegistryError> {
        self.closed = true;
        self.keepalive.abort();
        let registry = self.sessions.shared.registry.clone();
        registry.store().revoke(self.lease).await?;
        // The revoke's deletes are visible once the store's revision is.
        let rev = registry.current_revision().await?;
        registry.visible(rev).await;
        tracing::info!(node = %self.node_id, "sidecar session closed; instances deregistered");
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keepalive.abort();
        if !self.closed {
            tracing::info!(node = %self.node_id, "sidecar stream gone; grace period started");
            self.sessions
                .start_grace(self.node_id.clone(), self.epoch, Some(self.lease));
        }
    }
}
