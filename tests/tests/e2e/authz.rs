//! Authorization rules through `isdpctl authz`: stored, listed, replaced,
//! deleted; bad rules (a path prefix not in canonical form included)
//! refused with every problem named and nothing changed. Enforcement by the
//! destination's sidecar is in `mtls.rs` and `authz_bypass.rs`.

use isdp_tests::{ControlPlane, ControlPlaneOpts};

async fn rules(cp: &ControlPlane, destination: Option<&str>) -> Vec<serde_json::Value> {
    let mut args = vec!["-o", "json", "authz", "list"];
    if let Some(d) = destination {
        args.extend(["--to", d]);
    }
    let out = cp.ctl_ok(&args).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rules JSON: {e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_the_default_are_managed_with_isdpctl() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    assert_eq!(cp.ctl_ok(&["authz", "default"]).await.trim(), "allow");

    cp.ctl_ok(&["authz", "allow", "--to", "payments", "--from", "web"])
        .await;
    cp.ctl_ok(&[
        "authz",
        "deny",
        "--to",
        "payments",
        "--from",
        "batch",
        "--method",
        "POST",
        "--path-prefix",
        "/charge",
    ])
    .await;
    cp.ctl_ok(&["authz", "allow", "--to", "orders", "--from", "*"])
        .await;

    let payments = rules(&cp, Some("payments")).await;
    let names: Vec<&str> = payments
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["allow-web", "deny-batch"]);
    assert_eq!(payments[1]["action"], "deny");
    assert_eq!(payments[1]["methods"][0], "POST");
    assert_eq!(payments[1]["path_prefix"], "/charge");
    assert_eq!(rules(&cp, None).await.len(), 3);

    cp.ctl_ok(&["authz", "default", "deny"]).await;
    assert_eq!(cp.ctl_ok(&["authz", "default"]).await.trim(), "deny");

    cp.ctl_ok(&["authz", "delete", "--to", "payments", "deny-batch"])
        .await;
    assert_eq!(rules(&cp, Some("payments")).await.len(), 1);
    let missing = cp
        .ctl(&["authz", "delete", "--to", "payments", "deny-batch"])
        .await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_is_refused_naming_every_field_and_changes_nothing() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    cp.ctl_ok(&["authz", "allow", "--to", "payments", "--from", "web"])
        .await;
    let before = rules(&cp, None).await;

    let out = cp
        .ctl(&[
            "authz",
            "deny",
            "--to",
            "Payments!",
            "--from",
            "not a service",
            "--method",
            "get",
            "--path-prefix",
            "charge",
            "--name",
            "allow-web",
        ])
        .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    for field in [
        "rule.destination",
        "rule.sources[0]",
        "rule.methods[0]",
        "rule.path_prefix",
    ] {
        assert!(
            stderr.contains(field),
            "stderr does not name {field}: {stderr}"
        );
    }
    assert_eq!(rules(&cp, None).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_prefix_not_in_canonical_form_is_refused_and_changes_nothing() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    cp.ctl_ok(&["authz", "allow", "--to", "payments", "--from", "web"])
        .await;
    let before = rules(&cp, None).await;
    for (prefix, says) in [
        ("/admin/../x", "write \"/x\""),
        ("//admin", "write \"/admin\""),
        ("/%61dmin/", "write \"/admin/\""),
        ("/admin%2Fx", "encoded '/'"),
        ("/admin;x", "';'"),
    ] {
        let out = cp
            .ctl(&[
                "authz",
                "deny",
                "--to",
                "payments",
                "--from",
                "batch",
                "--path-prefix",
                prefix,
            ])
            .await;
        assert!(!out.status.success(), "{prefix} was stored");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("InvalidArgument"), "{prefix}: {stderr}");
        assert!(stderr.contains("rule.path_prefix"), "{prefix}: {stderr}");
        assert!(stderr.contains(says), "{prefix}: {stderr}");
    }
    assert_eq!(rules(&cp, None).await, before);
}
