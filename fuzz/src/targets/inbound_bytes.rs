//! The first bytes a sidecar's listeners take from the network, through
//! the real accept path: one in-process sidecar data plane (inbound mTLS
//! listener with its gate, handshake cap, TLS, ALPN, HTTP/1.1 and HTTP/2
//! serving, the inbound stack and TCP tunnels to a local backend; and the
//! plaintext outbound listener) serves every input over loopback.
//!
//! The first byte picks how the input arrives: raw on the inbound port
//! (ClientHellos, SNI, ALPN, or anything else), inside a completed mTLS
//! session with ALPN `h2`, `http/1.1` or `isdp-tcp/1` (the second byte
//! picks the SNI), or raw on the outbound listener. Once the answer goes
//! quiet the client closes its side, and the answer must end, within a
//! deadline and a size bound. A panic in any of the sidecar's tasks fails the input (the
//! harness's panic hook sees every thread).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use isdp_proto::v1::{AuthorizationPolicy, TrustBundle};
use isdp_sidecar::config::Config;
use isdp_sidecar::metrics::Metrics;
use isdp_sidecar::proxy::{Listeners, LocalInputs, transport::Tls, upstreams::Upstreams};
use isdp_sidecar::tls::{LocalCert, Revocations, TlsContext, certified_key};
use isdp_sidecar::xds::Snapshot;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::Target;

pub const TARGET: Target = Target {
    name: "inbound_bytes",
    run,
    dictionary: &[
        b"\x16\x03\x01",
        b"\x16\x03\x03",
        b"\x00\x10",
        b"\x02h2",
        b"\x08http/1.1",
        b"\x0aisdp-tcp/1",
        b"payments.svc.mesh.test",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\n",
        b"Host: payments\r\n",
        b"x-isdp-service: ",
        b"Transfer-Encoding: chunked\r\n",
        b"Content-Length: ",
        b"Connection: upgrade\r\nUpgrade: websocket\r\n",
        b"Expect: 100-continue\r\n",
        b"content-type: application/grpc\r\n",
        b"/%2e%2e/",
        b"//",
        b"0\r\n\r\n",
        b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        b"\x00\x00\x00\x04\x01\x00\x00\x00\x00",
    ],
    seeds,
};

/// Longest an exchange may take: the listeners' own timeouts (TLS
/// handshake, header read) are 10 s.
const DEADLINE: Duration = Duration::from_secs(30);
/// How long the client waits for more of the answer before it closes its
/// side, while fuzzing.
pub const QUIET: Duration = Duration::from_millis(50);
/// Most bytes an answer may carry: a few small responses per request.
const MAX_ANSWER: usize = 1 << 20;
const TRUST_DOMAIN: &str = "mesh.test";
/// SNIs the second byte picks from, in TLS modes.
const SNIS: [&str; 4] = [
    "payments.svc.mesh.test",
    "ledger.svc.mesh.test",
    "payments",
    "other.svc.mesh.test",
];

/// How the input reaches the sidecar.
#[derive(Clone, Copy, Debug)]
enum Mode {
    RawInbound,
    Tls(Alpn),
    RawOutbound,
}

#[derive(Clone, Copy, Debug)]
enum Alpn {
    H2,
    Http1,
    Tunnel,
}

pub fn run(data: &[u8]) {
    answer(data, QUIET);
}

/// What the sidecar answered `data` (decrypted in TLS modes), the client
/// closing its side once the answer is quiet for `quiet`; None when
/// nothing was sent (an empty input, or a handshake the sidecar refused).
pub fn answer(data: &[u8], quiet: Duration) -> Option<Vec<u8>> {
    let (&first, rest) = data.split_first()?;
    let mode = match first % 5 {
        0 => Mode::RawInbound,
        1 => Mode::Tls(Alpn::H2),
        2 => Mode::Tls(Alpn::Http1),
        3 => Mode::Tls(Alpn::Tunnel),
        _ => Mode::RawOutbound,
    };
    let mesh = Mesh::get();
    mesh.runtime.block_on(mesh.exchange(mode, rest, quiet))
}

/// The sidecar, its backend, and a client's TLS settings; started once
/// per process. The sidecar's tasks run on the runtime's worker thread;
/// each input's client runs on the caller's (`block_on`).
struct Mesh {
    runtime: Runtime,
    inbound: SocketAddr,
    outbound: SocketAddr,
    client: Arc<TlsContext>,
    /// Kept so the sidecar's inputs stay open.
    _keep: Inputs,
}

/// The senders of the sidecar's TLS contexts, snapshots and shutdown.
type Inputs = (
    watch::Sender<Option<Arc<TlsContext>>>,
    watch::Sender<Arc<Snapshot>>,
    watch::Sender<bool>,
);

impl Mesh {
    fn get() -> &'static Mesh {
        static MESH: OnceLock<Mesh> = OnceLock::new();
        MESH.get_or_init(Mesh::start)
    }

    fn start() -> Mesh {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let pki = Pki::new();
        let (inbound, outbound, client, keep) = runtime.block_on(async move {
            let backend = TcpListener::bind("127.0.0.1:0").await.expect("backend");
            let port = backend.local_addr().expect("backend address").port();
            tokio::spawn(serve_backend(backend));
            let config = Config::from_toml(&format!(
                r#"
node_id = "fuzz"
control_plane = ["http://127.0.0.1:1"]
admin_listen = "127.0.0.1:0"
address = "127.0.0.1"
inbound_listen = "127.0.0.1:0"
outbound_listen = "127.0.0.1:0"
[[service]]
name = "payments"
port = {port}
[[service]]
name = "ledger"
port = {port}
protocol = "tcp"
[[upstream]]
name = "orders"
"#
            ))
            .expect("config");
            let metrics = Metrics::new();
            let revocations = Revocations::new(metrics.clone());
            let server = pki.context(&["payments", "ledger"], "payments", &revocations);
            let client = pki.context(&["web"], "web", &revocations);
            let (tls_tx, tls_rx) = watch::channel(Some(server));
            let tls = Tls::new(tls_rx, revocations, metrics.clone());
            let allow = |service: &str| AuthorizationPolicy {
                destination: service.into(),
                default_action: 1,
                trust_domain: TRUST_DOMAIN.into(),
                ..Default::default()
            };
            let snapshot = Snapshot {
                ready: true,
                trust_bundle: Some(TrustBundle {
                    trust_domain: TRUST_DOMAIN.into(),
                    roots_der: vec![pki.root.to_vec()],
                    ..Default::default()
                }),
                authz_policies: ["payments", "ledger"]
                    .into_iter()
                    .map(|s| (s.to_owned(), allow(s)))
                    .collect(),
                ..Default::default()
            };
            let (snap_tx, snapshots) = watch::channel(Arc::new(snapshot));
            let (stop, shutdown) = watch::channel(false);
            let (policies, _) = isdp_sidecar::authz::follow(snapshots.clone(), shutdown.clone());
            let upstreams =
                Upstreams::spawn(&config.upstreams, &metrics, snapshots, shutdown.clone());
            let listeners = Listeners::bind(&config).await.expect("listeners");
            let addrs = listeners.addrs();
            tokio::spawn(async move {
                listeners
                    .serve(
                        &config,
                        upstreams,
                        &metrics,
                        tls,
                        LocalInputs {
                            policies,
                            loads: Vec::new(),
                        },
                        shutdown,
                    )
                    .await
            });
            (
                addrs.inbound,
                addrs.outbound,
                client,
                (tls_tx, snap_tx, stop),
            )
        });
        Mesh {
            runtime,
            inbound,
            outbound,
            client,
            _keep: keep,
        }
    }

    /// Sends `bytes` as `mode` says, closes the client's side, and checks
    /// that the answer ends within [`DEADLINE`] and [`MAX_ANSWER`].
    async fn exchange(&self, mode: Mode, bytes: &[u8], quiet: Duration) -> Option<Vec<u8>> {
        let addr = match mode {
            Mode::RawOutbound => self.outbound,
            _ => self.inbound,
        };
        let Ok(Ok(tcp)) = tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await else {
            panic!("the sidecar's listener at {addr} did not accept a connection");
        };
        let Mode::Tls(alpn) = mode else {
            return Some(talk(tcp, bytes, quiet).await);
        };
        let (&pick, payload) = bytes.split_first()?;
        let config = match alpn {
            Alpn::H2 => self.client.client_h2.clone(),
            Alpn::Http1 => self.client.client_h1.clone(),
            Alpn::Tunnel => self.client.client_tcp.clone(),
        };
        let sni = SNIS[usize::from(pick) % SNIS.len()];
        let name = ServerName::try_from(sni.to_owned()).expect("server name");
        let connector = tokio_rustls::TlsConnector::from(config);
        match tokio::time::timeout(DEADLINE, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Some(talk(tls, payload, quiet).await),
            // Refused (an SNI the sidecar serves no certificate for).
            Ok(Err(_)) => None,
            Err(_) => panic!("the TLS handshake with SNI {sni:?} did not end within {DEADLINE:?}"),
        }
    }
}

/// Writes `bytes`, reads what the sidecar answers until it goes quiet for
/// `quiet` (a client that stops writing, as a keep-alive client waiting
/// for its next request), then closes the write side and reads the rest
/// to its end. Closing at once would test less: an HTTP/1.1 server drops
/// a connection whose client closed mid-request, response and all.
async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
    quiet: Duration,
) -> Vec<u8> {
    // The sidecar may close first (a refusal): what it wrote is still read.
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let read = async {
        let mut closed = false;
        loop {
            let n = if closed {
                stream.read(&mut buf).await
            } else {
                match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
                    Ok(n) => n,
                    Err(_) => {
                        let _ = stream.shutdown().await;
                        closed = true;
                        continue;
                    }
                }
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if answer.len() > MAX_ANSWER {
                return;
            }
        }
    };
    if tokio::time::timeout(DEADLINE, read).await.is_err() {
        panic!(
            "the sidecar's answer did not end within {DEADLINE:?} ({} bytes so far)",
            answer.len()
        );
    }
    assert!(
        answer.len() <= MAX_ANSWER,
        "the sidecar answered {} bytes to {} bytes",
        answer.len(),
        bytes.len()
    );
    answer
}

/// The local service: reads a request head (or whatever comes within a
/// second), answers one small HTTP response and closes.
async fn serve_backend(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        });
    }
}

/// A test CA and the contexts it issues, as the control plane would.
struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "fuzz mesh");
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let root = p.self_signed(&key).expect("root").der().clone();
        Pki {
            issuer: rcgen::Issuer::new(p, key),
            root,
        }
    }

    fn leaf(&self, service: &str) -> Arc<rustls::sign::CertifiedKey> {
        let key = rcgen::KeyPair::generate().expect("key");
        let dns = isdp_core::names::server_name(TRUST_DOMAIN, service);
        let mut p = rcgen::CertificateParams::new(vec![dns]).expect("params");
        let uri = isdp_core::names::service_spiffe_id(TRUST_DOMAIN, service);
        p.subject_alt_names
            .push(rcgen::SanType::URI(uri.as_str().try_into().expect("uri")));
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.issuer).expect("leaf");
        certified_key(vec![cert.der().clone()], key.serialize_der()).expect("certified key")
    }

    fn context(&self, local: &[&str], primary: &str, revocations: &Revocations) -> Arc<TlsContext> {
        let local: Vec<LocalCert> = local
            .iter()
            .map(|s| LocalCert {
                service: (*s).to_owned(),
                key: self.leaf(s),
            })
            .collect();
        let ctx = TlsContext::new(
            TRUST_DOMAIN,
            &local,
            self.leaf(primary),
            std::slice::from_ref(&self.root),
            revocations,
        )
        .expect("tls context");
        Arc::new(ctx)
    }
}

/// A ClientHello as a sidecar sends it, requests of each kind, and a
/// tunnel's first bytes, each behind its mode byte.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let pki = Pki::new();
    let client = pki.context(&["web"], "web", &Revocations::new(Metrics::new()));
    let mut hello = Vec::new();
    let mut conn = rustls::ClientConnection::new(
        client.client_h2.clone(),
        ServerName::try_from(SNIS[0]).expect("server name"),
    )
    .expect("client connection");
    conn.write_tls(&mut hello).expect("client hello");
    let get = b"GET /api/x?y=1 HTTP/1.1\r\nHost: payments\r\nx-isdp-service: payments\r\n\r\n";
    let post = b"POST /api HTTP/1.1\r\nHost: payments\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let upgrade = b"GET /ws HTTP/1.1\r\nHost: payments\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let outbound = b"GET /x HTTP/1.1\r\nHost: orders\r\n\r\nGET http://orders/y HTTP/1.1\r\nHost: orders\r\n\r\n";
    let tagged = |mode: &[u8], body: &[u8]| [mode, body].concat();
    vec![
        ("client_hello", tagged(&[0], &hello)),
        ("plaintext_on_inbound", tagged(&[0], get)),
        ("h2_get", tagged(&[1, 0], &h2_get())),
        ("http1_get", tagged(&[2, 0], get)),
        ("http1_post_chunked", tagged(&[2, 0], post)),
        ("http1_upgrade", tagged(&[2, 0], upgrade)),
        ("tunnel", tagged(&[3, 1], b"hello\r\n\r\n")),
        ("outbound_get", tagged(&[4], outbound)),
    ]
}

/// An HTTP/2 connection preface, SETTINGS, and one GET (HPACK literals
/// without indexing, so the bytes read as written).
fn h2_get() -> Vec<u8> {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/api/x"),
        (":authority", "payments"),
        ("x-isdp-service", "payments"),
    ] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    // HEADERS, END_STREAM | END_HEADERS.
    out.extend(frame(1, 5, 1, &block));
    out
}
