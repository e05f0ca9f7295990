//! `isdp-demo`: the quickstart. Starts a small mesh on loopback with fixed
//! ports, prints what to try, and tears it all down on Ctrl-C.
//!
//! Topology: one control plane (gRPC 15010, admin 15014); three `echo-http`
//! instances of service `payments` (ports 18081-18083), each with a sidecar
//! (admin 15101-15103) that registers it with an HTTP check on `/healthz`;
//! and one `web` client sidecar (admin 15000) with upstream `payments` on
//! 127.0.0.1:9191 and its DNS server on 127.0.0.1:15053 (UDP and TCP).
//!
//! It runs the sibling binaries next to its own executable, so the demo uses
//! exactly the build the user just made, never something else on `PATH`.
//!
//! # Layout
//! - this file: flags, the topology, and the run/stop loop.
//! - `children`: spawning, readiness waits, and SIGTERM-then-kill shutdown.

// A binary root resolves modules beside itself, hence the explicit path.
#[path = "isdp-demo/children.rs"]
mod children;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use children::Children;

/// Flags.
#[derive(Debug, Parser)]
#[command(version, about = "Run the ISDP quickstart mesh on loopback")]
struct Args {
    /// Working directory: control-plane data, sidecar configs and every
    /// process's log. Kept after exit so logs can be read.
    #[arg(long, env = "ISDP_DEMO_DIR", default_value = "./isdp-data/demo")]
    data_dir: PathBuf,

    /// Stop by itself after this long (e.g. `10s`); lets tests and CI run
    /// the demo without sending Ctrl-C.
    #[arg(long, env = "ISDP_DEMO_EXIT_AFTER")]
    exit_after: Option<humantime::Duration>,
}

const CONTROL_PLANE: &str = "127.0.0.1:15010";
const CONTROL_PLANE_ADMIN: &str = "127.0.0.1:15014";
const WEB_ADMIN: &str = "127.0.0.1:15000";
const WEB_UPSTREAM: &str = "127.0.0.1:9191";
/// The web sidecar's DNS server (UDP and TCP), and its port for `dig -p`.
const WEB_DNS: &str = "127.0.0.1:15053";
const WEB_DNS_PORT: u16 = 15053;
const PAYMENTS: usize = 3;

/// Binaries the demo runs, all built by `cargo build --release --workspace --bins`.
const BINARIES: [&str; 4] = ["isdp-control-plane", "isdp-sidecar", "isdpctl", "echo-http"];

fn echo_port(i: usize) -> u16 {
    18081 + i as u16
}

fn sidecar_admin_port(i: usize) -> u16 {
    15101 + i as u16
}

/// Each payments sidecar's inbound (mesh traffic in) and outbound
/// listeners; the web sidecar keeps the defaults (15006 and 15001).
fn sidecar_inbound_port(i: usize) -> u16 {
    15201 + i as u16
}

fn sidecar_outbound_port(i: usize) -> u16 {
    15301 + i as u16
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = find_bin_dir()?;
    check_ports_free()?;

    let dir = &args.data_dir;
    let logs = dir.join("logs");
    let configs = dir.join("configs");
    for d in [&logs, &configs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // isdpctl finds ca.pem and admin.token in the control plane's data dir.
    let isdpctl = format!(
        "{} --data-dir {}",
        display_path(&bin_dir.join("isdpctl")),
        display_path(&dir.join("control-plane"))
    );
    let mut kids = Children::new(bin_dir, logs.clone());

    let result = start_mesh(&mut kids, dir, &configs).await;
    if let Err(e) = result {
        kids.stop_all().await;
        return Err(e.context(format!(
            "starting the demo mesh (logs in {})",
            logs.display()
        )));
    }
    print_next_steps(&isdpctl, &logs);

    let reason = kids
        .run_until_stopped(args.exit_after.map(Into::into))
        .await;
    println!("\n{reason}: stopping the mesh...");
    kids.stop_all().await;
    println!("stopped. logs kept in {}", logs.display());
    Ok(())
}

/// Makes the control plane's data dir private (0700, its secrets 0600). The
/// control plane creates a new one that way and refuses an open one; a dir
/// left by a demo run from before it checked is the demo's own, so it is
/// tightened here rather than refused.
fn private_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", p.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    set(dir, 0o700)?;
    for secret in ["store.redb", "admin.token", "kek"] {
        let path = dir.join(secret);
        if path.exists() {
            set(&path, 0o600)?;
        }
    }
    Ok(())
}

/// Starts every process in dependency order and waits for each to listen,
/// so a failure names the process that failed rather than a later symptom.
async fn start_mesh(kids: &mut Children, dir: &Path, configs: &Path) -> anyhow::Result<()> {
    let cp_data = dir.join("control-plane");
    private_data_dir(&cp_data)?;
    let cp_data = cp_data.to_str().context("data dir must be UTF-8")?;
    println!("starting control plane on {CONTROL_PLANE} (admin {CONTROL_PLANE_ADMIN})");
    kids.spawn(
        "control-plane",
        "isdp-control-plane",
        &[
            "--listen",
            CONTROL_PLANE,
            "--admin-listen",
            CONTROL_PLANE_ADMIN,
            "--data-dir",
            cp_data,
        ],
    )?;
    kids.wait_listening("control-plane", CONTROL_PLANE).await?;
    // The control plane serves TLS with its own CA and wrote the bootstrap
    // admin token; the demo's sidecars use that token to join (an admin
    // token is accepted wherever a join token is).
    let ca_file = Path::new(cp_data).join("ca.pem");
    let ca_file = ca_file.to_str().context("data dir must be UTF-8")?;
    let token_file = Path::new(cp_data).join("admin.token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading {}", token_file.display()))?;
    let token = token.trim();

    for i in 0..PAYMENTS {
        let n = i + 1;
        let port = echo_port(i);
        let name = format!("payments-{n}");
        let listen = format!("127.0.0.1:{port}");
        println!("starting echo-http {name} on {listen}");
        kids.spawn(&name, "echo-http", &["--listen", &listen, "--id", &name])?;
        kids.wait_listening(&name, &listen).await?;

        let sidecar = format!("{name}-sidecar");
        let admin = format!("127.0.0.1:{}", sidecar_admin_port(i));
        let (inbound, outbound) = (sidecar_inbound_port(i), sidecar_outbound_port(i));
        let config = format!(
            r#"node_id = "{name}"
control_plane = ["https://{CONTROL_PLANE}"]
ca_file = "{ca_file}"
join_token = "{token}"
admin_listen = "{admin}"
inbound_listen = "127.0.0.1:{inbound}"
outbound_listen = "127.0.0.1:{outbound}"

[[service]]
name = "payments"
port = {port}
protocol = "http"
check = "http://{listen}/healthz"
interval = "1s"
metadata = {{ version = "v1", zone = "zone-{n}" }}
"#
        );
        let path = write_config(configs, &sidecar, &config)?;
        println!("starting sidecar {sidecar} (admin {admin})");
        kids.spawn(&sidecar, "isdp-sidecar", &["--config", &path])?;
        kids.wait_listening(&sidecar, &admin).await?;
    }

    let config = format!(
        r#"node_id = "web-1"
# It only calls out: its client certificate names it as the `web` service.
identity = "web"
control_plane = ["https://{CONTROL_PLANE}"]
ca_file = "{ca_file}"
join_token = "{token}"
admin_listen = "{WEB_ADMIN}"
# Answers payments.service.isdp (A, SRV) from what it learned over xDS.
dns_listen = "{WEB_DNS}"

[[upstream]]
name = "payments"
listen = "{WEB_UPSTREAM}"
protocol = "http"
"#
    );
    let path = write_config(configs, "web-sidecar", &config)?;
    println!(
        "starting web client sidecar (admin {WEB_ADMIN}, payments on {WEB_UPSTREAM}, DNS on {WEB_DNS})"
    );
    kids.spawn("web-sidecar", "isdp-sidecar", &["--config", &path])?;
    kids.wait_listening("web-sidecar", WEB_ADMIN).await?;

    // Readiness means the web sidecar has its first xDS answer; the demo is
    // still usable without it, so only warn.
    if !children::wait_http_ok(WEB_ADMIN, "/ready", Duration::from_secs(10)).await {
        eprintln!("warning: web sidecar not ready after 10s; see its log");
    }
    Ok(())
}

fn write_config(dir: &Path, name: &str, body: &str) -> anyhow::Result<String> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    path.to_str()
        .map(str::to_owned)
        .context("config path must be UTF-8")
}

/// The directory holding this executable, checked to hold every binary the
/// demo runs.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating isdp-demo's own executable")?;
    let dir = exe
        .parent()
        .context("isdp-demo's executable has no parent directory")?
        .to_path_buf();
    for bin in BINARIES {
        if !dir.join(bin).is_file() {
            bail!(
                "missing binary `{bin}` in {}; build all binaries first with \
                 `cargo build --release --workspace --bins`",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Fails fast when a fixed port is taken (usually a demo still running),
/// instead of a child failing to bind with the reason buried in its log.
fn check_ports_free() -> anyhow::Result<()> {
    let mut addrs = vec![
        CONTROL_PLANE.to_owned(),
        CONTROL_PLANE_ADMIN.to_owned(),
        WEB_ADMIN.to_owned(),
        WEB_UPSTREAM.to_owned(),
        WEB_DNS.to_owned(),
        "127.0.0.1:15006".to_owned(),
        "127.0.0.1:15001".to_owned(),
    ];
    for i in 0..PAYMENTS {
        addrs.push(format!("127.0.0.1:{}", echo_port(i)));
        addrs.push(format!("127.0.0.1:{}", sidecar_admin_port(i)));
        addrs.push(format!("127.0.0.1:{}", sidecar_inbound_port(i)));
        addrs.push(format!("127.0.0.1:{}", sidecar_outbound_port(i)));
    }
    for addr in addrs {
        if std::net::TcpListener::bind(&addr).is_err()
            || (addr == WEB_DNS && std::net::UdpSocket::bind(&addr).is_err())
        {
            bail!("port {addr} is in use; is another isdp-demo still running?");
        }
    }
    Ok(())
}

/// `path` relative to the working directory when it is below it, so the
/// printed commands are short and can be pasted as they are.
fn display_path(path: &Path) -> String {
    let rel = std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(|p| Path::new(".").join(p)));
    rel.unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn print_next_steps(isdpctl: &str, logs: &Path) {
    let logs = logs.display();
    println!(
        r#"
ISDP demo is up. Try:

  # the registry: three healthy payments instances
  {isdpctl} services
  {isdpctl} instances payments

  # what the web sidecar learned over xDS
  curl -s {WEB_ADMIN}/config

  # call payments through the web sidecar (x-instance-id shows who answered)
  curl -si {WEB_UPSTREAM}/hello

  # the spread under load: 300 calls, 20 at a time, counted per instance
  seq 300 | xargs -P20 -I% curl -s -o /dev/null -D- {WEB_UPSTREAM}/hello \
    | grep -i '^x-instance-id' | sort | uniq -c
  # One call at a time mostly lands on one instance: the default balancer
  # (load_aware) picks the cheaper of two random instances by latency² x
  # requests in flight, and an idle mesh has nothing in flight, so the
  # fastest instance keeps winning. Under concurrent load it spreads.
  # `lb = "round_robin"` in the web sidecar's [[upstream]] takes turns.

  # the web sidecar's DNS: the healthy payments instances, and their ports
  dig @127.0.0.1 -p {WEB_DNS_PORT} payments.service.isdp +short
  dig @127.0.0.1 -p {WEB_DNS_PORT} payments.service.isdp SRV +short

  # make payments-2 fail its health check, watch it turn unhealthy, restore it
  {isdpctl} watch payments      # in another terminal
  curl -XPOST 127.0.0.1:18082/admin/health/fail
  curl -XPOST 127.0.0.1:18082/admin/health/pass

  # control-plane metrics
  curl -s {CONTROL_PLANE_ADMIN}/metrics

Logs: {logs}
Press Ctrl-C to stop."#
    );
}
