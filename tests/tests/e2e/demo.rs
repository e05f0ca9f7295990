//! The quickstart: `isdp-demo` brings up the documented topology on its
//! fixed ports, the registry and the web sidecar see three healthy payments
//! instances, and `--exit-after` stops every child it started.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use isdp_tests::{binary, dig, eventually, http, isdpctl, status_of};
use tokio::io::{AsyncBufReadExt, BufReader};

const CONTROL_PLANE: &str = "https://127.0.0.1:15010";
const WEB_ADMIN: &str = "127.0.0.1:15000";
const WEB_UPSTREAM: &str = "127.0.0.1:9191";
const WEB_DNS: &str = "127.0.0.1:15053";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_comes_up_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut demo = tokio::process::Command::new(binary("isdp-demo"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--exit-after", "15s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning isdp-demo");
    let mut lines = BufReader::new(demo.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let up = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("reading demo stdout") {
            // The last line of what it prints once up.
            let done = line.contains("Press Ctrl-C to stop");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    if up != Ok(true) {
        let mut err = String::new();
        if let Some(mut e) = demo.stderr.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err),
            )
            .await;
        }
        panic!(
            "isdp-demo did not come up; stdout:\n{}\nstderr:\n{err}\nlogs in {}",
            seen.join("\n"),
            dir.keep().display()
        );
    }
    let printed = seen.join("\n");
    assert!(
        printed.contains("dig @127.0.0.1 -p 15053 payments.service.isdp"),
        "the demo prints no dig line:\n{printed}"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    eventually(
        Duration::from_secs(15),
        "3 healthy payments in isdpctl",
        || async {
            let data = dir.path().join("control-plane");
            let data = data.to_str().expect("UTF-8 temp dir");
            let out = isdpctl(
                CONTROL_PLANE,
                &["--data-dir", data, "-o", "json", "instances", "payments"],
            )
            .await;
            anyhow::ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
            anyhow::ensure!(list.len() == 3, "{list:?}");
            for n in 1..=3 {
                let id = format!("payments-{n}.payments");
                anyhow::ensure!(status_of(&list, &id)? == "healthy", "{id}: {list:?}");
            }
            Ok(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "web sidecar has 3 payments endpoints",
        || async {
            let config = http::get_json(WEB_ADMIN, "/config").await?;
            let eps = config["upstreams"]["payments"]["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            anyhow::ensure!(eps.len() == 3, "{config}");
            Ok(())
        },
    )
    .await;

    // The dig line it prints: the web sidecar's DNS answers the three
    // instances (one address, three ports).
    eventually(Duration::from_secs(15), "3 SRV records", || async {
        let out = dig::run(WEB_DNS, &["payments.service.isdp", "SRV"]).await;
        let srv = dig::answers(&out);
        anyhow::ensure!(
            srv.len() == 3 && srv.iter().all(|(t, _)| t == "SRV"),
            "{out}"
        );
        Ok(())
    })
    .await;

    // The hint the demo prints: under concurrent load the default balancer
    // spreads calls over the instances.
    let spread = spread(300, 20).await;
    eprintln!("300 calls through the web sidecar, by instance: {spread:?}");
    assert!(
        spread.len() >= 2 && spread.values().sum::<usize>() == 300,
        "300 calls, 20 at a time, should reach several instances: {spread:?}"
    );

    let status = tokio::time::timeout(Duration::from_secs(40), demo.wait())
        .await
        .expect("isdp-demo did not stop after --exit-after")
        .expect("waiting for isdp-demo");
    assert!(status.success(), "isdp-demo exited with {status}");
    for port in [
        15010, 15014, 15000, 15001, 15006, 9191, 15101, 15102, 15103, 15201, 15202, 15203, 15301,
        15302, 15303, 18081, 18082, 18083, 15053,
    ] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still in use after the demo stopped: a child outlived it"
        );
    }
}

/// Sends `calls` GETs through the web sidecar's payments listener,
/// `concurrency` at a time, and counts answers per `x-instance-id`.
async fn spread(calls: usize, concurrency: usize) -> BTreeMap<String, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let next = next.clone();
        workers.spawn(async move {
            let mut seen = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let resp = http::get(WEB_UPSTREAM, "/hello").await.expect("a call");
                assert_eq!(resp.status, 200, "{resp:?}");
                seen.push(
                    resp.header("x-instance-id")
                        .expect("x-instance-id")
                        .to_owned(),
                );
            }
            seen
        });
    }
    let mut counts = BTreeMap::new();
    while let Some(seen) = workers.join_next().await {
        for id in seen.expect("a worker") {
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}
