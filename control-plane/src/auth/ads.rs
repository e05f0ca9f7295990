//! What an ADS stream may read: the control plane's answer to the xDS
//! engine's [`Access`] question, asked once per stream.
//!
//! The auth layer has already authenticated the stream and put its
//! [`Principal`] into the request's extensions. Its [`ReadScope`] decides
//! every (type URL, name) the stream may read (the engine answers the rest
//! as absent, and filters wildcard subscriptions by it), and the token that
//! vouches for it ([`Principal::grant`]) ends the stream with
//! UNAUTHENTICATED when it is revoked ([`tokens::revoked`]).

use isdp_xds::{Access, Caller, Revoked, StreamAccess};

use super::{Principal, ReadScope};
use crate::tokens::{self, Tokens};

/// The access rules of the control plane's ADS server.
#[derive(Clone)]
pub struct AdsAccess {
    tokens: Tokens,
}

impl AdsAccess {
    pub fn new(tokens: Tokens) -> Self {
        AdsAccess { tokens }
    }
}

impl Access for AdsAccess {
    fn stream(&self, caller: Caller<'_>) -> Box<dyn StreamAccess> {
        let principal = caller.extensions.get::<Principal>();
        Box::new(StreamScope {
            scope: ReadScope::of(principal),
            grant: principal.and_then(|p| p.grant.clone()),
            tokens: self.tokens.clone(),
        })
    }
}

/// One stream's caller: what it may read, and the token it stands on.
struct StreamScope {
    scope: ReadScope,
    grant: Option<String>,
    tokens: Tokens,
}

impl StreamAccess for StreamScope {
    fn allows(&self, type_url: &str, name: &str) -> bool {
        self.scope.allows(type_url, name)
    }

    fn refusal(&self, type_url: &str, name: &str) -> String {
        self.scope.refusal(type_url, name)
    }

    fn revoked(&self) -> Revoked {
        let (tokens, grant) = (self.tokens.clone(), self.grant.clone());
        Box::pin(async move { tokens::revoked(Some(&tokens), grant.as_deref()).await })
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL as EPS, TRUST_BUNDLE_TYPE_URL as BUNDLE};
    use tonic::{Extensions, metadata::MetadataMap};

    use super::*;
    use crate::{
        store::Store,
        tokens::{Role, Scope},
    };

    fn open(access: &AdsAccess, principal: Option<Principal>) -> Box<dyn StreamAccess> {
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

    /// A stream reads what its principal's scope allows, and ends when the
    /// token it was opened with is revoked; a stream of another token (or
    /// of none) does not.
    #[tokio::test]
    async fn a_stream_reads_its_scope_until_its_token_is_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(dir.path()).unwrap();
        let shared: Arc<dyn Store> = Arc::new(store.clone());
        let tokens = Tokens::load(shared, "/isdp/", Duration::from_secs(60))
            .await
            .unwrap();
        let web = || Scope::services(vec!["web".into()]);
        let (token, _) = tokens
            .create(Role::Join, web(), "web".into(), None)
            .await
            .unwrap();
        let (other, _) = tokens
            .create(Role::Join, web(), "web too".into(), None)
            .await
            .unwrap();
        let access = AdsAccess::new(tokens.clone());
        let join = |grant: &str| Principal {
            id: grant.into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: Some(vec!["payments".into()]),
            grant: Some(grant.into()),
        };

        let scoped = open(&access, Some(join(&token.id)));
        assert!(scoped.allows(BUNDLE, "mesh"));
        assert!(scoped.allows(EPS, "payments"));
        assert!(!scoped.allows(EPS, "billing"));
        assert!(scoped.refusal(EPS, "billing").contains("billing"));
        let unauthenticated = open(&access, None);
        assert!(
            unauthenticated.allows(EPS, "billing"),
            "as ReadScope::of(None)"
        );

        let ends = tokio::spawn(scoped.revoked());
        let stays = tokio::spawn(open(&access, Some(join(&other.id))).revoked());
        let never = tokio::spawn(unauthenticated.revoked());
        tokio::task::yield_now().await;
        assert!(!ends.is_finished(), "not revoked yet");
        tokens.revoke(&token.id).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(1), ends)
            .await
            .expect("revoking the token ends the stream")
            .unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains(&token.id), "{status}");
        tokio::task::yield_now().await;
        assert!(!stays.is_finished() && !never.is_finished());
        stays.abort();
        never.abort();
        store.close().await;
    }
}
