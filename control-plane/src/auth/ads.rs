//! What an ADS stream may read: the control plane's answer to the xDS
//! engine's [`Access`] question, asked once per stream.
//!
//! The auth layer has already authenticated the stream and put its
//! [`Principal`] into the request's extensions. Its [`ReadScope`] decides
//! every (type URL, name) the stream may read (the engine answers the rest
//! as absent, and filters wildcard subscriptions by it). The layer also
//! ends the stream when its credential is revoked or expires, as it does
//! every streaming call (`auth::lifetime`).
//!
//! Streams are counted per principal (the token that vouches for the
//! caller, so a token and the certificates issued under it share one
//! count, as sessions do): the stream over `--xds-max-streams-per-principal`
//! is refused with RESOURCE_EXHAUSTED before it opens, and each stream's
//! place is given back when the engine drops its access, as the stream
//! ends. The count is the control plane's, not the engine's: a principal
//! is its notion, and the engine's [`Access`] already decides per stream.
//! A stream's `node.id` must be a valid id, as a session's node id is.
//!
//! The bytes of names a principal's streams subscribe to are budgeted
//! together too (`--xds-max-name-bytes-per-principal`, `name_budget.rs`),
//! separately from the stream count: a subscription past it ends its
//! stream with RESOURCE_EXHAUSTED.

mod name_budget;

use std::sync::Arc;

use dashmap::DashMap;
use isdp_xds::{Access, Caller, StreamAccess};
use tonic::Status;

pub use self::name_budget::DEFAULT_NAME_BYTES_PER_PRINCIPAL;
use self::name_budget::{NameBudget, NameCharge};
use super::{Principal, ReadScope};
use crate::registry::validate;

/// The access rules of the control plane's ADS server.
#[derive(Clone)]
pub struct AdsAccess {
    streams: Arc<OpenStreams>,
    names: Arc<NameBudget>,
}

/// principal -> ADS streams open on this replica.
struct OpenStreams {
    open: DashMap<String, usize>,
    /// `--xds-max-streams-per-principal`.
    max: usize,
}

impl AdsAccess {
    /// Rules admitting at most `max_streams_per_principal` streams of one
    /// principal at a time, holding at most
    /// [`DEFAULT_NAME_BYTES_PER_PRINCIPAL`] of names together.
    pub fn new(max_streams_per_principal: usize) -> Self {
        AdsAccess {
            streams: Arc::new(OpenStreams {
                open: DashMap::new(),
                max: max_streams_per_principal,
            }),
            names: NameBudget::new(DEFAULT_NAME_BYTES_PER_PRINCIPAL),
        }
    }

    /// The bytes of subscribed names one principal's streams may hold
    /// together (`--xds-max-name-bytes-per-principal`).
    pub fn with_name_bytes_per_principal(mut self, max: usize) -> Self {
        self.names = NameBudget::new(max);
        self
    }

    /// A place for one more stream of `principal`, or RESOURCE_EXHAUSTED
    /// naming the flag and its limit.
    fn admit(&self, principal: &Principal) -> Result<StreamSlot, Status> {
        let key = principal
            .grant
            .clone()
            .unwrap_or_else(|| principal.id.clone());
        let max = self.streams.max;
        let mut open = self.streams.open.entry(key.clone()).or_insert(0);
        if *open >= max {
            return Err(Status::resource_exhausted(format!(
                "quota --xds-max-streams-per-principal ({max}) exceeded: principal {} already has {} ADS streams open on this control plane",
                principal.id, *open
            )));
        }
        *open += 1;
        Ok(StreamSlot {
            streams: self.streams.clone(),
            key,
        })
    }
}

impl Access for AdsAccess {
    fn stream(&self, caller: Caller<'_>) -> Result<Box<dyn StreamAccess>, Status> {
        let principal = caller.extensions.get::<Principal>();
        // Behind the auth layer every stream has a principal; without one
        // (unit tests) nothing is counted.
        let slot = principal.map(|p| self.admit(p)).transpose()?;
        Ok(Box::new(StreamScope {
            scope: ReadScope::of(principal),
            names: principal.map(|p| self.names.stream(p)),
            _slot: slot,
        }))
    }
}

/// One open stream counted against its principal until dropped.
struct StreamSlot {
    streams: Arc<OpenStreams>,
    key: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.streams.open.entry(self.key.clone()) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// One stream's caller: what it may read, and its place in the
/// principal's count.
struct StreamScope {
    scope: ReadScope,
    /// Its names' bytes, counted in the principal's budget.
    names: Option<NameCharge>,
    _slot: Option<StreamSlot>,
}

impl StreamAccess for StreamScope {
    fn allows(&self, type_url: &str, name: &str) -> bool {
        self.scope.allows(type_url, name)
    }

    fn refusal(&self, type_url: &str, name: &str) -> String {
        self.scope.refusal(type_url, name)
    }

    /// A node id is a sidecar's, as its session names it: required, and
    /// a valid id (the empty id is refused: every sidecar sends one).
    fn node(&self, id: &str) -> Result<(), Status> {
        validate::node_id("node.id", id).map_err(|e| Status::invalid_argument(e.to_string()))
    }

    fn charge(&self, delta: isize) -> Result<(), Status> {
        self.names.as_ref().map_or(Ok(()), |n| n.charge(delta))
    }
}

#[cfg(test)]
mod tests {
    use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL as EPS, TRUST_BUNDLE_TYPE_URL as BUNDLE};
    use tonic::{Extensions, metadata::MetadataMap};

    use super::*;
    use crate::tokens::Role;

    fn try_open(
        access: &AdsAccess,
        principal: Option<Principal>,
    ) -> Result<Box<dyn StreamAccess>, Status> {
        let mut extensions = Extensions::new();
        if let Some(p) = principal {
            extensions.insert(p);
        }
        access.stream(Caller {
            metadata: &MetadataMap::new(),
            extensions: &extensions,
            peer: None,
        })
    }

    fn open(access: &AdsAccess, principal: Option<Principal>) -> Box<dyn StreamAccess> {
        try_open(access, principal).expect("a stream")
    }

    fn join(grant: &str, upstreams: Option<Vec<String>>) -> Principal {
        Principal {
            id: grant.into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams,
            grant: Some(grant.into()),
            grant_expires_at_unix_ms: None,
        }
    }

    /// A principal's streams are counted, a token and the certificates
    /// issued under it together: the one over the limit is refused with
    /// RESOURCE_EXHAUSTED naming the flag and limit, another principal
    /// has its own count, and a stream that ends gives its place back.
    #[test]
    fn streams_are_counted_per_principal() {
        let access = AdsAccess::new(2);
        let token = |id: &str| join(id, None);
        let cert = Principal {
            id: "spiffe://isdp.local/svc/web".into(),
            ..token("t1")
        };
        let first = open(&access, Some(token("t1")));
        let second = open(&access, Some(cert.clone()));
        let refused = try_open(&access, Some(token("t1")))
            .err()
            .expect("over the limit");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("quota --xds-max-streams-per-principal (2) exceeded"),
            "{refused}"
        );
        assert!(refused.message().contains("t1"), "{refused}");
        let _other = open(&access, Some(token("t2")));
        let _unauthenticated = open(&access, None);
        drop(first);
        let third = open(&access, Some(cert));
        assert!(try_open(&access, Some(token("t1"))).is_err());
        drop((second, third));
        assert!(
            access.streams.open.get("t1").is_none(),
            "emptied entries go"
        );
    }

    #[test]
    fn node_ids_are_valid_ids() {
        let access = open(&AdsAccess::new(1), None);
        assert!(access.node("web-1").is_ok());
        for bad in ["", "web-1\nforged", &"n".repeat(129)] {
            let e = access.node(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("node.id: must be 1 to 128"), "{e}");
        }
    }

    /// A stream reads what its principal's scope allows; one without a
    /// principal (no auth layer in front) reads everything.
    #[test]
    fn a_stream_reads_its_principals_scope() {
        let access = AdsAccess::new(64);
        let scoped = open(
            &access,
            Some(join("0123456789abcdef", Some(vec!["payments".into()]))),
        );
        assert!(scoped.allows(BUNDLE, "mesh"));
        assert!(scoped.allows(EPS, "payments"));
        assert!(scoped.allows(EPS, "web"));
        assert!(!scoped.allows(EPS, "billing"));
        assert!(scoped.refusal(EPS, "billing").contains("billing"));
        let unauthenticated = open(&access, None);
        assert!(
            unauthenticated.allows(EPS, "billing"),
            "as ReadScope::of(None)"
        );
    }
}
