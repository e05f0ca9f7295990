//! `isdpctl bootstrap grpc` against a real control plane: the files a
//! proxyless gRPC client needs (modes, absolute paths, a certificate of
//! the service that verifies against the bundle written beside it), the
//! certificate accepted on its own as the service's join principal with
//! the token's scope, renewal in place (atomic, same key and node, on the
//! current certificate), refusals, and bad input that writes nothing.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use isdp_proto::v1::{
    ListServicesRequest, SERVICE_ENDPOINTS_TYPE_URL, SignRequest, TrustBundleRequest,
    certificates_client::CertificatesClient, registry_client::RegistryClient,
};
use isdp_tests::{ControlPlane, ControlPlaneOpts, isdpctl_raw};
use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject as _};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

const FILES: [&str; 4] = ["bootstrap.json", "ca.pem", "cert.pem", "key.pem"];

/// `isdpctl bootstrap grpc --out DIR ARGS` with the harness's admin
/// credentials.
async fn bootstrap(cp: &ControlPlane, dir: &Path, args: &[&str]) -> Output {
    let dir = dir.display().to_string();
    let mut all = vec!["bootstrap", "grpc", "--out", &dir];
    all.extend_from_slice(args);
    cp.ctl(&all).await
}

async fn bootstrap_ok(cp: &ControlPlane, dir: &Path, args: &[&str]) -> Output {
    let out = bootstrap(cp, dir, args).await;
    assert!(
        out.status.success(),
        "bootstrap {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs it with no credentials but what `args` give: no CA file, no admin
/// token, no data dir (the client host of a renewal cron job).
async fn bootstrap_bare(cp: &ControlPlane, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(isdp_tests::binary("isdpctl"));
    cmd.arg("--control-plane")
        .arg(cp.grpc_url())
        .arg("--data-dir")
        .arg("/nonexistent/isdp-data")
        .env_remove("ISDP_TOKEN")
        .env_remove("ISDP_CA_FILE")
        .env_remove("ISDP_JOIN_TOKEN");
    let mut all = vec!["bootstrap", "grpc"];
    all.extend_from_slice(args);
    isdpctl_raw(cmd, &all).await
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&read(dir, "bootstrap.json")).expect("bootstrap.json is JSON")
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every certificate of a PEM file, DER.
fn pems(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.expect("a PEM certificate"))
        .collect()
}

fn leaf(dir: &Path) -> CertificateDer<'static> {
    pems(&read(dir, "cert.pem")).remove(0)
}

/// Serial and notAfter (unix seconds) of a certificate.
fn serial_and_end(der: &[u8]) -> (Vec<u8>, i64) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    (
        cert.raw_serial().to_vec(),
        cert.validity().not_after.timestamp(),
    )
}

/// Whether `leaf` chains to one of the roots in `ca_pem`, as a TLS server
/// checking a client certificate would decide.
fn verifies(leaf: &CertificateDer<'static>, ca_pem: &[u8]) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for root in pems(ca_pem) {
        roots.add(root).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    verifier
        .verify_client_cert(leaf, &[], UnixTime::now())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A channel to `https://<server_uri>` as the client's bootstrap says:
/// trusting its ca.pem, presenting its cert.pem and key.pem, no token.
async fn client_channel(dir: &Path) -> Result<Channel, tonic::transport::Error> {
    let doc = json(dir);
    let server = &doc["xds_servers"][0];
    let files = &server["channel_creds"][0]["config"];
    let file = |field: &str| std::fs::read(files[field].as_str().unwrap()).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(file("ca_certificate_file")))
        .identity(Identity::from_pem(
            file("certificate_file"),
            file("private_key_file"),
        ));
    let uri = server["server_uri"].as_str().unwrap();
    Endpoint::from_shared(format!("https://{uri}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// The ServiceEndpoints names a delta ADS stream on `ch` is sent for `names`.
async fn endpoints_sent(ch: Channel, node_id: &str, names: &[&str]) -> Vec<String> {
    let first = DeltaDiscoveryRequest {
        node: Some(Node {
            id: node_id.into(),
            ..Default::default()
        }),
        type_url: SERVICE_ENDPOINTS_TYPE_URL.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(first).await.unwrap();
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("ADS opens for the certificate")
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an ADS answer within 5 s")
        .expect("stream ok")
        .expect("a response");
    resp.resources.iter().map(|r| r.name.clone()).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn join_tokens(cp: &ControlPlane) -> Vec<serde_json::Value> {
    let list = cp.ctl_ok(&["-o", "json", "token", "list"]).await;
    let all: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    all.into_iter().filter(|t| t["role"] == "join").collect()
}

async fn start() -> ControlPlane {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    cp.register("payments", "127.0.0.1", 8080, &[]).await;
    cp.register("billing", "127.0.0.1", 8081, &[]).await;
    cp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_holds_what_a_grpc_client_needs_and_its_certificate_is_the_join_principal() {
    let cp = start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("xds");
    let out = bootstrap_ok(
        &cp,
        &dir,
        &["--service", "web", "--upstream", "payments", "--zone", "z1"],
    )
    .await;
    let dir = dir.canonicalize().unwrap();

    // stdout is the one line to eval; the notes go to stderr.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "export GRPC_XDS_BOOTSTRAP={}\n",
            dir.join("bootstrap.json").display()
        )
    );
    let tokens = join_tokens(&cp).await;
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let token_id = tokens[0]["id"].as_str().unwrap();
    assert_eq!(tokens[0]["services"], serde_json::json!(["web"]));
    assert_eq!(tokens[0]["upstreams"], serde_json::json!(["payments"]));
    assert_eq!(tokens[0]["expires_at_unix_ms"], 0, "no --ttl: never");
    let notes = stderr(&out);
    assert!(
        notes.contains(&format!("isdpctl token revoke {token_id}")),
        "{notes}"
    );

    // The files and their modes; nothing else is left in the directory.
    assert_eq!(listing(&dir), FILES);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    for public in ["cert.pem", "ca.pem", "bootstrap.json"] {
        assert_eq!(mode(&dir.join(public)), 0o644, "{public}");
    }
    // The token's secret is used once and kept nowhere.
    for name in FILES {
        let text = String::from_utf8_lossy(&read(&dir, name)).into_owned();
        assert!(!text.contains(&format!("isdp_{token_id}_")), "{name}");
    }

    // The bootstrap: what gRPC reads, every path absolute and existing.
    let doc = json(&dir);
    let server = &doc["xds_servers"][0];
    assert_eq!(server["server_uri"], cp.grpc_addr());
    assert_eq!(server["server_features"], serde_json::json!(["xds_v3"]));
    assert_eq!(server["channel_creds"][0]["type"], "tls");
    let provider = &doc["certificate_providers"]["isdp"];
    assert_eq!(provider["plugin_name"], "file_watcher");
    for files in [&server["channel_creds"][0]["config"], &provider["config"]] {
        for (field, name) in [
            ("ca_certificate_file", "ca.pem"),
            ("certificate_file", "cert.pem"),
            ("private_key_file", "key.pem"),
        ] {
            let path = PathBuf::from(files[field].as_str().expect(field));
            assert!(path.is_absolute() && path.is_file(), "{field}: {path:?}");
            assert_eq!(path, dir.join(name));
        }
        assert_eq!(files["refresh_interval"], "60s");
    }
    let node_id = doc["node"]["id"].as_str().unwrap().to_owned();
    let suffix = node_id.strip_prefix("web-").expect("<service>-<random>");
    assert!(
        suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit()),
        "{node_id}"
    );
    assert_eq!(doc["node"]["cluster"], "web");
    assert_eq!(doc["node"]["locality"], serde_json::json!({ "zone": "z1" }));

    // The certificate: web's SPIFFE ID, chaining to the roots beside it,
    // which are the mesh's; and to no other CA.
    let cert = leaf(&dir);
    assert_eq!(
        isdp_core::cert::uri_san(&cert).unwrap(),
        "spiffe://isdp.local/svc/web"
    );
    verifies(&cert, &read(&dir, "ca.pem")).expect("cert.pem verifies against ca.pem");
    assert_eq!(
        pems(&read(&dir, "ca.pem")),
        pems(&std::fs::read(cp.ca_file()).unwrap())
    );
    let stranger = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    assert!(verifies(&cert, stranger.pem().as_bytes()).is_err());

    // The certificate alone (no token) is web's join principal, at the
    // address the bootstrap names, with the token's scope.
    let ch = client_channel(&dir).await.expect("mTLS to server_uri");
    CertificatesClient::new(ch.clone())
        .trust_bundle(TrustBundleRequest {})
        .await
        .expect("a join principal reads the bundle");
    let err = RegistryClient::new(ch.clone())
        .list_services(ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = CertificatesClient::new(ch.clone())
        .sign(SignRequest {
            service: "payments".into(),
            csr_der: vec![],
            lifetime_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_eq!(
        endpoints_sent(ch, &node_id, &["payments", "billing"]).await,
        ["payments"],
        "the token's --upstream scope limits what the client reads"
    );

    // With a join token and --server: no token is created, and the
    // control plane's certificate verifies for that host too. Under a
    // umask of 077 the modes are still exactly 0700, 0600 and 0644.
    let join = cp
        .create_token(&["--role", "join", "--service", "web"])
        .await;
    let other = tmp.path().join("other");
    let server = cp.grpc_addr().replace("127.0.0.1", "localhost");
    let node = "web-host-1.pod:a";
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg("umask 077 && exec \"$0\" \"$@\"")
        .arg(isdp_tests::binary("isdpctl"))
        .arg("--control-plane")
        .arg(cp.grpc_url())
        .arg("--ca-file")
        .arg(cp.ca_file());
    let other_arg = other.display().to_string();
    let out = isdpctl_raw(
        cmd,
        &[
            "bootstrap",
            "grpc",
            "--out",
            &other_arg,
            "--service",
            "web",
            "--join-token",
            &join.secret,
            "--server",
            &server,
            "--node-id",
            node,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&other), 0o700);
    assert_eq!(mode(&other.join("key.pem")), 0o600);
    for public in ["cert.pem", "ca.pem", "bootstrap.json"] {
        assert_eq!(mode(&other.join(public)), 0o644, "{public} under umask 077");
    }
    assert_eq!(join_tokens(&cp).await.len(), 2, "no token minted");
    let doc = json(&other);
    assert_eq!(doc["xds_servers"][0]["server_uri"], server.as_str());
    assert_eq!(doc["node"]["id"], node);
    let ch = client_channel(&other).await.expect("mTLS to localhost");
    assert_eq!(
        endpoints_sent(ch, node, &["payments", "billing"])
            .await
            .len(),
        2,
        "a token without upstreams reads every service"
    );
    // A renewal keeps the server, node and zone the bootstrap names.
    bootstrap_ok(&cp, &other, &["--service", "web", "--renew"]).await;
    assert_eq!(json(&other), doc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_replaces_the_certificate_atomically_keeping_key_and_node() {
    let cp = start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("xds");
    bootstrap_ok(&cp, &dir, &["--service", "web", "--cert-lifetime", "1h"]).await;
    let key = read(&dir, "key.pem");
    let doc = json(&dir);
    let before = serial_and_end(&leaf(&dir));
    let grant = isdp_core::grant::of_certificate(&leaf(&dir)).expect("a grant");
    let inode = std::fs::metadata(dir.join("cert.pem")).unwrap().ino();

    // A reader like gRPC's file watcher, polling while renewals run: each
    // read is one whole file, old or new.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for name in ["cert.pem", "ca.pem", "key.pem", "bootstrap.json"] {
                    let bytes = std::fs::read(dir.join(name)).unwrap();
                    let whole = if name == "bootstrap.json" {
                        serde_json::from_slice::<serde_json::Value>(&bytes).is_ok()
                    } else {
                        bytes.starts_with(b"-----BEGIN ") && bytes.ends_with(b"-----\n")
                    };
                    assert!(whole, "{name} read half-written: {bytes:?}");
                    reads += 1;
                }
            }
            reads
        })
    };
    // X.509 times are whole seconds: a renewal a second later ends later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        bootstrap_ok(
            &cp,
            &dir,
            &["--service", "web", "--renew", "--cert-lifetime", "1h"],
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("no half-written file was read");
    assert!(reads > 0);

    let after = serial_and_end(&leaf(&dir));
    assert_ne!(after.0, before.0, "a new certificate");
    assert!(after.1 > before.1, "it ends later: {after:?} vs {before:?}");
    assert_ne!(
        std::fs::metadata(dir.join("cert.pem")).unwrap().ino(),
        inode,
        "replaced by a rename, not rewritten in place"
    );
    assert_eq!(read(&dir, "key.pem"), key, "the key is kept");
    assert_eq!(json(&dir), doc, "same node, same files");
    assert_eq!(listing(&dir), FILES, "no temporary file left");
    assert_eq!(
        isdp_core::grant::of_certificate(&leaf(&dir)).map(|g| g.token),
        Some(grant.token),
        "renewed under the same token"
    );
    assert_eq!(join_tokens(&cp).await.len(), 1, "renewal mints no token");

    // A client host needs neither a CA file nor an admin token: the
    // renewal trusts the bundle it wrote and signs on the certificate.
    let dir_arg = dir.display().to_string();
    let out = bootstrap_bare(&cp, &["--service", "web", "--out", &dir_arg, "--renew"]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // After a root rotation the control plane's certificate comes from the
    // new root, which the bundle in the directory lacks: the renewal needs
    // the operator's CA file once, and then holds every root.
    cp.ctl_ok(&["ca", "rotate", "--prune-after", "1h"]).await;
    isdp_tests::eventually(
        Duration::from_secs(10),
        "the control plane's certificate from the new root",
        || async {
            let old_roots_only = match client_channel(&dir).await {
                Ok(ch) => CertificatesClient::new(ch)
                    .trust_bundle(TrustBundleRequest {})
                    .await
                    .is_err(),
                Err(_) => true,
            };
            anyhow::ensure!(old_roots_only, "the old root still verifies it");
            let n = pems(&std::fs::read(cp.ca_file())?).len();
            anyhow::ensure!(n == 2, "{n} roots in the operator's ca.pem");
            Ok(())
        },
    )
    .await;
    let unchanged = read(&dir, "cert.pem");
    let out = bootstrap_bare(&cp, &["--service", "web", "--out", &dir_arg, "--renew"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot reach the control plane"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read(&dir, "cert.pem"), unchanged);
    bootstrap_ok(&cp, &dir, &["--service", "web", "--renew"]).await;
    let roots = pems(&read(&dir, "ca.pem"));
    assert_eq!(roots.len(), 2, "every root of the bundle");
    verifies(&leaf(&dir), &read(&dir, "ca.pem")).unwrap();
    client_channel(&dir).await.expect("mTLS after the rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_clearly_and_change_nothing() {
    let cp = start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("xds");
    let out = bootstrap_ok(&cp, &dir, &["-o", "json", "--service", "web"]).await;
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token_id = printed["token_id"].as_str().unwrap().to_owned();
    let snapshot = |dir: &Path| FILES.map(|name| read(dir, name));
    let files = snapshot(&dir);

    // An unknown join token, fresh and on renewal.
    let bogus = "isdp_0123456789abcdef_notarealsecret";
    let fresh = tmp.path().join("fresh");
    let out = bootstrap(&cp, &fresh, &["--service", "web", "--join-token", bogus]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("certificates sign: Unauthenticated")
            && err.contains("--role join --service web"),
        "{err}"
    );
    assert!(!fresh.exists(), "the directory it created is gone again");
    let out = bootstrap(
        &cp,
        &dir,
        &["--service", "web", "--renew", "--join-token", bogus],
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Unauthenticated"), "{}", stderr(&out));
    assert_eq!(snapshot(&dir), files);

    // A join token of another service.
    let payments = cp
        .create_token(&["--role", "join", "--service", "payments"])
        .await;
    let out = bootstrap(
        &cp,
        &fresh,
        &["--service", "web", "--join-token", &payments.secret],
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("PermissionDenied") && err.contains("may not act as service \"web\""),
        "{err}"
    );
    assert!(!fresh.exists());

    // A failure after the token was created revokes it again: a
    // certificate lifetime below the control plane's minimum.
    let before = join_tokens(&cp).await.len();
    let out = bootstrap(&cp, &fresh, &["--service", "web", "--cert-lifetime", "2s"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("InvalidArgument") && err.contains("revoked token"),
        "{err}"
    );
    assert_eq!(join_tokens(&cp).await.len(), before, "no token left behind");
    assert!(!fresh.exists());

    // Revoked: the certificate cannot renew itself.
    cp.ctl_ok(&["token", "revoke", &token_id]).await;
    let out = bootstrap(&cp, &dir, &["--service", "web", "--renew"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Unauthenticated")
            && err.contains(&format!("token {token_id}, which has been revoked"))
            && err.contains("--join-token"),
        "{err}"
    );
    assert_eq!(snapshot(&dir), files, "a refused renewal changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_ends_with_its_token_and_an_expired_one_cannot_renew_itself() {
    let cp = start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("xds");
    // A 6 s token caps an hour's certificate.
    let out = bootstrap_ok(
        &cp,
        &dir,
        &[
            "-o",
            "json",
            "--service",
            "web",
            "--ttl",
            "6s",
            "--cert-lifetime",
            "1h",
        ],
    )
    .await;
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = &join_tokens(&cp).await[0];
    assert_eq!(token["id"], printed["token_id"]);
    let expires = token["expires_at_unix_ms"].as_i64().unwrap();
    assert!(expires > 0);
    let not_after = printed["not_after_unix_ms"].as_i64().unwrap();
    assert!(not_after <= expires, "{not_after} > {expires}");
    assert_eq!(serial_and_end(&leaf(&dir)).1 * 1000, not_after);

    tokio::time::sleep(Duration::from_millis(
        u64::try_from(not_after - now_ms()).unwrap_or(0) + 500,
    ))
    .await;
    let unchanged = read(&dir, "cert.pem");
    let out = bootstrap(&cp, &dir, &["--service", "web", "--renew"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--renew: the certificate of spiffe://isdp.local/svc/web expired at")
            && err.contains("--join-token"),
        "{err}"
    );
    assert_eq!(read(&dir, "cert.pem"), unchanged);
    // A new token renews it in place, key and node kept.
    let key = read(&dir, "key.pem");
    let join = cp
        .create_token(&["--role", "join", "--service", "web"])
        .await;
    bootstrap_ok(
        &cp,
        &dir,
        &["--service", "web", "--renew", "--join-token", &join.secret],
    )
    .await;
    assert_eq!(read(&dir, "key.pem"), key);
    assert!(serial_and_end(&leaf(&dir)).1 * 1000 > not_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_is_written() {
    let cp = start().await;
    let tmp = tempfile::tempdir().unwrap();
    let join = cp
        .create_token(&["--role", "join", "--service", "web"])
        .await;
    let tokens = join_tokens(&cp).await.len();
    let long_id = "n".repeat(129);
    let long_label = "x".repeat(64);
    let fresh = tmp.path().join("fresh");

    // Flags: each refused with the flag named, nothing created.
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--service", "Web"], "--service: must be a DNS label"),
        (vec!["--service", "a_b"], "--service: must be a DNS label"),
        (vec!["--service=-web"], "--service: must be a DNS label"),
        (vec!["--service", "web-"], "--service: must be a DNS label"),
        (vec!["--service", ""], "--service: must be a DNS label"),
        (
            vec!["--service", &long_label],
            "--service: must be a DNS label",
        ),
        (
            vec!["--service", "web", "--upstream", "Bad_Name"],
            "--upstream: must be a DNS label",
        ),
        (
            vec![
                "--service",
                "web",
                "--join-token",
                &join.secret,
                "--upstream",
                "payments",
            ],
            "--upstream: scopes only a join token this command creates; with --join-token",
        ),
        (
            vec![
                "--service",
                "web",
                "--join-token",
                &join.secret,
                "--ttl",
                "1h",
            ],
            "--ttl: sets the expiry of a join token this command creates",
        ),
        (
            vec!["--service", "web", "--join-token", " "],
            "--join-token: is empty",
        ),
        (
            vec!["--service", "web", "--ttl", "0s"],
            "--ttl: must be at least 1s",
        ),
        (
            vec!["--service", "web", "--cert-lifetime", "0s"],
            "--cert-lifetime: must be at least 1s",
        ),
        (
            vec!["--service", "web", "--renew", "--upstream", "payments"],
            "--upstream: scopes only a join token this command creates; with --renew",
        ),
        (
            vec!["--service", "web", "--node-id", "a b"],
            "--node-id: must be 1 to 128",
        ),
        (
            vec!["--service", "web", "--node-id", "a/b"],
            "--node-id: must be 1 to 128",
        ),
        (
            vec!["--service", "web", "--node-id", &long_id],
            "--node-id: must be 1 to 128",
        ),
        (
            vec!["--service", "web", "--zone", "a\nb"],
            "--zone: must be 1 to 512 bytes",
        ),
        (
            vec!["--service", "web", "--zone", ""],
            "--zone: must be 1 to 512 bytes",
        ),
        (
            vec!["--service", "web", "--server", "cp.example"],
            "--server: expected HOST:PORT",
        ),
        (
            vec!["--service", "web", "--server", "https://cp:1"],
            "--server: expected HOST:PORT",
        ),
        (
            vec!["--service", "web", "--server", "cp:0"],
            "--server: expected HOST:PORT",
        ),
    ];
    for (args, want) in &cases {
        let out = bootstrap(&cp, &fresh, args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!fresh.exists(), "{args:?} created the directory");
    }

    // A plaintext control-plane URL cannot go into a TLS bootstrap.
    let fresh_arg = fresh.display().to_string();
    let out = isdp_tests::isdpctl(
        &format!("http://{}", cp.grpc_addr()),
        &["bootstrap", "grpc", "--service", "web", "--out", &fresh_arg],
    )
    .await;
    assert!(stderr(&out).contains("--control-plane: the control plane serves TLS only"));
    // Creating a token needs an admin token.
    let out = bootstrap_bare(
        &cp,
        &[
            "--ca-file",
            &cp.ca_file().display().to_string(),
            "--service",
            "web",
            "--out",
            &fresh_arg,
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("needs an admin token"),
        "{}",
        stderr(&out)
    );
    assert!(!fresh.exists());

    // Directories it cannot or must not write.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let dir_cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (file.clone(), vec![], "not a directory"),
        (file.join("sub"), vec![], "Not a directory"),
        (
            tmp.path().join("no/such"),
            vec![],
            "its parent does not exist",
        ),
        (shared.clone(), vec![], "(mode 0777)"),
        (tmp.path().join("missing"), vec!["--renew"], "--renew: "),
        (
            empty.clone(),
            vec!["--renew"],
            "holds no key.pem, cert.pem, ca.pem, bootstrap.json",
        ),
    ];
    for (dir, extra, want) in &dir_cases {
        let mut args = vec!["--service", "web"];
        args.extend_from_slice(extra);
        let out = bootstrap(&cp, dir, &args).await;
        assert!(!out.status.success(), "{dir:?} {extra:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(want), "{dir:?}: {err}");
    }
    assert!(!tmp.path().join("no").exists() && !tmp.path().join("missing").exists());
    assert!(listing(&shared).is_empty() && listing(&empty).is_empty());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    // A directory this process may not write (meaningful unless root,
    // which writes anyway).
    let locked = tmp.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
    if std::fs::write(locked.join("probe"), b"").is_err() {
        let out = bootstrap(&cp, &locked, &["--service", "web"]).await;
        assert!(stderr(&out).contains("not writable"), "{}", stderr(&out));
    }

    // An existing bootstrap: not overwritten, nor renewed as another service.
    let dir = tmp.path().join("xds");
    bootstrap_ok(
        &cp,
        &dir,
        &["--service", "web", "--join-token", &join.secret],
    )
    .await;
    let files = FILES.map(|name| read(&dir, name));
    let out = bootstrap(
        &cp,
        &dir,
        &["--service", "web", "--join-token", &join.secret],
    )
    .await;
    let err = stderr(&out);
    assert!(
        err.contains("already holds key.pem, cert.pem, ca.pem, bootstrap.json")
            && err.contains("--renew"),
        "{err}"
    );
    let out = bootstrap(&cp, &dir, &["--service", "payments", "--renew"]).await;
    let err = stderr(&out);
    assert!(
        err.contains("is the bootstrap of \"spiffe://isdp.local/svc/web\"")
            && err.contains("not of --service \"payments\""),
        "{err}"
    );
    assert_eq!(FILES.map(|name| read(&dir, name)), files);
    assert_eq!(listing(&dir), FILES);
    assert_eq!(join_tokens(&cp).await.len(), tokens, "no token was created");
}
