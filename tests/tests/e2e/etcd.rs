//! Control-plane replicas on a real 3-member etcd cluster: a change made
//! through one replica reaches sidecars on the other; a killed replica's
//! sidecars move to the other without a failed request or a lost
//! registration; the mesh rides out the loss of an etcd member, and of all
//! of etcd (the data plane keeps serving, writes fail with UNAVAILABLE,
//! and everything converges once etcd is back); a token revoked through
//! one replica is refused by the other's sidecars within its next re-read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use isdp_control_plane::store::{
    Store,
    etcd::{EtcdOptions, EtcdStore},
};
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, EtcdCluster, Sidecar, SidecarToml, eventually,
    find_by_id, holds_for, status_of,
};

const SERVICE: &str = "payments";
const PROBE: Duration = Duration::from_millis(200);

/// The key prefix the replicas of these tests use.
fn prefix() -> String {
    format!("/isdp-test-{}/", std::process::id())
}

/// Two control-plane replicas over one etcd cluster, under a key prefix of
/// their own.
async fn replicas(etcd: &EtcdCluster, opts: ControlPlaneOpts) -> (ControlPlane, ControlPlane) {
    let prefix = prefix();
    let mut opts = opts;
    opts.extra_args.extend(etcd.control_plane_args(&prefix));
    opts.extra_args
        .extend(["--leader-lease".into(), "2s".into()]);
    let a = ControlPlane::start(opts.clone()).await;
    let b = ControlPlane::start(opts).await;
    (a, b)
}

/// Waits until `sidecar` holds endpoint `id` for [`SERVICE`], healthy (or
/// of unknown health: operator registrations without a check); returns how
/// long that took.
async fn until_endpoint(sidecar: &Sidecar, id: &str, timeout: Duration) -> Duration {
    eventually(timeout, &format!("{id} at the sidecar"), || async {
        let eps = sidecar.endpoints(SERVICE).await?;
        let status = status_of(&eps, id)?;
        anyhow::ensure!(status != "unhealthy", "{id} is {status}");
        Ok(())
    })
    .await
}

/// Requests through `web`'s listener for [`SERVICE`] in a loop, counting
/// answers that are not 200, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(addr: &str) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let addr = addr.to_owned();
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match isdp_tests::http::get(&addr, "/").await {
                    Ok(r) if r.status == 200 => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{} {}", r.status, r.body));
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{e:#}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            errors
        });
        Traffic {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Stops and asserts that every request succeeded; returns how many.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.expect("traffic task");
        let (ok, failed) = (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        assert_eq!(
            failed,
            0,
            "{failed} of {} requests failed: {errors:?}",
            ok + failed
        );
        ok
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_through_one_replica_reaches_sidecars_on_the_other_within_1s() {
    let etcd = EtcdCluster::start(3).await;
    let (a, b) = replicas(&etcd, ControlPlaneOpts::default()).await;
    let e1 = EchoHttp::start("e1").await;
    let e2 = EchoHttp::start("e2").await;
    let first = a.register(SERVICE, "127.0.0.1", e1.port(), &[]).await;
    let web = SidecarToml::new("web", &b.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .start()
        .await;
    until_endpoint(&web, &first, Duration::from_secs(10)).await;

    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let start = Instant::now();
        let id = a.register(SERVICE, "127.0.0.1", e2.port(), &[]).await;
        until_endpoint(&web, &id, Duration::from_secs(5)).await;
        let took = start.elapsed();
        eprintln!("registered through A -> at B's sidecar after {took:?}");
        worst = worst.max(took);
        // And removed through B, gone through A's view.
        b.ctl_ok(&["deregister", &id]).await;
        eventually(
            Duration::from_secs(5),
            "deregistration seen by A",
            || async {
                let list = a.instances(SERVICE).await?;
                anyhow::ensure!(find_by_id(&list, &id).is_none(), "{list:?}");
                Ok(())
            },
        )
        .await;
    }
    assert!(
        worst <= Duration::from_secs(1),
        "slowest propagation {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_sidecars_move_to_the_other_without_failed_requests() {
    let etcd = EtcdCluster::start(3).await;
    // A short session timeout: the killed replica's leases expire within
    // the test, and must take nothing with them.
    let (mut a, b) = replicas(
        &etcd,
        ControlPlaneOpts {
            session_grace: Some(Duration::from_secs(1)),
            session_timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        },
    )
    .await;
    let (ua, ub) = (a.grpc_url(), b.grpc_url());
    let p1_echo = EchoHttp::start("p1").await;
    let p2_echo = EchoHttp::start("p2").await;
    let p1 = SidecarToml::new("p1", &ua)
        .control_planes(&[ua.clone(), ub.clone()])
        .service(SERVICE, p1_echo.port(), PROBE)
        .start()
        .await;
    let _p2 = SidecarToml::new("p2", &ub)
        .control_planes(&[ub.clone(), ua.clone()])
        .service(SERVICE, p2_echo.port(), PROBE)
        .start()
        .await;
    let web = SidecarToml::new("web", &ua)
        .control_planes(&[ua.clone(), ub.clone()])
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .start()
        .await;
    let ids = [format!("p1.{SERVICE}"), format!("p2.{SERVICE}")];
    for id in &ids {
        eventually(
            Duration::from_secs(10),
            "healthy at the sidecar",
            || async {
                let eps = web.endpoints(SERVICE).await?;
                anyhow::ensure!(status_of(&eps, id)? == "healthy");
                Ok(())
            },
        )
        .await;
    }

    let traffic = Traffic::start(web.upstream_addr(SERVICE));
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill9().await;
    let killed = Instant::now();
    // Both sidecars that were on A reconnect to B: web's xDS stream, p1's
    // session.
    for (who, sidecar, view) in [("web", &web, "control_plane"), ("p1", &p1, "session")] {
        eventually(Duration::from_secs(10), &format!("{who} on B"), || async {
            let c = sidecar.config_json().await?;
            anyhow::ensure!(
                c[view]["connected"] == true && c[view]["url"] == ub.as_str(),
                "{}",
                c[view]
            );
            Ok(())
        })
        .await;
    }
    eprintln!("sidecars on B {:?} after the kill", killed.elapsed());
    // Past A's leases' expiry (3 s) and the grace period (1 s), both
    // instances stay registered and healthy, as B and the sidecar see them.
    holds_for(
        Duration::from_secs(4),
        "both instances healthy on B",
        || async {
            let list = b.instances(SERVICE).await?;
            for id in &ids {
                anyhow::ensure!(status_of(&list, id)? == "healthy", "{list:?}");
            }
            let eps = web.endpoints(SERVICE).await?;
            for id in &ids {
                anyhow::ensure!(status_of(&eps, id)? == "healthy", "{eps:?}");
            }
            Ok(())
        },
    )
    .await;
    let ok = traffic.finish().await;
    eprintln!("{ok} requests, none failed");
    assert!(ok > 100, "only {ok} requests got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_rides_out_a_lost_etcd_member_and_a_total_etcd_outage() {
    let mut etcd = EtcdCluster::start(3).await;
    let (a, b) = replicas(&etcd, ControlPlaneOpts::default()).await;
    let p1_echo = EchoHttp::start("p1").await;
    let extra = EchoHttp::start("extra").await;
    let _p1 = SidecarToml::new("p1", &a.grpc_url())
        .service(SERVICE, p1_echo.port(), PROBE)
        .start()
        .await;
    let web = SidecarToml::new("web", &b.grpc_url())
        .upstream_on_port0(SERVICE, "http", "round_robin")
        .start()
        .await;
    until_endpoint(&web, &format!("p1.{SERVICE}"), Duration::from_secs(10)).await;
    let traffic = Traffic::start(web.upstream_addr(SERVICE));

    // The raft leader down: writes (after the election, inside their time
    // budget) and propagation go on, without a failure.
    let leader = etcd.leader().await;
    etcd.kill9(leader).await;
    for port in ["1", "2", "3"] {
        a.ctl_ok(&[
            "register",
            "--service",
            "other",
            "--address",
            "127.0.0.1",
            "--port",
            port,
        ])
        .await;
    }
    let port = extra.port().to_string();
    let out = a
        .ctl_ok(&[
            "register",
            "--service",
            SERVICE,
            "--address",
            "127.0.0.1",
            "--port",
            &port,
        ])
        .await;
    let extra_id = out.trim().to_owned();
    until_endpoint(&web, &extra_id, Duration::from_secs(2)).await;

    // All of etcd down: the data plane keeps serving, reads answer from the
    // replicas' views, writes fail fast with UNAVAILABLE naming etcd.
    etcd.stop_all().await;
    let start = Instant::now();
    let out = b
        .ctl(&[
            "register",
            "--service",
            SERVICE,
            "--address",
            "127.0.0.1",
            "--port",
            "2",
        ])
        .await;
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a write succeeded without etcd");
    assert!(
        stderr.contains("Unavailable") && stderr.contains("etcd"),
        "{stderr}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the write failed only after {took:?}"
    );
    let list = a.instances(SERVICE).await.expect("reads work without etcd");
    assert!(find_by_id(&list, &extra_id).is_some(), "{list:?}");
    holds_for(
        Duration::from_secs(2),
        "web keeps both endpoints",
        || async {
            let eps = web.endpoints(SERVICE).await?;
            anyhow::ensure!(eps.len() == 2, "{eps:?}");
            Ok(())
        },
    )
    .await;

    // etcd back: writes succeed again and both replicas converge.
    etcd.start_all().await;
    let start = Instant::now();
    let late = EchoHttp::start("late").await;
    let port = late.port().to_string();
    let late_id = "late-1";
    eventually(
        Duration::from_secs(15),
        "a write after etcd returned",
        || async {
            let out = b
                .ctl(&[
                    "register",
                    "--service",
                    SERVICE,
                    "--address",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--id",
                    late_id,
                ])
                .await;
            anyhow::ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        },
    )
    .await;
    eprintln!(
        "writes work again {:?} after etcd restarted",
        start.elapsed()
    );
    until_endpoint(&web, late_id, Duration::from_secs(5)).await;
    eventually(
        Duration::from_secs(5),
        "A sees the write made through B",
        || async {
            let list = a.instances(SERVICE).await?;
            anyhow::ensure!(find_by_id(&list, late_id).is_some(), "{list:?}");
            Ok(())
        },
    )
    .await;
    let ok = traffic.finish().await;
    eprintln!("{ok} requests through the outages, none failed");
}

/// Which replica's gRPC address the health-check leader key names.
async fn health_leader(etcd: &EtcdCluster) -> anyhow::Result<String> {
    let store = EtcdStore::connect(&EtcdOptions {
        endpoints: etcd.endpoints(),
        ..Default::default()
    })
    .await?;
    let key = format!("{}leader/health-checks", prefix());
    let (kvs, _) = store.range(&key).await?;
    let kv = kvs
        .iter()
        .find(|kv| kv.key == key)
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let value = std::str::from_utf8(&kv.value)?;
    Ok(value.split(' ').next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_run_on_one_elected_replica_and_move_when_it_dies() {
    let etcd = EtcdCluster::start(3).await;
    let (mut a, mut b) = replicas(&etcd, ControlPlaneOpts::default()).await;
    let echo = EchoHttp::start("checked").await;
    let check = echo.health_url();
    let id = a
        .register(
            SERVICE,
            "127.0.0.1",
            echo.port(),
            &["--check", &check, "--interval", "200ms"],
        )
        .await;
    eventually(Duration::from_secs(5), "healthy", || async {
        anyhow::ensure!(status_of(&b.instances(SERVICE).await?, &id)? == "healthy");
        Ok(())
    })
    .await;
    let leader = health_leader(&etcd).await.expect("a leader is elected");
    let (dead, survivor) = if leader == a.grpc_addr() {
        (&mut a, &mut b)
    } else {
        assert_eq!(leader, b.grpc_addr(), "the leader is one of the replicas");
        (&mut b, &mut a)
    };
    let survivor_addr = survivor.grpc_addr().to_owned();

    // The leader dies: its lease (2 s) expires, the other replica takes
    // over and its checker sees the failure.
    dead.kill9().await;
    let killed = Instant::now();
    echo.fail_health().await;
    eventually(
        Duration::from_secs(8),
        "unhealthy via the new leader",
        || async {
            anyhow::ensure!(status_of(&survivor.instances(SERVICE).await?, &id)? == "unhealthy");
            Ok(())
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!("leader killed -> check failure recorded by the other replica after {took:?}");
    assert!(
        took <= Duration::from_secs(5),
        "took over only after {took:?}"
    );
    assert_eq!(health_leader(&etcd).await.unwrap(), survivor_addr);
}

/// On etcd the store's revision also moves with writes nobody waits for
/// (the election key's renewals, other meshes under other prefixes): a
/// client-only sidecar's empty session still opens on either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_only_sidecar_becomes_ready_on_either_replica_after_writes_elsewhere() {
    let etcd = EtcdCluster::start(1).await;
    let (a, b) = replicas(&etcd, ControlPlaneOpts::default()).await;
    a.ctl_ok(&["authz", "allow", "--to", SERVICE, "--from", "web"])
        .await;
    for (n, cp) in [&a, &b].into_iter().enumerate() {
        let sidecar = SidecarToml::new(&format!("web-{n}"), &cp.grpc_url())
            .raw("identity = \"web\"")
            .upstream(SERVICE)
            .start()
            .await;
        crate::sessions::client_only_ready(&sidecar, "rule written on replica a").await;
    }
}

/// A token revoked through one replica: the other learns the tombstone on
/// its next re-read of the tokens (every second) and its sidecars refuse
/// the certificates issued under the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_reaches_sidecars_on_the_other() {
    use super::mtls::{mesh_identity_under, payments_instance, tls};
    let etcd = EtcdCluster::start(3).await;
    let (a, b) = replicas(&etcd, ControlPlaneOpts::default()).await;
    let (_echo, pay) = payments_instance(&b, "pay-0").await;
    pay.wait_ready(Duration::from_secs(20)).await;
    let created = a
        .create_token(&["--role", "join", "--service", "web"])
        .await;
    let (id, secret) = (created.id.as_str(), created.secret.as_str());
    let (chain, key) = mesh_identity_under(&a, "web", 300, secret).await;
    let client = || Some((chain.clone(), key.clone_key()));
    let ca = std::fs::read_to_string(b.ca_file()).unwrap();
    let ok = tls::attempt(pay.inbound_addr(), &ca, SERVICE, client())
        .await
        .expect("accepted before the revocation");
    assert!(ok.starts_with(b"HTTP/1.1 200"));

    let start = Instant::now();
    a.ctl_ok(&["token", "revoke", id]).await;
    eventually(Duration::from_secs(5), "B's sidecar refuses", || async {
        let refused = tls::attempt(pay.inbound_addr(), &ca, SERVICE, client()).await;
        anyhow::ensure!(refused.is_err(), "accepted");
        Ok(())
    })
    .await;
    let took = start.elapsed();
    eprintln!("revoked through A -> refused at B's sidecar after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let config = pay.config_json().await.unwrap();
    assert_eq!(config["xds"]["revoked_grants"], serde_json::json!([id]));
}

/// Load weights across replicas: p1's sidecar holds its session on A, p2's
/// on B; each reports load (p1's requests ten times as costly) to its own
/// replica only. Both replicas push the same weights, from the summaries
/// the session's replica wrote to etcd: a client sidecar on B and one on A
/// see p1 weighed down alike, and `isdpctl instances` says the same
/// through either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reported_to_one_replica_weighs_endpoints_on_the_other() {
    let etcd = EtcdCluster::start(3).await;
    let (a, b) = replicas(
        &etcd,
        ControlPlaneOpts {
            extra_args: vec!["--load-weight-blackout".into(), "1s".into()],
            ..Default::default()
        },
    )
    .await;
    let p1_echo = EchoHttp::start("p1").await;
    let p2_echo = EchoHttp::start("p2").await;
    for (echo, cost) in [(&p1_echo, 0.01), (&p2_echo, 0.001)] {
        let r = isdp_tests::http::post(echo.addr(), &format!("/admin/load?cost={cost}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let _p1 = SidecarToml::new("p1", &a.grpc_url())
        .service(SERVICE, p1_echo.port(), PROBE)
        .start()
        .await;
    let _p2 = SidecarToml::new("p2", &b.grpc_url())
        .service(SERVICE, p2_echo.port(), PROBE)
        .start()
        .await;
    let on_b = SidecarToml::new("web-b", &b.grpc_url())
        .upstream_on_port0(SERVICE, "http", "load_aware")
        .start()
        .await;
    let on_a = SidecarToml::new("web-a", &a.grpc_url())
        .upstream_on_port0(SERVICE, "http", "load_aware")
        .start()
        .await;
    let ids = [format!("p1.{SERVICE}"), format!("p2.{SERVICE}")];
    for web in [&on_a, &on_b] {
        for id in &ids {
            until_endpoint(web, id, Duration::from_secs(10)).await;
        }
    }
    // Traffic through both clients, so both instances serve and report.
    let _load_b = isdp_tests::load::Load::start(on_b.upstream_addr(SERVICE), "/slow?ms=10", 8);
    let _load_a = isdp_tests::load::Load::start(on_a.upstream_addr(SERVICE), "/slow?ms=10", 8);
    let weights = |eps: &[serde_json::Value]| -> anyhow::Result<Vec<(u64, String)>> {
        ids.iter()
            .map(|id| {
                let e =
                    find_by_id(eps, id).ok_or_else(|| anyhow::anyhow!("{id} not in {eps:?}"))?;
                Ok((
                    e["weight"].as_u64().unwrap_or_default(),
                    e["weight_reason"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect()
    };
    let took = eventually(
        Duration::from_secs(30),
        "p1 weighed down alike through A and B",
        || async {
            let at_b = weights(&on_b.endpoints(SERVICE).await?)?;
            let at_a = weights(&on_a.endpoints(SERVICE).await?)?;
            anyhow::ensure!(
                at_b.iter().all(|(_, r)| r.starts_with("load:")),
                "at B: {at_b:?}"
            );
            anyhow::ensure!(at_b[0].0 * 2 < at_b[1].0, "p1 not down at B: {at_b:?}");
            anyhow::ensure!(at_a == at_b, "A pushes {at_a:?}, B {at_b:?}");
            let via_a = a.instances(SERVICE).await?;
            let via_b = b.instances(SERVICE).await?;
            for id in &ids {
                let w = |list: &[serde_json::Value]| {
                    find_by_id(list, id).map(|v| v["load"]["lb_weight"].clone())
                };
                anyhow::ensure!(w(&via_a) == w(&via_b), "{id}: {via_a:?} vs {via_b:?}");
            }
            eprintln!("weights at B's and A's clients: {at_b:?}");
            Ok(())
        },
    )
    .await;
    eprintln!("same weights through both replicas after {took:?}");
}
