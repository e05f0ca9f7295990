//! Observability end to end: traffic through two sidecars and writes
//! through the control plane show up in each process's `/metrics`, every
//! exposition passes `promtool check metrics`, the shipped alerts and
//! dashboard query only series that exist, the alerting rules pass their
//! promtool unit tests, and `isdpctl proxy-status` reports what each
//! sidecar holds.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use isdp_examples::proto::{EchoRequest, echo_client::EchoClient};
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoGrpc, EchoHttp, SidecarToml, eventually, http, promtool,
    status_of,
};

const SETUP: Duration = Duration::from_secs(15);

/// The value of the first sample of `name` carrying every label in
/// `labels` (`key="value"` pairs), if any.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn metrics(addr: &str) -> String {
    let resp = http::get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.body
}

#[tokio::test]
async fn golden_metrics_count_traffic_and_pass_promtool() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let echo = EchoHttp::start("pay-0").await;
    let greeter = EchoGrpc::start("grpc-0").await;
    let pay = SidecarToml::new("pay-0", &cp.grpc_url())
        .raw(&format!(
            "[[service]]\nname = \"payments\"\nport = {port}\nprotocol = \"http\"\n\
             check = \"{check}\"\ninterval = \"200ms\"\n\
             [[service]]\nname = \"greeter\"\nport = {gport}\nprotocol = \"grpc\"\n\
             check = \"{gcheck}\"\ninterval = \"200ms\"\n",
            port = echo.port(),
            check = echo.health_url(),
            gport = greeter.port(),
            gcheck = greeter.health_target(),
        ))
        .start()
        .await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0("payments", "http", "round_robin")
        .upstream_on_port0("greeter", "http", "round_robin")
        .upstream_on_port0("ghost", "http", "round_robin")
        .start()
        .await;
    eventually(SETUP, "web sees pay-0 healthy", || async {
        let eps = web.endpoints("payments").await?;
        anyhow::ensure!(status_of(&eps, "pay-0.payments")? == "healthy", "{eps:?}");
        let eps = web.endpoints("greeter").await?;
        anyhow::ensure!(status_of(&eps, "pay-0.greeter")? == "healthy", "{eps:?}");
        Ok(())
    })
    .await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", web.upstream_addr("greeter")))
            .unwrap()
            .connect()
            .await
            .expect("connect to web's greeter listener");
    let reply = EchoClient::new(channel)
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .expect("unary call through the mesh");
    assert_eq!(reply.into_inner().message, "hi");

    const N: usize = 20;
    for _ in 0..N {
        let r = http::get(web.upstream_addr("payments"), "/").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = http::get(web.upstream_addr("ghost"), "/").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);

    // A change after web subscribed: its ACK is a convergence sample.
    cp.register("payments", "127.0.0.1", 1, &[]).await;
    // An operator-registered instance the control plane checks itself.
    let check = echo.health_url();
    cp.register(
        "ledger",
        "127.0.0.1",
        echo.port(),
        &["--check", &check, "--interval", "200ms"],
    )
    .await;
    // A refused write, counted with its code.
    let bad = cp
        .ctl(&[
            "register",
            "--service",
            "Bad Name",
            "--address",
            "127.0.0.1",
            "--port",
            "1",
        ])
        .await;
    assert!(!bad.status.success());

    let web_text = metrics(web.admin_addr()).await;
    fn out<'a>(labels: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut l = vec![("direction", "outbound")];
        l.extend_from_slice(labels);
        l
    }
    assert_eq!(
        sample(
            &web_text,
            "isdp_requests_total",
            &out(&[("service", "payments"), ("status_class", "2xx")])
        ),
        Some(N as f64),
        "{web_text}"
    );
    assert_eq!(
        sample(
            &web_text,
            "isdp_request_duration_seconds_count",
            &out(&[("service", "payments")])
        ),
        Some(N as f64)
    );
    assert_eq!(
        sample(
            &web_text,
            "isdp_requests_in_flight",
            &out(&[("service", "payments")])
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &web_text,
            "isdp_proxy_errors_total",
            &out(&[("service", "ghost"), ("reason", "no-healthy-endpoints")])
        ),
        Some(1.0),
        "{web_text}"
    );
    assert_eq!(
        sample(
            &web_text,
            "isdp_grpc_requests_total",
            &out(&[("service", "greeter"), ("grpc_code", "OK")])
        ),
        Some(1.0),
        "{web_text}"
    );
    assert_eq!(sample(&web_text, "isdp_xds_connected", &[]), Some(1.0));
    assert!(sample(&web_text, "isdp_xds_acks_total", &[]).unwrap() >= 1.0);

    // A plaintext caller knocks on pay's mTLS port: refused and counted.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(pay.inbound_addr())
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: pay\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(buf.is_empty(), "plaintext was answered");
    }
    let pay_text = metrics(pay.admin_addr()).await;
    assert_eq!(
        sample(
            &pay_text,
            "isdp_tls_handshake_failures_total",
            &[("direction", "inbound"), ("reason", "plaintext")]
        ),
        Some(1.0),
        "{pay_text}"
    );
    assert_eq!(
        sample(
            &pay_text,
            "isdp_requests_total",
            &[
                ("direction", "inbound"),
                ("service", "payments"),
                ("status_class", "2xx")
            ]
        ),
        Some(N as f64),
        "{pay_text}"
    );
    assert_eq!(
        sample(
            &pay_text,
            "isdp_local_service_health",
            &[("service", "payments"), ("health", "healthy")]
        ),
        Some(1.0)
    );

    eventually(
        Duration::from_secs(5),
        "a convergence sample and a health transition",
        || async {
            let text = metrics(cp.admin_addr()).await;
            let n = sample(&text, "isdp_xds_convergence_seconds_count", &[]).unwrap_or(0.0);
            anyhow::ensure!(n >= 1.0, "no convergence sample yet");
            let healthy = [("status", "healthy")];
            let t = sample(&text, "isdp_health_transitions_total", &healthy).unwrap_or(0.0);
            anyhow::ensure!(t >= 1.0, "no health transition yet");
            Ok(())
        },
    )
    .await;
    let cp_text = metrics(cp.admin_addr()).await;
    assert!(
        sample(
            &cp_text,
            "isdp_grpc_server_handled_total",
            &[("method", "/isdp.v1.Registry/Register"), ("code", "OK")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{cp_text}"
    );
    assert!(
        sample(
            &cp_text,
            "isdp_grpc_server_handled_total",
            &[
                ("method", "/isdp.v1.Registry/Register"),
                ("code", "INVALID_ARGUMENT")
            ]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{cp_text}"
    );
    assert!(
        sample(
            &cp_text,
            "isdp_store_operation_duration_seconds_count",
            &[("op", "txn")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{cp_text}"
    );
    assert!(sample(&cp_text, "isdp_xds_streams", &[]).unwrap() >= 1.0);
    // Tracing is off here: nothing is exported, so nothing is dropped.
    for text in [&web_text, &pay_text, &cp_text] {
        assert_eq!(
            sample(text, "isdp_trace_spans_dropped_total", &[]),
            Some(0.0)
        );
    }

    for text in [&web_text, &pay_text, &cp_text] {
        promtool::check_metrics(text).await;
    }

    // Every series the shipped alerts and dashboard query exists.
    let exposed: BTreeSet<&str> = [&web_text, &pay_text, &cp_text]
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let dir = observability_dir();
    for file in ["alerts.yml", "grafana/dashboards/isdp-mesh.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for name in metric_names(&text) {
            assert!(
                exposed.contains(name.as_str()),
                "{file} queries {name}, which no process exposes"
            );
        }
    }
}

/// `deploy/observability/` in the repository.
fn observability_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability")
}

/// Every `isdp_*` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("isdp_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `isdp_` inside a longer word (a job name like `isdp-sidecar` has
        // a dash, so it never matches) would be preceded by a word char.
        let word_start = i == 0 || !rest[..i].ends_with(|c: char| c.is_ascii_alphanumeric());
        if word_start {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn shipped_alerting_rules_check_and_fire_in_their_unit_tests() {
    let dir = observability_dir();
    let dir = dir.to_str().unwrap();
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let mut full = args.clone();
        let file = full.pop().unwrap();
        let path = format!("{dir}/{file}");
        full.push(&path);
        let (ok, text) = promtool::run(&full, "").await;
        assert!(ok, "promtool {args:?} failed:\n{text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
    }
    let dashboard =
        std::fs::read_to_string(format!("{dir}/grafana/dashboards/isdp-mesh.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert_eq!(json["uid"], "isdp-mesh");
    assert!(json["panels"].as_array().unwrap().len() >= 10);
}

#[tokio::test]
async fn proxy_status_shows_what_each_sidecar_acknowledged() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0("payments", "http", "round_robin")
        .start()
        .await;
    let api = SidecarToml::new("api", &cp.grpc_url())
        .upstream_on_port0("payments", "http", "round_robin")
        .start()
        .await;
    cp.register("payments", "127.0.0.1", 9, &[]).await;

    // Every sidecar reports, through the control plane, the version its own
    // admin page says it holds.
    eventually(SETUP, "proxy-status matches each sidecar", || async {
        let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        let nodes: Vec<&str> = list.iter().filter_map(|p| p["node_id"].as_str()).collect();
        anyhow::ensure!(nodes == ["api", "web"], "sorted nodes: {nodes:?}");
        for (sidecar, entry) in [(&api, &list[0]), (&web, &list[1])] {
            let config = sidecar.config_json().await?;
            let held = config["xds"]["acked"]["payments"].clone();
            anyhow::ensure!(held.is_string(), "sidecar holds no payments yet");
            let bundle = config["xds"]["acked_by_type"]["TrustBundle/mesh"].clone();
            anyhow::ensure!(
                bundle.is_string(),
                "sidecar holds no trust bundle: {config}"
            );
            let types = entry["types"].as_array().expect("types");
            let of = |short: &str| {
                types
                    .iter()
                    .find(|t| t["type_url"].as_str().is_some_and(|u| u.ends_with(short)))
            };
            let endpoints = of("/isdp.v1.ServiceEndpoints")
                .ok_or_else(|| anyhow::anyhow!("no ServiceEndpoints: {types:?}"))?;
            anyhow::ensure!(endpoints["acked"]["payments"] == held, "{entry} vs {held}");
            anyhow::ensure!(endpoints["pending"] == false && endpoints["nacks"] == 0);
            let trust = of("/isdp.v1.TrustBundle")
                .ok_or_else(|| anyhow::anyhow!("no TrustBundle: {types:?}"))?;
            anyhow::ensure!(trust["acked"]["mesh"] == bundle, "{entry} vs {bundle}");
            // Traffic policies have a subscription of their own too.
            anyhow::ensure!(
                of("/isdp.v1.TrafficPolicy").is_some(),
                "no TrafficPolicy: {types:?}"
            );
            anyhow::ensure!(entry["delta"] == true);
        }
        Ok(())
    })
    .await;

    let table = cp.ctl_ok(&["proxy-status"]).await;
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table.contains("SYNCED") && table.contains("ServiceEndpoints"),
        "{table}"
    );

    // A sidecar that goes away leaves the list.
    drop(api);
    eventually(SETUP, "api leaves proxy-status", || async {
        let out = cp.ctl_ok(&["-o", "json", "proxy-status"]).await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        anyhow::ensure!(list.len() == 1 && list[0]["node_id"] == "web", "{out}");
        Ok(())
    })
    .await;
}
