//! Traffic policies through `isdpctl policy`: YAML documents applied,
//! read back, versioned with compare-and-set; bad documents refused with
//! every problem listed and the previous policy left in force.

use isdp_tests::{ControlPlane, ControlPlaneOpts};

const GOOD: &str = "\
service: payments
timeouts: { request: 2s, per_try: 500ms }
retries:
  attempts: 2
  retry_on: [connect-failure, gateway-error]
  backoff: { base: 25ms, max: 250ms }
  budget: { ratio: 0.2, min_per_second: 10 }
circuit_breaker: { max_connections: 100, max_pending_requests: 10, max_requests: 100 }
outlier_detection: { consecutive_5xx: 5, interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50 }
---
service: orders
fault:
  abort: { percent: 10, status: 503 }
";

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn version(cp: &ControlPlane, service: &str) -> u64 {
    let out = cp.ctl_ok(&["-o", "json", "policy", "get", service]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["version"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_applied_read_and_versioned() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = write(&dir, "good.yaml", GOOD);

    // A dry run stores nothing.
    cp.ctl_ok(&["policy", "apply", "-f", &good, "--dry-run"])
        .await;
    let list: serde_json::Value =
        serde_json::from_str(&cp.ctl_ok(&["-o", "json", "policy", "list"]).await).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);

    cp.ctl_ok(&["policy", "apply", "-f", &good]).await;
    let got: serde_json::Value = serde_json::from_str(
        &cp.ctl_ok(&["-o", "json", "policy", "get", "payments"])
            .await,
    )
    .unwrap();
    assert_eq!(got["document"]["retries"]["attempts"], 2);
    assert_eq!(got["document"]["timeouts"]["per_try"], "500ms");
    let v1 = version(&cp, "payments").await;

    // Compare-and-set: applying over the version read succeeds once; a
    // second writer holding the same old version is refused.
    let newer = write(
        &dir,
        "newer.yaml",
        "service: payments\nretries: { attempts: 3 }\n",
    );
    let v1s = v1.to_string();
    cp.ctl_ok(&["policy", "apply", "-f", &newer, "--expect-version", &v1s])
        .await;
    let other = write(
        &dir,
        "other.yaml",
        "service: payments\nretries: { attempts: 1 }\n",
    );
    let lost = cp
        .ctl(&["policy", "apply", "-f", &other, "--expect-version", &v1s])
        .await;
    assert!(!lost.status.success());
    let stderr = String::from_utf8_lossy(&lost.stderr);
    assert!(
        stderr.contains("Aborted") && stderr.contains("version"),
        "{stderr}"
    );
    assert!(version(&cp, "payments").await > v1);

    cp.ctl_ok(&["policy", "delete", "orders"]).await;
    let missing = cp.ctl(&["policy", "get", "orders"]).await;
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_are_refused_with_every_problem_and_change_nothing() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = write(&dir, "good.yaml", GOOD);
    cp.ctl_ok(&["policy", "apply", "-f", &good]).await;
    let before = cp.ctl_ok(&["-o", "json", "policy", "list"]).await;

    let bad = write(
        &dir,
        "bad.yaml",
        "\
service: payments
timeouts: { request: -1s, idle: 5 }
retries: { attempts: \"three\", colour: red }
subsets: [ { name: v2, labels: { version: v2 } } ]
split: [ { subset: v2, weight: 60 }, { subset: v1, weight: 30 } ]
unknown_section: {}
",
    );
    let out = cp.ctl(&["policy", "apply", "-f", &bad]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    for field in [
        "timeouts.request: must not be negative",
        "timeouts.idle: must be a duration",
        "retries.attempts: must be an integer 0..10",
        "retries.colour: unknown field",
        "split[1].subset",
        "split: weights must sum to 100, got 90",
        "subsets[0]: subset \"v2\" has no instances",
        "unknown_section: unknown field",
    ] {
        assert!(stderr.contains(field), "stderr lacks {field:?}: {stderr}");
    }
    // A file whose second document is bad stores neither.
    let mixed = write(
        &dir,
        "mixed.yaml",
        "service: billing\n---\nservice: orders\nfault: { abort: { percent: 200, status: 503 } }\n",
    );
    let out = cp.ctl(&["policy", "apply", "-f", &mixed]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fault.abort.percent"));
    assert_eq!(cp.ctl_ok(&["-o", "json", "policy", "list"]).await, before);
}
