//! Input validation at the registry API, through `isdpctl`: bad input is
//! refused with a message naming the field, and changes nothing; garbage on
//! the gRPC port does not take the control plane down.

use std::time::Duration;

use isdp_tests::{ControlPlane, ControlPlaneOpts};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Runs `isdpctl register` with `args` and checks it fails naming `field`.
async fn refused(cp: &ControlPlane, args: &[&str], field: &str) {
    let mut full = vec!["register"];
    full.extend_from_slice(args);
    let out = cp.ctl(&full).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "isdpctl {full:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.to_lowercase().contains(field),
        "isdpctl {full:?}: stderr does not name `{field}`: {stderr}"
    );
    assert!(
        stderr.trim().lines().count() <= 3,
        "errors should be short, got: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_are_refused_and_change_nothing() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    cp.register("valid", "127.0.0.1", 8080, &[]).await;
    let before = cp.services().await;

    let ok = ["--address", "127.0.0.1", "--port", "8080"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = extra.to_vec();
        v.extend_from_slice(&ok);
        v
    };
    refused(&cp, &with(&["--service", "Bad_Name"]), "service").await;
    refused(
        &cp,
        &[
            "--service",
            "valid",
            "--address",
            "127.0.0.1",
            "--port",
            "0",
        ],
        "port",
    )
    .await;
    refused(
        &cp,
        &[
            "--service",
            "valid",
            "--address",
            "127.0.0.1",
            "--port",
            "70000",
        ],
        "port",
    )
    .await;
    refused(
        &cp,
        &[
            "--service",
            "valid",
            "--address",
            "not-an-ip",
            "--port",
            "8080",
        ],
        "address",
    )
    .await;
    let big = format!("big={}", "x".repeat(10 * 1024));
    let mut args = with(&["--service", "valid"]);
    args.extend(["--meta", big.as_str()]);
    refused(&cp, &args, "metadata").await;
    refused(
        &cp,
        &with(&["--service", "valid", "--zone", "Zone_A"]),
        "instance.zone",
    )
    .await;
    refused(
        &cp,
        &with(&["--service", "valid", "--priority", "8"]),
        "instance.priority: must be 0..=7",
    )
    .await;

    assert_eq!(
        cp.services().await,
        before,
        "a refused registration changed the registry"
    );
    let listed = cp.instances("valid").await.expect("instances");
    assert_eq!(listed.len(), 1, "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_an_unknown_id_says_not_found() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let out = cp.ctl(&["deregister", "no-such-id"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success(),
        "deregister of an unknown id succeeded"
    );
    assert!(stderr.contains("not found"), "stderr: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_port_does_not_hurt() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    cp.register("survivor", "127.0.0.1", 8080, &[]).await;

    let payloads: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        // A valid HTTP/2 preface followed by a nonsense frame.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x09\x01\x00\x00\x00\x01garbage",
        &[0u8; 4096],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not really TLS",
    ];
    for payload in payloads {
        let mut s = TcpStream::connect(cp.grpc_addr())
            .await
            .expect("connect gRPC port");
        // The server may close on us mid-write; that is fine.
        let _ = s.write_all(payload).await;
        let _ = s.shutdown().await;
    }
    // Also leave a few connections open and silent.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(TcpStream::connect(cp.grpc_addr()).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let listed = cp
        .instances("survivor")
        .await
        .expect("control plane still answers");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let mut cp = cp;
    assert!(
        cp.process().is_running(),
        "control plane died: {}",
        cp.process().stderr()
    );
    drop(idle);
}
