//! Issuance, renewal timing and retries on tokio's paused clock, against a
//! fake signer backed by an rcgen CA.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

use tokio::time::Instant;

use super::*;
use crate::tls::test_pki::{Leaf, TD, TestCa};

const LIFETIME: Duration = Duration::from_secs(300);

struct FakeSigner {
    ca: TestCa,
    /// Sign for this service's SPIFFE ID instead of the requested one.
    impersonate: Option<String>,
    fail: AtomicBool,
    /// Refuse as the control plane does a revoked token's certificate.
    refuse: AtomicBool,
    /// Issue nothing past this, as the control plane caps certificates at
    /// their token's expiry.
    until: Mutex<Option<SystemTime>>,
    calls: Mutex<Vec<Instant>>,
}

impl FakeSigner {
    fn new() -> Arc<Self> {
        Arc::new(FakeSigner {
            ca: TestCa::new("mesh"),
            impersonate: None,
            fail: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            until: Mutex::default(),
            calls: Mutex::default(),
        })
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

impl Signer for FakeSigner {
    fn sign(
        &self,
        request: SignRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SignResponse, tonic::Status>> + Send + '_>> {
        self.calls.lock().unwrap().push(Instant::now());
        let result = if self.fail.load(Ordering::SeqCst) {
            Err(tonic::Status::unavailable("control plane down"))
        } else if self.refuse.load(Ordering::SeqCst) {
            Err(tonic::Status::unauthenticated(
                "the client certificate was issued under token 0123456789abcdef, which has been revoked",
            ))
        } else {
            let service = self.impersonate.as_ref().unwrap_or(&request.service);
            let leaf = Leaf::service(TD, service);
            let cert = self.ca.sign_csr(&request.csr_der, &leaf);
            let not_after = SystemTime::now() + LIFETIME;
            let not_after = self
                .until
                .lock()
                .unwrap()
                .map_or(not_after, |u| u.min(not_after));
            Ok(SignResponse {
                chain_der: vec![cert.to_vec()],
                spiffe_id: format!("spiffe://{TD}/svc/{service}"),
                not_after_unix_ms: not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64,
                trust_bundle_der: vec![self.ca.root.to_vec()],
            })
        };
        Box::pin(std::future::ready(result))
    }
}

fn start(
    signer: Arc<FakeSigner>,
    services: &[&str],
) -> (watch::Receiver<Arc<Identities>>, watch::Sender<bool>) {
    let (stop, shutdown) = watch::channel(false);
    let settings = IdentitySettings {
        services: services.iter().map(|s| s.to_string()).collect(),
        primary: services.first().map(|s| s.to_string()),
        lifetime: None,
    };
    let (rx, _task) = spawn(settings, signer, shutdown);
    (rx, stop)
}

#[tokio::test(start_paused = true)]
async fn certifies_every_service_and_renews_at_two_thirds() {
    let signer = FakeSigner::new();
    let (mut ids, _stop) = start(signer.clone(), &["web", "admin"]);
    let got = ids
        .wait_for(|i| i.by_service.len() == 2)
        .await
        .unwrap()
        .clone();
    let web = got.primary().expect("primary");
    assert_eq!(web.spiffe_id, "spiffe://mesh.test/svc/web");
    assert_eq!(web.trust_domain, TD);
    assert_eq!(got.trust_bundle, vec![signer.ca.root.clone()]);
    assert!(got.ready());
    let first = signer.calls()[0];

    while signer.calls().len() < 4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for renewal in &signer.calls()[2..] {
        let after = renewal.duration_since(first).as_secs_f64();
        // 2/3 of 300 s, ±10 %.
        assert!((179.0..=221.0).contains(&after), "renewed after {after} s");
    }
    let renewed = ids.borrow().primary().unwrap().clone();
    assert!(
        !Arc::ptr_eq(&renewed.key, &web.key),
        "new key and certificate"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_retry_and_keep_the_certificate_until_it_expires() {
    let signer = FakeSigner::new();
    let (mut ids, _stop) = start(signer.clone(), &["web"]);
    ids.wait_for(|i| i.ready()).await.unwrap();
    let issued = Instant::now();
    signer.fail.store(true, Ordering::SeqCst);

    tokio::time::sleep_until(issued + Duration::from_secs(290)).await;
    assert!(ids.borrow().ready(), "the old certificate still serves");
    let retries = signer.calls().len() - 2;
    assert!(retries >= 10, "retried with backoff: {retries} retries");

    tokio::time::sleep_until(issued + Duration::from_secs(301)).await;
    assert!(!ids.borrow().ready(), "withdrawn once expired");

    signer.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(ids.borrow().ready(), "back once the signer recovers");
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_service_is_refused() {
    let signer = Arc::new(FakeSigner {
        impersonate: Some("payments".into()),
        ..Arc::into_inner(FakeSigner::new()).unwrap()
    });
    let (ids, _stop) = start(signer.clone(), &["web"]);
    while signer.calls().len() < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!ids.borrow().ready());
}

/// A refusal (the token was revoked) is retried, but slowly: a minute at
/// most between attempts rather than the 5 s of an unreachable control
/// plane, and it is published for `/ready`. A certificate clears it.
#[tokio::test(start_paused = true)]
async fn refusals_are_retried_slowly_and_reported() {
    let signer = FakeSigner::new();
    signer.refuse.store(true, Ordering::SeqCst);
    let (mut ids, _stop) = start(signer.clone(), &["web"]);
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        ids.wait_for(|i| i.refused.contains_key("web")),
    )
    .await
    .expect("the refusal is published")
    .unwrap()
    .clone();
    assert!(
        refused.refused["web"].contains("revoked"),
        "{:?}",
        refused.refused
    );
    assert!(!refused.ready());

    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(600)).await;
    let calls = signer.calls();
    // Full jitter under a ceiling growing from 100 ms to 60 s: about 30
    // calls in ten minutes (the 5 s ceiling of other failures: about 240).
    assert!(
        (5..=60).contains(&calls.len()),
        "{} calls in ten minutes",
        calls.len()
    );
    let late: Vec<_> = calls
        .iter()
        .filter(|c| **c >= start + Duration::from_secs(300))
        .collect();
    for pair in late.windows(2) {
        assert!(pair[1].duration_since(*pair[0]) <= renew::REFUSED_CAP);
    }

    signer.refuse.store(false, Ordering::SeqCst);
    tokio::time::sleep(renew::REFUSED_CAP + Duration::from_secs(1)).await;
    let ids = ids.borrow();
    assert!(ids.ready(), "certified once the control plane agrees");
    assert!(ids.refused.is_empty(), "{:?}", ids.refused);
}

/// A certificate capped at its token's expiry is renewed once (which
/// brings no later end), then held to its end rather than renewed ever
/// more often as the end nears; withdrawn then, the next refusal (the
/// token expired) is reported.
#[tokio::test(start_paused = true)]
async fn a_certificate_capped_at_its_tokens_expiry_is_held_to_its_end() {
    const CAP: Duration = Duration::from_secs(90);
    let signer = FakeSigner::new();
    *signer.until.lock().unwrap() = Some(SystemTime::now() + CAP);
    let (mut ids, _stop) = start(signer.clone(), &["web"]);
    ids.wait_for(|i| i.ready()).await.unwrap();
    // The first renewal, at 2/3 of the capped life, ends no later.
    while signer.calls().len() < 2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let renewed = *signer.calls().last().unwrap();
    let first = signer.calls()[0];
    let after = renewed.duration_since(first).as_secs_f64();
    assert!((53.0..=67.0).contains(&after), "renewed after {after} s");
    // (The paused clock stops tokio's time, not the wall clock the
    // remaining life is read from: the certificate still has ~90 s.)
    tokio::time::sleep_until(renewed + CAP - Duration::from_secs(5)).await;
    assert_eq!(signer.calls().len(), 2, "not renewed again before its end");
    assert!(ids.borrow().ready(), "the certificate serves to its end");
    signer.refuse.store(true, Ordering::SeqCst);
    tokio::time::sleep_until(renewed + CAP + Duration::from_secs(1)).await;
    let ids = ids.borrow();
    assert!(!ids.ready(), "withdrawn at its end");
    assert!(ids.refused.contains_key("web"), "{:?}", ids.refused);
}
