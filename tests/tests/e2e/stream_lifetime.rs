//! A stream lives no longer than the credential that opened it: every
//! streaming RPC of the control plane (both ADS variants, the sidecar
//! session, the policy and registry watches) ends with UNAUTHENTICATED,
//! naming the token, when that token is revoked or expires, and one opened
//! with a workload certificate when the certificate expires. A certificate
//! lives no longer than the token it was issued under, and is not renewed
//! past it.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use isdp_core::dial::{ClientIdentity, ControlAuth, ControlChannel, connect};
use isdp_proto::v1::{
    Instance, SessionOpen, SessionRequest, SignRequest, TRUST_BUNDLE_NAME, TRUST_BUNDLE_TYPE_URL,
    WatchPoliciesRequest, WatchServiceRequest, certificates_client::CertificatesClient,
    policies_client::PoliciesClient, registry_client::RegistryClient, session_request::Kind,
    sidecar_client::SidecarClient,
};
use isdp_tests::{ControlPlane, ControlPlaneOpts, CreatedToken};
use tokio::task::JoinHandle;
use tonic::{Code, Status};

/// A token: (id, secret, expires at unix ms; 0 never).
async fn token(cp: &ControlPlane, args: &[&str]) -> CreatedToken {
    cp.create_token(args).await
}

fn auth(cp: &ControlPlane, token: Option<&str>, identity: ClientIdentity) -> ControlAuth {
    ControlAuth {
        ca_pem: Some(std::fs::read_to_string(cp.ca_file()).unwrap()),
        token: token.map(str::to_owned),
        identity,
        learned: Default::default(),
    }
}

async fn with_token(cp: &ControlPlane, secret: &str) -> ControlChannel {
    connect(&cp.grpc_url(), &auth(cp, Some(secret), Default::default()))
        .await
        .unwrap()
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// How a stream ended: when, and with what status (OK: ended cleanly).
type Ended = (Instant, Status);

/// Reads `stream` after its first message until it ends, keeping `keep`
/// (the request stream's sender) open meanwhile.
fn follow<T: Send + 'static, K: Send + 'static>(
    what: &'static str,
    mut stream: tonic::Streaming<T>,
    keep: K,
) -> (&'static str, JoinHandle<Ended>) {
    let task = tokio::spawn(async move {
        let _keep = keep;
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return (Instant::now(), Status::ok("")),
                Err(status) => return (Instant::now(), status),
            }
        }
    });
    (what, task)
}

/// Opens `Sidecar/Session` for `web` as node `node` and both ADS variants
/// (trust bundle) on `ch`, each answered once; returns them as they run
/// on. Each sidecar its own node: a newer session of a node ends the
/// older one's stream.
async fn open_sidecar_streams(
    ch: &ControlChannel,
    node: &str,
) -> Vec<(&'static str, JoinHandle<Ended>)> {
    let mut open = Vec::new();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(SessionRequest {
        kind: Some(Kind::Open(SessionOpen {
            node_id: node.into(),
            instances: vec![Instance {
                service: "web".into(),
                address: "127.0.0.1".into(),
                port: 8080,
                inbound_port: 15006,
                ..Default::default()
            }],
        })),
    })
    .await
    .unwrap();
    let mut session = SidecarClient::new(ch.clone())
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Session opens")
        .into_inner();
    session.message().await.expect("session answered");
    open.push(follow("Sidecar/Session", session, tx));

    let node = Some(Node {
        id: node.into(),
        ..Default::default()
    });
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DeltaDiscoveryRequest {
        node: node.clone(),
        type_url: TRUST_BUNDLE_TYPE_URL.into(),
        resource_names_subscribe: vec![TRUST_BUNDLE_NAME.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut delta = AggregatedDiscoveryServiceClient::new(ch.clone())
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("delta ADS opens")
        .into_inner();
    delta.message().await.expect("delta ADS answered");
    open.push(follow("ADS delta", delta, tx));

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DiscoveryRequest {
        node,
        type_url: TRUST_BUNDLE_TYPE_URL.into(),
        resource_names: vec![TRUST_BUNDLE_NAME.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut sotw = AggregatedDiscoveryServiceClient::new(ch.clone())
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("SotW ADS opens")
        .into_inner();
    sotw.message().await.expect("SotW ADS answered");
    open.push(follow("ADS state of the world", sotw, tx));
    open
}

/// Every streaming RPC: the sidecar's three with `join`, `Policies/Watch`
/// with `join` too, and `Registry/WatchService` (an operator view) with
/// `read`. Each is answered once before it is returned. Returns each with
/// the id of the token that opened it.
async fn open_every_stream(
    cp: &ControlPlane,
    join: &CreatedToken,
    read: &CreatedToken,
) -> Vec<(&'static str, String, JoinHandle<Ended>)> {
    let joined = with_token(cp, &join.secret).await;
    let mut all: Vec<_> = open_sidecar_streams(&joined, "lifetime-a")
        .await
        .into_iter()
        .map(|(what, task)| (what, join.id.clone(), task))
        .collect();
    let mut watch = PoliciesClient::new(joined)
        .watch(WatchPoliciesRequest {})
        .await
        .expect("Policies/Watch opens")
        .into_inner();
    watch.message().await.expect("Policies/Watch answered");
    let (what, task) = follow("Policies/Watch", watch, ());
    all.push((what, join.id.clone(), task));
    let mut registry = RegistryClient::new(with_token(cp, &read.secret).await)
        .watch_service(WatchServiceRequest {
            service: "billing".into(),
        })
        .await
        .expect("Registry/WatchService opens")
        .into_inner();
    registry
        .message()
        .await
        .expect("Registry/WatchService answered");
    let (what, task) = follow("Registry/WatchService", registry, ());
    all.push((what, read.id.clone(), task));
    assert_eq!(all.len(), 5, "every streaming RPC");
    all
}

/// Waits for `task` up to `within`; panics naming `what` if it runs on.
async fn ended(what: &str, task: JoinHandle<Ended>, within: Duration) -> Ended {
    tokio::time::timeout(within, task)
        .await
        .unwrap_or_else(|_| panic!("{what} still streams {within:?} later"))
        .unwrap()
}

/// Revoking a token ends, within seconds, every stream it opened, each
/// with UNAUTHENTICATED naming the token (and never its secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_ends_every_stream_it_opened() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let join = token(&cp, &["--role", "join", "--service", "web"]).await;
    let read = token(&cp, &["--role", "read"]).await;
    let streams = open_every_stream(&cp, &join, &read).await;
    // Another token's streams go on.
    let other = token(&cp, &["--role", "join", "--service", "web"]).await;
    let others = open_sidecar_streams(&with_token(&cp, &other.secret).await, "lifetime-b").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    for (what, _, task) in &streams {
        assert!(!task.is_finished(), "{what} ended before the revocation");
    }
    let revoked = Instant::now();
    cp.ctl_ok(&["token", "revoke", &join.id]).await;
    cp.ctl_ok(&["token", "revoke", &read.id]).await;
    for (what, id, task) in streams {
        let (at, status) = ended(what, task, Duration::from_secs(5)).await;
        eprintln!("{what} ended {:?} after the revocation", at - revoked);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert_eq!(
            status.message(),
            format!("token {id} was revoked"),
            "{what}"
        );
    }
    for (what, task) in &others {
        assert!(!task.is_finished(), "{what} of another token ended");
    }
}

/// A token with a TTL: every stream it opened ends at its expiry (not
/// before), with UNAUTHENTICATED naming the token and when it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_expiry_ends_every_stream_it_opened() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let ttl = ["--ttl", "6s"];
    let join = token(
        &cp,
        &[&["--role", "join", "--service", "web"][..], &ttl].concat(),
    )
    .await;
    let read = token(&cp, &[&["--role", "read"][..], &ttl].concat()).await;
    assert!(join.expires_at_unix_ms > 0 && read.expires_at_unix_ms > 0);
    let streams = open_every_stream(&cp, &join, &read).await;
    let forever = token(&cp, &["--role", "join", "--service", "web"]).await;
    let others = open_sidecar_streams(&with_token(&cp, &forever.secret).await, "lifetime-b").await;

    for (what, id, task) in streams {
        let expires = if id == join.id {
            join.expires_at_unix_ms
        } else {
            read.expires_at_unix_ms
        };
        let (_, status) = ended(what, task, Duration::from_secs(15)).await;
        let late = unix_ms() - expires;
        eprintln!("{what} ended {late} ms after its token expired");
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(
            late >= 0,
            "{what} ended {}ms before its token expired",
            -late
        );
        assert!(
            late < 3_000,
            "{what} ended {late} ms after its token expired"
        );
        let message = status.message();
        assert!(
            message.starts_with(&format!("token {id} expired at 20")),
            "{what}: {message}"
        );
    }
    for (what, task) in &others {
        assert!(
            !task.is_finished(),
            "{what} of a token without expiry ended"
        );
    }
    // And the expired token opens nothing new.
    let err = PoliciesClient::new(with_token(&cp, &join.secret).await)
        .watch(WatchPoliciesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired at"), "{err:?}");
}

/// A certificate issued under a token with a TTL ends by the token's
/// expiry, whatever lifetime was asked; streams opened with the certificate
/// alone end when it expires; and once the token has expired the
/// certificate is not renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_lives_no_longer_than_its_token() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let join = token(&cp, &["--role", "join", "--service", "web", "--ttl", "7s"]).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = || {
        rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    };
    let sign = |lifetime_seconds| SignRequest {
        service: "web".into(),
        csr_der: csr(),
        lifetime_seconds,
    };
    let signed = CertificatesClient::new(with_token(&cp, &join.secret).await)
        .sign(sign(30 * 86_400))
        .await
        .expect("signed under the join token")
        .into_inner();
    assert!(
        signed.not_after_unix_ms <= join.expires_at_unix_ms,
        "certificate until {}, its token until {}",
        signed.not_after_unix_ms,
        join.expires_at_unix_ms
    );
    let (_, leaf) = x509_parser::parse_x509_certificate(&signed.chain_der[0]).unwrap();
    let not_after = leaf.validity().not_after.timestamp() * 1000;
    assert!(
        (join.expires_at_unix_ms - 2_000..=join.expires_at_unix_ms).contains(&not_after),
        "notAfter {not_after}, token expires {}",
        join.expires_at_unix_ms
    );

    // The certificate alone (no token) opens the sidecar's streams...
    let identity = ClientIdentity::fixed(isdp_core::pem::ChainPem {
        chain: isdp_core::pem::der_to_pem(&signed.chain_der[0], "CERTIFICATE"),
        key: key.serialize_pem(),
    });
    let certified = connect(&cp.grpc_url(), &auth(&cp, None, identity))
        .await
        .unwrap();
    let streams = open_sidecar_streams(&certified, "lifetime-a").await;
    // ...and renews itself while the token is valid, still capped.
    let renewed = CertificatesClient::new(certified.clone())
        .sign(sign(30 * 86_400))
        .await
        .expect("renewed with the certificate before the token expires")
        .into_inner();
    assert!(renewed.not_after_unix_ms <= join.expires_at_unix_ms);

    // Its streams end when it expires.
    for (what, task) in streams {
        let (_, status) = ended(what, task, Duration::from_secs(15)).await;
        let late = unix_ms() - not_after;
        eprintln!("{what} ended {late} ms after the certificate expired");
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!((0..3_000).contains(&late), "{what}: {late} ms");
        assert!(
            status
                .message()
                .starts_with("the client certificate of spiffe://isdp.local/svc/web expired at"),
            "{what}: {}",
            status.message()
        );
    }

    // Past the token's expiry a certificate issued under it is not renewed
    // (one issued before certificates were capped would still be valid).
    let sleep = join.expires_at_unix_ms + 200 - unix_ms();
    tokio::time::sleep(Duration::from_millis(sleep.max(0) as u64)).await;
    let err = CertificatesClient::new(with_token(&cp, &join.secret).await)
        .sign(sign(3600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message()
            .starts_with(&format!("token {} expired at 20", join.id)),
        "{err:?}"
    );
}
