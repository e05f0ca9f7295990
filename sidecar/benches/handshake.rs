//! Handshake-rate benchmark: how many new mutual-TLS connections per
//! second the sidecar's inbound listener completes, next to HAProxy's TLS
//! frontend doing the same work, in the same run.
//!
//! ```sh
//! apt-get update && apt-get install -y haproxy nginx-light
//! cargo build --release --workspace --bins
//! cargo bench -p isdp-sidecar --bench handshake
//! ```
//!
//! Both servers hold an ECDSA P-256 certificate, require a client
//! certificate chaining to their CA (verified on every connection, as the
//! sidecar does), and offer ALPN `h2`. The client (this process, pinned to
//! core 1; the servers are pinned to core 0) keeps `CONCURRENCY` loops that
//! each connect, handshake with TLS 1.3 and no session resumption, send the
//! HTTP/2 preface and read the server's SETTINGS (which a server sends only
//! once it has accepted the client's certificate), then close. Runs
//! alternate between the two servers; medians are reported. Every failed
//! handshake fails the bench.
//!
//! `ISDP_BENCH_SECS` (default 10) and `ISDP_BENCH_REPS` (default 3).

#[path = "dataplane/process.rs"]
#[allow(dead_code)]
mod process;
#[path = "dataplane/shapes.rs"]
#[allow(dead_code)]
mod shapes;
#[path = "dataplane/tools.rs"]
#[allow(dead_code)]
mod tools;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use process::Proc;

/// Handshakes in flight at once: enough to keep one server core busy.
const CONCURRENCY: usize = 32;
/// The core the client runs on (servers are on `shapes::SERVER_CORE`).
const CLIENT_CORE: usize = 1;
/// HTTP/2 client preface and an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// One server to knock on, with what a client needs to be let in.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    sni: String,
    client: Arc<rustls::ClientConfig>,
}

fn main() -> anyhow::Result<()> {
    process::in_temp_dir("handshake", run)
}

fn run(dir: &std::path::Path) -> anyhow::Result<()> {
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (secs, reps) = (var("ISDP_BENCH_SECS", 10), var("ISDP_BENCH_REPS", 3));
    let tools = tools::preflight()?;
    let bins = tools::isdp_bins()?;
    let ticks = process::clock_ticks()?;
    pin_self(CLIENT_CORE)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    let backend = shapes::nginx(&tools, dir)?;
    let (isdp, _cp, details) = shapes::isdp_detailed(&bins, dir, &backend, "isdp", "")?;
    // Sidecar B (the inbound listener) is the second proxy of the shape.
    let mut isdp_procs = isdp.proxies;
    let sidecar_b = isdp_procs.pop().context("no sidecar B")?;
    let (chain, key) = rt.block_on(mesh_client(&details))?;
    let sidecar = Target {
        name: "isdp inbound",
        addr: details.inbound,
        sni: "bench.svc.isdp.local".into(),
        client: client_config(&details.ca_pem, chain, key)?,
    };

    let pki = shapes::haproxy_pki(dir)?;
    let bind = format!(
        "ssl crt {} ca-file {} verify required alpn h2 no-tls-tickets",
        pki.server.display(),
        pki.ca.display()
    );
    let (haproxy_proc, haproxy_addr) =
        shapes::haproxy(&tools, dir, "haproxy-tls", &bind, &backend.addr.to_string())?;
    let (chain, key) = split_pem(&std::fs::read_to_string(&pki.client)?)?;
    let haproxy = Target {
        name: "haproxy",
        addr: haproxy_addr,
        sni: "bench.svc.isdp.local".into(),
        client: client_config(&std::fs::read_to_string(&pki.ca)?, chain, key)?,
    };

    let targets = [Arc::new(sidecar), Arc::new(haproxy)];
    let servers: [Proc; 2] = [sidecar_b, haproxy_proc];
    for t in &targets {
        // One handshake each first, so a misconfiguration fails here.
        rt.block_on(handshake(t))
            .with_context(|| format!("first handshake with {}", t.name))?;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut cpu_us: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for rep in 1..=reps {
        for (i, t) in targets.iter().enumerate() {
            eprintln!("[{rep}/{reps}] {} for {secs} s", t.name);
            let before = servers[i].cpu_seconds(ticks)?;
            let (count, elapsed) = rt.block_on(flood(t, Duration::from_secs(secs)))?;
            let cpu = servers[i].cpu_seconds(ticks)? - before;
            rates[i].push(count as f64 / elapsed.as_secs_f64());
            cpu_us[i].push(cpu * 1e6 / count as f64);
        }
    }

    println!("\n## Inbound handshake rate (mTLS, TLS 1.3, ECDSA P-256, no resumption)\n");
    println!(
        "{CONCURRENCY} concurrent clients on core {CLIENT_CORE}, server on core {}; {reps} runs of {secs} s, medians.\n",
        shapes::SERVER_CORE
    );
    println!("| server | handshakes/s | server CPU per handshake |");
    println!("|---|---:|---:|");
    for (i, t) in targets.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} µs |",
            t.name,
            median(&rates[i]),
            median(&cpu_us[i])
        );
    }
    println!(
        "\nISDP / HAProxy handshake rate: {:.2}x",
        median(&rates[0]) / median(&rates[1])
    );
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Pins this process (and the threads it starts later) to `core`.
fn pin_self(core: usize) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args([
            "-p",
            "-c",
            &core.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset")?;
    ensure!(status.success(), "taskset -p -c {core} failed: {status}");
    Ok(())
}

/// A mesh certificate for `client`, signed by the control plane through
/// `Certificates/Sign` with the bootstrap admin token.
async fn mesh_client(
    details: &shapes::IsdpDetails,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    use isdp_proto::v1::{SignRequest, certificates_client::CertificatesClient};
    let auth = isdp_core::dial::ControlAuth {
        ca_pem: Some(details.ca_pem.clone()),
        token: Some(details.admin_token.clone()),
        identity: Default::default(),
        learned: Default::default(),
    };
    let channel = isdp_core::dial::connect(&details.grpc_url, &auth).await?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    let signed = CertificatesClient::new(channel)
        .sign(SignRequest {
            service: "client".into(),
            csr_der: csr.der().to_vec(),
            lifetime_seconds: 3600,
        })
        .await?
        .into_inner();
    let chain = signed
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(anyhow::Error::msg)?;
    Ok((chain, key))
}

/// The certificate chain and key in a PEM bundle (HAProxy's format).
fn split_pem(pem: &str) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())?;
    Ok((chain, key))
}

fn client_config(
    ca_pem: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Every connection pays a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// One full handshake, proven complete on the server side by its SETTINGS.
async fn handshake(t: &Target) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(t.client.clone());
    let mut tls = connector
        .connect(ServerName::try_from(t.sni.clone())?, tcp)
        .await?;
    tls.write_all(PREFACE).await?;
    let mut frame = [0u8; 9];
    tls.read_exact(&mut frame).await?;
    ensure!(
        frame[3] == 0x4,
        "expected SETTINGS, got frame type {}",
        frame[3]
    );
    Ok(())
}

/// Handshakes from `CONCURRENCY` loops for `duration`; the count and the
/// time it took.
async fn flood(target: &Arc<Target>, duration: Duration) -> anyhow::Result<(u64, Duration)> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let loops: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (t, done, stop) = (target.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    handshake(&t).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await??;
    }
    Ok((done.load(Ordering::Relaxed), started.elapsed()))
}
