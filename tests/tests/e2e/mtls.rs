//! Zero trust on the wire, end to end: sidecars talk to each other only
//! over mutual TLS with certificates from the mesh CA; strangers (no TLS,
//! no certificate, a rogue CA's certificate, an expired one) are refused
//! and counted; certificates rotate under load without a failed request;
//! authorization rules stop and restore traffic within a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use isdp_tests::{ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) const SERVICE: &str = "payments";
pub(crate) const SETUP: Duration = Duration::from_secs(20);

/// `payments` (echo-http behind sidecar `pay-0`) and a `web` sidecar with a
/// `payments` listener.
pub(crate) struct Mesh {
    pub(crate) cp: ControlPlane,
    _echo: EchoHttp,
    pub(crate) pay: Sidecar,
    pub(crate) web: Sidecar,
}

impl Mesh {
    pub(crate) async fn start(cp_args: &[&str]) -> Mesh {
        let cp = ControlPlane::start(ControlPlaneOpts {
            extra_args: cp_args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
        let (echo, pay) = payments(&cp).await;
        let web = SidecarToml::new("web", &cp.grpc_url())
            .upstream_on_port0(SERVICE, "http", "round_robin")
            .start()
            .await;
        let mesh = Mesh {
            cp,
            _echo: echo,
            pay,
            web,
        };
        eventually(SETUP, "web gets 200 from payments", || async {
            let (status, head) = fetch(mesh.web.upstream_addr(SERVICE), "/").await?;
            anyhow::ensure!(status == 200, "{status}: {head}");
            Ok(())
        })
        .await;
        mesh
    }
}

/// One payments instance, `pay-0`, behind its sidecar.
pub(super) async fn payments(cp: &ControlPlane) -> (EchoHttp, Sidecar) {
    payments_instance(cp, "pay-0").await
}

/// A payments instance `id` behind its sidecar (joined with the admin
/// token).
pub(super) async fn payments_instance(cp: &ControlPlane, id: &str) -> (EchoHttp, Sidecar) {
    let echo = EchoHttp::start(id).await;
    let pay = SidecarToml::new(id, &cp.grpc_url())
        .raw(&format!(
            "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
             check = \"{check}\"\ninterval = \"200ms\"\n",
            port = echo.port(),
            check = echo.health_url(),
        ))
        .start()
        .await;
    (echo, pay)
}

/// A `GET` with `Connection: close` over a fresh connection; the status
/// and the response head.
pub(super) async fn fetch(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {text:?}"))?;
    Ok((status, head))
}

/// The value of `name` (a counter with these labels) on a `/metrics` page.
pub(crate) async fn counter(sidecar: &Sidecar, name: &str, labels: &str) -> f64 {
    let page = isdp_tests::http::get(sidecar.admin_addr(), "/metrics")
        .await
        .expect("/metrics")
        .body;
    page.lines()
        .filter(|l| l.starts_with(name) && labels.split(',').all(|kv| l.contains(kv)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// === raw TLS clients ===

pub(super) mod tls {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub fn roots(ca_pem: &str) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile_certs(ca_pem) {
            roots.add(c).unwrap();
        }
        roots
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.unwrap())
            .collect()
    }

    /// Connects to a sidecar's inbound port as a mesh peer would, with the
    /// given client certificate (or none), sends one request for
    /// `service`, and returns what came back: `Ok(bytes)` with the start of
    /// a response, or the error that ended the attempt.
    pub async fn attempt(
        addr: &str,
        ca_pem: &str,
        service: &str,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Vec<u8>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(ca_pem));
        let mut config = match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(format!("{service}.svc.isdp.local")).unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(
            format!(
                "GET / HTTP/1.1\r\nHost: {service}\r\nx-isdp-service: {service}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        match tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut buf))
            .await
        {
            Err(_) => Err("no answer".into()),
            Ok(Err(e)) => Err(format!("read: {e}")),
            Ok(Ok(_)) if buf.is_empty() => Err("closed without an answer".into()),
            Ok(Ok(_)) => Ok(buf),
        }
    }
}

/// A key and a certificate for `spiffe://isdp.local/svc/{service}` from a
/// CA made here, which the mesh has never heard of.
fn rogue_identity(
    service: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://isdp.local/svc/{service}")
            .try_into()
            .unwrap(),
    )];
    let cert = params.signed_by(&key, &ca).unwrap();
    (
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
}

/// A certificate for `service` signed by the mesh CA (through
/// `Certificates/Sign` with the admin token) that lives `secs` seconds.
async fn mesh_identity(
    cp: &ControlPlane,
    service: &str,
    secs: u64,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    mesh_identity_under(cp, service, secs, cp.admin_token()).await
}

/// Like [`mesh_identity`], signed for the bearer of `token`: the
/// certificate is issued under that token.
pub(super) async fn mesh_identity_under(
    cp: &ControlPlane,
    service: &str,
    secs: u64,
    token: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use isdp_proto::v1::{SignRequest, certificates_client::CertificatesClient};
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let mut client = CertificatesClient::new(cp.channel().await);
    let mut req = tonic::Request::new(SignRequest {
        service: service.into(),
        csr_der: csr.der().to_vec(),
        lifetime_seconds: secs,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let signed = client.sign(req).await.expect("Sign").into_inner();
    (
        signed
            .chain_der
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect(),
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_accept_only_mesh_certificates() {
    let mesh = Mesh::start(&[]).await;
    let inbound = mesh.pay.inbound_addr().to_owned();
    let ca = std::fs::read_to_string(mesh.cp.ca_file()).unwrap();

    // A mesh identity is let in: the inbound port is reachable at all.
    let (chain, key) = mesh_identity(&mesh.cp, "web", 300).await;
    let ok = tls::attempt(&inbound, &ca, SERVICE, Some((chain, key)))
        .await
        .expect("a mesh certificate is accepted");
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );

    // Plaintext HTTP gets no answer.
    let plain = fetch(&inbound, "/").await;
    assert!(plain.is_err(), "plaintext was answered: {plain:?}");
    // TLS without a client certificate, or with a rogue CA's one: refused.
    let none = tls::attempt(&inbound, &ca, SERVICE, None).await;
    assert!(none.is_err(), "no client certificate was accepted");
    let rogue = tls::attempt(&inbound, &ca, SERVICE, Some(rogue_identity("web"))).await;
    assert!(rogue.is_err(), "a rogue CA's certificate was accepted");
    // A mesh certificate past its end: refused.
    let (chain, key) = mesh_identity(&mesh.cp, "web", 5).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let expired = tls::attempt(&inbound, &ca, SERVICE, Some((chain, key))).await;
    assert!(expired.is_err(), "an expired certificate was accepted");

    for reason in ["plaintext", "no_client_cert", "unknown_ca", "expired"] {
        let labels = format!("direction=\"inbound\",reason=\"{reason}\"");
        eventually(
            Duration::from_secs(5),
            &format!("{reason} counted"),
            || async {
                let n = counter(&mesh.pay, "isdp_tls_handshake_failures_total", &labels).await;
                anyhow::ensure!(n >= 1.0, "{labels}: {n}");
                Ok(())
            },
        )
        .await;
    }
    // Mesh traffic itself still flows.
    let (status, _) = fetch(mesh.web.upstream_addr(SERVICE), "/").await.unwrap();
    assert_eq!(status, 200);
}

/// When `sidecar`'s certificate for `service` expires (Unix seconds).
async fn expiry(sidecar: &Sidecar, service: &str) -> f64 {
    let labels = format!("service=\"{service}\"");
    counter(
        sidecar,
        "isdp_workload_certificate_expiry_timestamp",
        &labels,
    )
    .await
}

/// Runs `workers` request loops against `addr` until `stop`; counts
/// successes and failures (anything but 200, or a transport error).
fn load(
    addr: String,
    workers: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = (0..workers)
        .map(|_| {
            let (addr, ok, failed, stop) = (addr.clone(), ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                while !*stop.borrow() {
                    match fetch(&addr, "/").await {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("failed request: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let mesh = Mesh::start(&["--cert-lifetime", "6s"]).await;
    let (pay_before, web_before) = (
        expiry(&mesh.pay, SERVICE).await,
        expiry(&mesh.web, "web").await,
    );
    assert!(
        pay_before > 0.0 && web_before > 0.0,
        "no certificate expiry exposed"
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (ok, failed, tasks) = load(mesh.web.upstream_addr(SERVICE).to_owned(), 4, stop);
    // Two lifetimes: every certificate is replaced at least twice.
    tokio::time::sleep(Duration::from_secs(13)).await;
    stop_tx.send_replace(true);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 200, "too little traffic to mean anything: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    // Renewal comes at about 2/3 of a 6 s life: after 13 s each side's
    // certificate has been replaced at least twice, each ending ~4 s later.
    assert!(expiry(&mesh.pay, SERVICE).await >= pay_before + 6.0);
    assert!(expiry(&mesh.web, "web").await >= web_before + 6.0);
    // New connections after the rotations are served with the new
    // certificates (the old ones have expired by now).
    let (status, _) = fetch(mesh.web.upstream_addr(SERVICE), "/").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_rule_stops_traffic_within_a_second_and_removing_it_restores_it() {
    let mesh = Mesh::start(&[]).await;
    let url = mesh.web.upstream_addr(SERVICE).to_owned();
    let denied = || async {
        let (status, head) = fetch(&url, "/").await?;
        anyhow::ensure!(status == 403, "{status}: {head}");
        anyhow::ensure!(
            head.to_lowercase()
                .contains("x-isdp-error: denied-by-policy"),
            "{head}"
        );
        Ok(())
    };
    let allowed = || async {
        let (status, head) = fetch(&url, "/").await?;
        anyhow::ensure!(status == 200, "{status}: {head}");
        Ok(())
    };

    mesh.cp
        .ctl_ok(&["authz", "deny", "--to", SERVICE, "--from", "web"])
        .await;
    let took = eventually(Duration::from_secs(1), "the deny rule applies", denied).await;
    eprintln!("deny applied in {took:?}");
    assert!(
        counter(&mesh.pay, "isdp_authz_denied_total", "rule=\"deny-web\"").await >= 1.0,
        "denials are counted with their rule"
    );

    mesh.cp
        .ctl_ok(&["authz", "delete", "--to", SERVICE, "deny-web"])
        .await;
    eventually(
        Duration::from_secs(1),
        "removing the rule restores traffic",
        allowed,
    )
    .await;

    // Default deny with an allow rule for web: web passes, nobody else.
    mesh.cp.ctl_ok(&["authz", "default", "deny"]).await;
    eventually(Duration::from_secs(1), "default deny applies", denied).await;
    mesh.cp
        .ctl_ok(&[
            "authz", "allow", "--to", SERVICE, "--from", "web", "--method", "GET",
        ])
        .await;
    eventually(
        Duration::from_secs(1),
        "the allow rule lets web in",
        allowed,
    )
    .await;
    let started = Instant::now();
    let ca = std::fs::read_to_string(mesh.cp.ca_file()).unwrap();
    let other = mesh_identity(&mesh.cp, "batch", 300).await;
    let answer = tls::attempt(mesh.pay.inbound_addr(), &ca, SERVICE, Some(other))
        .await
        .expect("batch's certificate is valid; only the policy refuses it");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_under_load_fails_no_request() {
    let mesh = Mesh::start(&["--cert-lifetime", "6s"]).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (ok, failed, tasks) = load(mesh.web.upstream_addr(SERVICE).to_owned(), 4, stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    mesh.cp
        .ctl_ok(&["ca", "rotate", "--prune-after", "1h"])
        .await;
    // Both roots are trusted while certificates from the old one live;
    // every sidecar renews onto the new root within a lifetime.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop_tx.send_replace(true);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 200, "too little traffic to mean anything: {ok}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);

    let bundle = mesh.cp.ctl_ok(&["ca", "bundle"]).await;
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    // The signing (new) root comes first; pay's certificate now chains to
    // it alone, and a certificate it signs is accepted.
    let new_root = bundle
        .split_inclusive("-----END CERTIFICATE-----")
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let client = mesh_identity(&mesh.cp, "web", 300).await;
    let answer = tls::attempt(mesh.pay.inbound_addr(), &new_root, SERVICE, Some(client))
        .await
        .expect("pay serves a certificate from the new root");
    assert!(answer.starts_with(b"HTTP/1.1 200"));
}

/// A sidecar joins with a short-lived token narrowed to its upstream: its
/// certificate (limited to that upstream) ends with the token, so at the
/// token's expiry its streams end, its certificate is withdrawn and not
/// renewed, and it says why it is not ready rather than exit; a restarted
/// control plane does not let it back in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_lives_no_longer_than_its_join_token() {
    let mut cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let _payments = payments(&cp).await;
    let created = cp
        .create_token(&[
            "--role",
            "join",
            "--service",
            "web",
            "--upstream",
            SERVICE,
            "--ttl",
            "10s",
        ])
        .await;
    let expires_at_unix_ms = created.expires_at_unix_ms;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .upstream_on_port0("billing", "http", "round_robin")
        .join_token(&created.secret)
        .start()
        .await;
    cp.register("billing", "127.0.0.1", 9, &[]).await;
    eventually(SETUP, "web calls payments over mTLS", || async {
        let (status, head) = fetch(web.upstream_addr(SERVICE), "/").await?;
        anyhow::ensure!(status == 200, "{status}: {head}");
        Ok(())
    })
    .await;
    assert!(
        web.endpoints("billing").await.unwrap().is_empty(),
        "billing is outside the token's scope"
    );
    let config = web.config_json().await.unwrap();
    let cert_ends = config["identities"]["web"]["not_after_unix_ms"]
        .as_i64()
        .expect("web holds a certificate");
    assert!(
        cert_ends <= expires_at_unix_ms,
        "the certificate ends at {cert_ends}, its token at {expires_at_unix_ms}"
    );

    // The token expires: web is cut off, and says so.
    eventually(
        Duration::from_secs(20),
        "web is not ready, naming the expiry",
        || async {
            let r = isdp_tests::http::get(web.admin_addr(), "/ready").await?;
            anyhow::ensure!(r.status == 503, "{}: {}", r.status, r.body);
            anyhow::ensure!(r.body.contains("expired at"), "{}", r.body);
            Ok(())
        },
    )
    .await;
    eventually(SETUP, "web's streams ended", || async {
        let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
        anyhow::ensure!(!out.contains("\"web\""), "web still connected: {out}");
        Ok(())
    })
    .await;
    cp.restart().await;
    cp.register(SERVICE, "127.0.0.1", 29, &[]).await;
    isdp_tests::holds_for(Duration::from_secs(3), "web stays out", || async {
        let eps = web.endpoints(SERVICE).await?;
        let ports: Vec<_> = eps.iter().filter_map(|e| e["port"].as_u64()).collect();
        anyhow::ensure!(!ports.contains(&29), "web learned port 29");
        let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
        anyhow::ensure!(!out.contains("\"web\""), "web reconnected: {out}");
        // Alive and answering on its admin endpoint: it did not exit.
        let r = isdp_tests::http::get(web.admin_addr(), "/ready").await?;
        anyhow::ensure!(r.status == 503, "{}: {}", r.status, r.body);
        Ok(())
    })
    .await;
}
