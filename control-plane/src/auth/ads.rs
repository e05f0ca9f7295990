//! What an ADS stream may read: the control plane's answer to the xDS
//! engine's [`Access`] question, asked once per stream.
//!
//! The auth layer has already authenticated the stream and put its
//! [`Principal`] into the request's extensions. Its [`ReadScope`] decides
//! every (type URL, name) the stream may read (the engine answers the rest
//! as absent, and filters wildcard subscriptions by it). The layer also
//! ends the stream when its credential is revoked or expires, and counts
//! it against its principal, as it does every streaming call
//! (`auth::lifetime`, `auth::streams`).
//!
//! A stream's `node.id` must be a valid id, as a session's node id is;
//! it is not bound to the caller (several services' sidecars may share a
//! host's node id), so each stream names its principal (the token id or
//! the certificate's SPIFFE ID, never a secret) as its caller, which
//! `isdpctl proxy-status` shows beside the node id.
//!
//! The bytes of names a principal's streams subscribe to are budgeted
//! together (`--xds-max-name-bytes-per-principal`, `name_budget.rs`): a
//! subscription past it ends its stream with RESOURCE_EXHAUSTED.

mod name_budget;

use std::sync::Arc;

use isdp_xds::{Access, Caller, StreamAccess};
use tonic::Status;

pub use self::name_budget::DEFAULT_NAME_BYTES_PER_PRINCIPAL;
use self::name_budget::{NameBudget, NameCharge};
use super::{Principal, ReadScope};
use crate::{publish::standard, registry::validate};

/// The access rules of the control plane's ADS server.
#[derive(Clone)]
pub struct AdsAccess {
    names: Arc<NameBudget>,
}

impl Default for AdsAccess {
    fn default() -> Self {
        AdsAccess::new(DEFAULT_NAME_BYTES_PER_PRINCIPAL)
    }
}

impl AdsAccess {
    /// Rules letting one principal's streams hold at most
    /// `name_bytes_per_principal` of subscribed names together
    /// (`--xds-max-name-bytes-per-principal`).
    pub fn new(name_bytes_per_principal: usize) -> Self {
        AdsAccess {
            names: NameBudget::new(name_bytes_per_principal),
        }
    }
}

impl Access for AdsAccess {
    fn stream(&self, caller: Caller<'_>) -> Result<Box<dyn StreamAccess>, Status> {
        // Behind the auth layer every stream has a principal; without one
        // (unit tests) it reads everything, as `ReadScope::of(None)`.
        let principal = caller.extensions.get::<Principal>();
        Ok(Box::new(StreamScope {
            scope: ReadScope::of(principal),
            caller: principal.map(|p| p.id.clone()).unwrap_or_default(),
            names: principal.map(|p| self.names.stream(p)),
        }))
    }
}

/// One stream's caller: what it may read, who it is, and what its names
/// cost its principal.
struct StreamScope {
    scope: ReadScope,
    /// The principal's id: a token id or a SPIFFE ID.
    caller: String,
    /// Its names' bytes, counted in the principal's budget.
    names: Option<NameCharge>,
}

impl StreamAccess for StreamScope {
    fn allows(&self, type_url: &str, name: &str) -> bool {
        self.scope.allows(type_url, name)
    }

    fn refusal(&self, type_url: &str, name: &str) -> String {
        self.scope.refusal(type_url, name)
    }

    /// A wildcard listener subscription is Envoy's: it gets the
    /// address-bound outbound listener, not the API listeners proxyless
    /// gRPC clients ask for by name (Envoy would skip each with a
    /// warning). Every other type's wildcard carries what the scope allows.
    fn in_wildcard(&self, type_url: &str, name: &str) -> bool {
        type_url != standard::LISTENER || name == standard::ENVOY_OUTBOUND
    }

    /// A node id is a sidecar's, as its session names it: required, and
    /// a valid id (the empty id is refused: every sidecar sends one).
    fn node(&self, id: &str) -> Result<(), Status> {
        validate::node_id("node.id", id).map_err(|e| Status::invalid_argument(e.to_string()))
    }

    fn caller(&self) -> String {
        self.caller.clone()
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

    fn open(access: &AdsAccess, principal: Option<Principal>) -> Box<dyn StreamAccess> {
        let mut extensions = Extensions::new();
        if let Some(p) = principal {
            extensions.insert(p);
        }
        access
            .stream(Caller {
                metadata: &MetadataMap::new(),
                extensions: &extensions,
                peer: None,
            })
            .expect("a stream")
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

    /// Each stream names its principal as its caller: the token id, or
    /// the certificate's SPIFFE ID (never the grant's secret, which the
    /// principal does not hold); none without a principal.
    #[test]
    fn a_stream_names_its_principal() {
        assert_eq!(
            open(&AdsAccess::default(), Some(join("0123456789abcdef", None))).caller(),
            "0123456789abcdef"
        );
        let cert = Principal {
            id: "spiffe://isdp.local/svc/web".into(),
            ..join("0123456789abcdef", None)
        };
        assert_eq!(
            open(&AdsAccess::default(), Some(cert)).caller(),
            "spiffe://isdp.local/svc/web"
        );
        assert_eq!(open(&AdsAccess::default(), None).caller(), "");
    }

    #[test]
    fn node_ids_are_valid_ids() {
        let access = open(&AdsAccess::default(), None);
        assert!(access.node("web-1").is_ok());
        for bad in ["", "web-1\nforged", &"n".repeat(129)] {
            let e = access.node(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("node.id: must be 1 to 128"), "{e}");
        }
    }

    /// A standard resource belongs to the service its name starts with
    /// (`S`, `S/<subset>`); Envoy's outbound listener and routes name
    /// every service, so only a principal reading everything gets them.
    /// A wildcard listener subscription (Envoy's) carries only the
    /// outbound listener.
    #[test]
    fn standard_resources_are_read_by_their_service() {
        use crate::publish::standard::{CLUSTER, ENVOY_OUTBOUND, LISTENER, ROUTE_CONFIGURATION};
        let access = AdsAccess::default();
        let scoped = open(
            &access,
            Some(join("0123456789abcdef", Some(vec!["payments".into()]))),
        );
        assert!(scoped.allows(CLUSTER, "payments"));
        assert!(scoped.allows(CLUSTER, "payments/v1"));
        assert!(scoped.allows(LISTENER, "web"));
        assert!(!scoped.allows(CLUSTER, "billing/v1"));
        assert!(!scoped.allows(LISTENER, ENVOY_OUTBOUND));
        assert!(!scoped.allows(ROUTE_CONFIGURATION, ENVOY_OUTBOUND));
        let everything = open(&access, Some(join("0123456789abcdef", None)));
        assert!(everything.allows(LISTENER, ENVOY_OUTBOUND));
        assert!(everything.in_wildcard(LISTENER, ENVOY_OUTBOUND));
        assert!(!everything.in_wildcard(LISTENER, "payments"));
        assert!(everything.in_wildcard(CLUSTER, "payments"));
    }

    /// A stream reads what its principal's scope allows; one without a
    /// principal (no auth layer in front) reads everything.
    #[test]
    fn a_stream_reads_its_principals_scope() {
        let access = AdsAccess::default();
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
