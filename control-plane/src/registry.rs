//! Service registrations: validation, the write path, and the in-memory view.
//!
//! Writes go to the [`Store`]; the view is rebuilt only from the store's
//! watch, never written directly. That keeps one path for every change (an
//! API call here, another replica's write, a lease expiring) and lets a
//! caller wait until its own write is visible before answering.

pub mod quota;
pub mod session;
pub mod validate;
mod view;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use isdp_proto::v1::{HealthStatus, Instance};
use prost::Message;
use tokio::sync::{broadcast, watch};

use crate::store::{LeaseId, Revision, Store, StoreError, Txn, progress};
pub use quota::Quotas;
pub use validate::FieldError;
pub use view::Stored;

/// A change notification: which service's instances changed. Consumers
/// re-read the view; `All` follows a resync, when anything may have changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Service(Arc<str>),
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{}", validate::describe(.0))]
    Invalid(Vec<FieldError>),
    #[error("instance {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The id belongs to a sidecar's session, which an operator's
    /// registration may not silently take over.
    #[error("{0}")]
    OwnedBySession(String),
    #[error(transparent)]
    Quota(#[from] quota::Exceeded),
    #[error("instance {0:?} kept changing; try again")]
    Contended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cheap handle to the registry; clone it freely.
#[derive(Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    /// Keys are `<prefix>instances/<id>`.
    prefix: String,
    view: view::View,
    /// The store revision the view has applied.
    applied: progress::Applied,
    changes: broadcast::Sender<Change>,
    quotas: Quotas,
    /// Growth admitted by writes not yet visible in the view.
    reserved: quota::Reserved,
}

// === impl Registry ===

impl Registry {
    /// Loads every instance and follows the store from there on, until
    /// `shutdown` turns true; the default quotas apply.
    pub async fn start(
        store: Arc<dyn Store>,
        prefix: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, RegistryError> {
        Self::start_with(store, prefix, Quotas::default(), shutdown).await
    }

    /// [`Registry::start`] with these quotas.
    pub async fn start_with(
        store: Arc<dyn Store>,
        prefix: &str,
        quotas: Quotas,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, RegistryError> {
        let (changes, _) = broadcast::channel(65_536);
        let prefix = prefix.to_owned();
        let (view, applied) =
            view::View::start(store.clone(), &prefix, changes.clone(), shutdown).await?;
        Ok(Registry {
            shared: Arc::new(Shared {
                store,
                prefix,
                view,
                applied,
                changes,
                quotas,
                reserved: Default::default(),
            }),
        })
    }

    pub fn quotas(&self) -> &Quotas {
        &self.shared.quotas
    }

    /// Checks a write against the quotas and reserves its growth until the
    /// returned guard drops, which the writer does once the write is
    /// visible (or failed).
    fn admit(&self, write: &quota::Write<'_>) -> Result<quota::Reservation, RegistryError> {
        let view = &self.shared.view;
        Ok(self
            .shared
            .quotas
            .admit(write, |s| view.totals(s), &self.shared.reserved)?)
    }

    fn key(&self, id: &str) -> String {
        format!("{}instances/{id}", self.shared.prefix)
    }

    /// The store revision the view has applied (the HTTP API's blocking
    /// reads number their answers with it).
    pub fn revision(&self) -> Revision {
        self.shared.applied.current()
    }

    /// Notifications of every change applied to the view from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }

    /// Waits until the view reflects `revision`, so a caller reads its own
    /// writes. It may be a revision of another prefix (a transaction that
    /// wrote nothing answers with the store's current revision, and that
    /// may be an authorization rule's): the view reaches it through the
    /// watch's progress.
    async fn visible(&self, revision: Revision) {
        self.shared.applied.wait(revision).await;
    }

    /// Validates, fills in defaults and stores an instance registered by an
    /// operator. Replacing an instance keeps its health; an instance a
    /// sidecar's session owns is not replaced (deregister it first).
    pub async fn register(&self, mut instance: Instance) -> Result<Instance, RegistryError> {
        validate::instance(&instance, "instance").map_err(RegistryError::Invalid)?;
        normalise(&mut instance);
        instance.node_id.clear();
        let owned = self.put_keeping_health(instance, None).await?;
        Ok(owned)
    }

    /// Stores `instance`; if the id exists its status carries over unless
    /// the caller set one. Compare-and-set, retried on a concurrent change.
    async fn put_keeping_health(
        &self,
        mut instance: Instance,
        lease: Option<LeaseId>,
    ) -> Result<Instance, RegistryError> {
        let requested = instance.status;
        for _ in 0..8 {
            let current = self.shared.view.get(&instance.id);
            if let Some(cur) = &current
                && !cur.instance.node_id.is_empty()
            {
                return Err(RegistryError::OwnedBySession(format!(
                    "instance {:?} belongs to the session of sidecar node {:?}; deregister it first to replace it with an operator registration",
                    instance.id, cur.instance.node_id
                )));
            }
            let write = quota::Write {
                puts: vec![("instance".into(), &instance)],
                removes: current.iter().map(|c| &c.instance).collect(),
            };
            let reservation = self.admit(&write)?;
            if let Some(cur) = &current
                && requested == HealthStatus::Unknown as i32
                && same_check(&cur.instance, &instance)
            {
                instance.status = cur.instance.status;
            }
            let key = self.key(&instance.id);
            let rev = current.as_ref().map_or(0, |c| c.mod_revision);
            let value = Bytes::from(instance.encode_to_vec());
            let out = self
                .shared
                .store
                .txn(
                    Txn::default()
                        .when_mod_revision(&key, rev)
                        .put(key.clone(), value, lease),
                )
                .await?;
            if out.succeeded {
                self.visible(out.revision).await;
                drop(reservation);
                return Ok(instance);
            }
            drop(reservation);
            self.visible(self.current_revision().await?).await;
        }
        Err(RegistryError::Contended(instance.id))
    }

    async fn current_revision(&self) -> Result<Revision, RegistryError> {
        let (_, rev) = self.shared.store.range(&self.key("\u{0}")).await?;
        Ok(rev)
    }

    pub async fn deregister(&self, id: &str) -> Result<Instance, RegistryError> {
        let Some(current) = self.shared.view.get(id) else {
            return Err(RegistryError::NotFound(id.to_owned()));
        };
        let out = self
            .shared
            .store
            .txn(Txn::default().delete(self.key(id)))
            .await?;
        self.visible(out.revision).await;
        Ok(current.instance.clone())
    }

    /// Records a health transition; a no-op when the status is unchanged or
    /// the instance is gone. Says whether it changed anything, so callers
    /// log transitions rather than every report.
    pub async fn set_status(&self, id: &str, status: HealthStatus) -> Result<bool, RegistryError> {
        for _ in 0..8 {
            let Some(cur) = self.shared.view.get(id) else {
                return Ok(false);
            };
            if cur.instance.status == status as i32 {
                return Ok(false);
            }
            let mut next = cur.instance.clone();
            next.status = status as i32;
            let key = self.key(id);
            let out = self
                .shared
                .store
                .txn(
                    Txn::default()
                        .when_mod_revision(&key, cur.mod_revision)
                        .put(key.clone(), Bytes::from(next.encode_to_vec()), cur.lease),
                )
                .await?;
            if out.succeeded {
                self.visible(out.revision).await;
                return Ok(true);
            }
            self.visible(self.current_revision().await?).await;
        }
        Err(RegistryError::Contended(id.to_owned()))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Stored>> {
        self.shared.view.get(id)
    }

    /// The instances of `service`, sorted by id.
    pub fn instances(&self, service: &str) -> Vec<Arc<Stored>> {
        self.shared.view.instances(service)
    }

    /// Every service with its instance count and healthy count, by name.
    pub fn services(&self) -> BTreeMap<String, (u32, u32)> {
        self.shared.view.services()
    }

    /// Every instance owned by sidecar `node_id`.
    pub fn owned_by(&self, node_id: &str) -> Vec<Arc<Stored>> {
        self.shared.view.owned_by(node_id)
    }

    /// Every instance, for reconcilers that start from scratch.
    pub fn all(&self) -> Vec<Arc<Stored>> {
        self.shared.view.all()
    }

    pub fn len(&self) -> usize {
        self.shared.view.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }
}

/// Fills in what a client may leave out.
fn normalise(i: &mut Instance) {
    if i.id.is_empty() {
        i.id = format!("{}-{:08x}", i.service, rand::random::<u32>());
    }
    if i.weight == 0 {
        i.weight = 1;
    }
    if let Some(c) = &mut i.check {
        c.interval_ms = validate::effective_ms(c.interval_ms);
        c.timeout_ms = validate::effective_ms(c.timeout_ms);
        c.rise = c.rise.max(1);
        c.fall = c.fall.max(1);
    }
    if HealthStatus::try_from(i.status).is_err() {
        i.status = HealthStatus::Unknown as i32;
    }
}

fn same_check(a: &Instance, b: &Instance) -> bool {
    a.check.as_ref().map(|c| &c.target) == b.check.as_ref().map(|c| &c.target)
        && a.address == b.address
        && a.port == b.port
}

/// How long a session may be gone before its instances turn unhealthy, and
/// before they are removed.
#[derive(Clone, Copy, Debug)]
pub struct SessionTimeouts {
    pub grace: Duration,
    pub timeout: Duration,
}

#[cfg(test)]
mod tests;
