use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;

#[test]
fn parses_targets() {
    let t: Target = "http://127.0.0.1:8080/healthz".parse().unwrap();
    assert!(matches!(&t, Target::Http(u) if u.path() == "/healthz"));
    assert_eq!(t.to_string(), "http://127.0.0.1:8080/healthz");

    let t: Target = "tcp://localhost:5432".parse().unwrap();
    assert_eq!(t, Target::Tcp("localhost:5432".into()));
    assert_eq!(t.to_string(), "tcp://localhost:5432");

    let t: Target = "grpc://127.0.0.1:9000/pkg.Svc".parse().unwrap();
    assert_eq!(
        t,
        Target::Grpc {
            endpoint: "http://127.0.0.1:9000".into(),
            service: "pkg.Svc".into()
        }
    );
    assert_eq!(t.to_string(), "grpc://127.0.0.1:9000/pkg.Svc");

    let t: Target = "grpc://[::1]:9000".parse().unwrap();
    assert_eq!(
        t,
        Target::Grpc {
            endpoint: "http://[::1]:9000".into(),
            service: String::new()
        }
    );
    assert_eq!(t.to_string(), "grpc://[::1]:9000");
}

#[test]
fn rejects_bad_targets() {
    for bad in [
        "",
        "127.0.0.1:80",
        "https://example.com/",
        "udp://1.2.3.4:5",
        "tcp://1.2.3.4",
        "tcp://1.2.3.4:0",
        "tcp://1.2.3.4:99999",
        "tcp://:80",
        "tcp://h:80/path",
        "grpc://host",
        "http://",
        "http:// bad",
    ] {
        let err = bad.parse::<Target>().unwrap_err();
        assert!(matches!(err, ProbeError::InvalidTarget(_)), "{bad}");
        let msg = err.to_string();
        assert!(
            msg.contains("http://HOST:PORT/PATH") && msg.contains("tcp://HOST:PORT"),
            "{msg}"
        );
    }
}

async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A tiny HTTP server: `/ok` answers 200, `/fail` 503, `/slow` never answers.
async fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/fail",
            get(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn tcp_probe() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let t: Target = format!("tcp://{addr}").parse().unwrap();
    probe(&t, Duration::from_secs(1)).await.unwrap();
    drop(listener);
    let err = probe(&t, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("connect {addr}: connection refused")
    );
}

#[tokio::test]
async fn http_probe() {
    let addr = http_server().await;
    let ok: Target = format!("http://{addr}/ok").parse().unwrap();
    probe(&ok, Duration::from_secs(1)).await.unwrap();

    let fail: Target = format!("http://{addr}/fail").parse().unwrap();
    let err = probe(&fail, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.to_string(), "http status 503");

    let slow: Target = format!("http://{addr}/slow").parse().unwrap();
    let err = probe(&slow, Duration::from_millis(200)).await.unwrap_err();
    assert_eq!(err.to_string(), "timed out after 200ms");

    let closed = closed_port().await;
    let t: Target = format!("http://{closed}/healthz").parse().unwrap();
    let err = probe(&t, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("connect {closed}: connection refused")
    );
}

#[tokio::test]
async fn grpc_probe() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("up", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("down", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let up: Target = format!("grpc://{addr}/up").parse().unwrap();
    probe(&up, Duration::from_secs(2)).await.unwrap();
    let down: Target = format!("grpc://{addr}/down").parse().unwrap();
    let err = probe(&down, Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(err.to_string(), "grpc status NOT_SERVING");
    let unknown: Target = format!("grpc://{addr}/nope").parse().unwrap();
    let err = probe(&unknown, Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(err, ProbeError::Grpc(_)), "{err}");

    let closed = closed_port().await;
    let t: Target = format!("grpc://{closed}").parse().unwrap();
    let err = probe(&t, Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("connect {closed}: connection refused")
    );
}

#[tokio::test(start_paused = true)]
async fn checker_reports_transitions_on_schedule() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let start = tokio::time::Instant::now();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = watch::channel(false);
    let spec = CheckSpec {
        target: format!("tcp://{addr}").parse().unwrap(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        thresholds: Thresholds { rise: 2, fall: 2 },
    };
    let record = seen.clone();
    let task = spawn_checker(
        spec,
        move |h| record.lock().unwrap().push((h, start.elapsed().as_secs())),
        rx,
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(*seen.lock().unwrap(), vec![(Health::Healthy, 0)]);

    // Probes at t=2 and t=3 fail; fall=2 turns it unhealthy at t=3.
    drop(listener);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(Health::Healthy, 0), (Health::Unhealthy, 3)]
    );

    tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn checker_stops_when_sender_dropped() {
    let closed = closed_port().await;
    let (tx, rx) = watch::channel(false);
    let spec = CheckSpec {
        target: format!("tcp://{closed}").parse().unwrap(),
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(100),
        thresholds: Thresholds::default(),
    };
    let task = spawn_checker(spec, |_| {}, rx);
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(tx);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
}
