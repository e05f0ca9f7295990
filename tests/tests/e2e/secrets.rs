//! Secrets at rest: the data directory and its secret files are private
//! (0700 / 0600 whatever the umask) and the control plane refuses to start
//! on looser ones; the CA's private key is in no store in the clear (the
//! embedded store's file, etcd), sealed under a key-encryption key (KEK)
//! that replicas share, that can be rotated without changing the CA, and
//! without which (or with a wrong one) the control plane refuses to start;
//! a store written before keys were sealed is sealed on start.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser as _;
use isdp_control_plane::ca::{Kek, Keyring, Roots};
use isdp_control_plane::store::{
    Store, Txn,
    embedded::EmbeddedStore,
    etcd::{EtcdOptions, EtcdStore},
};
use isdp_core::pem::pem_to_der;
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, EtcdCluster, Sidecar, SidecarToml, binary,
    eventually, new_kek_file,
};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt as _, BufReader};

const ROOTS: &str = "ca/roots";
const SERVICE: &str = "payments";
const SETUP: Duration = Duration::from_secs(20);

fn tempdir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("isdp-{name}-"))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .expect("temp dir")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Flags for a control plane on free ports in `data`, plus `extra`.
fn cp_args(data: &Path, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
    ]
    .map(String::from)
    .to_vec();
    args.push(data.display().to_string());
    args.extend(extra.iter().cloned());
    args
}

fn kek_args(current: &Path, previous: Option<&Path>) -> Vec<String> {
    let mut args = vec!["--kek-file".to_owned(), current.display().to_string()];
    if let Some(p) = previous {
        args.extend(["--previous-kek-file".to_owned(), p.display().to_string()]);
    }
    args
}

/// Runs the control plane with `envs` until it prints its listening line
/// (`Ok`: the running child) or exits on its own (`Err`: its stderr; a
/// zero exit status fails the test).
async fn run_cp(args: &[String], envs: &[(&str, &str)]) -> Result<tokio::process::Child, String> {
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let mut child = tokio::process::Command::new(binary("isdp-control-plane"))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("the log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("running isdp-control-plane");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let stderr = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("stdout") {
            if line.contains("listening:") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the control plane neither started nor exited within 30s");
    if listening {
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        return Ok(child);
    }
    let status = child.wait().await.expect("waiting for the control plane");
    assert!(!status.success(), "exited {status}: {}", stderr());
    Err(stderr())
}

/// Runs the control plane expecting it to refuse to start; its stderr.
async fn refused(args: &[String]) -> String {
    refused_with(args, &[]).await
}

async fn refused_with(args: &[String], envs: &[(&str, &str)]) -> String {
    match run_cp(args, envs).await {
        Ok(_) => panic!("the control plane started with {args:?}; it should have refused"),
        Err(stderr) => stderr,
    }
}

/// Runs the control plane expecting it to start, then stops it (SIGKILL).
async fn starts_with(args: &[String], envs: &[(&str, &str)]) {
    match run_cp(args, envs).await {
        Ok(mut child) => {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        }
        Err(stderr) => panic!("the control plane refused to start: {stderr}"),
    }
}

fn assert_names(stderr: &str, wants: &[&str]) {
    for want in wants {
        assert!(stderr.contains(want), "want {want:?} in: {stderr}");
    }
}

/// The key of the signing root stored in `data`'s store, opened with `kek`
/// (the control plane must not be running).
async fn stored_signer(data: &Path, kek: &Path) -> (String, Vec<u8>, String) {
    let keys = Keyring::new(
        Kek::from_base64(&std::fs::read_to_string(kek).expect("reading the KEK")).expect("KEK"),
        None,
    );
    let store = EmbeddedStore::open(data).expect("opening the store");
    let key = format!("/isdp/{ROOTS}");
    let (kvs, _) = store.range(&key).await.expect("range");
    let kv = kvs.into_iter().next().expect("roots stored");
    let roots = Roots::decode(&kv.value, kv.mod_revision, &key, &keys).expect("roots open");
    let raw = String::from_utf8(kv.value.to_vec()).expect("JSON");
    store.close().await;
    (
        roots.signer().key_pem.clone(),
        roots.signer().cert_der.clone(),
        raw,
    )
}

/// What `strings` would find of a PEM key in `bytes`: the markers, any
/// line of its base64 body, its DER.
fn assert_no_key_in(bytes: &[u8], key_pem: &str, what: &str) {
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(b"PRIVATE KEY"), "{what} holds a PEM private key");
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!contains(line.as_bytes()), "{what} holds key line {line:?}");
    }
    let der = pem_to_der(key_pem, "PRIVATE KEY").expect("the key is PKCS#8 PEM");
    assert!(!contains(&der), "{what} holds the key's DER");
}

/// A self-signed CA an operator would bring: (certificate PEM, key PEM).
fn operator_root() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "operator root");
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// `<prefix>ca/roots` as an earlier version stored it: the key in plain PEM.
fn plaintext_roots(cert_pem: &str, key_pem: &str) -> Bytes {
    let v = serde_json::json!({
        "roots": [{ "cert_pem": cert_pem, "key_pem": key_pem }],
        "prune_at_unix_ms": 0,
    });
    Bytes::from(v.to_string())
}

fn first_cert_der(pem: &str) -> Vec<u8> {
    pem_to_der(pem, "CERTIFICATE").expect("a PEM certificate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_dir_is_private_under_any_umask_and_its_store_holds_no_key() {
    let root = tempdir("secrets");
    let data = root.path().join("new/data");
    // umask 000: every file would be world-readable if the control plane
    // relied on the umask.
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(binary("isdp-control-plane"))
        .args(cp_args(&data, &[]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(root.path().join("cp.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning the control plane");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening:") {
                return;
            }
        }
        let log = std::fs::read_to_string(root.path().join("cp.log")).unwrap_or_default();
        panic!("the control plane exited before listening: {log}");
    })
    .await
    .expect("the control plane did not start within 30s");

    assert_eq!(mode(&data), 0o700, "data dir");
    for secret in ["store.redb", "admin.token", "kek"] {
        assert_eq!(mode(&data.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(mode(&data.join("ca.pem")), 0o644, "ca.pem is public");
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    // `strings store.redb` finds no private key: not the PEM markers, not a
    // line of the key, not its DER.
    let file = std::fs::read(data.join("store.redb")).unwrap();
    let (key_pem, cert_der, raw) = stored_signer(&data, &data.join("kek")).await;
    assert_no_key_in(&file, &key_pem, "store.redb");
    assert!(raw.contains("key_sealed"), "{raw}");
    // The sealed key is the key of the root sidecars trust.
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    assert_eq!(first_cert_der(&ca_pem), cert_der);
    let kp = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        kp.public_key_raw()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_ca_key_must_be_private_and_is_stored_sealed() {
    let root = tempdir("secrets");
    let (cert_pem, key_pem) = operator_root();
    let cert = root.path().join("ca-cert.pem");
    let key = root.path().join("ca-key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    let flags = vec![
        "--ca-cert".to_owned(),
        cert.display().to_string(),
        "--ca-key".to_owned(),
        key.display().to_string(),
    ];
    let data = root.path().join("data");
    for bad in [0o644, 0o640, 0o604] {
        chmod(&key, bad);
        let stderr = refused(&cp_args(&data, &flags)).await;
        let path = key.display().to_string();
        assert_names(
            &stderr,
            &[
                &format!("--ca-key file {path} is mode {bad:04o}"),
                &format!("chmod 600 {path}"),
            ],
        );
    }
    chmod(&key, 0o600);
    let mut cp = ControlPlane::start_in(
        tempdir("cp-data"),
        ControlPlaneOpts {
            extra_args: flags,
            ..Default::default()
        },
    )
    .await;
    let ca_pem = std::fs::read_to_string(cp.ca_file()).unwrap();
    assert_eq!(first_cert_der(&ca_pem), first_cert_der(&cert_pem));
    // The control plane's TLS certificate is signed with the operator key.
    cp.ctl_ok(&["services"]).await;
    cp.kill9().await;
    let data = cp.data_dir().to_owned();
    let file = std::fs::read(data.join("store.redb")).unwrap();
    assert_no_key_in(&file, &key_pem, "store.redb");
    let (stored_key, _, _) = stored_signer(&data, &data.join("kek")).await;
    assert_eq!(stored_key, key_pem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_data_dirs_and_secret_files_are_refused_naming_path_and_fix() {
    let root = tempdir("secrets");
    let outside_kek = new_kek_file(&root.path().join("outside.kek"));
    let mut cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let ca_before = std::fs::read_to_string(cp.ca_file()).unwrap();
    cp.kill9().await;
    let data = cp.data_dir().to_owned();
    let dir = data.display().to_string();

    for bad in [0o755, 0o750, 0o711] {
        chmod(&data, bad);
        let stderr = refused(&cp_args(&data, &[])).await;
        assert_names(
            &stderr,
            &[
                &format!("data directory {dir} is mode {bad:04o}"),
                &format!("chmod 700 {dir}"),
            ],
        );
    }
    chmod(&data, 0o700);

    for name in ["store.redb", "admin.token", "kek"] {
        let path = data.join(name);
        let shown = path.display().to_string();
        for bad in [0o644, 0o640, 0o606] {
            chmod(&path, bad);
            let stderr = refused(&cp_args(&data, &[])).await;
            assert_names(
                &stderr,
                &[
                    &format!("{shown} is mode {bad:04o}"),
                    &format!("chmod 600 {shown}"),
                ],
            );
        }
        chmod(&path, 0o600);
    }

    // A KEK file the operator points at is checked the same way.
    chmod(&outside_kek, 0o644);
    let stderr = refused(&cp_args(&data, &kek_args(&outside_kek, None))).await;
    let shown = outside_kek.display().to_string();
    assert_names(
        &stderr,
        &[
            &format!("KEK file {shown} is mode 0644"),
            &format!("chmod 600 {shown}"),
        ],
    );

    // A data dir that belongs to another user (tests run as root).
    std::os::unix::fs::chown(&data, Some(65534), None).expect("chown needs root");
    let stderr = refused(&cp_args(&data, &[])).await;
    assert_names(&stderr, &[&format!("{dir} belongs to uid 65534"), "chown"]);
    std::os::unix::fs::chown(&data, Some(0), None).unwrap();

    // Fixed as the messages say, it starts on the same CA: nothing was lost.
    cp.restart().await;
    cp.ctl_ok(&["services"]).await;
    assert_eq!(std::fs::read_to_string(cp.ca_file()).unwrap(), ca_before);
}

/// `payments` (echo-http behind sidecar `pay-0`) and a `web` sidecar with
/// a `payments` listener, and traffic flowing between them.
async fn mesh(cp: &ControlPlane) -> (EchoHttp, Sidecar, Sidecar) {
    let echo = EchoHttp::start("pay-0").await;
    let pay = SidecarToml::new("pay-0", &cp.grpc_url())
        .raw(&format!(
            "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
             check = \"{check}\"\ninterval = \"200ms\"\n",
            port = echo.port(),
            check = echo.health_url(),
        ))
        .start()
        .await;
    let web = web_sidecar(cp, "web").await;
    (echo, pay, web)
}

async fn web_sidecar(cp: &ControlPlane, name: &str) -> Sidecar {
    let web = SidecarToml::new(name, &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .start()
        .await;
    served(&web, "web gets 200 from payments").await;
    web
}

async fn served(web: &Sidecar, what: &str) {
    eventually(SETUP, what, || async {
        let r = isdp_tests::http::get(web.upstream_addr(SERVICE), "/").await?;
        anyhow::ensure!(r.status == 200, "{}: {}", r.status, r.body);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kek_rotates_without_changing_the_ca_and_sidecars_keep_working() {
    let root = tempdir("secrets");
    let k1 = new_kek_file(&root.path().join("k1"));
    let k2 = new_kek_file(&root.path().join("k2"));
    let mut cp = ControlPlane::start(ControlPlaneOpts {
        extra_args: kek_args(&k1, None),
        ..Default::default()
    })
    .await;
    let data = cp.data_dir().to_owned();
    assert!(
        !data.join("kek").exists(),
        "a KEK was given: none is generated"
    );
    let ca = std::fs::read_to_string(cp.ca_file()).unwrap();
    let (_echo, _pay, web) = mesh(&cp).await;

    // K2 with K1 as the previous KEK: the key is sealed again under K2.
    cp.opts_mut().extra_args = kek_args(&k2, Some(&k1));
    cp.restart().await;
    served(&web, "traffic after the restart with K2 + previous K1").await;
    assert_eq!(std::fs::read_to_string(cp.ca_file()).unwrap(), ca);

    // K1 alone no longer opens it: proof it was re-sealed (and a clear error).
    cp.kill9().await;
    let stderr = refused(&cp_args(&data, &kek_args(&k1, None))).await;
    assert_names(
        &stderr,
        &["sealed with key-encryption key", "--previous-kek-file"],
    );

    // K2 alone: the old KEK can go.
    cp.opts_mut().extra_args = kek_args(&k2, None);
    cp.restart().await;
    assert_eq!(std::fs::read_to_string(cp.ca_file()).unwrap(), ca);
    served(&web, "traffic after the restart with K2 only").await;
    // A new sidecar is signed a certificate by the same CA.
    let web2 = web_sidecar(&cp, "web-2").await;
    served(&web2, "a sidecar joining after the rotation").await;
    cp.kill9().await;
    let (key_pem, _, _) = stored_signer(&data, &k2).await;
    let file = std::fs::read(data.join("store.redb")).unwrap();
    assert_no_key_in(&file, &key_pem, "store.redb");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kek_can_come_from_the_environment_and_only_once() {
    let root = tempdir("secrets");
    let k1_file = new_kek_file(&root.path().join("k1"));
    let k1 = std::fs::read_to_string(&k1_file).unwrap();
    let k2 = std::fs::read_to_string(new_kek_file(&root.path().join("k2"))).unwrap();
    let data = root.path().join("data");
    let args = cp_args(&data, &[]);
    starts_with(&args, &[("ISDP_KEK", k1.trim())]).await;
    assert!(!data.join("kek").exists(), "ISDP_KEK was given");
    let ca = std::fs::read_to_string(data.join("ca.pem")).unwrap();

    // Given twice, or a previous one without a current one: refused.
    let stderr = refused_with(
        &cp_args(&data, &kek_args(&k1_file, None)),
        &[("ISDP_KEK", k1.trim())],
    )
    .await;
    assert_names(&stderr, &["give the KEK once"]);
    let stderr = refused_with(&args, &[("ISDP_PREVIOUS_KEK", k1.trim())]).await;
    assert_names(&stderr, &["ISDP_PREVIOUS_KEK needs the new KEK"]);
    let stderr = refused_with(&args, &[("ISDP_KEK", "not a key")]).await;
    assert_names(&stderr, &["ISDP_KEK", "base64"]);

    // Rotation through the variables.
    starts_with(
        &args,
        &[("ISDP_KEK", k2.trim()), ("ISDP_PREVIOUS_KEK", k1.trim())],
    )
    .await;
    let stderr = refused_with(&args, &[("ISDP_KEK", k1.trim())]).await;
    assert_names(&stderr, &["sealed with key-encryption key"]);
    // No KEK at all: the store's key is sealed, so nothing is generated.
    let stderr = refused(&args).await;
    assert_names(
        &stderr,
        &["no KEK was given", "start with the KEK that sealed it"],
    );
    assert!(!data.join("kek").exists());
    starts_with(&args, &[("ISDP_KEK", k2.trim())]).await;
    assert_eq!(std::fs::read_to_string(data.join("ca.pem")).unwrap(), ca);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_a_plaintext_key_is_sealed_on_start() {
    let (cert_pem, key_pem) = operator_root();
    let data = tempdir("cp-data");
    {
        let store = EmbeddedStore::open(data.path()).unwrap();
        let put = Txn::default().put(
            format!("/isdp/{ROOTS}"),
            plaintext_roots(&cert_pem, &key_pem),
            None,
        );
        assert!(store.txn(put).await.unwrap().succeeded);
        store.close().await;
    }
    let mut cp = ControlPlane::start_in(data, ControlPlaneOpts::default()).await;
    let ca_pem = std::fs::read_to_string(cp.ca_file()).unwrap();
    assert_eq!(first_cert_der(&ca_pem), first_cert_der(&cert_pem));
    // It still signs with the migrated key (the TLS certificate).
    cp.ctl_ok(&["services"]).await;
    cp.kill9().await;
    let data = cp.data_dir().to_owned();
    let (stored_key, _, raw) = stored_signer(&data, &data.join("kek")).await;
    assert_eq!(stored_key, key_pem);
    assert!(
        raw.contains("key_sealed") && !raw.contains("key_pem"),
        "{raw}"
    );
    assert!(!raw.contains("PRIVATE KEY"), "{raw}");
    assert_eq!(mode(&data.join("kek")), 0o600);
    let file = std::fs::read(data.join("store.redb")).unwrap();
    assert_no_key_in(&file, &key_pem, "store.redb after sealing");
}

async fn etcd_store(etcd: &EtcdCluster) -> EtcdStore {
    EtcdStore::connect(&EtcdOptions {
        endpoints: etcd.endpoints(),
        ..Default::default()
    })
    .await
    .expect("connecting to etcd")
}

/// Everything under `prefix` in etcd, as one string.
async fn etcd_dump(store: &EtcdStore, prefix: &str) -> String {
    let (kvs, _) = store.range(prefix).await.expect("range");
    kvs.iter()
        .map(|kv| format!("{} {}\n", kv.key, String::from_utf8_lossy(&kv.value)))
        .collect()
}

/// A data dir holding `cp`'s admin token, for a replica the harness should
/// authenticate to with it (only the first replica writes one).
fn data_with_token_of(cp: &ControlPlane) -> TempDir {
    let data = tempdir("cp-data");
    let token = data.path().join("admin.token");
    std::fs::copy(cp.data_dir().join("admin.token"), &token).unwrap();
    chmod(&token, 0o600);
    data
}

fn opts(args: Vec<String>) -> ControlPlaneOpts {
    ControlPlaneOpts {
        extra_args: args,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_holds_only_ciphertext_and_replicas_need_the_same_kek() {
    let etcd = EtcdCluster::start(1).await;
    let prefix = format!("/secrets-{}/", std::process::id());
    let a = ControlPlane::start(opts(etcd.control_plane_args(&prefix))).await;
    let b = ControlPlane::start(opts(etcd.control_plane_args(&prefix))).await;
    let ca = std::fs::read_to_string(a.ca_file()).unwrap();
    assert_eq!(std::fs::read_to_string(b.ca_file()).unwrap(), ca);
    b.ctl_ok(&["services"]).await;
    assert!(
        !a.data_dir().join("kek").exists(),
        "no KEK is generated for etcd"
    );

    let store = etcd_store(&etcd).await;
    let dump = etcd_dump(&store, &prefix).await;
    assert!(dump.contains("key_sealed"), "{dump}");
    let keys = Keyring::new(
        Kek::from_base64(&std::fs::read_to_string(etcd.kek_file()).unwrap()).unwrap(),
        None,
    );
    let key = format!("{prefix}{ROOTS}");
    let (kvs, _) = store.range(&key).await.unwrap();
    let roots = Roots::decode(&kvs[0].value, kvs[0].mod_revision, &key, &keys).unwrap();
    assert_no_key_in(dump.as_bytes(), &roots.signer().key_pem, "etcd");

    // Another KEK, or none: refused, naming what to give; etcd unchanged.
    let other = tempdir("kek");
    let wrong = new_kek_file(&other.path().join("wrong"));
    let mut args = etcd.control_plane_args_without_kek(&prefix);
    args.extend(kek_args(&wrong, None));
    let data = tempdir("cp-data");
    let stderr = refused(&cp_args(data.path(), &args)).await;
    assert_names(
        &stderr,
        &[
            &format!("the CA key stored at {key}"),
            "sealed with key-encryption key",
            "--kek-file",
        ],
    );
    let stderr = refused(&cp_args(
        data.path(),
        &etcd.control_plane_args_without_kek(&prefix),
    ))
    .await;
    assert_names(&stderr, &["--store etcd needs", "--kek-file", "ISDP_KEK"]);
    assert_eq!(etcd_dump(&store, &prefix).await, dump);

    // Rotating: a replica restarted with a new KEK (the shared one as
    // previous) re-seals; then the new KEK alone opens it, the old one not.
    let k2 = new_kek_file(&other.path().join("k2"));
    let mut a = a;
    let mut rotate = etcd.control_plane_args_without_kek(&prefix);
    rotate.extend(kek_args(&k2, Some(etcd.kek_file())));
    a.opts_mut().extra_args = rotate;
    a.restart().await;
    let dump2 = etcd_dump(&store, &prefix).await;
    assert_ne!(dump2, dump, "re-sealed under K2");
    let mut k2_only = etcd.control_plane_args_without_kek(&prefix);
    k2_only.extend(kek_args(&k2, None));
    let c = ControlPlane::start_in(data_with_token_of(&a), opts(k2_only)).await;
    assert_eq!(std::fs::read_to_string(c.ca_file()).unwrap(), ca);
    c.ctl_ok(&["services"]).await;
    let stderr = refused(&cp_args(
        tempdir("cp-data").path(),
        &etcd.control_plane_args(&prefix),
    ))
    .await;
    assert_names(&stderr, &["sealed with key-encryption key"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_key_in_etcd_is_sealed_once_by_racing_replicas() {
    let etcd = EtcdCluster::start(1).await;
    let prefix = format!("/secrets-plain-{}/", std::process::id());
    let (cert_pem, key_pem) = operator_root();
    let store = etcd_store(&etcd).await;
    let put = Txn::default().put(
        format!("{prefix}{ROOTS}"),
        plaintext_roots(&cert_pem, &key_pem),
        None,
    );
    assert!(store.txn(put).await.unwrap().succeeded);

    // Two replicas start at once (in this process, so their CA loads
    // overlap): both seal it, one compare-and-set wins, both agree.
    let dirs = [tempdir("cp-data"), tempdir("cp-data")];
    let bind = |dir: &TempDir| {
        let args = cp_args(dir.path(), &etcd.control_plane_args(&prefix));
        let config = isdp_control_plane::Config::parse_from(
            std::iter::once("isdp-control-plane".to_owned()).chain(args),
        );
        isdp_control_plane::Server::bind(config)
    };
    let (a, b) = tokio::join!(bind(&dirs[0]), bind(&dirs[1]));
    let (a, b) = (a.expect("replica a"), b.expect("replica b"));
    for server in [&a, &b] {
        assert_eq!(
            server.ca().roots().signer().cert_der,
            first_cert_der(&cert_pem)
        );
        assert_eq!(server.ca().roots().signer().key_pem, key_pem);
    }
    let dump = etcd_dump(&store, &prefix).await;
    assert_no_key_in(dump.as_bytes(), &key_pem, "etcd");
    let keys = Keyring::new(
        Kek::from_base64(&std::fs::read_to_string(etcd.kek_file()).unwrap()).unwrap(),
        None,
    );
    let key = format!("{prefix}{ROOTS}");
    let (kvs, _) = store.range(&key).await.unwrap();
    let roots = Roots::decode(&kvs[0].value, kvs[0].mod_revision, &key, &keys).unwrap();
    assert_eq!(roots.signer().key_pem, key_pem);
    assert!(roots.reseal.is_none());
}
