//! Authentication and authorization of every gRPC call.
//!
//! A caller is a [`Principal`]: from `authorization: Bearer <secret>`
//! (a token, [`crate::tokens`]) or, failing that (no token, or one expired
//! or revoked), from the SPIFFE ID of the client certificate it presented
//! on the TLS handshake: a join principal for that one service, with the
//! read scope of the token the certificate was issued under, as long as
//! that token has neither been revoked nor expired, and the certificate
//! itself has not expired. [`required`] maps each method path to what it
//! needs (one row per method; anything else needs admin); [`AuthLayer`]
//! applies that in front of the whole router and puts the principal into
//! the request's extensions, where handlers that scope by service
//! (`Certificates/Sign`, `Sidecar/Session`) find it, and from which the
//! xDS server and the traffic-policy reads derive the caller's
//! [`ReadScope`].
//!
//! A streaming call lives no longer than the credential that opened it:
//! the layer ends it with UNAUTHENTICATED when the token is revoked or the
//! credential expires, whatever the service, and stops its handler even
//! if the client stopped reading (`lifetime`, `bounded`). And one
//! principal holds at most `--max-streams-per-principal` calls of each
//! streaming method at a time (`streams`).
//!
//! # Layout
//! - `methods`: the method -> role table, and which methods stream (in
//!   which group they are counted).
//! - `layer`: the tower layer.
//! - `streams`: open streaming calls counted per principal and group.
//! - `lifetime`: what ends a credential, as one future per call.
//! - `bounded`: the bodies of a streaming call, cut off when it ends.
//! - `ads`: the xDS engine's access rules ([`AdsAccess`]): each ADS
//!   stream reads its principal's `ReadScope`; `ads/name_budget.rs` is the
//!   per-principal ledger of subscribed name bytes.

mod ads;
mod bounded;
mod layer;
mod lifetime;
mod methods;
mod streams;

pub use ads::{AdsAccess, DEFAULT_NAME_BYTES_PER_PRINCIPAL};
pub use layer::{AuthLayer, token_principal};
pub use lifetime::Lifetime;
pub use methods::{METHODS, Need, STREAMING, lookup, required, stream_group};
pub use streams::{OpenStreams, StreamSlot};

use tonic::Status;

use crate::tokens::Role;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Token id, or the SPIFFE ID of a client certificate.
    pub id: String,
    pub role: Role,
    /// Join principals: the services they may act as.
    pub services: Vec<String>,
    /// Join principals: the services they may discover besides their own;
    /// `None` reads every service.
    pub upstreams: Option<Vec<String>>,
    /// The token that vouches for this caller: its own, or for a
    /// certificate the one it was issued under. Certificates signed for
    /// this caller carry it on, so revoking the token revokes them too.
    pub grant: Option<String>,
    /// When that token expires (unix ms); `None`: never. A token's expiry
    /// is its credential's: certificates signed for this caller end then
    /// too (`api::certificates`).
    pub grant_expires_at_unix_ms: Option<i64>,
}

impl Principal {
    /// Whether this caller may sign for, or register instances of, `service`.
    pub fn may_act_as(&self, service: &str) -> bool {
        match self.role {
            Role::Admin | Role::Write => true,
            Role::Join => self.services.iter().any(|s| s == service),
            Role::Read => false,
        }
    }

    /// Like [`Principal::may_act_as`], as the status a handler returns.
    pub fn check_service(&self, method: &str, service: &str) -> Result<(), Status> {
        if self.may_act_as(service) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{method}: the {} principal {} may not act as service {service:?} (its services: {})",
            self.role.name(),
            self.id,
            self.services.join(", ")
        )))
    }
}

/// What a caller may subscribe to over xDS. Operators, and join tokens
/// minted without `upstreams`, read everything; a scoped join principal
/// reads the trust bundle, its own services' resources, and the endpoints
/// and traffic policies of its upstreams, nothing more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadScope {
    All,
    Only {
        who: String,
        services: Vec<String>,
        upstreams: Vec<String>,
    },
}

impl ReadScope {
    pub fn of(principal: Option<&Principal>) -> Self {
        match principal {
            Some(
                p @ Principal {
                    role: Role::Join,
                    upstreams: Some(upstreams),
                    ..
                },
            ) => ReadScope::Only {
                who: p.id.clone(),
                services: p.services.clone(),
                upstreams: upstreams.clone(),
            },
            _ => ReadScope::All,
        }
    }

    /// Whether the resource `name` of `type_url` may be sent.
    pub fn allows(&self, type_url: &str, name: &str) -> bool {
        use isdp_proto::v1::{AUTHORIZATION_POLICY_TYPE_URL, TRUST_BUNDLE_TYPE_URL};
        let ReadScope::Only {
            services,
            upstreams,
            ..
        } = self
        else {
            return true;
        };
        // A standard resource belongs to the service its name starts
        // with; Envoy's outbound listener and routes name every service,
        // so only callers reading everything get them.
        let name = if crate::publish::standard::type_urls().contains(&type_url) {
            match crate::publish::standard::service_of(name) {
                Some(service) => service,
                None => return false,
            }
        } else {
            name
        };
        let own = services.iter().any(|s| s == name);
        match type_url {
            TRUST_BUNDLE_TYPE_URL => true,
            // Who may call a service is that service's business.
            AUTHORIZATION_POLICY_TYPE_URL => own,
            _ => own || upstreams.iter().any(|s| s == name),
        }
    }

    /// [`ReadScope::allows`] as the status a handler returns: refused
    /// reads are PERMISSION_DENIED naming the principal, what it asked for
    /// and what it may read.
    pub fn check(&self, method: &str, type_url: &str, name: &str) -> Result<(), Status> {
        if self.allows(type_url, name) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{method}: {}",
            self.refusal(type_url, name)
        )))
    }

    /// Why a subscription to `name` was refused, for the log.
    pub fn refusal(&self, type_url: &str, name: &str) -> String {
        match self {
            ReadScope::All => String::new(),
            ReadScope::Only {
                who,
                services,
                upstreams,
            } => format!(
                "join principal {who} may not read {name:?} of {type_url} (its services: {}; its upstreams: {})",
                services.join(", "),
                upstreams.join(", ")
            ),
        }
    }
}

/// The principal the auth layer put on a request; handlers behind the layer
/// always find one (every method authenticates), and one that does not
/// refuses rather than guess.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::unauthenticated("no authenticated principal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_scope() {
        let p = Principal {
            id: "t".into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: None,
            grant: None,
            grant_expires_at_unix_ms: None,
        };
        assert!(p.may_act_as("web"));
        assert!(p.check_service("Sign", "payments").is_err());
        let admin = Principal {
            role: Role::Admin,
            services: vec![],
            ..p
        };
        assert!(admin.may_act_as("payments"));
    }

    #[test]
    fn read_scope() {
        use isdp_proto::v1::{
            AUTHORIZATION_POLICY_TYPE_URL as AUTHZ, SERVICE_ENDPOINTS_TYPE_URL as EPS,
            TRAFFIC_POLICY_TYPE_URL as TRAFFIC, TRUST_BUNDLE_TYPE_URL as BUNDLE,
        };
        let join = Principal {
            id: "t".into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: Some(vec!["payments".into()]),
            grant: None,
            grant_expires_at_unix_ms: None,
        };
        let scope = ReadScope::of(Some(&join));
        assert!(scope.allows(BUNDLE, "mesh"));
        assert!(scope.allows(EPS, "payments"));
        assert!(scope.allows(TRAFFIC, "payments"));
        assert!(scope.allows(EPS, "web"));
        assert!(scope.allows(AUTHZ, "web"));
        assert!(!scope.allows(AUTHZ, "payments"), "another service's rules");
        assert!(!scope.allows(EPS, "billing"));
        assert!(!scope.allows(TRAFFIC, "billing"));
        let why = scope.refusal(EPS, "billing");
        assert!(why.contains("billing") && why.contains("payments"), "{why}");
        assert!(scope.check("Policies/Get", TRAFFIC, "payments").is_ok());
        let err = scope.check("Policies/Get", TRAFFIC, "billing").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        for part in ["Policies/Get", "t", "\"billing\"", "web", "payments"] {
            assert!(err.message().contains(part), "{part}: {}", err.message());
        }

        let unscoped = Principal {
            upstreams: None,
            ..join.clone()
        };
        assert_eq!(ReadScope::of(Some(&unscoped)), ReadScope::All);
        let admin = Principal {
            role: Role::Admin,
            ..join
        };
        assert_eq!(ReadScope::of(Some(&admin)), ReadScope::All);
        assert!(ReadScope::All.allows(AUTHZ, "anything"));
    }
}
