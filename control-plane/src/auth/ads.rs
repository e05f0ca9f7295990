//! What an ADS stream may read: the control plane's answer to the xDS
//! engine's [`Access`] question, asked once per stream.
//!
//! The auth layer has already authenticated the stream and put its
//! [`Principal`] into the request's extensions. Its [`ReadScope`] decides
//! every (type URL, name) the stream may read (the engine answers the rest
//! as absent, and filters wildcard subscriptions by it). The layer also
//! ends the stream when its credential is revoked or expires, as it does
//! every streaming call (`auth::lifetime`).

use isdp_xds::{Access, Caller, StreamAccess};

use super::{Principal, ReadScope};

/// The access rules of the control plane's ADS server.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdsAccess;

impl Access for AdsAccess {
    fn stream(&self, caller: Caller<'_>) -> Box<dyn StreamAccess> {
        Box::new(StreamScope {
            scope: ReadScope::of(caller.extensions.get::<Principal>()),
        })
    }
}

/// One stream's caller: what it may read.
struct StreamScope {
    scope: ReadScope,
}

impl StreamAccess for StreamScope {
    fn allows(&self, type_url: &str, name: &str) -> bool {
        self.scope.allows(type_url, name)
    }

    fn refusal(&self, type_url: &str, name: &str) -> String {
        self.scope.refusal(type_url, name)
    }
}

#[cfg(test)]
mod tests {
    use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL as EPS, TRUST_BUNDLE_TYPE_URL as BUNDLE};
    use tonic::{Extensions, metadata::MetadataMap};

    use super::*;
    use crate::tokens::Role;

    fn open(principal: Option<Principal>) -> Box<dyn StreamAccess> {
        let mut extensions = Extensions::new();
        if let Some(p) = principal {
            extensions.insert(p);
        }
        AdsAccess.stream(Caller {
            metadata: &MetadataMap::new(),
            extensions: &extensions,
            peer: None,
        })
    }

    /// A stream reads what its principal's scope allows; one without a
    /// principal (no auth layer in front) reads everything.
    #[test]
    fn a_stream_reads_its_principals_scope() {
        let scoped = open(Some(Principal {
            id: "0123456789abcdef".into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: Some(vec!["payments".into()]),
            grant: Some("0123456789abcdef".into()),
            grant_expires_at_unix_ms: None,
        }));
        assert!(scoped.allows(BUNDLE, "mesh"));
        assert!(scoped.allows(EPS, "payments"));
        assert!(scoped.allows(EPS, "web"));
        assert!(!scoped.allows(EPS, "billing"));
        assert!(scoped.refusal(EPS, "billing").contains("billing"));
        let unauthenticated = open(None);
        assert!(
            unauthenticated.allows(EPS, "billing"),
            "as ReadScope::of(None)"
        );
    }
}
