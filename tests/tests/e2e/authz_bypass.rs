//! Authorization rules hold however a request is spelled: the destination's
//! sidecar compares rules with the canonical path and hands the
//! application that same path (the echo service reports what it got), so
//! `//admin`, `/x/../admin` or `/%61dmin` meet a rule for `/admin`; paths
//! with no canonical form (`%2F`, `..;`, `%zz`) and methods not in upper
//! case are refused with 400; a TCP tunnel to an HTTP service, which would
//! carry requests past method and path rules, is closed. Requests that
//! were never the rule's business pass unchanged.

use std::time::Duration;

use isdp_tests::{SidecarToml, eventually, http::request, status_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mtls::{Mesh, SERVICE, counter};

const APPLY: Duration = Duration::from_secs(5);

/// Stores a rule for `payments` and waits until `probe` gets `status`.
async fn rule(mesh: &Mesh, args: &[&str], probe: (&str, &str), status: u16) {
    let mut cmd = vec!["authz"];
    cmd.extend_from_slice(args);
    mesh.cp.ctl_ok(&cmd).await;
    let web = mesh.web.upstream_addr(SERVICE).to_owned();
    eventually(APPLY, "the rule applies", || {
        let web = web.clone();
        async move {
            let r = request(probe.0, &web, probe.1).await?;
            anyhow::ensure!(r.status == status, "{r:?}");
            Ok(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_denied_path_is_refused_before_the_app() {
    let mesh = Mesh::start(&[]).await;
    let web = mesh.web.upstream_addr(SERVICE).to_owned();
    rule(
        &mesh,
        &[
            "deny",
            "--to",
            SERVICE,
            "--from",
            "web",
            "--path-prefix",
            "/admin",
        ],
        ("GET", "/admin"),
        403,
    )
    .await;

    // The same path spelled otherwise: normalized, then denied.
    for path in [
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/ad%6Din/users",
        "/%2e%2e/admin",
        "/admin/.",
        "/admin;jsessionid=1",
        "/public/%2E%2E//admin/x?q=1",
    ] {
        let r = request("GET", &web, path).await.unwrap();
        assert_eq!(
            (r.status, r.header("x-isdp-error")),
            (403, Some("denied-by-policy")),
            "{path}: {r:?}"
        );
    }

    // No canonical form: refused before any rule, whatever the rules say.
    for path in [
        "/admin%2f",
        "/%2Fadmin",
        "/x%5C..%5Cadmin",
        "/x\\..\\admin",
        "/public/..;/admin",
        "/%zz",
        "/admin%4",
        "/admin%00",
        "/%C0%AFadmin",
    ] {
        let r = request("GET", &web, path).await.unwrap();
        assert_eq!(
            (r.status, r.header("x-isdp-error")),
            (400, Some("bad-path")),
            "{path}: {r:?}"
        );
    }

    // What the rule is not about passes, and the app sees the path that
    // was checked, with the query as it was sent.
    for (path, seen, query) in [
        ("/administrator", "/administrator", None),
        ("/ADMIN", "/ADMIN", None),
        (
            "/public//x/./y?q=%2F%zz/..",
            "/public/x/y",
            Some("q=%2F%zz/.."),
        ),
        ("/%7Euser/a%3bb", "/~user/a%3Bb", None),
        ("/admin/../public", "/public", None),
        ("/admin%2541", "/admin%2541", None),
    ] {
        let r = request("GET", &web, path).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let echo: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(echo["path"], seen, "{path}: {echo}");
        assert_eq!(echo["query"].as_str(), query, "{path}: {echo}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_rule_cannot_be_passed_in_another_case() {
    let mesh = Mesh::start(&[]).await;
    let web = mesh.web.upstream_addr(SERVICE).to_owned();
    rule(
        &mesh,
        &[
            "deny", "--to", SERVICE, "--from", "web", "--method", "DELETE",
        ],
        ("DELETE", "/orders/1"),
        403,
    )
    .await;
    rule(
        &mesh,
        &[
            "deny",
            "--to",
            SERVICE,
            "--from",
            "web",
            "--method",
            "GET",
            "--path-prefix",
            "/reports",
            "--name",
            "no-reports",
        ],
        ("GET", "/reports/q1"),
        403,
    )
    .await;

    for method in ["delete", "Delete", "dELETE", "get"] {
        let r = request(method, &web, "/orders/1").await.unwrap();
        assert_eq!(
            (r.status, r.header("x-isdp-error")),
            (400, Some("bad-method")),
            "{method}: {r:?}"
        );
    }
    // HEAD is served by GET handlers: a deny for GET covers it.
    let r = request("HEAD", &web, "/reports/q1").await.unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    for (method, path) in [("GET", "/orders/1"), ("POST", "/orders"), ("HEAD", "/x")] {
        let r = request(method, &web, path).await.unwrap();
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_to_an_http_service_is_refused() {
    let mesh = Mesh::start(&[]).await;
    // `batch` calls payments as if it were a TCP service: an `isdp-tcp/1`
    // tunnel, in which HTTP requests would carry no method or path for
    // the rules to see.
    let batch = SidecarToml::new("batch", &mesh.cp.grpc_url())
        .upstream_on_port0(SERVICE, "tcp", "round_robin")
        .start()
        .await;
    eventually(Duration::from_secs(20), "batch sees payments", || async {
        let eps = batch.endpoints(SERVICE).await?;
        anyhow::ensure!(status_of(&eps, "pay-0.payments")? == "healthy", "{eps:?}");
        Ok(())
    })
    .await;

    let mut s = TcpStream::connect(batch.upstream_addr(SERVICE))
        .await
        .unwrap();
    // The write may already fail if the tunnel is gone.
    let _ = s
        .write_all(b"GET /admin HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n")
        .await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the tunnel is closed, not left open");
    assert!(
        read.is_err() || got.is_empty(),
        "the HTTP service answered through a tunnel: {}",
        String::from_utf8_lossy(&got)
    );
    eventually(APPLY, "the refusal is counted", || async {
        let n = counter(
            &mesh.pay,
            "isdp_authz_denied_total",
            "source=\"batch\",rule=\"tunnel-to-http\"",
        )
        .await;
        anyhow::ensure!(n >= 1.0, "{n}");
        Ok(())
    })
    .await;

    // HTTP from the same mesh still passes.
    let r = request("GET", mesh.web.upstream_addr(SERVICE), "/admin")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}
