//! What each gRPC method needs of its caller: one explicit row per method
//! the control plane serves, and nothing open by default.
//!
//! A path without a row (a method or service added without one, a typo, a
//! probe) needs `admin`: a new method can never ship open, and only an
//! admin learns that a path is UNIMPLEMENTED; everyone else is refused
//! first. The unit tests walk the compiled descriptors of every service
//! served, so a method added to a `.proto` without a row here fails them.
//!
//! Every call authenticates: the control plane's own health is on the
//! admin listener (`/healthz`, `/ready`), and `grpc.health.v1.Health` is
//! not served here, so it needs `admin` like any unknown path.
//!
//! Join principals (sidecars, by token or workload certificate) are let
//! into what a sidecar calls, and into reads the handler can narrow to
//! their scope; the operator views of the whole mesh (registry, proxy
//! status and its standard form CSDS, authorization rules) stay `read`,
//! since a sidecar gets what it needs of those over xDS, scoped per
//! resource.

use crate::tokens::Role;

/// What a method needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// At least this role (read < write < admin); join does not qualify.
    Role(Role),
    /// A join principal, or this role or more. The handler applies the
    /// join principal's scope: its own services for what it does as a
    /// service (`Sign`, `Session`), its [`super::ReadScope`] for what it
    /// reads (xDS, traffic policies).
    JoinOr(Role),
}

impl Need {
    /// `Ok` when `role` suffices, else what the refusal should name.
    pub fn check(self, role: Role) -> Result<(), &'static str> {
        match self {
            Need::Role(r) if role.includes(r) => Ok(()),
            Need::Role(r) => Err(r.name()),
            Need::JoinOr(_) if role == Role::Join => Ok(()),
            Need::JoinOr(r) if role.includes(r) => Ok(()),
            Need::JoinOr(Role::Read) => Err("join or read"),
            Need::JoinOr(Role::Write) => Err("join or write"),
            Need::JoinOr(Role::Admin) => Err("join or admin"),
            Need::JoinOr(Role::Join) => Err("join"),
        }
    }
}

const READ: Need = Need::Role(Role::Read);
const WRITE: Need = Need::Role(Role::Write);
const ADMIN: Need = Need::Role(Role::Admin);
/// Any principal; a join principal reads within its scope.
const JOIN_OR_READ: Need = Need::JoinOr(Role::Read);

/// What a path without a row in [`METHODS`] needs.
pub const UNLISTED: Need = ADMIN;

/// Every method the control plane serves, by gRPC service, with what it
/// needs. Rows are exact method names; there are no wildcards.
pub const METHODS: &[(&str, &[(&str, Need)])] = &[
    (
        "isdp.v1.Registry",
        &[
            ("Register", WRITE),
            ("Deregister", WRITE),
            // The whole mesh's instances: an operator view. Sidecars read
            // endpoints over xDS, where a scoped join token sees only its
            // upstreams.
            ("ListServices", READ),
            ("ListInstances", READ),
            ("WatchService", READ),
        ],
    ),
    (
        "isdp.v1.Sidecar",
        // A join principal only for its own services (checked before
        // anything is stored); write tokens for tooling.
        &[("Session", Need::JoinOr(Role::Write))],
    ),
    // Every connected sidecar and what it acknowledged: an operator view.
    ("isdp.v1.ProxyStatus", &[("ListProxies", READ)]),
    (
        "isdp.v1.Certificates",
        &[
            // A join principal for its own services; otherwise only admin
            // mints identities (write may register instances, not become them).
            ("Sign", Need::JoinOr(Role::Admin)),
            // The roots every workload must trust anyway: public material.
            ("TrustBundle", JOIN_OR_READ),
            ("RotateRoot", ADMIN),
        ],
    ),
    (
        "isdp.v1.Tokens",
        &[("Create", ADMIN), ("List", ADMIN), ("Revoke", ADMIN)],
    ),
    (
        "isdp.v1.Authorization",
        &[
            ("PutRule", WRITE),
            ("DeleteRule", WRITE),
            ("SetDefault", WRITE),
            // Who may call whom, mesh-wide. A sidecar gets its own services'
            // rules over xDS and no others.
            ("ListRules", READ),
            ("GetDefault", READ),
        ],
    ),
    (
        "isdp.v1.Policies",
        &[
            // Put with `dry_run` too: it validates against the registry and
            // answers as a write would, so it is no read.
            ("Put", WRITE),
            ("Delete", WRITE),
            // A join principal reads the policies of its own services and
            // of its upstreams (all of them without `--upstream`), as over
            // xDS; the handler refuses or filters the rest.
            ("Get", JOIN_OR_READ),
            ("List", JOIN_OR_READ),
            ("Watch", JOIN_OR_READ),
        ],
    ),
    (
        // Scoped per subscription by `auth::ads` (through the xDS engine).
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        &[
            ("StreamAggregatedResources", JOIN_OR_READ),
            ("DeltaAggregatedResources", JOIN_OR_READ),
        ],
    ),
    (
        // Proxy status in the standard form (CSDS): every connected xDS
        // client's node and resources, an operator view like
        // `ProxyStatus/ListProxies`. A join principal is no operator, and
        // the status of its own streams would still name other nodes'.
        "envoy.service.status.v3.ClientStatusDiscoveryService",
        &[("StreamClientStatus", READ), ("FetchClientStatus", READ)],
    ),
];

/// Every streaming method (server-streaming, client-streaming or both),
/// with the group its calls are counted in: a call that outlives its
/// request, so the auth layer ends it when the credential that opened it
/// is revoked or expires (`auth::lifetime`), and counts it against its
/// principal while it is open (`auth::streams`). Both ADS variants are one
/// group: a sidecar opens one or the other. `StreamClientStatus` (CSDS)
/// answers each request of a stream that may stay open, so it counts as
/// any other stream, in its own group. The tests check this list
/// against the descriptors, so a streaming method added to a `.proto`
/// without a row here fails them.
pub const STREAMING: &[(&str, &str)] = &[
    ("/isdp.v1.Registry/WatchService", "Registry/WatchService"),
    ("/isdp.v1.Sidecar/Session", "Sidecar/Session"),
    ("/isdp.v1.Policies/Watch", "Policies/Watch"),
    (
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        "ADS",
    ),
    (
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
        "ADS",
    ),
    (
        "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus",
        "CSDS/StreamClientStatus",
    ),
];

/// The group the streaming method at `path` is counted in, or `None` for
/// a unary method ([`STREAMING`]).
pub fn stream_group(path: &str) -> Option<&'static str> {
    STREAMING
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, group)| *group)
}

/// Whether the method at `path` streams ([`STREAMING`]).
pub fn streams(path: &str) -> bool {
    stream_group(path).is_some()
}

/// The row for `path` (`/package.Service/Method`), if it has one.
pub fn lookup(path: &str) -> Option<Need> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let (_, methods) = METHODS.iter().find(|(s, _)| *s == service)?;
    methods
        .iter()
        .find(|(m, _)| *m == method)
        .map(|(_, need)| *need)
}

/// What the method at `path` needs: its row, or [`UNLISTED`].
pub fn required(path: &str) -> Need {
    lookup(path).unwrap_or(UNLISTED)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message as _;

    use super::*;

    /// The methods of the xDS service. `envoy-types` ships no descriptor
    /// set, and ADS is fixed by the xDS v3 protocol: these two are all of it.
    const ADS: &[&str] = &[
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
    ];

    /// The methods of CSDS (`envoy/service/status/v3/csds.proto`), which
    /// ships no descriptor either: a bidirectional stream and a unary
    /// call, all of it.
    const CSDS_STREAM: &str =
        "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus";
    const CSDS_FETCH: &str =
        "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus";

    /// Every method path of every service in `fds`.
    fn described(fds: &[u8]) -> BTreeSet<String> {
        methods_where(fds, |_| true)
    }

    /// The method paths in `fds` whose descriptor satisfies `keep`.
    fn methods_where(
        fds: &[u8],
        keep: impl Fn(&prost_types::MethodDescriptorProto) -> bool,
    ) -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(fds).expect("a descriptor set");
        let mut paths = BTreeSet::new();
        for file in &set.file {
            for service in &file.service {
                for method in service.method.iter().filter(|m| keep(m)) {
                    paths.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        paths
    }

    /// The streaming methods served, from the descriptors: the auth layer
    /// must bound every one of them by its credential, and nothing else.
    #[test]
    fn every_streaming_method_is_listed_and_nothing_else() {
        let mut streaming = methods_where(isdp_proto::v1::FILE_DESCRIPTOR_SET, |m| {
            m.server_streaming() || m.client_streaming()
        });
        // ADS is bidirectional, both methods (the xDS v3 protocol); CSDS
        // streams in one of its two.
        streaming.extend(ADS.iter().map(|p| p.to_string()));
        streaming.insert(CSDS_STREAM.to_owned());
        assert!(
            streaming.len() >= 6,
            "the descriptors lost their streams: {streaming:?}"
        );
        let listed: BTreeSet<String> = STREAMING.iter().map(|(p, _)| p.to_string()).collect();
        let missing: Vec<_> = streaming.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "streaming methods missing from auth::methods::STREAMING: {missing:?}"
        );
        let stale: Vec<_> = listed.difference(&streaming).collect();
        assert!(stale.is_empty(), "listed but not streaming: {stale:?}");
        for path in &streaming {
            assert!(streams(path), "{path}");
        }
        for path in served().difference(&streaming) {
            assert!(!streams(path), "{path} is unary");
        }
        // Each method its own group, but ADS's two variants one.
        let groups: BTreeSet<&str> = STREAMING.iter().map(|(_, g)| *g).collect();
        assert_eq!(groups.len(), STREAMING.len() - 1, "{groups:?}");
        assert_eq!(stream_group(ADS[0]), Some("ADS"));
        assert_eq!(stream_group(ADS[1]), Some("ADS"));
        assert_eq!(stream_group(CSDS_STREAM), Some("CSDS/StreamClientStatus"));
        assert_eq!(stream_group(CSDS_FETCH), None);
        assert_eq!(stream_group("/isdp.v1.Policies/Get"), None);
    }

    fn served() -> BTreeSet<String> {
        let mut paths = described(isdp_proto::v1::FILE_DESCRIPTOR_SET);
        assert!(
            paths.len() > 20,
            "the descriptors lost their services: {paths:?}"
        );
        paths.extend(ADS.iter().map(|p| p.to_string()));
        paths.extend([CSDS_STREAM, CSDS_FETCH].map(str::to_owned));
        paths
    }

    #[test]
    fn every_served_method_has_a_row_and_every_row_a_method() {
        let served = served();
        let missing: Vec<_> = served.iter().filter(|p| lookup(p).is_none()).collect();
        assert!(
            missing.is_empty(),
            "methods without a row: add one to auth::methods::METHODS for each of {missing:?}"
        );
        let mut rows = BTreeSet::new();
        for (service, methods) in METHODS {
            for (method, _) in *methods {
                let path = format!("/{service}/{method}");
                assert!(rows.insert(path.clone()), "{path} has two rows");
                assert!(
                    served.contains(&path),
                    "{path} has a row but is no method in the descriptors: a stale row"
                );
            }
        }
    }

    #[test]
    fn grpc_health_is_not_served_and_not_open() {
        let health = described(tonic_health::pb::FILE_DESCRIPTOR_SET);
        assert!(!health.is_empty());
        for path in health {
            assert_eq!(lookup(&path), None, "{path}");
            assert_eq!(required(&path), Need::Role(Role::Admin), "{path}");
        }
    }

    #[test]
    fn method_roles() {
        let read = Need::Role(Role::Read);
        let write = Need::Role(Role::Write);
        let admin = Need::Role(Role::Admin);
        let join_or_read = Need::JoinOr(Role::Read);
        let cases = [
            ("/isdp.v1.Registry/ListServices", read),
            ("/isdp.v1.Registry/ListInstances", read),
            ("/isdp.v1.Registry/WatchService", read),
            ("/isdp.v1.Registry/Register", write),
            ("/isdp.v1.Registry/Deregister", write),
            ("/isdp.v1.ProxyStatus/ListProxies", read),
            ("/isdp.v1.Tokens/Create", admin),
            ("/isdp.v1.Tokens/List", admin),
            ("/isdp.v1.Tokens/Revoke", admin),
            ("/isdp.v1.Certificates/Sign", Need::JoinOr(Role::Admin)),
            ("/isdp.v1.Certificates/TrustBundle", join_or_read),
            ("/isdp.v1.Certificates/RotateRoot", admin),
            ("/isdp.v1.Authorization/ListRules", read),
            ("/isdp.v1.Authorization/GetDefault", read),
            ("/isdp.v1.Authorization/PutRule", write),
            ("/isdp.v1.Authorization/DeleteRule", write),
            ("/isdp.v1.Authorization/SetDefault", write),
            ("/isdp.v1.Policies/Put", write),
            ("/isdp.v1.Policies/Delete", write),
            ("/isdp.v1.Policies/Get", join_or_read),
            ("/isdp.v1.Policies/List", join_or_read),
            ("/isdp.v1.Policies/Watch", join_or_read),
            ("/isdp.v1.Sidecar/Session", Need::JoinOr(Role::Write)),
            (
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
                join_or_read,
            ),
            (
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                join_or_read,
            ),
            (CSDS_STREAM, read),
            (CSDS_FETCH, read),
            (
                "/envoy.service.status.v3.ClientStatusDiscoveryService/Nope",
                admin,
            ),
            // Unknown services and methods, and malformed paths: admin.
            ("/nope.Service/Method", admin),
            ("/isdp.v1.Policies/Nope", admin),
            ("/isdp.v1.Registry/ListServices/", admin),
            ("//isdp.v1.Registry/ListServices", admin),
            ("/isdp.v1.Registry", admin),
            ("isdp.v1.Registry/ListServices", admin),
            ("/isdp.v1.registry/ListServices", admin),
            ("/", admin),
            ("", admin),
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
        for path in [
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            "/isdp.v1.Policies/Get",
            "/isdp.v1.Certificates/TrustBundle",
        ] {
            for r in [Role::Read, Role::Join, Role::Write, Role::Admin] {
                assert!(required(path).check(r).is_ok(), "{path} {r:?}");
            }
        }
        for path in [CSDS_STREAM, CSDS_FETCH] {
            assert_eq!(required(path).check(Role::Join), Err("read"), "{path}");
            assert!(required(path).check(Role::Read).is_ok(), "{path}");
        }
        let put = required("/isdp.v1.Policies/Put");
        assert_eq!(put.check(Role::Join), Err("write"));
        assert_eq!(put.check(Role::Read), Err("write"));
        assert_eq!(
            required("/isdp.v1.Tokens/List").check(Role::Join),
            Err("admin")
        );
        let unknown = required("/isdp.v1.Policies/Nope");
        for r in [Role::Read, Role::Join, Role::Write] {
            assert_eq!(unknown.check(r), Err("admin"), "{r:?}");
        }
        assert!(unknown.check(Role::Admin).is_ok());
        assert_eq!(Need::JoinOr(Role::Read).check(Role::Join), Ok(()));
    }
}
