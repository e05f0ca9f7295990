//! Policy cost: the same request through three ISDP sidecar pairs in one
//! run, differing only in the traffic policy of the upstream they call:
//!
//! - **bare**: retries off (`attempts: 0`), ejection thresholds out of
//!   reach; the layers still run, as pass-throughs;
//! - **defaults**: no policy, so the sidecar's defaults (2 retries on
//!   connect failures and gateway errors, the 1024-request breaker, outlier
//!   detection after 5 gateway errors);
//! - **full**: a policy with every resilience section: request and per-try
//!   timeouts, retries with backoff and budget, breaker limits, outlier
//!   detection, and a header route in front of them.
//!
//! ```sh
//! apt-get update && apt-get install -y wrk haproxy nginx-light
//! cargo install --locked oha
//! cargo build --release --workspace --bins
//! cargo bench -p isdp-sidecar --bench policy
//! ```
//!
//! It reuses the data-plane bench's pieces and measurements
//! (`benches/dataplane/compare.rs`). Each pair has its own control plane;
//! the policy is stored through `isdp.v1.Policies/Put` and the bench waits
//! until sidecar A's `/config` shows it in force.
//!
//! `ISDP_BENCH_SECS` (default 15) and `ISDP_BENCH_REPS` (default 3).

#[path = "dataplane/compare.rs"]
mod compare;
#[path = "dataplane/load.rs"]
mod load;
#[path = "dataplane/process.rs"]
mod process;
#[allow(dead_code)]
#[path = "dataplane/shapes.rs"]
mod shapes;
#[allow(dead_code)]
#[path = "dataplane/tools.rs"]
mod tools;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use process::Proc;
use shapes::Shape;

const BARE: &str = r#"{"service": "bench",
  "retries": {"attempts": 0},
  "outlier_detection": {"consecutive_5xx": 1000, "consecutive_gateway_errors": 1000}}"#;

const FULL: &str = r#"{"service": "bench",
  "timeouts": {"request": "5s", "per_try": "2s", "connect": "1s"},
  "retries": {"attempts": 2, "retry_on": ["connect-failure", "reset", "gateway-error"],
              "backoff": {"base": "25ms", "max": "250ms"},
              "budget": {"ratio": 0.2, "min_per_second": 10}},
  "circuit_breaker": {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024},
  "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_errors": 5,
                        "interval": "1s", "base_ejection_time": "30s", "max_ejection_percent": 50},
  "routes": [{"name": "canary", "match": {"headers": {"x-canary": "true"}}}]}"#;

fn main() -> anyhow::Result<()> {
    process::in_temp_dir("policy", run)
}

fn run(dir: &std::path::Path) -> anyhow::Result<()> {
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (secs, reps) = (var("ISDP_BENCH_SECS", 15), var("ISDP_BENCH_REPS", 3));
    let tools = tools::preflight()?;
    let bins = tools::isdp_bins()?;
    let ticks = process::clock_ticks()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let backend = shapes::nginx(&tools, dir)?;
    let mut pairs: Vec<(Shape, Proc)> = Vec::new();
    for (name, tag, policy) in [
        ("bare", "bare", Some(BARE)),
        ("defaults", "defaults", None),
        ("full", "full", Some(FULL)),
    ] {
        let (mut shape, cp, details) = shapes::isdp_detailed(&bins, dir, &backend, tag, "")?;
        if let Some(doc) = policy {
            let version = rt.block_on(put(&details, doc))?;
            wait_in_force(&details.a_admin, version)?;
        }
        shape.name = name;
        shapes::check(&shape)?;
        pairs.push((shape, cp));
    }
    compare::print_setup("Policy-cost bench", &tools, secs, reps);
    let runs = compare::measure(&tools, ticks, &pairs, secs, reps)?;
    compare::print(&pairs, &runs)
}

/// Stores `doc` through `isdp.v1.Policies/Put`; its version.
async fn put(details: &shapes::IsdpDetails, doc: &str) -> anyhow::Result<u64> {
    use isdp_proto::v1::{PutPolicyRequest, policies_client::PoliciesClient};
    let auth = isdp_core::dial::ControlAuth {
        ca_pem: Some(details.ca_pem.clone()),
        token: Some(details.admin_token.clone()),
        identity: Default::default(),
        learned: Default::default(),
    };
    let channel = isdp_core::dial::connect(&details.grpc_url, &auth).await?;
    let stored = PoliciesClient::new(channel)
        .put(PutPolicyRequest {
            document_json: doc.to_owned(),
            expected_version: None,
            dry_run: false,
        })
        .await?
        .into_inner()
        .policy
        .context("no policy in the answer")?;
    Ok(stored.version)
}

/// Polls sidecar A's `/config` until the upstream's policy is in force.
fn wait_in_force(admin: &str, version: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok((200, body)) = shapes::http_get(admin, "/config") {
            let config: serde_json::Value = serde_json::from_str(&body)?;
            let held = &config["upstreams"]["bench"]["policy_version"];
            if !held.is_null() {
                return Ok(());
            }
            last = held.to_string();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("sidecar A never put policy version {version} in force; last: {last}")
}
