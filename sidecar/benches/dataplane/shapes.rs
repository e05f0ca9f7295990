//! The three ways the same request reaches the backend: directly, through a
//! pair of ISDP sidecars, and through a pair of HAProxies. Each is started
//! here with its config generated into the bench's temp dir.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::process::{Proc, free_port};
use crate::tools::{IsdpBins, Tools};

/// Every server runs on this core; the load generator gets the other one.
pub const SERVER_CORE: usize = 0;

/// The service name sidecar B registers and sidecar A calls.
const SERVICE: &str = "bench";

/// One way to reach the backend: the URL the load generator hits and the
/// proxy processes whose CPU and memory are measured.
pub struct Shape {
    pub name: &'static str,
    pub url: String,
    pub proxies: Vec<Proc>,
}

/// The backend: nginx answering `200 ok`, one process, so it is never
/// what limits a shape.
pub struct Backend {
    /// Held so nginx lives as long as this handle.
    _server: Proc,
    pub addr: SocketAddr,
}

/// Starts nginx in the foreground as a single process (`master_process
/// off`, so the measured PID is the one that serves) with keep-alive
/// unlimited, as the proxies in front of it reuse their connections.
pub fn nginx(tools: &Tools, dir: &Path) -> anyhow::Result<Backend> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx.error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
         client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n\
         uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
         server {{\n    listen {addr};\n    default_type text/plain;\n\
         location / {{ return 200 \"ok\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let args = ["-p", &d.to_string(), "-c", &path.display().to_string()].map(String::from);
    let mut proc = Proc::spawn("nginx", SERVER_CORE, &tools.nginx, &args, &[], dir)?;
    proc.wait_port(addr)?;
    Ok(Backend {
        _server: proc,
        addr,
    })
}

/// Shape 1: the load generator talks to the backend itself.
pub fn direct(backend: &Backend) -> Shape {
    Shape {
        name: "direct",
        url: format!("http://{}/", backend.addr),
        proxies: Vec::new(),
    }
}

/// Shape 3: haproxy A -> haproxy B -> backend, HTTP/1.1 over mutual TLS
/// between the two (each verifies the other's certificate against a mesh
/// CA made for the run, as the sidecars do), one thread each, connections
/// to the next hop reused (`http-reuse always`), TLS sessions resumed.
pub fn haproxy_pair(tools: &Tools, dir: &Path, backend: &Backend) -> anyhow::Result<Shape> {
    let pki = haproxy_pki(dir)?;
    let b_bind = format!(
        "ssl crt {} ca-file {} verify required alpn http/1.1",
        pki.server.display(),
        pki.ca.display()
    );
    let b = haproxy(tools, dir, "haproxy-b", &b_bind, &backend.addr.to_string())?;
    let a_server = format!(
        "{} ssl crt {} ca-file {} verify required sni str({SERVICE}.svc.isdp.local) \
         verifyhost {SERVICE}.svc.isdp.local alpn http/1.1",
        b.1,
        pki.client.display(),
        pki.ca.display()
    );
    let a = haproxy(tools, dir, "haproxy-a", "", &a_server)?;
    Ok(Shape {
        name: "haproxy",
        url: format!("http://{}/", a.1),
        proxies: vec![a.0, b.0],
    })
}

/// PEM files (certificate then key, as HAProxy wants them) for HAProxy's
/// mutual TLS: a CA, B's server certificate, A's client certificate.
pub struct HaproxyPki {
    pub ca: std::path::PathBuf,
    pub server: std::path::PathBuf,
    pub client: std::path::PathBuf,
}

pub fn haproxy_pki(dir: &Path) -> anyhow::Result<HaproxyPki> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    // Distinct subject names: OpenSSL takes a leaf whose subject equals its
    // issuer's for self-signed.
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench mesh CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf = |name: &str| -> anyhow::Result<String> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca)?;
        Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
    };
    let write = |name: &str, pem: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    Ok(HaproxyPki {
        ca: write("haproxy-ca.pem", &ca.pem())?,
        server: write(
            "haproxy-b.pem",
            &leaf(&format!("{SERVICE}.svc.isdp.local"))?,
        )?,
        client: write("haproxy-a.pem", &leaf("client.svc.isdp.local")?)?,
    })
}

/// One HAProxy: `bind_opts` follow the bind address, `server` is the next
/// hop's server line (address and options).
pub fn haproxy(
    tools: &Tools,
    dir: &Path,
    name: &str,
    bind_opts: &str,
    server: &str,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let conf = format!(
        "global\n  nbthread 1\n  maxconn 4096\n  tune.ssl.default-dh-param 2048\n\
         defaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n\
         timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\
         frontend fe\n  bind {addr} {bind_opts}\n  default_backend be\n\
         backend be\n  server next {server}\n"
    );
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, conf)?;
    // -db: stay in the foreground, one process, logs to stderr.
    let args = ["-db", "-f", &path.display().to_string()].map(String::from);
    let mut proc = Proc::spawn(name, SERVER_CORE, &tools.haproxy, &args, &[], dir)?;
    proc.wait_port(addr)?;
    Ok((proc, addr))
}

/// Shape 2: sidecar A (a per-upstream listener) -> HTTP/2 over mutual TLS
/// -> sidecar B (inbound) -> backend, with a real control plane between them. The
/// control plane is kept alive in `control_plane` but not measured: it is
/// idle once A knows the endpoint.
pub fn isdp(bins: &IsdpBins, dir: &Path, backend: &Backend) -> anyhow::Result<(Shape, Proc)> {
    isdp_named(bins, dir, backend, "isdp", "")
}

/// Shape 2 under another `name` (which prefixes node ids and file names),
/// with `extra` top-level TOML for both sidecars (the tracing bench's
/// `otlp_endpoint` and `trace_sample_ratio`).
pub fn isdp_named(
    bins: &IsdpBins,
    dir: &Path,
    backend: &Backend,
    name: &'static str,
    extra: &str,
) -> anyhow::Result<(Shape, Proc)> {
    isdp_detailed(bins, dir, backend, name, extra).map(|(shape, cp, _)| (shape, cp))
}

/// Where to reach the pieces of an ISDP shape from outside it.
#[allow(dead_code)] // Only the handshake bench reads these.
pub struct IsdpDetails {
    /// Sidecar B's inbound (mTLS) listener.
    pub inbound: SocketAddr,
    /// `https://ADDR` of the control plane.
    pub grpc_url: String,
    /// The control plane's `ca.pem` and bootstrap admin token.
    pub ca_pem: String,
    pub admin_token: String,
    /// Sidecar A's admin listener.
    pub a_admin: String,
}

/// [`isdp_named`], also returning [`IsdpDetails`].
pub fn isdp_detailed(
    bins: &IsdpBins,
    dir: &Path,
    backend: &Backend,
    name: &'static str,
    extra: &str,
) -> anyhow::Result<(Shape, Proc, IsdpDetails)> {
    let env = [("RUST_LOG", "warn")];
    // The plain shape keeps the process names its reports always had.
    let prefix = if name == "isdp" { "sidecar" } else { name };
    let data = dir.join(format!("{prefix}-cp-data"));
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        &data.display().to_string(),
    ]
    .map(String::from);
    let mut cp = Proc::spawn(
        &format!("{prefix}-control-plane"),
        SERVER_CORE,
        &bins.control_plane,
        &args,
        &env,
        dir,
    )?;
    let grpc = cp
        .listening_line()?
        .remove("grpc")
        .context("no grpc= address")?;
    // The control plane wrote its root and a bootstrap admin token, which
    // sidecars accept as a join token.
    let admin_token = std::fs::read_to_string(data.join("admin.token"))
        .context("reading the control plane's admin.token")?
        .trim()
        .to_owned();
    let credentials = format!(
        "ca_file = \"{}\"\njoin_token = \"{admin_token}\"\n",
        data.join("ca.pem").display(),
    );

    let service = format!(
        "[[service]]\nname = \"{SERVICE}\"\nport = {port}\nprotocol = \"http\"\n\
         check = \"http://{addr}/\"\ninterval = \"1s\"\n",
        port = backend.addr.port(),
        addr = backend.addr,
    );
    let (b, b_addrs) = sidecar(
        bins,
        dir,
        &format!("{prefix}-b"),
        &grpc,
        &format!("{credentials}{extra}\n{service}"),
    )?;
    let details = IsdpDetails {
        inbound: b_addrs
            .get("inbound")
            .context("sidecar B printed no inbound=")?
            .parse()?,
        grpc_url: format!("https://{grpc}"),
        ca_pem: std::fs::read_to_string(data.join("ca.pem"))?,
        admin_token,
        a_admin: String::new(),
    };
    let upstream = format!(
        "[[upstream]]\nname = \"{SERVICE}\"\nlisten = \"127.0.0.1:0\"\n\
         protocol = \"http\"\nlb = \"round_robin\"\n"
    );
    let (a, addrs) = sidecar(
        bins,
        dir,
        &format!("{prefix}-a"),
        &grpc,
        &format!("{credentials}identity = \"client\"\n{extra}\n{upstream}"),
    )?;
    let listen = addrs
        .get(&format!("upstream.{SERVICE}"))
        .context("sidecar A printed no upstream listener")?;
    let admin = addrs.get("admin").context("sidecar A printed no admin=")?;
    wait_healthy(admin)?;
    let details = IsdpDetails {
        a_admin: admin.clone(),
        ..details
    };
    let shape = Shape {
        name,
        url: format!("http://{listen}/"),
        proxies: vec![a, b],
    };
    Ok((shape, cp, details))
}

/// Writes a sidecar config (`tables` appended to the common keys, every
/// listener on port 0) and starts the sidecar.
fn sidecar(
    bins: &IsdpBins,
    dir: &Path,
    name: &str,
    grpc: &str,
    tables: &str,
) -> anyhow::Result<(Proc, std::collections::HashMap<String, String>)> {
    let toml = format!(
        "node_id = \"{name}\"\ncontrol_plane = [\"https://{grpc}\"]\naddress = \"127.0.0.1\"\n\
         admin_listen = \"127.0.0.1:0\"\ninbound_listen = \"127.0.0.1:0\"\n\
         outbound_listen = \"127.0.0.1:0\"\n\n{tables}"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml)?;
    let args = ["--config".to_owned(), path.display().to_string()];
    let mut proc = Proc::spawn(
        name,
        SERVER_CORE,
        &bins.sidecar,
        &args,
        &[("RUST_LOG", "warn")],
        dir,
    )?;
    let addrs = proc.listening_line()?;
    Ok((proc, addrs))
}

/// Polls sidecar A's `/config` until the upstream has a healthy endpoint:
/// B registered the backend, B's probe passed, and the control plane's
/// push reached A.
fn wait_healthy(admin: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match http_get(admin, "/config") {
            Ok((200, body)) => {
                let config: serde_json::Value = serde_json::from_str(&body)?;
                let eps = &config["upstreams"][SERVICE]["endpoints"];
                if eps
                    .as_array()
                    .is_some_and(|eps| eps.iter().any(|e| e["status"] == "healthy"))
                {
                    return Ok(());
                }
                last = eps.to_string();
            }
            Ok((status, body)) => last = format!("{status} {body}"),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("sidecar A never saw a healthy `{SERVICE}` endpoint within 30 s; last /config: {last}")
}

/// Checks that `shape` answers `GET /` with `200 ok`, so a misconfigured
/// shape fails before it is measured rather than benchmarking error pages.
pub fn check(shape: &Shape) -> anyhow::Result<()> {
    let hostport = shape
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let (status, body) = http_get(hostport, "/")?;
    ensure!(
        status == 200 && body == "ok",
        "{} ({}) answered {status} {body:?}, expected 200 \"ok\"",
        shape.name,
        shape.url
    );
    Ok(())
}

/// A one-shot `GET` with `Connection: close`, read to EOF: enough for
/// admin endpoints and the check above without an HTTP client stack.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: malformed response {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {addr}{path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}
