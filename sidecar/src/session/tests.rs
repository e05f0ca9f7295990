//! The session against an in-process fake `isdp.v1.Sidecar` server.

use isdp_proto::v1::sidecar_server::{Sidecar, SidecarServer};
use isdp_proto::v1::{HealthStatus, SessionResponse};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::*;

type Outbound = mpsc::Sender<Result<SessionResponse, Status>>;

struct FakeSidecar {
    streams: mpsc::UnboundedSender<(Streaming<SessionRequest>, Outbound)>,
    /// While set, sessions are refused UNAVAILABLE, as by a control plane
    /// that is restarting.
    down: Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl Sidecar for FakeSidecar {
    type SessionStream = ReceiverStream<Result<SessionResponse, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable("restarting"));
        }
        let (tx, rx) = mpsc::channel(16);
        let _ = self.streams.send((request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn next(inbound: &mut Streaming<SessionRequest>) -> Kind {
    tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("request in time")
        .unwrap()
        .unwrap()
        .kind
        .unwrap()
}

fn config() -> Config {
    let mut c = Config::from_toml(
        r#"
node_id = "web-1"
ca_file = "/ca.pem"
join_token = "t"
[[service]]
name = "web"
port = 8080
check = "http://127.0.0.1:8080/healthz"
interval = "500ms"
rise = 2
metadata = { version = "v1" }
[[service]]
name = "db"
port = 5432
"#,
    )
    .unwrap();
    c.control_plane.clear();
    c
}

type Accepted = mpsc::UnboundedReceiver<(Streaming<SessionRequest>, Outbound)>;

/// A fake control plane: its URL, the streams it accepts, and its switch.
async fn fake() -> (String, Accepted, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (streams, accepted) = mpsc::unbounded_channel();
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SidecarServer::new(FakeSidecar {
                streams,
                down: down.clone(),
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, accepted, down)
}

#[tokio::test]
async fn opens_reports_reopens_and_closes() {
    let (url, mut accepted, _) = fake().await;
    let session = Session::new(&config());
    let (stop, shutdown) = watch::channel(false);
    let task = spawn(
        session.clone(),
        vec![url.clone()],
        Default::default(),
        Duration::from_secs(5),
        shutdown,
    );

    let (mut inbound, outbound) = accepted.recv().await.unwrap();
    let Kind::Open(open) = next(&mut inbound).await else {
        panic!("expected open")
    };
    assert_eq!(open.node_id, "web-1");
    assert_eq!(open.instances.len(), 2);
    let web = &open.instances[0];
    assert_eq!(
        (web.id.as_str(), web.service.as_str()),
        ("web-1.web", "web")
    );
    assert_eq!(
        (web.address.as_str(), web.port, web.weight),
        ("127.0.0.1", 8080, 1)
    );
    assert_eq!(web.metadata["version"], "v1");
    let check = web.check.as_ref().unwrap();
    assert_eq!(check.target, "http://127.0.0.1:8080/healthz");
    assert_eq!(
        (check.interval_ms, check.timeout_ms, check.rise, check.fall),
        (500, 1000, 2, 1)
    );
    assert_eq!(web.status, HealthStatus::Unknown as i32);
    assert!(open.instances[1].check.is_none());

    let mut status = session.shared.status.subscribe();
    status.wait_for(|s| s.opened && s.connected).await.unwrap();

    session.set_health(0, Health::Healthy);
    let Kind::Health(report) = next(&mut inbound).await else {
        panic!("expected health report")
    };
    assert_eq!(report.instance_id, "web-1.web");
    assert_eq!(report.status, HealthStatus::Healthy as i32);

    // The server drops the stream; the session reopens with current health.
    drop((inbound, outbound));
    let (mut inbound, outbound) = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .unwrap()
        .unwrap();
    let Kind::Open(open) = next(&mut inbound).await else {
        panic!("expected open")
    };
    assert_eq!(open.instances[0].status, HealthStatus::Healthy as i32);
    status.wait_for(|s| s.connected).await.unwrap();
    assert_eq!(session.status().reconnects, 1);

    // Shutdown sends Close and waits for the server to end the stream.
    stop.send(true).unwrap();
    assert!(matches!(next(&mut inbound).await, Kind::Close(_)));
    assert!(inbound.message().await.unwrap().is_none());
    drop(outbound);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
    assert!(!session.status().connected);
}

/// Shutdown while the session is down (the control plane restarting):
/// within the drain timeout the sidecar keeps trying, and once a control
/// plane answers it opens a session registering nothing (which removes
/// the node's instances) and closes it.
#[tokio::test]
async fn shutdown_while_down_deregisters_once_a_control_plane_answers() {
    let (url, mut accepted, down) = fake().await;
    let session = Session::new(&config());
    let (stop, shutdown) = watch::channel(false);
    let task = spawn(
        session.clone(),
        vec![url],
        Default::default(),
        Duration::from_secs(10),
        shutdown,
    );
    let (mut inbound, outbound) = accepted.recv().await.unwrap();
    assert!(matches!(next(&mut inbound).await, Kind::Open(_)));
    let mut status = session.shared.status.subscribe();
    status.wait_for(|s| s.opened && s.connected).await.unwrap();

    // The control plane goes away, and refuses sessions for a while.
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    drop((inbound, outbound));
    status.wait_for(|s| !s.connected).await.unwrap();
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "gave up before the drain timeout");

    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let (mut inbound, outbound) = tokio::time::timeout(Duration::from_secs(5), accepted.recv())
        .await
        .expect("the sidecar came back to deregister")
        .unwrap();
    let Kind::Open(open) = next(&mut inbound).await else {
        panic!("expected open")
    };
    assert_eq!(open.node_id, "web-1");
    assert!(open.instances.is_empty(), "{open:?}");
    assert!(matches!(next(&mut inbound).await, Kind::Close(_)));
    drop(outbound);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the session task ended once deregistered")
        .unwrap();
}

/// With no control plane answering, shutdown gives up at the drain
/// timeout rather than hanging.
#[tokio::test]
async fn shutdown_while_down_gives_up_at_the_drain_timeout() {
    let (url, mut accepted, down) = fake().await;
    let session = Session::new(&config());
    let (stop, shutdown) = watch::channel(false);
    let task = spawn(
        session.clone(),
        vec![url],
        Default::default(),
        Duration::from_millis(500),
        shutdown,
    );
    let (mut inbound, outbound) = accepted.recv().await.unwrap();
    assert!(matches!(next(&mut inbound).await, Kind::Open(_)));
    let mut status = session.shared.status.subscribe();
    status.wait_for(|s| s.opened && s.connected).await.unwrap();
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    drop((inbound, outbound));
    status.wait_for(|s| !s.connected).await.unwrap();
    let stopped = std::time::Instant::now();
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("shutdown ended")
        .unwrap();
    assert!(
        stopped.elapsed() >= Duration::from_millis(400),
        "gave up after {:?}, before the drain timeout",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn reports_outbound_traffic_totals_every_interval() {
    use crate::metrics::{Direction, Metrics};

    let (url, mut accepted, _) = fake().await;
    let session = Session::new(&config());
    let metrics = Metrics::new();
    session.report_traffic(metrics.clone());
    let payments = metrics.route(Direction::Outbound, "payments");
    payments.finished(http::StatusCode::OK, Duration::from_millis(3));
    payments.finished(http::StatusCode::BAD_GATEWAY, Duration::from_millis(30));
    // Inbound traffic and upstreams never called are not reported.
    let _idle = metrics.route(Direction::Outbound, "idle");
    metrics
        .route(Direction::Inbound, "web")
        .finished(http::StatusCode::OK, Duration::from_millis(1));
    let (stop, shutdown) = watch::channel(false);
    let task = spawn(
        session.clone(),
        vec![url],
        Default::default(),
        Duration::from_secs(5),
        shutdown,
    );
    let (mut inbound, outbound) = accepted.recv().await.unwrap();
    assert!(matches!(next(&mut inbound).await, Kind::Open(_)));
    let opened = tokio::time::Instant::now();
    let message = tokio::time::timeout(traffic::INTERVAL * 2, inbound.message())
        .await
        .expect("a traffic report within two intervals")
        .unwrap()
        .unwrap();
    assert!(opened.elapsed() >= traffic::INTERVAL - Duration::from_millis(100));
    let Some(Kind::Traffic(report)) = message.kind else {
        panic!("expected a traffic report, got {message:?}")
    };
    assert_eq!(report.upstreams.len(), 1, "{report:?}");
    let u = &report.upstreams[0];
    assert_eq!(
        (u.upstream.as_str(), u.requests, u.errors),
        ("payments", 2, 1)
    );
    assert_eq!(u.bounds_ms.len(), u.counts.len());
    assert_eq!(*u.counts.last().unwrap(), 2, "cumulative: every request");
    stop.send(true).unwrap();
    assert!(matches!(next(&mut inbound).await, Kind::Close(_)));
    drop((inbound, outbound));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
