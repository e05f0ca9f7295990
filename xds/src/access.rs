//! Who may read what: the one place the application's rules reach the
//! engine.
//!
//! The engine knows no credential, role or resource family. When a stream
//! opens, it hands the application what it knows of the caller
//! ([`Caller`]: the request's metadata and extensions, where an
//! authentication layer in front of the server leaves its verdict) and
//! gets back a [`StreamAccess`] for the life of that stream: which
//! (type URL, name) pairs it may read, and why not. quilkin's engine takes
//! its domain through a trait the same way (`Configuration`). How long a
//! stream may last is not asked here: an authentication layer in front of
//! the server ends the stream when its credential ends, as it does for
//! every other streaming service beside it.
//!
//! A name the stream may not read is answered exactly as a resource that
//! does not exist (so the answer does not tell whether it does), and
//! logged (the first in full, then at most one line per interval counting
//! the rest, `access/log.rs`); a wildcard subscription returns exactly the
//! resources the stream may read, as they appear and disappear. Absent
//! rather than an error: one resource a client may not read must not cut
//! it off from the updates of all the others it may, and a client that
//! subscribes by wildcard (Envoy does, to listeners and clusters) cannot
//! subscribe any other way.

mod log;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use tokio::time::Instant;
use tonic::{Extensions, Status, metadata::MetadataMap};

use self::log::{Line, RefusalLog};
use crate::log_rate::LogRate;

/// What the engine knows of a stream's caller when the stream opens.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub metadata: &'a MetadataMap,
    /// Where layers in front of the server (authentication, TLS) put what
    /// they learned about the caller.
    pub extensions: &'a Extensions,
    pub peer: Option<SocketAddr>,
}

/// The application's access rules, asked once per stream.
pub trait Access: Send + Sync + 'static {
    /// What the stream opened by `caller` may read, for its whole life;
    /// or the status the stream is refused with before it opens
    /// (RESOURCE_EXHAUSTED when the caller holds too many streams, say).
    /// The returned access lives exactly as long as the stream, so a count
    /// of open streams can be kept by what it holds and releases on drop.
    fn stream(&self, caller: Caller<'_>) -> Result<Box<dyn StreamAccess>, Status>;
}

/// One stream's access, decided when it opened.
pub trait StreamAccess: Send + 'static {
    /// Whether the stream may read the resource `name` of `type_url`.
    /// Asked for every name subscribed to and, under a wildcard
    /// subscription, for every resource of the type the stream would be
    /// sent; it must not change over the stream's life.
    fn allows(&self, type_url: &str, name: &str) -> bool;

    /// Why `name` of `type_url` is refused, for the log. `name` is the
    /// client's: quote it with `{name:?}`, so control characters are
    /// escaped.
    fn refusal(&self, type_url: &str, name: &str) -> String {
        format!("{name:?} of {type_url} is outside the stream's access")
    }

    /// Whether a wildcard subscription carries `name` of `type_url`, of
    /// the resources [`StreamAccess::allows`] lets it read. Some resources
    /// are only for clients that ask for them by name: Envoy subscribes
    /// to every listener, and would only skip (and warn about) the API
    /// listeners proxyless gRPC clients name one by one. Not a refusal: a
    /// client naming the resource gets it. By default, everything.
    fn in_wildcard(&self, _type_url: &str, _name: &str) -> bool {
        true
    }

    /// Checks the `node.id` of the stream's first request (INVALID_ARGUMENT
    /// ends the stream). Whatever it says, the engine then refuses ids
    /// over [`crate::MAX_NODE_ID_BYTES`] or holding control characters; by
    /// default anything else, the empty id included, passes.
    fn node(&self, _id: &str) -> Result<(), Status> {
        Ok(())
    }

    /// The bytes of names the stream holds change by `delta` (see
    /// [`crate::name_cost`]): more when it subscribes to names, fewer
    /// when it drops them, and what it still holds when it ends. An
    /// error refuses a growth: the request is not applied and the stream
    /// ends with the status (RESOURCE_EXHAUSTED naming the budget, say).
    /// Decreases always pass. An application keeps a budget across
    /// streams here (one caller's streams together), which the engine
    /// cannot: it knows no caller. By default nothing is counted.
    fn charge(&self, _delta: isize) -> Result<(), Status> {
        Ok(())
    }

    /// Who opened the stream, as the application names its callers, for
    /// observers ([`crate::StreamInfo::caller`]): opaque to the engine,
    /// and shown to operators, so never a secret. Empty by default.
    fn caller(&self) -> String {
        String::new()
    }
}

/// Everyone reads everything: for an engine
/// whose callers are all trusted (and for tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unrestricted;

impl Access for Unrestricted {
    fn stream(&self, _caller: Caller<'_>) -> Result<Box<dyn StreamAccess>, Status> {
        Ok(Box::new(Unrestricted))
    }
}

impl StreamAccess for Unrestricted {
    fn allows(&self, _type_url: &str, _name: &str) -> bool {
        true
    }
}

/// A stream's access as the state machines apply it: refusals of named
/// subscriptions are remembered while subscribed and logged at a bounded
/// rate, and the bytes of the names the stream holds are charged to the
/// application.
pub(crate) struct Gate {
    access: Box<dyn StreamAccess>,
    /// Per type, the refused names the stream subscribes to now, so that
    /// state-of-the-world clients, which repeat their names on every ACK,
    /// are not logged again. Only names currently subscribed are kept, so
    /// this is bounded by the stream's name limit.
    refused: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Per type, the name bytes charged to the application
    /// ([`StreamAccess::charge`]); their sum is given back on drop.
    charged: HashMap<Arc<str>, usize>,
    log: RefusalLog,
}

impl Gate {
    pub(crate) fn new(access: Box<dyn StreamAccess>) -> Self {
        Gate {
            access,
            refused: HashMap::new(),
            charged: HashMap::new(),
            log: RefusalLog::default(),
        }
    }

    /// Logs under the server's `rate` rather than a rate of its own.
    pub(crate) fn set_log_rate(&mut self, rate: LogRate) {
        self.log = RefusalLog::new(rate);
    }

    /// Charges the application for the stream holding `bytes` of names
    /// of `type_url` from now on (see [`StreamAccess::charge`]); on an
    /// error nothing changed and the request must not be applied.
    pub(crate) fn hold(&mut self, type_url: &Arc<str>, bytes: usize) -> Result<(), Status> {
        let before = self.charged.get(type_url).copied().unwrap_or(0);
        if bytes == before {
            return Ok(());
        }
        self.access.charge(bytes as isize - before as isize)?;
        self.charged.insert(type_url.clone(), bytes);
        Ok(())
    }

    /// The application's check of a node id (whose message names its
    /// rule), then the engine's.
    pub(crate) fn node(&self, id: &str) -> Result<(), Status> {
        self.access.node(id)?;
        crate::limits::check_node_id(id)
    }

    /// Whether the stream may read `name`; silent, for resources a
    /// wildcard subscription would carry.
    pub(crate) fn allows(&self, type_url: &str, name: &str) -> bool {
        self.access.allows(type_url, name)
    }

    /// Whether a wildcard subscription carries `name`: one the stream may
    /// read, and that the application puts in wildcards.
    pub(crate) fn in_wildcard(&self, type_url: &str, name: &str) -> bool {
        self.access.allows(type_url, name) && self.access.in_wildcard(type_url, name)
    }

    /// Whether a name subscribed to is refused (and, the first time it is
    /// subscribed, logs why, within the stream's log rate).
    pub(crate) fn refuses(&mut self, type_url: &Arc<str>, name: &Arc<str>) -> bool {
        if self.access.allows(type_url, name) {
            return false;
        }
        let refused = self.refused.entry(type_url.clone()).or_default();
        if !refused.contains(name) {
            refused.insert(name.clone());
            match self.log.note(Instant::now()) {
                Line::First => tracing::warn!(
                    reason = %self.access.refusal(type_url, name),
                    "xds subscription refused: the resource is treated as absent"
                ),
                Line::Summary { refused } => tracing::warn!(
                    refused,
                    latest = %self.access.refusal(type_url, name),
                    "xds subscriptions refused since the last such line: the resources are treated as absent"
                ),
                Line::Quiet => tracing::debug!(
                    reason = %self.access.refusal(type_url, name),
                    "xds subscription refused: the resource is treated as absent"
                ),
            }
        }
        true
    }

    /// The refused names of `type_url` the stream subscribes to now.
    pub(crate) fn refused_names(&self, type_url: &str) -> impl Iterator<Item = &Arc<str>> {
        self.refused.get(type_url).into_iter().flatten()
    }

    /// The one copy of `name` the gate keeps, if it is a refused name the
    /// stream subscribes to.
    pub(crate) fn refused_name(&self, type_url: &str, name: &str) -> Option<&Arc<str>> {
        self.refused.get(type_url)?.get(name)
    }

    /// Forgets that `name` was refused: the stream no longer subscribes
    /// to it.
    pub(crate) fn forget(&mut self, type_url: &str, name: &str) {
        if let Some(r) = self.refused.get_mut(type_url) {
            r.remove(name);
        }
    }

    /// The names of `names`, the whole set the stream now subscribes to,
    /// that it may read.
    pub(crate) fn filter(
        &mut self,
        type_url: &Arc<str>,
        names: BTreeSet<Arc<str>>,
    ) -> BTreeSet<Arc<str>> {
        self.keep_only(type_url, &names);
        names
            .into_iter()
            .filter(|n| !self.refuses(type_url, n))
            .collect()
    }

    /// Forgets the refused names of `type_url` outside `names`, the whole
    /// set the stream now subscribes to (none under a wildcard).
    pub(crate) fn keep_only(&mut self, type_url: &str, names: &BTreeSet<Arc<str>>) {
        if let Some(r) = self.refused.get_mut(type_url) {
            r.retain(|n| names.contains(n));
        }
    }

    /// Refused names remembered, over all types.
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        self.refused.values().map(HashSet::len).sum()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let held: usize = self.charged.values().sum();
        if held > 0 {
            let _ = self.access.charge(-(held as isize));
        }
        let refused = self.log.unlogged();
        if refused > 0 {
            if self.log.admit() {
                tracing::warn!(
                    refused,
                    "xds subscriptions refused and not logged before the stream ended: the resources were treated as absent"
                );
            } else {
                tracing::debug!(
                    refused,
                    "xds subscriptions refused and not logged before the stream ended: the resources were treated as absent"
                );
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reads only the names listed, whatever the type.
    pub(crate) struct Only(pub &'static [&'static str]);

    impl StreamAccess for Only {
        fn allows(&self, _type_url: &str, name: &str) -> bool {
            self.0.contains(&name)
        }
    }

    #[test]
    fn names_outside_the_scope_are_dropped() {
        let mut s = Gate::new(Box::new(Only(&["payments", "web"])));
        let eps: Arc<str> = "type.googleapis.com/test.Endpoints".into();
        let names = ["payments", "billing", "web"].map(Arc::from).into();
        let kept = s.filter(&eps, names);
        assert_eq!(kept, ["payments", "web"].map(Arc::from).into());
        assert!(
            s.refuses(&eps, &"billing".into()),
            "refused again, logged once"
        );
        assert_eq!(s.remembered(), 1);
    }

    /// What a stream remembers of its refusals is what it subscribes to
    /// now: dropping names (state of the world sends the whole set,
    /// delta unsubscribes) forgets them, so subscribing to ever new
    /// refused names grows nothing.
    #[tokio::test]
    async fn refusals_are_remembered_only_while_subscribed() {
        let mut s = Gate::new(Box::new(Only(&["web"])));
        let t: Arc<str> = "type.googleapis.com/test.Endpoints".into();
        for round in 0..50 {
            let names: BTreeSet<Arc<str>> =
                (0..100).map(|n| format!("r{round}-{n}").into()).collect();
            assert!(s.filter(&t, names).is_empty());
            assert_eq!(s.remembered(), 100, "round {round}");
        }
        assert!(s.filter(&t, [Arc::from("web")].into()).contains("web"));
        assert_eq!(s.remembered(), 0);
        for n in 0..100 {
            assert!(s.refuses(&t, &format!("d{n}").into()));
            s.forget(&t, &format!("d{n}"));
        }
        assert_eq!(s.remembered(), 0);
    }
}
