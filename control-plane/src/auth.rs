//! Authentication and authorization of every gRPC call.
//!
//! A caller is a [`Principal`]: from `authorization: Bearer <secret>`
//! (a token, [`crate::tokens`]) or, failing that (no token, or one expired
//! or revoked), from the SPIFFE ID of the client certificate it presented
//! on the TLS handshake: a join principal for that one service, with the
//! read scope of the token the certificate was issued under, as long as
//! that token has not been revoked. [`required`] maps each method path to what it
//! needs; [`AuthLayer`] applies that in front of the whole router and puts
//! the principal into the request's extensions, where handlers that scope
//! by service (`Certificates/Sign`, `Sidecar/Session`) find it, and the
//! xDS server derives each stream's [`ReadScope`] from it.
//!
//! # Layout
//! - `layer`: the tower layer.

mod layer;

pub use layer::AuthLayer;

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
        let own = services.iter().any(|s| s == name);
        match type_url {
            TRUST_BUNDLE_TYPE_URL => true,
            // Who may call a service is that service's business.
            AUTHORIZATION_POLICY_TYPE_URL => own,
            _ => own || upstreams.iter().any(|s| s == name),
        }
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

/// What a method needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// No authentication (gRPC health checks).
    Nothing,
    /// Any authenticated principal.
    Authenticated,
    /// At least this role (read < write < admin); join does not qualify.
    Role(Role),
    /// A join principal (scope checked by the handler) or this role or more.
    JoinOr(Role),
}

impl Need {
    /// `None` when `role` suffices, else the role the message should name.
    pub fn check(self, role: Role) -> Result<(), &'static str> {
        match self {
            Need::Nothing | Need::Authenticated => Ok(()),
            Need::Role(r) if role.includes(r) => Ok(()),
            Need::Role(r) => Err(r.name()),
            Need::JoinOr(_) if role == Role::Join => Ok(()),
            Need::JoinOr(r) if role.includes(r) => Ok(()),
            Need::JoinOr(Role::Admin) => Err("join or admin"),
            Need::JoinOr(_) => Err("join or write"),
        }
    }
}

/// What the method at `path` (`/package.Service/Method`) needs.
pub fn required(path: &str) -> Need {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    match service {
        "grpc.health.v1.Health" => Need::Nothing,
        "isdp.v1.Registry" => match method {
            "Register" | "Deregister" => Need::Role(Role::Write),
            _ => Need::Role(Role::Read),
        },
        "isdp.v1.ProxyStatus" => Need::Role(Role::Read),
        "isdp.v1.Tokens" => Need::Role(Role::Admin),
        "isdp.v1.Certificates" => match method {
            "Sign" => Need::JoinOr(Role::Admin),
            "TrustBundle" => Need::Authenticated,
            _ => Need::Role(Role::Admin),
        },
        "isdp.v1.Authorization" => match method {
            "ListRules" | "GetDefault" => Need::Role(Role::Read),
            _ => Need::Role(Role::Write),
        },
        "isdp.v1.Sidecar" => Need::JoinOr(Role::Write),
        "envoy.service.discovery.v3.AggregatedDiscoveryService" => Need::Authenticated,
        // Unknown: the router answers UNIMPLEMENTED, but only to callers
        // who authenticated, so probing learns nothing.
        _ => Need::Authenticated,
    }
}

/// The principal the auth layer put on a request; handlers behind the layer
/// always find one except on unauthenticated methods.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::unauthenticated("no authenticated principal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_roles() {
        let cases = [
            ("/isdp.v1.Registry/ListServices", Need::Role(Role::Read)),
            ("/isdp.v1.Registry/WatchService", Need::Role(Role::Read)),
            ("/isdp.v1.Registry/Register", Need::Role(Role::Write)),
            ("/isdp.v1.Registry/Deregister", Need::Role(Role::Write)),
            ("/isdp.v1.ProxyStatus/ListProxies", Need::Role(Role::Read)),
            ("/isdp.v1.Tokens/Create", Need::Role(Role::Admin)),
            ("/isdp.v1.Certificates/Sign", Need::JoinOr(Role::Admin)),
            ("/isdp.v1.Certificates/TrustBundle", Need::Authenticated),
            ("/isdp.v1.Certificates/RotateRoot", Need::Role(Role::Admin)),
            ("/isdp.v1.Authorization/ListRules", Need::Role(Role::Read)),
            ("/isdp.v1.Authorization/PutRule", Need::Role(Role::Write)),
            ("/isdp.v1.Sidecar/Session", Need::JoinOr(Role::Write)),
            (
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
                Need::Authenticated,
            ),
            ("/grpc.health.v1.Health/Check", Need::Nothing),
            ("/nope.Service/Method", Need::Authenticated),
        ];
        for (path, need) in cases {
            assert_eq!(required(path), need, "{path}");
        }
    }

    #[test]
    fn role_checks_name_what_is_missing() {
        let reg = required("/isdp.v1.Registry/Register");
        assert_eq!(reg.check(Role::Read), Err("write"));
        assert_eq!(reg.check(Role::Join), Err("write"));
        assert!(reg.check(Role::Write).is_ok());
        assert!(reg.check(Role::Admin).is_ok());
        let session = required("/isdp.v1.Sidecar/Session");
        assert!(session.check(Role::Join).is_ok());
        assert!(session.check(Role::Write).is_ok());
        assert_eq!(session.check(Role::Read), Err("join or write"));
        let sign = required("/isdp.v1.Certificates/Sign");
        assert!(sign.check(Role::Join).is_ok());
        assert_eq!(sign.check(Role::Write), Err("join or admin"));
        let ads = required("/envoy.service.discovery.v3.AggregatedDiscoveryService/X");
        for r in [Role::Read, Role::Join, Role::Write, Role::Admin] {
            assert!(ads.check(r).is_ok());
        }
        assert_eq!(
            required("/isdp.v1.Tokens/List").check(Role::Join),
            Err("admin")
        );
    }

    #[test]
    fn join_scope() {
        let p = Principal {
            id: "t".into(),
            role: Role::Join,
            services: vec!["web".into()],
            upstreams: None,
            grant: None,
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
