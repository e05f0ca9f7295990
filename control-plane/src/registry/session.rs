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
//!
//! A session acts only as the principal that opened it ([`Opener`]). Its
//! instances' ids are `<node_id>.<service>`
//! ([`validate::session_instance_id`]; service names hold no '.'), so no
//! session can hold an id another service's sidecar will use. Opening (or
//! reopening) a node's session replaces only that node's instances of the
//! services the opener may act as; health reports, the grace timer and the
//! session's answer concern only the instances the session itself
//! registered. Sidecars of different services may therefore share a node
//! id (its default is the host name) without touching each other, and no
//! join principal can block, replace or report for another service's
//! instances, whichever connects first.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use dashmap::DashMap;
use isdp_proto::v1::{HealthStatus, Instance};
use prost::Message;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    Registry, RegistryError, SessionTimeouts, Stored, normalise,
    quota::{self, Exceeded, Quota},
    validate,
};
use crate::store::{LeaseId, StoreError, Txn};
use isdp_xds::LogRate;

#[derive(Clone)]
pub struct Sessions {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Registry,
    timeouts: SessionTimeouts,
    /// instance id -> epoch of the newest session that registered it. A
    /// grace timer acts on an instance only if no newer session registered
    /// it since it started.
    epochs: DashMap<String, u64>,
    next_epoch: AtomicU64,
    /// principal -> sessions open on this replica, for
    /// `--max-sessions-per-principal`.
    open: DashMap<String, usize>,
    /// Bounds the lines sessions write at info and warn level (opens,
    /// closes, health transitions, refusals): a join token may open,
    /// close and flap sessions as fast as it likes; past the bound they
    /// go to debug level and are counted.
    log: LogRate,
    /// Epochs of the sessions open on this replica (until closed or their
    /// stream breaks), each with the sender that tells it a newer session
    /// of its node took its instances.
    live: DashMap<u64, watch::Sender<bool>>,
}

/// Who opens a session: what it may register and replace, and whose
/// session quota it counts against.
#[derive(Clone, Debug, Default)]
pub struct Opener {
    /// The principal the session counts against: the token that vouches
    /// for the caller, so a token and the certificates issued under it
    /// share one count. `None` is not counted (no authentication).
    pub principal: Option<String>,
    /// The services it may act as; `None`: any (an operator's credential).
    pub services: Option<Vec<String>>,
}

impl Opener {
    /// Any service, counted against no one: callers that authenticate
    /// nobody (unit tests).
    pub fn anyone() -> Self {
        Opener::default()
    }

    pub fn may_act_as(&self, service: &str) -> bool {
        self.services
            .as_ref()
            .is_none_or(|own| own.iter().any(|s| s == service))
    }
}

/// One sidecar's open session. Dropping it without [`Session::close`] means
/// the stream broke: the grace period starts.
pub struct Session {
    sessions: Sessions,
    node_id: String,
    /// The instances this session registered, the only ones it answers for.
    ids: BTreeSet<String>,
    epoch: u64,
    lease: LeaseId,
    keepalive: JoinHandle<()>,
    /// Set by the keep-alive when the store no longer knows the lease
    /// (it expired while the store was out of reach, and with it the
    /// instances): the session must end so the sidecar registers again.
    lost: watch::Receiver<bool>,
    /// Set when a newer session of the same node (a restarted sidecar, or
    /// another holding the same node id) registered this one's instances
    /// on this replica: this one answers for nothing any more.
    superseded: watch::Receiver<bool>,
    closed: bool,
    /// Held while the session is open; `None` when not counted.
    _slot: Option<Slot>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("node_id", &self.node_id)
            .field("ids", &self.ids)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// One session counted against its principal's quota until dropped.
struct Slot {
    shared: Arc<Shared>,
    principal: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.shared.open.entry(self.principal.clone()) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
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
                open: DashMap::new(),
                log: LogRate::default(),
                live: DashMap::new(),
            }),
        };
        if !orphan_grace {
            return sessions;
        }
        let mut orphans: HashMap<(String, Option<LeaseId>), Vec<String>> = HashMap::new();
        for s in sessions.shared.registry.all() {
            if !s.instance.node_id.is_empty() {
                orphans
                    .entry((s.instance.node_id.clone(), s.lease))
                    .or_default()
                    .push(s.instance.id.clone());
            }
        }
        for ((node, lease), ids) in orphans {
            sessions.start_grace(node, ids, 0, lease);
        }
        sessions
    }

    /// Opens (or re-opens) the session of `node_id` with its instances,
    /// replacing the node's instances of the services `opener` may act as.
    pub async fn open(
        &self,
        node_id: &str,
        instances: Vec<Instance>,
        opener: &Opener,
    ) -> Result<Session, RegistryError> {
        let prepared = prepare(node_id, instances)?;
        let registry = &self.shared.registry;
        registry.quotas().check_session(prepared.len())?;
        let ids: BTreeSet<String> = prepared.iter().map(|i| i.id.clone()).collect();
        let mut replaced = Vec::new();
        for i in &prepared {
            if !opener.may_act_as(&i.service) {
                return Err(RegistryError::PermissionDenied(format!(
                    "node {node_id:?} may not register service {:?}: its credential acts as {}",
                    i.service,
                    opener.services.as_deref().unwrap_or_default().join(", ")
                )));
            }
            if let Some(cur) = registry.get(&i.id) {
                if cur.instance.node_id != node_id {
                    return Err(RegistryError::PermissionDenied(format!(
                        "instance {:?} belongs to {}; node {node_id:?} may not replace it",
                        i.id,
                        owner(&cur.instance)
                    )));
                }
                replaced.push(cur);
            }
        }
        // The node's instances this opener answers for and no longer
        // registers; another service's on the same node are not its own.
        // A session that registers nothing (a sidecar deregistering at
        // shutdown, or one without local services) leaves alone what a
        // session still open on this replica holds: a sidecar started
        // with the same node id while the old one was stopping keeps its
        // registration.
        let held_by_open_session = |id: &str| {
            prepared.is_empty()
                && self
                    .shared
                    .epochs
                    .get(id)
                    .is_some_and(|e| self.shared.live.contains_key(&*e))
        };
        let stale: Vec<Arc<Stored>> = registry
            .owned_by(node_id)
            .into_iter()
            .filter(|s| {
                opener.may_act_as(&s.instance.service)
                    && !ids.contains(&s.instance.id)
                    && !held_by_open_session(&s.instance.id)
            })
            .collect();
        let write = quota::Write {
            puts: prepared
                .iter()
                .enumerate()
                .map(|(n, i)| (format!("open.instances[{n}]"), i))
                .collect(),
            removes: replaced.iter().chain(&stale).map(|s| &s.instance).collect(),
        };
        let reservation = registry.admit(&write)?;
        let slot = self.take_slot(opener)?;

        let store = registry.store().clone();
        let lease = store.grant_lease(self.shared.timeouts.timeout).await?;
        let mut txn = Txn::default();
        for old in &stale {
            txn = txn.delete(registry.key(&old.instance.id));
        }
        for i in &prepared {
            txn = txn.put(
                registry.key(&i.id),
                Bytes::from(i.encode_to_vec()),
                Some(lease),
            );
        }
        // Nothing to write (a sidecar without local services): nothing to
        // commit or wait for.
        if !(stale.is_empty() && prepared.is_empty()) {
            let out = store.txn(txn).await?;
            registry.visible(out.revision).await;
        }
        drop(reservation);
        let epoch = self.shared.next_epoch.fetch_add(1, Ordering::Relaxed);
        // The sessions that held these instances (or the node's ones just
        // deleted) until now.
        let mut superseded: BTreeSet<u64> = BTreeSet::new();
        for id in &ids {
            if let Some(old) = self.shared.epochs.insert(id.clone(), epoch) {
                superseded.insert(old);
            }
        }
        for old in &stale {
            if let Some(e) = self.shared.epochs.get(&old.instance.id) {
                superseded.insert(*e);
            }
        }
        for old in superseded {
            if let Some(tell) = self.shared.live.get(&old) {
                let _ = tell.send(true);
            }
        }
        let (supersede, superseded) = watch::channel(false);
        self.shared.live.insert(epoch, supersede);

        let period = self.shared.timeouts.timeout / 3;
        let (lose, lost) = watch::channel(false);
        let keepalive_node = node_id.to_owned();
        let keepalive = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                match store.keep_alive(lease).await {
                    Ok(_) => {}
                    Err(StoreError::LeaseNotFound(_)) => {
                        tracing::warn!(
                            node = ?keepalive_node,
                            lease,
                            "session lease expired in the store (out of reach for longer than the session timeout): ending the session so the sidecar registers again"
                        );
                        let _ = lose.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!(lease, error = %e, "session keep-alive failed"),
                }
            }
        });
        if self.shared.log.admit() {
            tracing::info!(node = ?node_id, instances = prepared.len(), "sidecar session opened");
        } else {
            tracing::debug!(node = ?node_id, instances = prepared.len(), "sidecar session opened");
        }
        Ok(Session {
            sessions: self.clone(),
            node_id: node_id.to_owned(),
            ids,
            epoch,
            lease,
            keepalive,
            lost,
            superseded,
            closed: false,
            _slot: slot,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Counts a session against its principal's quota.
    fn take_slot(&self, opener: &Opener) -> Result<Option<Slot>, RegistryError> {
        let Some(principal) = &opener.principal else {
            return Ok(None);
        };
        let limit = self.shared.registry.quotas().sessions_per_principal;
        let mut open = self.shared.open.entry(principal.clone()).or_insert(0);
        if *open >= limit {
            return Err(Exceeded {
                quota: Quota::SessionsPerPrincipal,
                limit,
                what: format!(
                    "principal {principal} already has {} sessions open on this control plane",
                    *open
                ),
            }
            .into());
        }
        *open += 1;
        Ok(Some(Slot {
            shared: self.shared.clone(),
            principal: principal.clone(),
        }))
    }

    /// Instance ids whose newest session's epoch is kept.
    #[cfg(test)]
    pub(crate) fn epochs_kept(&self) -> usize {
        self.shared.epochs.len()
    }

    /// After the grace period, marks unhealthy the instances `ids` of
    /// `node_id` still on `lease`, unless a newer session registered them
    /// meanwhile. Instances re-put under another lease belong to a newer
    /// session (possibly on another replica) and are left alone.
    fn start_grace(&self, node_id: String, ids: Vec<String>, epoch: u64, lease: Option<LeaseId>) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(shared.timeouts.grace).await;
            let current = |id: &String| shared.epochs.get(id).map(|e| *e).unwrap_or(0);
            let left: Vec<String> = ids.into_iter().filter(|id| current(id) == epoch).collect();
            // The grace period was all this session's epochs were kept
            // for (a newer session holds its own): forgotten now, or the
            // map would grow with every node that ever went away.
            for id in &left {
                shared.epochs.remove_if(id, |_, e| *e == epoch);
            }
            if left.is_empty() {
                return; // the sidecar came back
            }
            if shared.log.admit() {
                tracing::warn!(node = ?node_id, grace = ?shared.timeouts.grace, "sidecar gone past its grace period; marking its instances unhealthy");
            } else {
                tracing::debug!(node = ?node_id, grace = ?shared.timeouts.grace, "sidecar gone past its grace period; marking its instances unhealthy");
            }
            for id in left {
                let Some(s) = shared.registry.get(&id) else {
                    continue;
                };
                if s.lease != lease || s.instance.node_id != node_id {
                    continue;
                }
                if let Err(e) = shared
                    .registry
                    .set_status(&id, HealthStatus::Unhealthy)
                    .await
                {
                    tracing::warn!(?id, error = %e, "marking instance unhealthy");
                }
            }
        });
    }
}

/// Validates a session's instances and gives each its id and node.
fn prepare(node_id: &str, instances: Vec<Instance>) -> Result<Vec<Instance>, RegistryError> {
    let mut errors = Vec::new();
    let node_ok = match validate::node_id("open.node_id", node_id) {
        Ok(()) => true,
        Err(e) => {
            errors.push(e);
            false
        }
    };
    let mut services = BTreeSet::new();
    let mut prepared = Vec::with_capacity(instances.len());
    for (n, mut i) in instances.into_iter().enumerate() {
        let field = format!("open.instances[{n}]");
        let mut problems = validate::instance(&i, &field).err().unwrap_or_default();
        if node_ok {
            // One problem per field, the session's rule (stricter) first.
            let stricter = validate::session_instance(&i, node_id, &field)
                .err()
                .unwrap_or_default();
            problems.retain(|p| !stricter.iter().any(|e| e.field == p.field));
            problems.extend(stricter);
        }
        if !problems.is_empty() {
            errors.append(&mut problems);
            continue;
        }
        if !services.insert(i.service.clone()) {
            errors.push(validate::FieldError {
                field: format!("{field}.service"),
                rule: format!(
                    "{:?} appears twice: a session registers each service once",
                    i.service
                ),
            });
            continue;
        }
        i.id = validate::session_instance_id(node_id, &i.service);
        normalise(&mut i);
        i.node_id = node_id.to_owned();
        prepared.push(i);
    }
    if errors.is_empty() {
        Ok(prepared)
    } else {
        Err(RegistryError::Invalid(errors))
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

    /// The instances this session registered, as stored now, by id.
    pub fn instances(&self) -> Vec<Instance> {
        let registry = &self.sessions.shared.registry;
        self.ids
            .iter()
            .filter_map(|id| registry.get(id))
            .filter(|s| s.instance.node_id == self.node_id)
            .map(|s| s.instance.clone())
            .collect()
    }

    /// Records a health transition seen by the sidecar's probes, for one
    /// of the instances this session registered; true when the status
    /// changed.
    pub async fn report(
        &self,
        instance_id: &str,
        status: HealthStatus,
    ) -> Result<bool, RegistryError> {
        let registry = &self.sessions.shared.registry;
        let current = registry.get(instance_id);
        if !self.ids.contains(instance_id) {
            // Whether another id exists, and whose it is, is none of this
            // session's business: one answer for all of them, which does
            // not echo the id (the caller knows what it sent).
            return Err(RegistryError::PermissionDenied(format!(
                "health reports are for the instances this session of node {:?} registered ({} of them); this one is not among them",
                self.node_id,
                self.ids.len()
            )));
        }
        match current {
            None => Err(RegistryError::NotFound(instance_id.to_owned())),
            Some(s) if s.instance.node_id != self.node_id => {
                Err(RegistryError::PermissionDenied(format!(
                    "instance {instance_id:?} was taken over since this session of node {:?} registered it (it belongs to {})",
                    self.node_id,
                    owner(&s.instance)
                )))
            }
            Some(_) => registry.set_status(instance_id, status).await,
        }
    }

    /// Resolves once the store has lost the session's lease, and with it
    /// the instances the session registered; never otherwise.
    pub fn lease_lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            if lost.wait_for(|l| *l).await.is_err() {
                // The keep-alive ended without losing the lease: the
                // session is closing.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves once a newer session of this node registered this
    /// session's instances on this replica; never otherwise.
    pub fn superseded(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut superseded = self.superseded.clone();
        async move {
            if superseded.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The session's store lease: what it writes goes with it.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The bound on the lines sessions log, for the session API's own.
    pub fn log(&self) -> &LogRate {
        &self.sessions.shared.log
    }

    /// Clean shutdown: the instances go at once.
    pub async fn close(mut self) -> Result<(), RegistryError> {
        self.closed = true;
        self.keepalive.abort();
        let registry = self.sessions.shared.registry.clone();
        registry.store().revoke(self.lease).await?;
        // The revoke's deletes are visible once the store's revision is
        // (reached through the watch's progress if the latest write was
        // elsewhere); without instances there is nothing to wait for.
        if !self.ids.is_empty() {
            let rev = registry.current_revision().await?;
            registry.visible(rev).await;
        }
        for id in &self.ids {
            self.sessions
                .shared
                .epochs
                .remove_if(id, |_, e| *e == self.epoch);
        }
        if self.sessions.shared.log.admit() {
            tracing::info!(node = ?self.node_id, "sidecar session closed; instances deregistered");
        } else {
            tracing::debug!(node = ?self.node_id, "sidecar session closed; instances deregistered");
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keepalive.abort();
        self.sessions.shared.live.remove(&self.epoch);
        if !self.closed {
            if self.sessions.shared.log.admit() {
                tracing::info!(node = ?self.node_id, "sidecar stream gone; grace period started");
            } else {
                tracing::debug!(node = ?self.node_id, "sidecar stream gone; grace period started");
            }
            self.sessions.start_grace(
                self.node_id.clone(),
                self.ids.iter().cloned().collect(),
                self.epoch,
                Some(self.lease),
            );
        }
    }
}
