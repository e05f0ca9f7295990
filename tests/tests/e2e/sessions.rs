//! Sidecar sessions: a sidecar registers its local service and reports its
//! health; a clean shutdown (SIGTERM) deregisters at once, even when it
//! finds the control plane down (as soon as it is back, within the drain
//! timeout); a crash (kill -9) makes the instance unhealthy after the
//! session grace and removes it after the session timeout.

use std::time::{Duration, Instant};

use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, SidecarToml, eventually, find_by_id, status_of,
};

const SERVICE: &str = "sessioned";
const PROBE: Duration = Duration::from_millis(200);

/// Waits until instance `id` of [`SERVICE`] has `status`; returns how long.
async fn until_status(cp: &ControlPlane, id: &str, status: &str, timeout: Duration) -> Duration {
    eventually(timeout, &format!("{id} {status} in isdpctl"), || async {
        let list = cp.instances(SERVICE).await?;
        let got = status_of(&list, id)?;
        anyhow::ensure!(got == status, "{id} is {got}: {list:?}");
        Ok(())
    })
    .await
}

/// Waits until instance `id` is gone from the registry; returns how long.
async fn until_gone(cp: &ControlPlane, id: &str, timeout: Duration) -> Duration {
    eventually(timeout, &format!("{id} removed"), || async {
        let list = cp.instances(SERVICE).await?;
        anyhow::ensure!(find_by_id(&list, id).is_none(), "still listed: {list:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_reports_health_and_sigterm_deregisters_at_once() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let echo = EchoHttp::start("sess-1").await;
    let mut sidecar = SidecarToml::new("sess-1", &cp.grpc_url())
        .service(SERVICE, echo.port(), PROBE)
        .start()
        .await;
    let id = format!("sess-1.{SERVICE}");

    until_status(&cp, &id, "healthy", Duration::from_secs(10)).await;
    let list = cp.instances(SERVICE).await.expect("instances");
    let inst = find_by_id(&list, &id).expect("listed");
    assert_eq!(inst["node_id"], "sess-1", "{inst}");
    assert_eq!(inst["port"], echo.port(), "{inst}");
    let config = sidecar.config_json().await.expect("/config");
    let services = config["services"].as_array().expect("services array");
    assert!(services.iter().any(|s| s["id"] == id.as_str()), "{config}");

    // The sidecar's own probe sees the failure and reports it.
    echo.fail_health().await;
    let took = until_status(&cp, &id, "unhealthy", Duration::from_secs(4)).await;
    eprintln!("failing health check -> unhealthy after {took:?}");
    assert!(
        took <= Duration::from_secs(2),
        "unhealthy only after {took:?}"
    );

    echo.pass_health().await;
    until_status(&cp, &id, "healthy", Duration::from_secs(5)).await;

    // A clean shutdown closes the session: gone at once, not after a grace.
    // Timed from the signal, not the exit: the sidecar may still be draining
    // connections, but its instance must stop getting traffic right away.
    let start = Instant::now();
    sidecar.process().send_term().await;
    until_gone(&cp, &id, Duration::from_secs(3)).await;
    let took = start.elapsed();
    eprintln!("SIGTERM -> deregistered after {took:?}");
    let status = sidecar.process().wait_exit().await;
    assert!(
        took <= Duration::from_secs(1),
        "deregistered only after {took:?}"
    );
    assert!(status.success(), "sidecar exited with {status} on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_sidecar_goes_unhealthy_after_grace_then_is_removed() {
    let cp = ControlPlane::start(ControlPlaneOpts {
        session_grace: Some(Duration::from_secs(1)),
        session_timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    })
    .await;
    let echo = EchoHttp::start("sess-2").await;
    let mut sidecar = SidecarToml::new("sess-2", &cp.grpc_url())
        .service(SERVICE, echo.port(), PROBE)
        .start()
        .await;
    let id = format!("sess-2.{SERVICE}");
    until_status(&cp, &id, "healthy", Duration::from_secs(10)).await;

    let start = Instant::now();
    sidecar.kill9().await;
    until_status(&cp, &id, "unhealthy", Duration::from_secs(5)).await;
    let unhealthy = start.elapsed();
    until_gone(&cp, &id, Duration::from_secs(8)).await;
    let gone = start.elapsed();
    eprintln!("after kill -9: unhealthy at {unhealthy:?}, removed at {gone:?}");

    // ~1 s grace: not at once (the stream dropping alone is no verdict), and
    // not much later. The upper bounds leave room for a loaded CI machine.
    assert!(
        (Duration::from_millis(700)..=Duration::from_millis(2500)).contains(&unhealthy),
        "unhealthy after {unhealthy:?}, expected ~1s"
    );
    assert!(
        (Duration::from_millis(2500)..=Duration::from_millis(5000)).contains(&gone),
        "removed after {gone:?}, expected ~3s"
    );
    // The backend itself was fine all along: this was the session's doing.
    assert_eq!(
        isdp_tests::http::get(echo.addr(), "/healthz")
            .await
            .expect("echo")
            .status,
        200
    );
}

/// A sidecar that only calls out (no local service) opens its session with
/// no instances. Whatever an operator wrote last (a rule, the default, a
/// traffic policy, a token, a root rotation: every write outside the
/// registry), the session opens and the sidecar becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_only_sidecar_becomes_ready_after_any_operator_write() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("payments.yaml");
    std::fs::write(&policy, "service: payments\ntimeouts: { request: 5s }\n").expect("policy");
    let policy = policy.to_str().expect("UTF-8 path");
    let writes: [(&str, &[&str]); 5] = [
        (
            "authorization rule",
            &["authz", "allow", "--to", "payments", "--from", "web"],
        ),
        ("authorization default", &["authz", "default", "deny"]),
        ("traffic policy", &["policy", "apply", "-f", policy]),
        ("token", &["token", "create", "--role", "read"]),
        ("root rotation", &["ca", "rotate"]),
    ];
    for (n, (what, args)) in writes.into_iter().enumerate() {
        cp.ctl_ok(args).await;
        let sidecar = SidecarToml::new(&format!("web-{n}"), &cp.grpc_url())
            .raw("identity = \"web\"")
            .upstream("payments")
            .start()
            .await;
        client_only_ready(&sidecar, what).await;
    }
}

/// Waits for a client-only sidecar's `/ready`, naming the write it follows.
pub async fn client_only_ready(sidecar: &isdp_tests::Sidecar, after: &str) {
    let admin = sidecar.admin_addr().to_owned();
    eventually(
        Duration::from_secs(10),
        &format!("a client-only sidecar ready after a {after}"),
        || {
            let admin = admin.clone();
            async move {
                let r = isdp_tests::http::get(&admin, "/ready").await?;
                anyhow::ensure!(r.status == 200, "/ready: {} {}", r.status, r.body);
                Ok(())
            }
        },
    )
    .await;
}

/// A session stream that never says `open` is ended after 10 s with
/// DEADLINE_EXCEEDED: it would otherwise hold its place among the
/// principal's streams, and a task, as long as the client kept it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_its_open_message_is_ended() {
    use isdp_proto::v1::{SessionRequest, sidecar_client::SidecarClient};
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let token = cp
        .create_token(&["--role", "join", "--service", SERVICE])
        .await;
    let channel = isdp_tests::tls_channel(&cp.grpc_url(), cp.ca_file()).await;
    let mut client = SidecarClient::with_interceptor(channel, isdp_tests::bearer(&token.secret));
    let (_quiet, rx) = tokio::sync::mpsc::channel::<SessionRequest>(1);
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        client.session(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("the control plane answered within 30 s");
    let status = answer.expect_err("a session without `open` is refused");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("no open message"), "{status:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(25),
        "ended after {waited:?}"
    );
}

/// A sidecar stopped while its session is down (here: its control plane
/// killed a moment before) keeps trying within its drain timeout, and
/// deregisters as soon as the control plane is back, rather than leaving
/// its instance registered until the session timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_control_plane_is_down_deregisters_once_it_is_back() {
    let mut cp = ControlPlane::start(ControlPlaneOpts {
        session_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    })
    .await;
    let echo = EchoHttp::start("sess-4").await;
    let mut sidecar = SidecarToml::new("sess-4", &cp.grpc_url())
        .raw("drain_timeout = \"20s\"")
        .service(SERVICE, echo.port(), PROBE)
        .start()
        .await;
    let id = format!("sess-4.{SERVICE}");
    until_status(&cp, &id, "healthy", Duration::from_secs(10)).await;

    cp.kill9().await;
    sidecar.process().send_term().await;
    // The sidecar finds nobody to close its session with.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cp.restart().await;
    let took = until_gone(&cp, &id, Duration::from_secs(10)).await;
    eprintln!("control plane back -> deregistered after {took:?}");
    let status = sidecar.process().wait_exit().await;
    assert!(status.success(), "sidecar exited with {status} on SIGTERM");
}
