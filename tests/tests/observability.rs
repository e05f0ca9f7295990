//! Metrics end to end: traffic through two sidecars and writes through the
//! control plane show up in each process's `/metrics`, and every exposition
//! passes `promtool check metrics`.

use std::time::Duration;

use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, SidecarToml, eventually, http, promtool, status_of,
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
    let pay = SidecarToml::new("pay-0", &cp.grpc_url())
        .raw(&format!(
            "[[service]]\nname = \"payments\"\nport = {port}\nprotocol = \"http\"\n\
             check = \"{check}\"\ninterval = \"200ms\"\n",
            port = echo.port(),
            check = echo.health_url(),
        ))
        .start()
        .await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0("payments", "http", "round_robin")
        .upstream_on_port0("ghost", "http", "round_robin")
        .start()
        .await;
    eventually(SETUP, "web sees pay-0 healthy", || async {
        let eps = web.endpoints("payments").await?;
        anyhow::ensure!(status_of(&eps, "pay-0.payments")? == "healthy", "{eps:?}");
        Ok(())
    })
    .await;

    const N: usize = 20;
    for _ in 0..N {
        let r = http::get(web.upstream_addr("payments"), "/").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = http::get(web.upstream_addr("ghost"), "/").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);

    // A change after web subscribed: its ACK is a convergence sample.
    cp.register("payments", "127.0.0.1", 1, &[]).await;
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
    assert_eq!(sample(&web_text, "isdp_xds_connected", &[]), Some(1.0));
    assert!(sample(&web_text, "isdp_xds_acks_total", &[]).unwrap() >= 1.0);

    let pay_text = metrics(pay.admin_addr()).await;
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

    eventually(Duration::from_secs(5), "a convergence sample", || async {
        let text = metrics(cp.admin_addr()).await;
        let n = sample(&text, "isdp_xds_convergence_seconds_count", &[]).unwrap_or(0.0);
        anyhow::ensure!(n >= 1.0, "no convergence sample yet");
        Ok(())
    })
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

    for text in [&web_text, &pay_text, &cp_text] {
        promtool::check_metrics(text).await;
    }
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
            let held = sidecar.config_json().await?["xds"]["acked"]["payments"].clone();
            anyhow::ensure!(held.is_string(), "sidecar holds no payments yet");
            let types = entry["types"].as_array().expect("types");
            anyhow::ensure!(types.len() == 1, "{types:?}");
            anyhow::ensure!(types[0]["acked"]["payments"] == held, "{entry} vs {held}");
            anyhow::ensure!(types[0]["pending"] == false && types[0]["nacks"] == 0);
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
