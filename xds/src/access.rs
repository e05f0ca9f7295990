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
//! logged once per stream; a wildcard subscription returns exactly the
//! resources the stream may read, as they appear and disappear. Absent
//! rather than an error: one resource a client may not read must not cut
//! it off from the updates of all the others it may, and a client that
//! subscribes by wildcard (Envoy does, to listeners and clusters) cannot
//! subscribe any other way.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use tonic::{Extensions, metadata::MetadataMap};

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
    /// What the stream opened by `caller` may read, for its whole life.
    fn stream(&self, caller: Caller<'_>) -> Box<dyn StreamAccess>;
}

/// One stream's access, decided when it opened.
pub trait StreamAccess: Send + 'static {
    /// Whether the stream may read the resource `name` of `type_url`.
    /// Asked for every name subscribed to and, under a wildcard
    /// subscription, for every resource of the type the stream would be
    /// sent; it must not change over the stream's life.
    fn allows(&self, type_url: &str, name: &str) -> bool;

    /// Why `name` of `type_url` is refused, for the log line written the
    /// first time a stream asks for it.
    fn refusal(&self, type_url: &str, name: &str) -> String {
        format!("{name:?} of {type_url} is outside the stream's access")
    }
}

/// Everyone reads everything: for an engine
/// whose callers are all trusted (and for tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unrestricted;

impl Access for Unrestricted {
    fn stream(&self, _caller: Caller<'_>) -> Box<dyn StreamAccess> {
        Box::new(Unrestricted)
    }
}

impl StreamAccess for Unrestricted {
    fn allows(&self, _type_url: &str, _name: &str) -> bool {
        true
    }
}

/// A stream's access as the state machines apply it: refusals of named
/// subscriptions are logged once per stream.
pub(crate) struct Gate {
    access: Box<dyn StreamAccess>,
    /// (type URL, name) pairs already refused and logged on this stream;
    /// state-of-the-world clients repeat their names on every ACK.
    refused: HashSet<(Arc<str>, String)>,
}

impl Gate {
    pub(crate) fn new(access: Box<dyn StreamAccess>) -> Self {
        Gate {
            access,
            refused: HashSet::new(),
        }
    }

    /// Whether the stream may read `name`; silent, for resources a
    /// wildcard subscription would carry.
    pub(crate) fn allows(&self, type_url: &str, name: &str) -> bool {
        self.access.allows(type_url, name)
    }

    /// Whether a name subscribed to is refused (and, the first time, logs
    /// why).
    pub(crate) fn refuses(&mut self, type_url: &Arc<str>, name: &str) -> bool {
        if self.access.allows(type_url, name) {
            return false;
        }
        if self.refused.insert((type_url.clone(), name.to_owned())) {
            tracing::warn!(
                reason = %self.access.refusal(type_url, name),
                "xds subscription refused: the resource is treated as absent"
            );
        }
        true
    }

    /// The names of `names` the stream may read.
    pub(crate) fn filter(
        &mut self,
        type_url: &Arc<str>,
        names: BTreeSet<String>,
    ) -> BTreeSet<String> {
        names
            .into_iter()
            .filter(|n| !self.refuses(type_url, n))
            .collect()
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
        let names = ["payments", "billing", "web"].map(String::from).into();
        let kept = s.filter(&eps, names);
        assert_eq!(kept, ["payments", "web"].map(String::from).into());
        assert!(s.refuses(&eps, "billing"), "refused again, logged once");
        assert_eq!(s.refused.len(), 1);
    }
}
