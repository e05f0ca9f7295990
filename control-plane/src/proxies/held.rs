//! What one stream holds of one resource type, from the engine's events,
//! and each resource's status derived from it.
//!
//! Names are the engine's own `Arc<str>` wherever it handed them over
//! (subscriptions, and the acknowledged versions of names subscribed to),
//! so recording a stream's names costs a pointer each, not a copy; a name
//! only a wildcard brought (the server's, not the client's) is held once
//! here. Both protocols share the record; what differs is what an ACK
//! says: delta acknowledges per name, state of the world the whole set
//! (its version under the empty name, and the names it lacked).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use isdp_xds::WILDCARD;

/// Where a resource stands, as the client last answered about it (the
/// status CSDS reports as `client_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceState {
    /// Subscribed, and no answered response carried it yet.
    Requested,
    /// The client acknowledged a response carrying it.
    Acked,
    /// The client rejected the last response carrying it.
    Nacked,
    /// The client acknowledged a response saying it does not exist (or
    /// that the stream may not read it: a scoped stream is answered alike).
    DoesNotExist,
}

/// What a NACK rejected, until an ACK replaces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The version rejected (state of the world: the set's).
    pub version: String,
    pub at: SystemTime,
    /// The client's reason, cut by the engine to 1 KiB; one copy shared
    /// by every resource the NACK names.
    pub message: Arc<str>,
}

/// A version the client holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Acked {
    /// Empty: acknowledged as absent (delta).
    version: String,
    /// When it was acknowledged; None when the client said it held it as
    /// its stream opened.
    at: Option<SystemTime>,
}

/// One resource of a stream, for CSDS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceStatus {
    pub name: Arc<str>,
    pub state: ResourceState,
    /// The version the client holds (empty if none).
    pub version: String,
    /// When the client acknowledged it, if it did on this stream.
    pub acked_at: Option<SystemTime>,
    /// Set while a NACK stands.
    pub rejection: Option<Rejection>,
}

/// One type on one stream.
#[derive(Default)]
pub(super) struct TypeRecord {
    /// Names subscribed to (`*` for the wildcard): the engine's copies.
    subscribed: BTreeSet<Arc<str>>,
    /// Delta: name -> what the client holds. State of the world: the
    /// empty name -> the set's version.
    acked: BTreeMap<Arc<str>, Acked>,
    /// State of the world: names subscribed to that the acknowledged set
    /// did not carry.
    absent: BTreeSet<Arc<str>>,
    /// State of the world: names subscribed to since the last answer, so
    /// in no answered response yet.
    unanswered: BTreeSet<Arc<str>>,
    /// State of the world: names subscribed to since the last ACK (those
    /// above, and those a standing NACK rejected first), so in no
    /// acknowledged set.
    unacked: BTreeSet<Arc<str>>,
    /// What NACKs rejected (state of the world: under the empty name).
    rejected: BTreeMap<Arc<str>, Rejection>,
    pub(super) acks: u64,
    pub(super) nacks: u64,
    pub(super) last_nack: String,
    pub(super) pending: bool,
    pub(super) last_ack: Option<SystemTime>,
}

impl TypeRecord {
    /// The copy of `name` already held, or a new one.
    fn intern(&self, name: &str) -> Arc<str> {
        self.subscribed
            .get(name)
            .or_else(|| self.acked.get_key_value(name).map(|(k, _)| k))
            .cloned()
            .unwrap_or_else(|| Arc::from(name))
    }

    pub(super) fn on_subscribed(
        &mut self,
        delta: bool,
        wildcard: bool,
        added: &[Arc<str>],
        removed: &[Arc<str>],
    ) {
        for name in removed {
            self.subscribed.remove(name);
            self.absent.remove(name);
            self.unanswered.remove(name);
            self.unacked.remove(name);
            if delta {
                // The client drops what it unsubscribes from.
                self.acked.remove(name);
                self.rejected.remove(name);
            }
        }
        let was_wildcard = self.subscribed.contains(WILDCARD);
        if was_wildcard && !wildcard {
            self.subscribed.remove(WILDCARD);
            self.unanswered.remove(WILDCARD);
            self.unacked.remove(WILDCARD);
            if delta {
                // What only the wildcard brought is no longer followed.
                let subscribed = &self.subscribed;
                self.acked.retain(|n, _| subscribed.contains(n));
                self.rejected.retain(|n, _| subscribed.contains(n));
            }
        }
        let star = (wildcard && !was_wildcard).then(|| Arc::from(WILDCARD));
        for name in added.iter().cloned().chain(star) {
            self.subscribed.insert(name.clone());
            if !delta {
                self.unanswered.insert(name.clone());
                self.unacked.insert(name);
            }
        }
    }

    pub(super) fn on_acked(
        &mut self,
        delta: bool,
        versions: &[(String, String)],
        absent: &[Arc<str>],
        at: Option<SystemTime>,
    ) {
        if delta {
            for (name, version) in versions {
                self.rejected.remove(name.as_str());
                if version.is_empty() && !self.subscribed.contains(name.as_str()) {
                    // A wildcard's resource removed: nothing to tell.
                    self.acked.remove(name.as_str());
                } else {
                    let name = self.intern(name);
                    let version = version.clone();
                    self.acked.insert(name, Acked { version, at });
                }
            }
            return;
        }
        // State of the world: the answer covers every name subscribed to
        // before it.
        self.acked.clear();
        self.rejected.clear();
        self.unanswered.clear();
        self.unacked.clear();
        if let Some((_, version)) = versions.first() {
            let version = version.clone();
            self.acked.insert(Arc::from(""), Acked { version, at });
        }
        self.absent = absent.iter().cloned().collect();
    }

    pub(super) fn on_nacked(
        &mut self,
        delta: bool,
        versions: &[(String, String)],
        message: &str,
        at: SystemTime,
    ) {
        self.last_nack = message.to_owned();
        let message: Arc<str> = Arc::from(message);
        if !delta {
            self.rejected.clear();
            self.unanswered.clear();
        }
        for (name, version) in versions {
            let rejection = Rejection {
                version: version.clone(),
                at,
                message: message.clone(),
            };
            self.rejected.insert(self.intern(name), rejection);
        }
    }

    /// Resource name -> version acknowledged, for `isdpctl proxy-status`
    /// (state of the world: the empty name -> the set's version).
    pub(super) fn acked_versions(&self) -> BTreeMap<String, String> {
        self.acked
            .iter()
            .filter(|(_, a)| !a.version.is_empty())
            .map(|(n, a)| (n.to_string(), a.version.clone()))
            .collect()
    }

    /// Every resource the stream subscribes to, by name, then (delta)
    /// those a wildcard brought; a state-of-the-world wildcard is one
    /// entry, `*`, standing for the set.
    pub(super) fn resources(&self, delta: bool) -> Vec<ResourceStatus> {
        if delta {
            self.delta_resources()
        } else {
            self.subscribed
                .iter()
                .map(|n| self.sotw_status(n))
                .collect()
        }
    }

    fn sotw_status(&self, name: &Arc<str>) -> ResourceStatus {
        let set = self.acked.get("");
        let rejection = self.rejected.get("").cloned();
        let state = if self.unanswered.contains(name) {
            ResourceState::Requested
        } else if rejection.is_some() {
            ResourceState::Nacked
        } else if set.is_none() {
            ResourceState::Requested
        } else if self.absent.contains(name) {
            ResourceState::DoesNotExist
        } else {
            ResourceState::Acked
        };
        // Nacked: the set still held, unless the name came after it.
        let held = set.filter(|_| match state {
            ResourceState::Requested => false,
            ResourceState::Nacked => !self.unacked.contains(name) && !self.absent.contains(name),
            _ => true,
        });
        ResourceStatus {
            name: name.clone(),
            state,
            version: held.map_or_else(String::new, |a| a.version.clone()),
            acked_at: held.and_then(|a| a.at),
            rejection: rejection.filter(|_| state == ResourceState::Nacked),
        }
    }

    fn delta_resources(&self) -> Vec<ResourceStatus> {
        let status = |name: &Arc<str>| {
            let held = self.acked.get(name);
            let rejection = self.rejected.get(name).cloned();
            let state = match (&rejection, held) {
                (Some(_), _) => ResourceState::Nacked,
                (None, Some(a)) if a.version.is_empty() => ResourceState::DoesNotExist,
                (None, Some(_)) => ResourceState::Acked,
                (None, None) => ResourceState::Requested,
            };
            ResourceStatus {
                name: name.clone(),
                state,
                version: held.map_or_else(String::new, |a| a.version.clone()),
                acked_at: held.and_then(|a| a.at),
                rejection,
            }
        };
        let named = self.subscribed.iter().filter(|n| &***n != WILDCARD);
        let mut out: Vec<ResourceStatus> = named.map(status).collect();
        if self.subscribed.contains(WILDCARD) {
            let brought: BTreeSet<&Arc<str>> = self
                .acked
                .keys()
                .chain(self.rejected.keys())
                .filter(|n| !self.subscribed.contains(*n))
                .collect();
            if brought.is_empty() {
                out.push(status(&Arc::from(WILDCARD)));
            }
            out.extend(brought.into_iter().map(status));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
