//! Every method of every gRPC service, called by every kind of caller
//! against a real control plane, answers exactly as the role table says:
//! UNAUTHENTICATED without credentials, PERMISSION_DENIED for a role that
//! does not suffice, and past the auth layer otherwise. The methods come
//! from the compiled descriptors, so a method added to a `.proto` without
//! an expectation here fails the test. Traffic policies: written only with
//! `write`, read by join principals only within their scope.

use std::{collections::BTreeSet, time::Duration};

use bytes::{Buf as _, BufMut as _, Bytes};
use isdp_core::{
    dial::{ClientIdentity, ControlAuth, ControlChannel, connect},
    pem::{ChainPem, cert_to_pem},
};
use isdp_proto::v1::{
    DeletePolicyRequest, GetPolicyRequest, ListPoliciesRequest, PutPolicyRequest, SignRequest,
    StoredPolicy, TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL, WatchPoliciesRequest,
    certificates_client::CertificatesClient, policies_client::PoliciesClient,
};
use isdp_tests::{ControlPlane, ControlPlaneOpts};
use prost::Message as _;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// The callers, in the order of each row of [`EXPECTED`]. The admin comes
/// last: its `RotateRoot` really rotates the root (see [`calls_in_order`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    /// No token, no client certificate.
    Nobody,
    Read,
    Write,
    /// `--role join --service web --upstream payments`.
    JoinScoped,
    /// `--role join --service web`: reads every service.
    JoinOpen,
    /// A sidecar's workload certificate for web, signed under the scoped
    /// join token (so it carries its upstreams), and no token.
    Certificate,
    Admin,
}

const CALLERS: [Caller; 7] = [
    Caller::Nobody,
    Caller::Read,
    Caller::Write,
    Caller::JoinScoped,
    Caller::JoinOpen,
    Caller::Certificate,
    Caller::Admin,
];

/// What a call should get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// UNAUTHENTICATED.
    U,
    /// PERMISSION_DENIED.
    D,
    /// Past the auth layer: any code but those two (the bodies are mostly
    /// empty, so INVALID_ARGUMENT and NOT_FOUND are common).
    P,
    /// Past the auth layer to the router, which knows no such method.
    Unimplemented,
}

use Expect::{D, P, U, Unimplemented as X};

/// Per method, per caller: nobody, read, write, join scoped, join
/// unscoped, workload certificate, admin.
const EXPECTED: &[(&str, [Expect; 7])] = &[
    ("/isdp.v1.Registry/Register", [U, D, P, D, D, D, P]),
    ("/isdp.v1.Registry/Deregister", [U, D, P, D, D, D, P]),
    ("/isdp.v1.Registry/ListServices", [U, P, P, D, D, D, P]),
    ("/isdp.v1.Registry/ListInstances", [U, P, P, D, D, D, P]),
    ("/isdp.v1.Registry/WatchService", [U, P, P, D, D, D, P]),
    ("/isdp.v1.Sidecar/Session", [U, D, P, P, P, P, P]),
    ("/isdp.v1.ProxyStatus/ListProxies", [U, P, P, D, D, D, P]),
    ("/isdp.v1.Certificates/Sign", [U, D, D, P, P, P, P]),
    ("/isdp.v1.Certificates/TrustBundle", [U, P, P, P, P, P, P]),
    ("/isdp.v1.Certificates/RotateRoot", [U, D, D, D, D, D, P]),
    ("/isdp.v1.Tokens/Create", [U, D, D, D, D, D, P]),
    ("/isdp.v1.Tokens/List", [U, D, D, D, D, D, P]),
    ("/isdp.v1.Tokens/Revoke", [U, D, D, D, D, D, P]),
    ("/isdp.v1.Authorization/PutRule", [U, D, P, D, D, D, P]),
    ("/isdp.v1.Authorization/DeleteRule", [U, D, P, D, D, D, P]),
    ("/isdp.v1.Authorization/SetDefault", [U, D, P, D, D, D, P]),
    ("/isdp.v1.Authorization/ListRules", [U, P, P, D, D, D, P]),
    ("/isdp.v1.Authorization/GetDefault", [U, P, P, D, D, D, P]),
    ("/isdp.v1.Policies/Put", [U, D, P, D, D, D, P]),
    ("/isdp.v1.Policies/Delete", [U, D, P, D, D, D, P]),
    ("/isdp.v1.Policies/Get", [U, P, P, P, P, P, P]),
    ("/isdp.v1.Policies/List", [U, P, P, P, P, P, P]),
    ("/isdp.v1.Policies/Watch", [U, P, P, P, P, P, P]),
    (ADS_SOTW, [U, P, P, P, P, P, P]),
    (ADS_DELTA, [U, P, P, P, P, P, P]),
    // Proxy status in its standard form: an operator view.
    (CSDS_STREAM, [U, P, P, D, D, D, P]),
    (CSDS_FETCH, [U, P, P, D, D, D, P]),
    // Not served by the control plane (its health is /healthz and /ready
    // on the admin listener): like any unknown method, admin only.
    ("/grpc.health.v1.Health/Check", [U, D, D, D, D, D, X]),
    ("/grpc.health.v1.Health/Watch", [U, D, D, D, D, D, X]),
    // Paths in no descriptor: nobody but an admin learns they do not exist.
    ("/isdp.v1.Policies/DryRun", [U, D, D, D, D, D, X]),
    ("/isdp.v1.Nope/Method", [U, D, D, D, D, D, X]),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        [U, D, D, D, D, D, X],
    ),
];

const ADS_SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const ADS_DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// `envoy-types` ships no descriptor set; ADS is fixed by the xDS v3
/// protocol and these two methods are all of it.
const ADS: [&str; 2] = [ADS_SOTW, ADS_DELTA];
const CSDS_STREAM: &str =
    "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus";
const CSDS_FETCH: &str = "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus";
/// CSDS ships no descriptor set either; `envoy/service/status/v3/csds.proto`
/// holds these two methods.
const CSDS: [&str; 2] = [CSDS_STREAM, CSDS_FETCH];
const ROTATE_ROOT: &str = "/isdp.v1.Certificates/RotateRoot";

/// Every method path of every service in an encoded descriptor set.
fn described(fds: &[u8]) -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(fds).expect("a descriptor set");
    let mut paths = BTreeSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
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

/// Every method of `proto/isdp/v1`, of `grpc.health.v1.Health`, of ADS and
/// of CSDS, plus the unknown paths [`EXPECTED`] lists.
fn every_path() -> Vec<String> {
    let mut described_paths = described(isdp_proto::v1::FILE_DESCRIPTOR_SET);
    assert!(described_paths.len() > 20, "{described_paths:?}");
    described_paths.extend(described(tonic_health::pb::FILE_DESCRIPTOR_SET));
    described_paths.extend(ADS.iter().map(|p| p.to_string()));
    described_paths.extend(CSDS.iter().map(|p| p.to_string()));
    let missing: Vec<_> = described_paths
        .iter()
        .filter(|p| !EXPECTED.iter().any(|(e, _)| e == p))
        .collect();
    assert!(
        missing.is_empty(),
        "no expectation for {missing:?}: add a row per method to EXPECTED in \
         tests/tests/e2e/roles.rs (and one to auth::methods::METHODS)"
    );
    EXPECTED.iter().map(|(p, _)| p.to_string()).collect()
}

/// The calls in the order they run: caller by caller, the admin last, and
/// its `RotateRoot` the very last call. A rotation reissues the control
/// plane's certificate from a new root; the connections already open keep
/// working and no later call needs a new one.
fn calls_in_order(paths: &[String]) -> Vec<(Caller, String)> {
    let mut paths = paths.to_vec();
    paths.sort_by_key(|p| (p == ROTATE_ROOT, p.clone()));
    CALLERS
        .iter()
        .flat_map(|c| paths.iter().map(move |p| (*c, p.clone())))
        .collect()
}

/// The body of the one request sent: empty (every field at its default)
/// except where a join principal's scope would refuse an empty one, so that
/// a refusal in the table is the auth layer's.
fn body(path: &str) -> Vec<u8> {
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    match path {
        // Web's own service; not a CSR, so nothing is signed.
        "/isdp.v1.Certificates/Sign" => SignRequest {
            service: "web".into(),
            csr_der: b"not a CSR".to_vec(),
            lifetime_seconds: 0,
        }
        .encode_to_vec(),
        "/isdp.v1.Policies/Get" => GetPolicyRequest {
            service: "web".into(),
        }
        .encode_to_vec(),
        // A served type, by a name every role may read: an empty request
        // names no type, and its refusal would be the server's, not the
        // auth layer's.
        ADS_SOTW => DiscoveryRequest {
            type_url: TRUST_BUNDLE_TYPE_URL.into(),
            resource_names: vec![TRUST_BUNDLE_NAME.into()],
            ..Default::default()
        }
        .encode_to_vec(),
        ADS_DELTA => DeltaDiscoveryRequest {
            type_url: TRUST_BUNDLE_TYPE_URL.into(),
            resource_names_subscribe: vec![TRUST_BUNDLE_NAME.into()],
            ..Default::default()
        }
        .encode_to_vec(),
        _ => Vec::new(),
    }
}

/// Messages as raw bytes, so one client calls any method.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls `path` with one message and returns the code it ends with. A call
/// refused by the auth layer ends before any message; a stream that is
/// open and quiet after a few seconds got past it (`Ok`).
async fn call(ch: ControlChannel, path: &str, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(ch);
    if let Err(e) = grpc.ready().await {
        panic!("{path}: channel not ready: {e}");
    }
    let request = tonic::Request::new(tokio_stream::once(Bytes::from(body)));
    let path = http::uri::PathAndQuery::try_from(path).expect("a path");
    let mut stream = match grpc.streaming(request, path, Raw).await {
        Ok(response) => response.into_inner(),
        Err(status) => return status.code(),
    };
    match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
        Ok(Ok(_)) | Err(_) => Code::Ok,
        Ok(Err(status)) => status.code(),
    }
}

fn matches(want: Expect, got: Code) -> bool {
    match want {
        U => got == Code::Unauthenticated,
        D => got == Code::PermissionDenied,
        P => !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
        X => got == Code::Unimplemented,
    }
}

/// `isdpctl -o json token create ARGS`: the token's id and secret.
async fn token(cp: &ControlPlane, args: &[&str]) -> (String, String) {
    let t = cp.create_token(args).await;
    (t.id, t.secret)
}

/// A channel to `cp` with `token` and/or a client certificate.
async fn channel(
    cp: &ControlPlane,
    token: Option<&str>,
    identity: ClientIdentity,
) -> ControlChannel {
    let auth = ControlAuth {
        ca_pem: Some(std::fs::read_to_string(cp.ca_file()).expect("ca.pem")),
        token: token.map(str::to_owned),
        identity,
        learned: Default::default(),
    };
    connect(&cp.grpc_url(), &auth).await.expect("connect")
}

/// A workload certificate for web, signed with `join` as a sidecar does.
async fn workload_identity(cp: &ControlPlane, join: &str) -> ClientIdentity {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let signed = CertificatesClient::new(channel(cp, Some(join), Default::default()).await)
        .sign(SignRequest {
            service: "web".into(),
            csr_der: csr.der().to_vec(),
            lifetime_seconds: 300,
        })
        .await
        .expect("a join token signs for its own service")
        .into_inner();
    ClientIdentity::fixed(ChainPem {
        chain: signed.chain_der.iter().map(|d| cert_to_pem(d)).collect(),
        key: key.serialize_pem(),
    })
}

/// The callers' channels, each opened once (before any root rotation).
struct Callers {
    channels: Vec<(Caller, ControlChannel)>,
    join_scoped_id: String,
}

impl Callers {
    async fn open(cp: &ControlPlane) -> Self {
        let (_, read) = token(cp, &["--role", "read"]).await;
        let (_, write) = token(cp, &["--role", "write"]).await;
        let (join_scoped_id, scoped) = token(
            cp,
            &[
                "--role",
                "join",
                "--service",
                "web",
                "--upstream",
                "payments",
            ],
        )
        .await;
        let (_, open) = token(cp, &["--role", "join", "--service", "web"]).await;
        let certificate = workload_identity(cp, &scoped).await;
        let mut channels = Vec::new();
        for caller in CALLERS {
            let ch = match caller {
                Caller::Nobody => channel(cp, None, Default::default()).await,
                Caller::Read => channel(cp, Some(&read), Default::default()).await,
                Caller::Write => channel(cp, Some(&write), Default::default()).await,
                Caller::JoinScoped => channel(cp, Some(&scoped), Default::default()).await,
                Caller::JoinOpen => channel(cp, Some(&open), Default::default()).await,
                Caller::Certificate => channel(cp, None, certificate.clone()).await,
                Caller::Admin => channel(cp, Some(cp.admin_token()), Default::default()).await,
            };
            channels.push((caller, ch));
        }
        Callers {
            channels,
            join_scoped_id,
        }
    }

    fn get(&self, caller: Caller) -> ControlChannel {
        self.channels
            .iter()
            .find(|(c, _)| *c == caller)
            .map(|(_, ch)| ch.clone())
            .expect("every caller has a channel")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_answers_every_caller_as_the_role_table_says() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let callers = Callers::open(&cp).await;
    let paths = every_path();
    let mut wrong = Vec::new();
    for (caller, path) in calls_in_order(&paths) {
        let (_, row) = EXPECTED.iter().find(|(p, _)| *p == path).expect("a row");
        let at = CALLERS.iter().position(|c| *c == caller).expect("a caller");
        let want = row[at];
        let got = call(callers.get(caller), &path, body(&path)).await;
        if !matches(want, got) {
            wrong.push(format!("{path} as {caller:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Nothing any refused caller sent was stored.
    let services = cp.services().await;
    assert_eq!(services.as_array().map(Vec::len), Some(0), "{services}");

    // Paths that are no method are counted as `unknown`, however they were
    // answered, so probing cannot grow the metrics' label set.
    let metrics = isdp_tests::http::get(cp.admin_addr(), "/metrics")
        .await
        .expect("GET /metrics")
        .body;
    let handled: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("isdp_grpc_server_handled_total{"))
        .collect();
    for (path, row) in EXPECTED {
        if row.last() == Some(&X) {
            assert!(!metrics.contains(path), "{path} is a label: {handled:#?}");
        }
    }
    for code in ["UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"] {
        let label = format!("method=\"unknown\",code=\"{code}\"");
        assert!(
            handled.iter().any(|l| l.contains(&label)),
            "no {label}: {handled:#?}"
        );
    }
}

const WEB: &str = r#"{"service":"web","timeouts":{"request":"2s"}}"#;
const PAYMENTS: &str = r#"{"service":"payments","timeouts":{"request":"3s"}}"#;
const BILLING: &str = r#"{"service":"billing","timeouts":{"request":"4s"}}"#;
const FAULTY: &str = r#"{"service":"payments","fault":{"abort":{"percent":100,"status":503}}}"#;

fn put(document: &str) -> PutPolicyRequest {
    PutPolicyRequest {
        document_json: document.into(),
        expected_version: None,
        dry_run: false,
    }
}

/// The next message of a watch, within 5 s.
async fn next<T>(watch: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a message within 5 s")
        .expect("stream ok")
        .expect("a message")
}

fn services(policies: &[StoredPolicy]) -> Vec<&str> {
    policies
        .iter()
        .map(|p| p.policy.as_ref().map_or("", |p| p.service.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_written_with_write_and_read_by_join_principals_within_their_scope() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let callers = Callers::open(&cp).await;
    let policies = |c: Caller| PoliciesClient::new(callers.get(c));
    let mut admin = policies(Caller::Admin);
    for doc in [WEB, PAYMENTS, BILLING] {
        admin.put(put(doc)).await.expect("admin puts a policy");
    }
    let before = admin
        .get(GetPolicyRequest {
            service: "payments".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();

    // The review's finding: a join token for web put a 100% fault policy
    // on payments, and a read token deleted policies. Every one of these,
    // a dry run included, is refused naming the role and changes nothing.
    for caller in [
        Caller::Read,
        Caller::JoinScoped,
        Caller::JoinOpen,
        Caller::Certificate,
    ] {
        for dry_run in [false, true] {
            let err = policies(caller)
                .put(PutPolicyRequest {
                    dry_run,
                    ..put(FAULTY)
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{caller:?}: {err}");
            assert!(
                err.message().contains("Policies/Put needs role write"),
                "{caller:?}: {err}"
            );
        }
        let err = policies(caller)
            .delete(DeletePolicyRequest {
                service: "payments".into(),
                expected_version: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{caller:?}: {err}");
        assert!(
            err.message().contains("Policies/Delete needs role write"),
            "{caller:?}: {err}"
        );
    }
    let after = admin
        .get(GetPolicyRequest {
            service: "payments".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(after, before, "a refused write changed the policy");
    let all = admin
        .list(ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(services(&all.policies), ["billing", "payments", "web"]);

    // A write token writes.
    let mut write = policies(Caller::Write);
    write
        .put(PutPolicyRequest {
            dry_run: true,
            ..put(FAULTY)
        })
        .await
        .expect("write may dry-run");

    // Scoped principals (the token, and the certificate issued under it)
    // read web and payments, not billing, and not whether a service they
    // may not read has a policy at all.
    let scoped = [
        (Caller::JoinScoped, callers.join_scoped_id.clone()),
        (
            Caller::Certificate,
            "spiffe://isdp.local/svc/web".to_owned(),
        ),
    ];
    for (caller, id) in &scoped {
        let mut c = policies(*caller);
        for service in ["web", "payments"] {
            c.get(GetPolicyRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{caller:?} reads {service}: {e}"));
        }
        for service in ["billing", "unknown"] {
            let err = c
                .get(GetPolicyRequest {
                    service: service.into(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{caller:?}: {err}");
            let msg = err.message();
            assert!(
                msg.contains("Policies/Get")
                    && msg.contains(id.as_str())
                    && msg.contains(&format!("{service:?}")),
                "{caller:?}: {msg}"
            );
        }
        let listed = c.list(ListPoliciesRequest {}).await.unwrap().into_inner();
        assert_eq!(
            services(&listed.policies),
            ["payments", "web"],
            "{caller:?}"
        );
    }
    // Unscoped principals read everything.
    for caller in [Caller::JoinOpen, Caller::Read, Caller::Write] {
        let mut c = policies(caller);
        c.get(GetPolicyRequest {
            service: "billing".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{caller:?} reads billing: {e}"));
        let err = c
            .get(GetPolicyRequest {
                service: "unknown".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{caller:?}: {err}");
        let listed = c.list(ListPoliciesRequest {}).await.unwrap().into_inner();
        assert_eq!(
            services(&listed.policies),
            ["billing", "payments", "web"],
            "{caller:?}"
        );
    }

    // Watch: a scoped principal sees its two, and a change to billing is
    // not passed on: the next message it gets is payments' change.
    let mut watch = policies(Caller::Certificate)
        .watch(WatchPoliciesRequest {})
        .await
        .expect("a join principal watches")
        .into_inner();
    let first = next(&mut watch).await;
    assert_eq!(services(&first.policies), ["payments", "web"]);
    let mut open = policies(Caller::JoinOpen)
        .watch(WatchPoliciesRequest {})
        .await
        .expect("an unscoped join principal watches")
        .into_inner();
    let all = next(&mut open).await;
    assert_eq!(services(&all.policies), ["billing", "payments", "web"]);

    write
        .put(put(r#"{"service":"billing","timeouts":{"request":"5s"}}"#))
        .await
        .expect("write puts billing");
    let billing = next(&mut open).await;
    assert_ne!(billing, all, "the unscoped watch sees billing change");
    let changed = write
        .put(put(r#"{"service":"payments","timeouts":{"request":"6s"}}"#))
        .await
        .expect("write puts payments")
        .into_inner()
        .policy
        .unwrap();
    let second = next(&mut watch).await;
    assert_eq!(services(&second.policies), ["payments", "web"]);
    assert_eq!(
        second.policies[0].version, changed.version,
        "the message after billing's change is payments' change: {second:?}"
    );
}
