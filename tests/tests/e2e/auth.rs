//! The authenticated control plane end to end: TLS only, a bearer token on
//! every call, roles per method, join tokens scoped to their services, and
//! nothing stored when a call is refused.

use std::time::Duration;

use envoy_types::pb::envoy::service::{
    discovery::v3::{
        DeltaDiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    status::v3::{
        ClientStatusRequest,
        client_status_discovery_service_client::ClientStatusDiscoveryServiceClient,
    },
};
use isdp_proto::v1::{
    Instance, ListInstancesRequest, ListProxiesRequest, ListServicesRequest, ListTokensRequest,
    RegisterRequest, RotateRootRequest, SessionOpen, SessionRequest, SignRequest,
    TrustBundleRequest, certificates_client::CertificatesClient,
    proxy_status_client::ProxyStatusClient, registry_client::RegistryClient, session_request::Kind,
    sidecar_client::SidecarClient, tokens_client::TokensClient,
};
use isdp_tests::{ControlPlane, ControlPlaneOpts, bearer};
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

type Authed<F> = InterceptedService<Channel, F>;

/// A token with no bearer header at all.
fn no_token(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    Ok(req)
}

fn instance(service: &str) -> Instance {
    Instance {
        service: service.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        inbound_port: 15006,
        ..Default::default()
    }
}

fn csr(names: &[&str]) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// The codes every API answers a caller with the interceptor `f`.
async fn codes<F>(channel: Channel, f: F) -> Vec<(&'static str, Code)>
where
    F: tonic::service::Interceptor + Clone,
{
    let ch = |c: &Channel| InterceptedService::new(c.clone(), f.clone());
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |_| Code::Ok);
    let mut out = Vec::new();
    let mut reg = RegistryClient::new(ch(&channel));
    out.push((
        "Registry/ListServices",
        code(reg.list_services(ListServicesRequest {}).await.map(drop)),
    ));
    out.push((
        "Registry/Register",
        code(
            reg.register(RegisterRequest {
                instance: Some(instance("payments")),
            })
            .await
            .map(drop),
        ),
    ));
    out.push((
        "ProxyStatus/ListProxies",
        code(
            ProxyStatusClient::new(ch(&channel))
                .list_proxies(ListProxiesRequest {})
                .await
                .map(drop),
        ),
    ));
    out.push((
        "Tokens/List",
        code(
            TokensClient::new(ch(&channel))
                .list(ListTokensRequest {})
                .await
                .map(drop),
        ),
    ));
    let mut certs = CertificatesClient::new(ch(&channel));
    out.push((
        "Certificates/TrustBundle",
        code(certs.trust_bundle(TrustBundleRequest {}).await.map(drop)),
    ));
    out.push((
        "Certificates/Sign",
        code(
            certs
                .sign(SignRequest {
                    service: "web".into(),
                    csr_der: csr(&[]),
                    lifetime_seconds: 0,
                })
                .await
                .map(drop),
        ),
    ));
    out.push((
        "Certificates/RotateRoot",
        code(
            certs
                .rotate_root(RotateRootRequest {
                    prune_after_seconds: 0,
                })
                .await
                .map(drop),
        ),
    ));
    out.push((
        "Sidecar/Session",
        code(session(ch(&channel), "payments").await),
    ));
    let first = DeltaDiscoveryRequest {
        type_url: isdp_proto::v1::SERVICE_ENDPOINTS_TYPE_URL.into(),
        resource_names_subscribe: vec!["payments".into()],
        ..Default::default()
    };
    let ads = AggregatedDiscoveryServiceClient::new(ch(&channel))
        .delta_aggregated_resources(tokio_stream::iter(vec![first]))
        .await;
    out.push(("ADS/Delta", code(ads.map(drop))));
    let csds = ClientStatusDiscoveryServiceClient::new(ch(&channel))
        .fetch_client_status(ClientStatusRequest::default())
        .await;
    out.push(("CSDS/Fetch", code(csds.map(drop))));
    out
}

/// Opens a session registering one instance of `service`.
async fn session<F: tonic::service::Interceptor>(
    ch: Authed<F>,
    service: &str,
) -> Result<(), tonic::Status> {
    let open = SessionRequest {
        kind: Some(Kind::Open(SessionOpen {
            node_id: "intruder".into(),
            instances: vec![instance(service)],
        })),
    };
    // Keep the request stream open so the server answers the open itself.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(open).await.unwrap();
    let resp = SidecarClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    let mut stream = resp.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no session answer"))?;
    drop(tx);
    first.map(drop)
}

async fn assert_store_empty(cp: &ControlPlane) {
    let services = cp.services().await;
    assert_eq!(
        services.as_array().map(Vec::len),
        Some(0),
        "a refused call changed the store: {services}"
    );
}

/// `isdpctl -o json token create ARGS` and its secret.
async fn create_token(cp: &ControlPlane, args: &[&str]) -> String {
    cp.create_token(args).await.secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_prints_only_the_secret_on_stdout() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let out = cp
        .ctl(&["token", "create", "--role", "join", "--service", "web"])
        .await;
    assert!(out.status.success(), "{out:?}");
    // `TOKEN=$(isdpctl token create ...)` must capture the secret alone.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let secret = stdout.strip_suffix('\n').expect("one line");
    assert!(
        secret.starts_with("isdp_") && !secret.contains(char::is_whitespace),
        "stdout is not just the secret: {stdout:?}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("not shown again"), "{stderr:?}");
    // And the captured secret works.
    let mut tokens = TokensClient::new(InterceptedService::new(cp.channel().await, bearer(secret)));
    let err = tokens.list(ListTokensRequest {}).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "a join token, not a bad one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_unauthenticated() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let channel = cp.channel().await;
    for (what, code) in codes(channel.clone(), no_token).await {
        assert_eq!(code, Code::Unauthenticated, "{what} without a token");
    }
    let bogus = bearer("isdp_0123456789abcdef_notarealsecret");
    for (what, code) in codes(channel.clone(), bogus).await {
        assert_eq!(code, Code::Unauthenticated, "{what} with a bogus token");
    }
    // The message tells the caller what is missing.
    let err = RegistryClient::new(channel.clone())
        .list_services(ListServicesRequest {})
        .await
        .unwrap_err();
    assert!(
        err.message().contains("missing bearer token"),
        "{}",
        err.message()
    );
    // The admin token gets everywhere (Session/ADS answer or stream).
    let admin = bearer(cp.admin_token());
    let mut reg = RegistryClient::new(InterceptedService::new(channel.clone(), admin));
    reg.list_instances(ListInstancesRequest {
        service: "payments".into(),
    })
    .await
    .expect("admin can list");
    assert_store_empty(&cp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_is_refused() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let url = format!("http://{}", cp.grpc_addr());
    let result = async {
        let ch = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        RegistryClient::with_interceptor(ch, bearer(cp.admin_token()))
            .list_services(ListServicesRequest {})
            .await
    }
    .await;
    assert!(result.is_err(), "plaintext gRPC was answered: {result:?}");
    // And plaintext isdpctl too.
    let out = isdp_tests::isdpctl(
        &format!("http://{}", cp.grpc_addr()),
        &["--token", cp.admin_token(), "services"],
    )
    .await;
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_join_scopes_are_enforced() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let channel = cp.channel().await;

    // A read token lists but cannot register.
    let read = create_token(&cp, &["--role", "read", "--description", "ci"]).await;
    cp.ctl_ok(&["--token", &read, "services"]).await;
    let out = cp
        .ctl(&[
            "--token",
            &read,
            "register",
            "--service",
            "payments",
            "--address",
            "127.0.0.1",
            "--port",
            "8080",
        ])
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("needs role write; token has read"),
        "{err}"
    );
    let codes_read = codes(channel.clone(), bearer(&read)).await;
    for (what, code) in &codes_read {
        let want = match *what {
            "Registry/ListServices"
            | "ProxyStatus/ListProxies"
            | "CSDS/Fetch"
            | "Certificates/TrustBundle" => Code::Ok,
            "ADS/Delta" => Code::Ok,
            _ => Code::PermissionDenied,
        };
        assert_eq!(*code, want, "{what} with a read token");
    }
    assert_store_empty(&cp).await;

    // A join token for web: no Session or Sign as payments.
    let join = create_token(&cp, &["--role", "join", "--service", "web"]).await;
    let joined = || InterceptedService::new(channel.clone(), bearer(&join));
    let err = session(joined(), "payments").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = CertificatesClient::new(joined())
        .sign(SignRequest {
            service: "payments".into(),
            csr_der: csr(&[]),
            lifetime_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = RegistryClient::new(joined())
        .list_services(ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_store_empty(&cp).await;

    // ... but it signs for web, names from the CSR ignored.
    let signed = CertificatesClient::new(joined())
        .sign(SignRequest {
            service: "web".into(),
            csr_der: csr(&["payments.svc.isdp.local"]),
            lifetime_seconds: 60,
        })
        .await
        .expect("join token signs for its own service")
        .into_inner();
    assert_eq!(signed.spiffe_id, "spiffe://isdp.local/svc/web");
    let (_, cert) = x509_parser::parse_x509_certificate(&signed.chain_der[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://isdp.local/svc/web"]);
    assert!(!signed.trust_bundle_der.is_empty());

    // And its session for web is accepted.
    session(joined(), "web")
        .await
        .expect("join token registers its own service");
    // A join token for payments opening the same node id neither takes
    // over nor is locked out: each acts only as its own service.
    let pay = create_token(&cp, &["--role", "join", "--service", "payments"]).await;
    session(
        InterceptedService::new(channel.clone(), bearer(&pay)),
        "payments",
    )
    .await
    .expect("payments' session beside web's on one node id");
    let web = cp.instances("web").await.expect("instances");
    assert_eq!(web.len(), 1, "web's instance is untouched: {web:?}");
    assert_eq!(web[0]["id"], "intruder.web");

    // Revocation takes effect at once.
    let list = cp.ctl_ok(&["-o", "json", "token", "list"]).await;
    let tokens: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    let read_id = tokens
        .iter()
        .find(|t| t["role"] == "read")
        .and_then(|t| t["id"].as_str())
        .expect("the read token is listed")
        .to_owned();
    assert!(!list.contains(&read), "token list shows a secret");
    cp.ctl_ok(&["token", "revoke", &read_id]).await;
    let out = cp.ctl(&["--token", &read, "services"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_bundle_and_rotation_through_isdpctl() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let before = cp.ctl_ok(&["ca", "bundle"]).await;
    assert_eq!(before.matches("BEGIN CERTIFICATE").count(), 1);
    assert_eq!(
        before.trim(),
        std::fs::read_to_string(cp.ca_file()).unwrap().trim()
    );
    let after = cp.ctl_ok(&["ca", "rotate", "--prune-after", "1h"]).await;
    assert_eq!(after.matches("BEGIN CERTIFICATE").count(), 2);
    // The server certificate was reissued from the new root, and the
    // rewritten ca.pem (both roots) still verifies it.
    isdp_tests::eventually(
        Duration::from_secs(5),
        "ca.pem holds both roots",
        || async {
            let pem = std::fs::read_to_string(cp.ca_file())?;
            anyhow::ensure!(pem.matches("BEGIN CERTIFICATE").count() == 2, "{pem}");
            Ok(())
        },
    )
    .await;
    cp.ctl_ok(&["services"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_as_its_service_and_ads_serves_the_bundle() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use isdp_core::dial::{ControlAuth, connect};
    use isdp_core::pem::der_to_pem;
    use prost::Message as _;

    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let ca_pem = std::fs::read_to_string(cp.ca_file()).unwrap();
    let admin = ControlAuth {
        ca_pem: Some(ca_pem.clone()),
        token: Some(cp.admin_token().to_owned()),
        identity: Default::default(),
        learned: Default::default(),
    };
    let admin_ch = connect(&cp.grpc_url(), &admin).await.unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let signed = CertificatesClient::new(admin_ch)
        .sign(SignRequest {
            service: "web".into(),
            csr_der: csr,
            lifetime_seconds: 300,
        })
        .await
        .expect("admin signs for any service")
        .into_inner();

    // No token: the certificate alone makes a join principal for web.
    let mtls = ControlAuth {
        ca_pem: Some(ca_pem),
        token: None,
        identity: isdp_core::dial::ClientIdentity::fixed(isdp_core::pem::ChainPem {
            chain: der_to_pem(&signed.chain_der[0], "CERTIFICATE"),
            key: key.serialize_pem(),
        }),
        learned: Default::default(),
    };
    let ch = connect(&cp.grpc_url(), &mtls).await.unwrap();
    session(ch.clone(), "web")
        .await
        .expect("the certificate's service may open a session");
    let err = session(ch.clone(), "payments").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = RegistryClient::new(ch.clone())
        .list_services(ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // The trust bundle over delta ADS, named "mesh".
    let first = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "auth-test".into(),
            ..Default::default()
        }),
        type_url: isdp_proto::v1::TRUST_BUNDLE_TYPE_URL.into(),
        resource_names_subscribe: vec![isdp_proto::v1::TRUST_BUNDLE_NAME.into()],
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(first).await.unwrap();
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("ADS opens for a join principal")
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a trust bundle within 5 s")
        .expect("stream ok")
        .expect("a response");
    let r = &resp.resources[0];
    assert_eq!(r.name, "mesh");
    let bundle = isdp_proto::v1::TrustBundle::decode(
        r.resource.as_ref().expect("resource").value.as_slice(),
    )
    .unwrap();
    assert_eq!(bundle.trust_domain, "isdp.local");
    assert_eq!(bundle.roots_der, signed.trust_bundle_der);
    drop(tx);
}

/// Opens a delta ADS stream on `ch` and returns its first answer (or the
/// status that refused it).
async fn first_delta<F: tonic::service::Interceptor>(
    ch: Authed<F>,
    type_url: &str,
    names: &[&str],
) -> Result<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse, tonic::Status> {
    let first = DeltaDiscoveryRequest {
        node: Some(envoy_types::pb::envoy::config::core::v3::Node {
            id: "scope-test".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(first).await.unwrap();
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer within 5 s"))??;
    drop(tx);
    resp.ok_or_else(|| tonic::Status::aborted("stream closed without an answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_scoped_to_its_upstreams_reads_only_those() {
    use isdp_proto::v1::{SERVICE_ENDPOINTS_TYPE_URL, TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL};

    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    for (service, port) in [("payments", "8080"), ("billing", "8081")] {
        cp.ctl_ok(&[
            "register",
            "--service",
            service,
            "--address",
            "127.0.0.1",
            "--port",
            port,
        ])
        .await;
    }

    // Upstreams narrow join tokens only, and must be service names.
    for (args, want) in [
        (
            &["--role", "read", "--upstream", "payments"][..],
            "upstreams apply to join tokens only",
        ),
        (
            &[
                "--role",
                "join",
                "--service",
                "web",
                "--upstream",
                "Bad_Name",
            ][..],
            "upstream",
        ),
    ] {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let out = cp.ctl(&all).await;
        assert!(!out.status.success(), "token create {args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("InvalidArgument") && err.contains(want),
            "{err}"
        );
    }

    let token = create_token(
        &cp,
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
    let listed: serde_json::Value =
        serde_json::from_str(&cp.ctl_ok(&["-o", "json", "token", "list"]).await).unwrap();
    let scoped = listed
        .as_array()
        .and_then(|all| all.iter().find(|t| t["role"] == "join"))
        .expect("the join token is listed");
    assert_eq!(scoped["upstreams"], serde_json::json!(["payments"]));

    let channel = cp.channel().await;
    let ch = || InterceptedService::new(channel.clone(), bearer(&token));
    // Both exist; billing is outside the token and reads as absent.
    let resp = first_delta(ch(), SERVICE_ENDPOINTS_TYPE_URL, &["payments", "billing"])
        .await
        .expect("ADS opens for a scoped join token");
    let names: Vec<_> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["payments"]);
    assert_eq!(resp.removed_resources, ["billing"]);
    // The trust bundle is for everyone.
    let resp = first_delta(ch(), TRUST_BUNDLE_TYPE_URL, &[TRUST_BUNDLE_NAME])
        .await
        .expect("the bundle");
    assert_eq!(resp.resources.len(), 1);
    // A wildcard (Envoy subscribes that way) is answered with exactly what
    // the token may read: the upstream, not billing.
    let resp = first_delta(ch(), SERVICE_ENDPOINTS_TYPE_URL, &["*"])
        .await
        .expect("a scoped wildcard is answered");
    let names: Vec<_> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["payments"]);
    assert!(resp.removed_resources.is_empty());

    // A join token minted without upstreams reads every service.
    let open = create_token(&cp, &["--role", "join", "--service", "web"]).await;
    let resp = first_delta(
        InterceptedService::new(channel.clone(), bearer(&open)),
        SERVICE_ENDPOINTS_TYPE_URL,
        &["payments", "billing"],
    )
    .await
    .expect("ADS for an unscoped join token");
    assert_eq!(resp.resources.len(), 2);
}
