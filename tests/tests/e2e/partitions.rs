//! Partitions and a bad network, made by the kernel: `web`'s sidecar runs
//! in a network namespace of its own, joined to the test's by a veth pair,
//! and iptables rules inside it drop packets (a blackhole to one port, or
//! random loss on the link). Nothing is refused or reset: the sidecar
//! sees silence, which only its keep-alives and timeouts can notice.
//!
//! The control plane and two `payments` instances (each behind its own
//! sidecar) stay in the test's namespace, bound to the host end of the
//! link so `web` reaches them; the test sends steady load into `web`
//! through the link and counts every request.
//!
//! The last test puts a control-plane replica in the namespace instead,
//! with etcd reached only over the link, and silences that.
//!
//! Each test states what it survives: the data plane keeps serving from
//! cached state while the control plane is out of reach, a silent peer is
//! routed around by per-try timeouts and retries, and a lossy link loses
//! no request; and how long convergence after healing took (printed).
//! Root only: creating the namespace panics otherwise (no skip).

use std::time::{Duration, Instant};

use isdp_tests::load::{Load, Window};
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, EtcdCluster, NetNs, Sidecar, SidecarToml, TcpGate,
    eventually, find_by_id, status_of,
};

const SERVICE: &str = "payments";
const SETUP: Duration = Duration::from_secs(20);
const WORKERS: usize = 4;
const PATH: &str = "/slow?ms=5";
/// What a policy gives the silent-peer case: a try that hears nothing
/// for 300 ms is abandoned and retried on another instance.
const POLICY: &str = "service: payments\n\
    timeouts: { per_try: 300ms, request: 3s }\n\
    retries: { attempts: 2, retry_on: [connect-failure, reset, gateway-error] }\n\
    outlier_detection: { consecutive_gateway_errors: 3, interval: 500ms, base_ejection_time: 2s, max_ejection_percent: 50 }\n";
/// A sidecar cut off from the control plane notices within its
/// keep-alive (10 s, 5 s to answer) and reconnects with backoff (at most
/// 5 s apart) once the link heals: convergence is bounded by this.
const CONVERGE: Duration = Duration::from_secs(30);

struct Mesh {
    // Field order is drop order: processes first, the namespace last.
    web: Sidecar,
    payments: Vec<(EchoHttp, Sidecar)>,
    cp: ControlPlane,
    ns: NetNs,
}

impl Mesh {
    async fn start() -> Self {
        let ns = NetNs::create();
        let cp = ControlPlane::start(ControlPlaneOpts {
            extra_args: vec!["--listen".to_owned(), format!("{}:0", ns.host_ip())],
            ..Default::default()
        })
        .await;
        let mut payments = Vec::new();
        for n in 0..2 {
            payments.push(start_payment(&cp, &ns, n).await);
        }
        let web = SidecarToml::new("web", &cp.grpc_url())
            .bind(ns.ns_ip())
            .upstream_on_port0(SERVICE, "http", "round_robin")
            .start_in(ns.name())
            .await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, POLICY).unwrap();
        cp.ctl_ok(&["policy", "apply", "-f", &path.display().to_string()])
            .await;
        let mesh = Mesh {
            web,
            payments,
            cp,
            ns,
        };
        mesh.wait_healthy(&["pay-0", "pay-1"], SETUP).await;
        eventually(SETUP, "web runs on the policy", || async {
            let config = mesh.web.config_json().await?;
            anyhow::ensure!(
                config["upstreams"][SERVICE]["policy_version"].is_string(),
                "no policy yet: {}",
                config["upstreams"][SERVICE]
            );
            Ok(())
        })
        .await;
        mesh
    }

    /// Waits until `web` holds exactly `ids` as healthy endpoints;
    /// returns how long that took.
    async fn wait_healthy(&self, ids: &[&str], within: Duration) -> Duration {
        let what = format!("web holds {ids:?} healthy");
        eventually(within, &what, || async {
            let eps = self.web.endpoints(SERVICE).await?;
            anyhow::ensure!(eps.len() == ids.len(), "{eps:?}");
            for id in ids {
                let id = format!("{id}.{SERVICE}");
                anyhow::ensure!(status_of(&eps, &id)? == "healthy", "{id}: {eps:?}");
            }
            Ok(())
        })
        .await
    }

    fn load(&self) -> Load {
        Load::start(self.web.upstream_addr(SERVICE), PATH, WORKERS)
    }

    fn inbound_port(&self, n: usize) -> u16 {
        let addr = self.payments[n].1.inbound_addr();
        addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn cp_port(&self) -> u16 {
        self.cp
            .grpc_addr()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// `pay-N`: an echo server on loopback and its sidecar, whose inbound
/// listener is on the link's host end.
async fn start_payment(cp: &ControlPlane, ns: &NetNs, n: usize) -> (EchoHttp, Sidecar) {
    let id = format!("pay-{n}");
    let echo = EchoHttp::start(&id).await;
    let sidecar = SidecarToml::new(&id, &cp.grpc_url())
        .bind(ns.host_ip())
        .service(SERVICE, echo.port(), Duration::from_millis(200))
        .start()
        .await;
    (echo, sidecar)
}

/// `web`'s retries to `payments` so far, every reason.
async fn retries(web: &Sidecar) -> u64 {
    let metrics = isdp_tests::http::get(web.admin_addr(), "/metrics")
        .await
        .unwrap()
        .body;
    let prefix = format!("isdp_retries_total{{service=\"{SERVICE}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn failures(w: &Window) -> String {
    let failed: Vec<_> =
        w.0.iter()
            .filter(|s| !(200..300).contains(&s.status))
            .take(10)
            .map(|s| format!("{} after {:?}", s.status, s.latency))
            .collect();
    format!("{} of {} failed: {failed:?}", w.failed(), w.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cut_off_from_the_control_plane_serves_from_cache_and_catches_up() {
    let mut mesh = Mesh::start().await;
    let load = mesh.load();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let cut_at = tokio::time::Instant::now();
    let cut = mesh.ns.blackhole(mesh.cp_port());
    // Past the keep-alive deadline, so the session is seen to be dead.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A write acknowledged while `web` is cut off: a third instance,
    // listed by the control plane at once.
    mesh.payments
        .push(start_payment(&mesh.cp, &mesh.ns, 2).await);
    eventually(SETUP, "pay-2 registered and healthy", || async {
        let list = mesh.cp.instances(SERVICE).await?;
        let id = format!("pay-2.{SERVICE}");
        anyhow::ensure!(status_of(&list, &id)? == "healthy", "{list:?}");
        Ok(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(14)).await;
    // `web` still serves, on what it last heard: two instances.
    let eps = mesh.web.endpoints(SERVICE).await.unwrap();
    assert_eq!(eps.len(), 2, "web cannot have heard of pay-2: {eps:?}");
    let ready = isdp_tests::http::get(mesh.web.admin_addr(), "/ready")
        .await
        .unwrap();
    println!(
        "cut off for {:?}: /ready {} {}",
        cut_at.elapsed(),
        ready.status,
        ready.body.trim()
    );

    let healed_at = Instant::now();
    cut.heal();
    let caught_up = mesh
        .wait_healthy(&["pay-0", "pay-1", "pay-2"], CONVERGE)
        .await;
    let healed = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let partitioned = load.window(cut_at, healed);
    let after = load.window(healed, tokio::time::Instant::now());
    println!(
        "partition {:?}: {} requests, {} failed; web caught up {caught_up:?} after healing \
         ({:?} since); after: {} requests, pay-2 share {:.1} %",
        healed - cut_at,
        partitioned.len(),
        partitioned.failed(),
        healed_at.elapsed(),
        after.len(),
        100.0 * after.share("pay-2"),
    );
    assert!(
        partitioned.len() > 100,
        "load kept flowing: {}",
        partitioned.len()
    );
    assert_eq!(partitioned.failed(), 0, "{}", failures(&partitioned));
    assert_eq!(after.failed(), 0, "{}", failures(&after));
    assert!(
        after.share("pay-2") > 0.1,
        "pay-2 gets traffic once web caught up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cut_off_from_one_peer_routes_around_it_and_back() {
    let mesh = Mesh::start().await;
    let load = mesh.load();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let cut_at = tokio::time::Instant::now();
    let cut = mesh.ns.blackhole(mesh.inbound_port(0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let retries_at_3s = retries(&mesh.web).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let retried = retries(&mesh.web).await - retries_at_3s;
    let healed_at = tokio::time::Instant::now();
    cut.heal();
    // pay-0 was ejected (its tries timed out); it is tried again after
    // its ejection and serves once its connection works again.
    let back = eventually(CONVERGE, "pay-0 serves again", || async {
        let now = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let w = load.window(now, tokio::time::Instant::now());
        anyhow::ensure!(
            w.share("pay-0") > 0.2,
            "pay-0 share {:.2}",
            w.share("pay-0")
        );
        Ok(())
    })
    .await;

    let during = load.window(cut_at, healed_at);
    let settled = load.window(cut_at + Duration::from_secs(3), healed_at);
    let all = load.window(cut_at - Duration::from_secs(1), tokio::time::Instant::now());
    println!(
        "peer cut for {:?}: {} requests, {} failed, p50 {:?} p99 {:?}; from 3 s on {} \
         requests, {retried} retries; pay-0 serving again {back:?} after healing",
        healed_at - cut_at,
        during.len(),
        during.failed(),
        during.quantile(0.5),
        during.quantile(0.99),
        settled.len(),
    );
    // A request to the silent peer is retried on the other instance (its
    // try times out at 300 ms): none fails.
    assert_eq!(all.failed(), 0, "{}", failures(&all));
    // Routed around, not retried every time: once ejected, the silent
    // peer costs a retry only when its ejection ends and it is tried again.
    assert!(
        (retried as f64) < 0.1 * settled.len() as f64,
        "{retried} retries for {} requests from 3 s after the cut",
        settled.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_link_loses_no_request() {
    let mesh = Mesh::start().await;
    let load = mesh.load();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lossy_at = tokio::time::Instant::now();
    let loss = mesh.ns.loss(0.02);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let healed_at = tokio::time::Instant::now();
    loss.heal();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = load.window(lossy_at - Duration::from_secs(2), lossy_at);
    let lossy = load.window(lossy_at, healed_at);
    let after = load.window(healed_at, tokio::time::Instant::now());
    println!(
        "2 % loss for {:?}: {} requests, {} failed, p50 {:?} p99 {:?} (before: p50 {:?} p99 {:?})",
        healed_at - lossy_at,
        lossy.len(),
        lossy.failed(),
        lossy.quantile(0.5),
        lossy.quantile(0.99),
        before.quantile(0.5),
        before.quantile(0.99),
    );
    assert!(lossy.len() > 100, "load kept flowing: {}", lossy.len());
    assert_eq!(lossy.failed(), 0, "{}", failures(&lossy));
    assert_eq!(after.failed(), 0, "{}", failures(&after));
    // Both instances still serve: loss is not mistaken for a dead peer.
    assert!(after.share("pay-0") > 0.2 && after.share("pay-1") > 0.2);
}

async fn listed(cp: &ControlPlane, id: &str) -> anyhow::Result<bool> {
    Ok(find_by_id(&cp.instances(SERVICE).await?, id).is_some())
}

/// `isdpctl register` of a `ledger` instance `id` through `cp`.
async fn register(cp: &ControlPlane, id: &str) -> std::process::Output {
    cp.ctl(&[
        "register",
        "--service",
        "ledger",
        "--address",
        "127.0.0.1",
        "--port",
        "9000",
        "--id",
        id,
    ])
    .await
}

/// A control-plane replica in the namespace, reaching etcd only over the
/// link (through a forwarder on the host end); replica B and etcd stay
/// outside. The link to etcd goes silent for longer than the session
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_etcd_link_goes_silent_refuses_writes_and_recovers() {
    const SESSION_TIMEOUT: Duration = Duration::from_secs(3);
    let ns = NetNs::create();
    let etcd = EtcdCluster::start(1).await;
    let forwarder = TcpGate::start_on(ns.host_ip().into(), etcd.first_member()).await;
    let prefix = format!("/isdp-netns-{}/", std::process::id());
    let mut a_args = etcd.control_plane_args_through(&prefix, forwarder.addr());
    for flag in ["--listen", "--admin-listen", "--http-listen"] {
        a_args.extend([flag.to_owned(), format!("{}:0", ns.ns_ip())]);
    }
    a_args.extend(["--etcd-unready-after".to_owned(), "2s".to_owned()]);
    let opts = |extra_args: Vec<String>| ControlPlaneOpts {
        session_grace: Some(Duration::from_secs(1)),
        session_timeout: Some(SESSION_TIMEOUT),
        extra_args,
    };
    let b = ControlPlane::start(opts(etcd.control_plane_args(&prefix))).await;
    let a = ControlPlane::start_netns(ns.name(), opts(a_args)).await;

    let echo = EchoHttp::start("silent-1").await;
    let sidecar = SidecarToml::new("silent-1", &a.grpc_url())
        .service(SERVICE, echo.port(), Duration::from_millis(200))
        .start()
        .await;
    let id = format!("silent-1.{SERVICE}");
    eventually(SETUP, "registered through A, seen by B", || async {
        anyhow::ensure!(listed(&b, &id).await?, "not listed");
        Ok(())
    })
    .await;

    let hole = ns.blackhole(forwarder.addr().port());
    // A write through A is refused, naming the store, in bounded time.
    let asked = Instant::now();
    let refused = register(&a, "through-a.ledger").await;
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        !refused.status.success(),
        "a write through A was acknowledged"
    );
    assert!(
        stderr.to_lowercase().contains("unavailable"),
        "refused as UNAVAILABLE: {stderr}"
    );
    assert!(took < Duration::from_secs(15), "refused after {took:?}");
    // B, which reaches etcd, acknowledges writes.
    let acked = register(&b, "through-b.ledger").await;
    assert!(
        acked.status.success(),
        "{}",
        String::from_utf8_lossy(&acked.stderr)
    );
    // A says it is not ready; etcd expires the session's lease.
    eventually(Duration::from_secs(15), "A's /ready is 503", || async {
        let r = isdp_tests::http::get(a.admin_addr(), "/ready").await?;
        anyhow::ensure!(r.status == 503, "/ready {} {}", r.status, r.body);
        Ok(())
    })
    .await;
    eventually(
        SESSION_TIMEOUT * 5,
        "the instance expired in etcd",
        || async {
            anyhow::ensure!(!listed(&b, &id).await?, "still listed");
            Ok(())
        },
    )
    .await;

    let healed = Instant::now();
    hole.heal();
    let back = eventually(CONVERGE, "the instance registered again", || async {
        anyhow::ensure!(listed(&b, &id).await?, "not listed");
        Ok(())
    })
    .await;
    let ready = eventually(CONVERGE, "A's /ready is 200", || async {
        let r = isdp_tests::http::get(a.admin_addr(), "/ready").await?;
        anyhow::ensure!(r.status == 200, "/ready {} {}", r.status, r.body);
        Ok(())
    })
    .await;
    println!(
        "write through A refused after {took:?}: {}; after healing: registered again in \
         {back:?}, A ready in {ready:?} ({:?} since)",
        stderr.trim(),
        healed.elapsed()
    );
    // What B acknowledged is there, read through A; what A refused is not.
    let ledger = a.ctl_ok(&["-o", "json", "instances", "ledger"]).await;
    assert!(ledger.contains("through-b.ledger"), "{ledger}");
    assert!(!ledger.contains("through-a.ledger"), "{ledger}");
    let config = sidecar.config_json().await.expect("/config");
    assert!(
        config["session"]["reconnects"].as_u64().unwrap_or(0) >= 1,
        "the sidecar reopened its session: {config}"
    );
}
