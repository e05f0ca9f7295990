//! Revoking a token reaches the data plane: every sidecar learns the
//! revoked token with the trust bundle and refuses the certificates issued
//! under it, on new handshakes and on connections already open, within
//! seconds; the control plane remembers the revocation across a restart,
//! until the last such certificate has expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use isdp_tests::{ControlPlane, ControlPlaneOpts, SidecarToml, eventually, holds_for};

use super::mtls::{
    SERVICE, SETUP, counter, fetch, mesh_identity_under, payments, payments_instance, tls,
};

/// A join token for `service`: (id, secret).
async fn join_token(cp: &ControlPlane, service: &str) -> (String, String) {
    let t = cp
        .create_token(&["--role", "join", "--service", service])
        .await;
    (t.id, t.secret)
}

/// When each call ended and whether it got a 200.
type CallLog = Arc<std::sync::Mutex<Vec<(Instant, bool)>>>;

/// Calls `addr` in a loop until `stop`, logging each call.
fn calls(
    addr: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (CallLog, tokio::task::JoinHandle<()>) {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let log = log.clone();
        async move {
            while !*stop.borrow() {
                let ok = matches!(fetch(&addr, "/").await, Ok((200, _)));
                log.lock().unwrap().push((Instant::now(), ok));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    (log, task)
}

/// `web` (joined with its own token) and `batch` (the admin token) keep
/// calling payments; revoking web's token makes payments' sidecar close
/// web's open HTTP/2 connection and refuse its new handshakes within
/// seconds, while batch never sees a failure. Web, cut off from the control
/// plane too, is not ready and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_callers_token_cuts_it_off_the_data_plane_within_seconds() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let (_echo, pay) = payments(&cp).await;
    let (web_token, secret) = join_token(&cp, "web").await;
    let web = SidecarToml::new("web", &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .join_token(&secret)
        .start()
        .await;
    let batch = SidecarToml::new("batch", &cp.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .start()
        .await;
    for caller in [&web, &batch] {
        eventually(SETUP, "the callers reach payments", || async {
            let (status, head) = fetch(caller.upstream_addr(SERVICE), "/").await?;
            anyhow::ensure!(status == 200, "{status}: {head}");
            Ok(())
        })
        .await;
    }

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (web_calls, web_task) = calls(web.upstream_addr(SERVICE).to_owned(), stop.clone());
    let (batch_calls, batch_task) = calls(batch.upstream_addr(SERVICE).to_owned(), stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = web_calls.lock().unwrap().clone();
    assert!(
        before.len() > 20 && before.iter().all(|(_, ok)| *ok),
        "web calls payments before: {} calls, {} failed",
        before.len(),
        before.iter().filter(|(_, ok)| !ok).count()
    );
    let inbound_revoked = "direction=\"inbound\",reason=\"revoked\"";
    let closed = "direction=\"inbound\",stage=\"connection\"";
    assert_eq!(
        counter(&pay, "isdp_revoked_peer_refusals_total", closed).await,
        0.0
    );

    let revoked_at = Instant::now();
    let out = cp.ctl_ok(&["token", "revoke", &web_token]).await;
    assert!(out.contains("sidecars refuse the certificates"), "{out}");
    // Web's calls fail from some moment on, and none succeeds after it.
    let first_refused = || {
        web_calls
            .lock()
            .unwrap()
            .iter()
            .find(|(t, ok)| *t > revoked_at && !ok)
            .map(|(t, _)| *t)
    };
    eventually(Duration::from_secs(10), "payments refuses web", || async {
        anyhow::ensure!(
            first_refused().is_some(),
            "no failed call since the revocation"
        );
        Ok(())
    })
    .await;
    let first_refused = first_refused().unwrap();
    let cut = first_refused.duration_since(revoked_at);
    eprintln!("web refused {cut:?} after the revocation began");
    assert!(cut < Duration::from_secs(5), "took {cut:?}");
    holds_for(
        Duration::from_secs(2),
        "payments keeps refusing web",
        || async {
            if let Ok((200, head)) = fetch(web.upstream_addr(SERVICE), "/").await {
                anyhow::bail!("web got through: {head}");
            }
            Ok(())
        },
    )
    .await;
    stop_tx.send_replace(true);
    web_task.await.unwrap();
    batch_task.await.unwrap();
    let web_log = web_calls.lock().unwrap().clone();
    let late_ok = web_log
        .iter()
        .filter(|(t, ok)| *t > first_refused && *ok)
        .count();
    assert_eq!(late_ok, 0, "web got through after it was first refused");

    // The open connection was closed, and the new handshakes refused.
    assert!(counter(&pay, "isdp_revoked_peer_refusals_total", closed).await >= 1.0);
    assert!(
        counter(&pay, "isdp_tls_handshake_failures_total", inbound_revoked).await >= 1.0,
        "new handshakes are refused as revoked"
    );
    let batch_log = batch_calls.lock().unwrap().clone();
    let batch_failed = batch_log.iter().filter(|(_, ok)| !ok).count();
    assert!(
        batch_log.len() > 50,
        "batch kept calling: {}",
        batch_log.len()
    );
    assert_eq!(batch_failed, 0, "batch failed {batch_failed} calls");
    let pay_config = pay.config_json().await.unwrap();
    assert_eq!(
        pay_config["xds"]["revoked_grants"],
        serde_json::json!([web_token])
    );

    // Web learns it is cut off from the control plane's refusal.
    eventually(Duration::from_secs(10), "web is not ready", || async {
        let r = isdp_tests::http::get(web.admin_addr(), "/ready").await?;
        anyhow::ensure!(r.status == 503, "{}: {}", r.status, r.body);
        anyhow::ensure!(r.body.contains("revoked"), "{}", r.body);
        Ok(())
    })
    .await;
}

/// A revocation is stored, not just held in memory: after a control-plane
/// restart a sidecar that starts afresh learns it and refuses the
/// certificate. It is forgotten once the longest certificate lifetime
/// (plus a margin) has passed, when every such certificate has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_survives_a_restart_and_is_pruned_after_the_longest_lifetime() {
    const MAX_LIFETIME: Duration = Duration::from_secs(15);
    /// `tokens::revoked::MARGIN` on the control plane.
    const MARGIN: Duration = Duration::from_secs(10);
    let mut cp = ControlPlane::start(ControlPlaneOpts {
        extra_args: vec![
            "--max-cert-lifetime".into(),
            "15s".into(),
            "--cert-lifetime".into(),
            "15s".into(),
        ],
        ..Default::default()
    })
    .await;
    let (_echo, pay) = payments(&cp).await;
    pay.wait_ready(SETUP).await;
    let ca = std::fs::read_to_string(cp.ca_file()).unwrap();
    let (token, secret) = join_token(&cp, "web").await;
    let (chain, key) = mesh_identity_under(&cp, "web", 15, &secret).await;
    let client = || Some((chain.clone(), key.clone_key()));
    let ok = tls::attempt(pay.inbound_addr(), &ca, SERVICE, client())
        .await
        .expect("accepted before the revocation");
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&ok)
    );

    let revoked_at = Instant::now();
    cp.ctl_ok(&["token", "revoke", &token]).await;
    eventually(
        Duration::from_secs(5),
        "pay refuses the certificate",
        || async {
            let refused = tls::attempt(pay.inbound_addr(), &ca, SERVICE, client()).await;
            anyhow::ensure!(refused.is_err(), "accepted after the revocation");
            Ok(())
        },
    )
    .await;

    // Restarted, the control plane still sends the revocation: a sidecar
    // that never heard of it before refuses the certificate too.
    cp.restart().await;
    let (_echo1, pay1) = payments_instance(&cp, "pay-1").await;
    pay1.wait_ready(SETUP).await;
    let config = pay1.config_json().await.unwrap();
    assert_eq!(config["xds"]["revoked_grants"], serde_json::json!([token]));
    assert!(
        revoked_at.elapsed() < MAX_LIFETIME,
        "the certificate must still be valid for this to mean anything"
    );
    let refused = tls::attempt(pay1.inbound_addr(), &ca, SERVICE, client()).await;
    assert!(refused.is_err(), "pay-1 accepted a revoked certificate");
    assert!(
        counter(
            &pay1,
            "isdp_tls_handshake_failures_total",
            "direction=\"inbound\",reason=\"revoked\""
        )
        .await
            >= 1.0
    );
    let admin_signed = mesh_identity_under(&cp, "web", 15, cp.admin_token()).await;
    let answer = tls::attempt(pay1.inbound_addr(), &ca, SERVICE, Some(admin_signed))
        .await
        .expect("another token's certificate is accepted");
    assert!(answer.starts_with(b"HTTP/1.1 200"));

    // Listed while a certificate issued under the token could live...
    let listed = || async {
        let config = pay1.config_json().await?;
        let ids = config["xds"]["revoked_grants"].clone();
        Ok::<_, anyhow::Error>(
            ids.as_array()
                .is_some_and(|a| a.contains(&token.clone().into())),
        )
    };
    tokio::time::sleep((revoked_at + MAX_LIFETIME).saturating_duration_since(Instant::now())).await;
    assert!(
        listed().await.unwrap(),
        "pruned before every certificate expired"
    );
    // ...then pruned, here and on the sidecars.
    let pruned = eventually(
        MARGIN + Duration::from_secs(15),
        "the revocation is forgotten",
        || async {
            anyhow::ensure!(!listed().await?, "still listed");
            Ok(())
        },
    )
    .await;
    let after = revoked_at.elapsed();
    eprintln!("pruned {after:?} after the revocation (waited {pruned:?})");
    assert!(after >= MAX_LIFETIME + MARGIN, "{after:?}");
    let config = pay.config_json().await.unwrap();
    assert_eq!(config["xds"]["revoked_grants"], serde_json::json!([]));
}
