//! DNS: queries per second and latency of one sidecar's DNS server, next
//! to dnsmasq serving the same records, in the same run.
//!
//! Both servers are pinned to core 0 and dnsperf (the load generator of
//! DNS server vendors) to core 1. The records: `payments.service.isdp`
//! with 10 A records (10 instances registered with the control plane; the
//! sidecar answers all 10, `dns_max_answers = 10`; dnsmasq reads the same
//! 10 from a hosts file). Each rep runs dnsperf for `ISDP_BENCH_SECS`
//! against each server in turn over UDP, with 4 clients and 64 queries
//! outstanding; a second pass of each rep logs every query's latency
//! (`dnsperf -v`) for the p99. Medians of `ISDP_BENCH_REPS` reps.
//!
//! ```sh
//! apt-get update && apt-get install -y dnsperf dnsmasq-base dnsutils
//! cargo build --release --workspace --bins
//! cargo bench -p isdp-sidecar --bench dns
//! ```
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it returns at
//! once. `ISDP_BENCH_SECS` (default 10) and `ISDP_BENCH_REPS` (default 3). A
//! missing tool, a lost query or an answer that is not NOERROR fails it.

#[path = "dataplane/process.rs"]
#[allow(dead_code)]
mod process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use process::Proc;

const SERVER_CORE: usize = 0;
const CLIENT_CORE: usize = 1;
const INSTANCES: usize = 10;
const NAME: &str = "payments.service.isdp";

fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs benches without `--bench`: build
    // and start only.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let secs: u64 = env_or("ISDP_BENCH_SECS", 10)?;
    let reps: usize = env_or("ISDP_BENCH_REPS", 3)?;
    let dnsperf = which("dnsperf").context("dnsperf not found: apt-get install dnsperf")?;
    let dnsmasq = which("dnsmasq").context("dnsmasq not found: apt-get install dnsmasq-base")?;
    let dig = which("dig").context("dig not found: apt-get install dnsutils")?;
    let bins = release_bins()?;
    process::in_temp_dir("dns", |dir| {
        // The control plane, 10 instances, and a sidecar answering DNS.
        let mut cp = Proc::spawn(
            "control-plane",
            CLIENT_CORE,
            &bins.join("isdp-control-plane"),
            &args(&[
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .into_iter()
            .chain([dir.join("cp").display().to_string()])
            .collect::<Vec<_>>(),
            &[],
            dir,
        )?;
        let grpc = cp
            .listening_line()?
            .remove("grpc")
            .context("no grpc= address")?;
        let url = format!("https://{grpc}");
        let data = dir.join("cp");
        let mut hosts = String::new();
        for i in 0..INSTANCES {
            let address = format!("127.0.0.{}", 11 + i);
            let out = Command::new(bins.join("isdpctl"))
                .args(["--control-plane", &url, "--data-dir"])
                .arg(&data)
                .args(["register", "--service", "payments", "--address", &address])
                .args(["--port", &(8000 + i).to_string()])
                .output()?;
            if !out.status.success() {
                bail!("isdpctl register: {}", String::from_utf8_lossy(&out.stderr));
            }
            hosts.push_str(&format!("{address} {NAME}\n"));
        }
        let token = std::fs::read_to_string(data.join("admin.token"))?;
        let config = dir.join("sidecar.toml");
        std::fs::write(
            &config,
            format!(
                "node_id = \"web\"\nidentity = \"web\"\ncontrol_plane = [\"{url}\"]\n\
                 ca_file = {:?}\njoin_token = {:?}\nadmin_listen = \"127.0.0.1:0\"\n\
                 inbound_listen = \"127.0.0.1:0\"\noutbound_listen = \"127.0.0.1:0\"\n\
                 dns_listen = \"127.0.0.1:0\"\ndns_max_answers = {INSTANCES}\n\
                 [[upstream]]\nname = \"payments\"\nlisten = \"127.0.0.1:0\"\n",
                data.join("ca.pem").display().to_string(),
                token.trim()
            ),
        )?;
        let mut sidecar = Proc::spawn(
            "sidecar",
            SERVER_CORE,
            &bins.join("isdp-sidecar"),
            &["--config".to_owned(), config.display().to_string()],
            &[],
            dir,
        )?;
        let sidecar_dns = sidecar
            .listening_line()?
            .remove("dns")
            .context("no dns= address")?;

        // dnsmasq with the same records, no upstream, no other file.
        let hosts_file = dir.join("hosts");
        std::fs::write(&hosts_file, hosts)?;
        let port = process::free_port()?;
        let _dnsmasq = Proc::spawn(
            "dnsmasq",
            SERVER_CORE,
            &dnsmasq,
            &args(&[
                "--no-daemon",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--log-facility=-",
            ])
            .into_iter()
            .chain([
                format!("--port={port}"),
                format!("--addn-hosts={}", hosts_file.display()),
            ])
            .collect::<Vec<_>>(),
            &[],
            dir,
        )?;
        let dnsmasq_dns = format!("127.0.0.1:{port}");
        for server in [&sidecar_dns, &dnsmasq_dns] {
            wait_answers(&dig, server)?;
        }

        let queries = dir.join("queries");
        std::fs::write(&queries, format!("{NAME} A\n"))?;
        let servers = [("isdp-sidecar", &sidecar_dns), ("dnsmasq", &dnsmasq_dns)];
        let mut qps = [Vec::new(), Vec::new()];
        let mut p99 = [Vec::new(), Vec::new()];
        for rep in 0..reps {
            for (i, (name, server)) in servers.iter().enumerate() {
                let rate = run_dnsperf(&dnsperf, server, &queries, secs, false)?.qps;
                let lat = run_dnsperf(&dnsperf, server, &queries, secs.min(5), true)?
                    .p99
                    .context("no latencies")?;
                eprintln!("rep {rep}: {name}: {rate:.0} q/s, p99 {:.0} us", lat * 1e6);
                qps[i].push(rate);
                p99[i].push(lat);
            }
        }
        println!(
            "\nDNS, `{NAME} A` ({INSTANCES} A records), dnsperf -c 4 -q 64 over UDP on core {CLIENT_CORE}, \
             servers on core {SERVER_CORE}; {reps} reps of {secs} s, medians\n"
        );
        println!("| server | queries/s | p99 |");
        println!("|---|---|---|");
        for (i, (name, _)) in servers.iter().enumerate() {
            println!(
                "| {name} | {:.0} | {:.0} µs |",
                median(&qps[i]),
                median(&p99[i]) * 1e6
            );
        }
        println!(
            "\nisdp-sidecar / dnsmasq: {:.2}x the queries/s, {:.2}x the p99",
            median(&qps[0]) / median(&qps[1]),
            median(&p99[0]) / median(&p99[1])
        );
        drop(sidecar);
        drop(cp);
        Ok(())
    })
}

struct Run {
    qps: f64,
    p99: Option<f64>,
}

/// One dnsperf run against `server`; with `verbose`, every query's
/// latency is read back for the p99.
fn run_dnsperf(
    dnsperf: &Path,
    server: &str,
    queries: &Path,
    secs: u64,
    verbose: bool,
) -> anyhow::Result<Run> {
    let (host, port) = server.rsplit_once(':').context("ADDR:PORT")?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &CLIENT_CORE.to_string()])
        .arg(dnsperf)
        .args(["-s", host, "-p", port, "-c", "4", "-q", "64", "-t", "2"])
        .args(["-l", &secs.to_string(), "-d"])
        .arg(queries);
    if verbose {
        cmd.arg("-v");
    }
    let out = cmd.output().context("running dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "dnsperf failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |key: &str| -> anyhow::Result<&str> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(str::trim)
            .with_context(|| format!("no `{key}` in dnsperf's output:\n{text}"))
    };
    let lost = field("Queries lost:")?;
    if !lost.starts_with("0 ") {
        bail!("dnsperf lost queries against {server}: {lost}");
    }
    let codes = field("Response codes:")?;
    if !codes.starts_with("NOERROR") || codes.contains(',') {
        bail!("answers other than NOERROR from {server}: {codes}");
    }
    let qps: f64 = field("Queries per second:")?.parse()?;
    let p99 = verbose.then(|| {
        // `> NOERROR payments.service.isdp A 0.000131`
        let mut lat: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("> "))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        lat.sort_by(f64::total_cmp);
        lat.get(lat.len() * 99 / 100).copied()
    });
    Ok(Run {
        qps,
        p99: p99.flatten(),
    })
}

/// Waits until `server` answers the name with all its records.
fn wait_answers(dig: &Path, server: &str) -> anyhow::Result<()> {
    let (host, port) = server.rsplit_once(':').context("ADDR:PORT")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(dig)
            .args([
                &format!("@{host}"),
                "-p",
                port,
                NAME,
                "+short",
                "+time=1",
                "+tries=1",
            ])
            .output()?;
        let n = String::from_utf8_lossy(&out.stdout).lines().count();
        if n == INSTANCES {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{server} answers {n} records, not {INSTANCES}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .ok()
            .with_context(|| format!("{key}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The release binaries beside this bench (`target/release/deps/dns-HASH`
/// -> `target/release/`).
fn release_bins() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("bench executable has no target/<profile> dir")?
        .to_path_buf();
    for bin in ["isdp-control-plane", "isdp-sidecar", "isdpctl"] {
        if !dir.join(bin).is_file() {
            bail!(
                "`{bin}` not found in {}: run `cargo build --release --workspace --bins` first",
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
