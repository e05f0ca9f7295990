//! The load generators, pinned to their own core: oha at a fixed rate for
//! latency (with coordinated-omission correction), wrk flat out for peak
//! throughput. Any failed request fails the bench: a shape that answers
//! errors fast must not look like a fast shape.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

/// The load generator's core; the servers have the other one.
pub const LOAD_CORE: usize = 1;
/// The fixed rate of the latency runs, the rate the targets use.
pub const RATE: u32 = 1000;
/// Connections for the fixed-rate runs: enough that a slow response does
/// not delay the next scheduled request.
const RATE_CONNECTIONS: u32 = 16;
/// Connections for the peak runs: enough to keep one proxy core busy.
const PEAK_CONNECTIONS: u32 = 64;

/// One fixed-rate run.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub requests: f64,
}

/// One flat-out run.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub requests: f64,
}

/// The command line of the fixed-rate run, also printed in the report.
pub fn oha_args(secs: u64, url: &str) -> Vec<String> {
    let args = format!(
        "-z {secs}s -q {RATE} --latency-correction -w --no-tui -c {RATE_CONNECTIONS} \
         --output-format json {url}"
    );
    args.split_whitespace().map(str::to_owned).collect()
}

/// The command line of the peak run, also printed in the report.
pub fn wrk_args(secs: u64, url: &str) -> Vec<String> {
    let args = format!("-t1 -c{PEAK_CONNECTIONS} -d{secs}s --latency {url}");
    args.split_whitespace().map(str::to_owned).collect()
}

/// `oha` at [`RATE`] requests per second with latency correction (each
/// latency counts from when the request was due, not when it was sent).
/// `-w` waits for the requests in flight at the deadline, so none is
/// counted as an error.
pub fn oha(oha: &Path, secs: u64, url: &str) -> anyhow::Result<Latency> {
    let out = pinned(oha, &oha_args(secs, url))?;
    let json: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("oha printed no JSON: {out}"))?;
    let statuses = json["statusCodeDistribution"]
        .as_object()
        .context("oha JSON has no statusCodeDistribution")?;
    let errors = &json["errorDistribution"];
    ensure!(
        statuses.keys().all(|k| k == "200") && errors.as_object().is_none_or(|e| e.is_empty()),
        "oha against {url}: statuses {statuses:?}, errors {errors}"
    );
    let seconds = |key: &str| {
        json["latencyPercentiles"][key]
            .as_f64()
            .map(Duration::from_secs_f64)
            .with_context(|| format!("oha JSON has no latencyPercentiles.{key}"))
    };
    Ok(Latency {
        p50: seconds("p50")?,
        p99: seconds("p99")?,
        requests: statuses.values().filter_map(|v| v.as_f64()).sum(),
    })
}

/// `wrk` with one thread and [`PEAK_CONNECTIONS`] connections.
pub fn wrk(wrk: &Path, secs: u64, url: &str) -> anyhow::Result<Peak> {
    let out = pinned(wrk, &wrk_args(secs, url))?;
    parse_wrk(&out).with_context(|| format!("wrk against {url}:\n{out}"))
}

/// Reads requests/s, the `--latency` p50/p99 and the request count from
/// wrk's text report; non-2xx answers or socket errors are failures.
fn parse_wrk(out: &str) -> anyhow::Result<Peak> {
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("failed requests: {}", line.trim());
    }
    let field = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("no `{prefix}` line"))
    };
    let rps = field("Requests/sec:")?.parse()?;
    let requests = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no `N requests in` line")?;
    Ok(Peak {
        rps,
        p50: wrk_duration(field("50%")?)?,
        p99: wrk_duration(field("99%")?)?,
        requests,
    })
}

/// Parses wrk's `123.45us` / `1.20ms` / `2.00s`.
fn wrk_duration(text: &str) -> anyhow::Result<Duration> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(Duration::from_secs_f64(value * scale))
}

/// Runs `bin args` under `taskset -c LOAD_CORE` and returns its stdout;
/// a non-zero exit is an error carrying stderr.
fn pinned(bin: &Path, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new("taskset")
        .arg("-c")
        .arg(LOAD_CORE.to_string())
        .arg(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {} {args:?}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {args:?} failed ({}): {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
