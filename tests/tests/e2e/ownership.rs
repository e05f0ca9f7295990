//! Sidecar sessions act only as their principal: a join credential cannot
//! squat, reopen, shadow or report for another service's node or instance
//! ids, instances registered through a session are reached through their
//! sidecar (mTLS, never plaintext), and an operator's registration does not
//! silently take over a sidecar's instance. Attacks go through a raw
//! session client; victims are real sidecars.

use std::time::Duration;

use isdp_proto::v1::{
    HealthReport, SessionClose, SessionOpen, SessionRequest, session_request::Kind,
    sidecar_client::SidecarClient,
};
use isdp_proto::v1::{HealthStatus, Instance, SessionResponse};
use isdp_tests::bearer;
use isdp_tests::{
    ControlPlane, ControlPlaneOpts, EchoHttp, Sidecar, SidecarToml, eventually, find_by_id,
    holds_for, status_of,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::{Status, Streaming};

/// How long the control plane may take to answer a session message.
const ANSWER: Duration = Duration::from_secs(10);

/// A raw `isdp.v1.Sidecar/Session` client: what a sidecar sends, under the
/// test's control (any node id, instance or token). Dropping it ends the stream (the grace period starts).
pub(crate) struct RawSession {
    tx: mpsc::Sender<SessionRequest>,
    stream: Streaming<SessionResponse>,
}

impl RawSession {
    /// Opens a session of `node_id` with `instances`, authenticated with
    /// `token`; returns it with the control plane's answer (the instances
    /// as registered), or the status that refused the open.
    pub async fn open(
        cp: &ControlPlane,
        token: &str,
        node_id: &str,
        instances: Vec<Instance>,
    ) -> Result<(RawSession, SessionResponse), Status> {
        let (tx, rx) = mpsc::channel(8);
        let open = SessionRequest {
            kind: Some(Kind::Open(SessionOpen {
                node_id: node_id.into(),
                instances,
            })),
        };
        tx.send(open).await.expect("queued");
        let mut client = SidecarClient::with_interceptor(cp.channel().await, bearer(token));
        let mut stream = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let answer = next(&mut stream).await?;
        Ok((RawSession { tx, stream }, answer))
    }

    /// Reports `status` for `instance_id`. The control plane answers a
    /// report only by ending the stream when it refuses one, so this waits
    /// up to `settle` for that refusal; `Ok` when none came.
    pub async fn report(
        &mut self,
        instance_id: &str,
        status: HealthStatus,
        settle: Duration,
    ) -> Result<(), Status> {
        let report = SessionRequest {
            kind: Some(Kind::Health(HealthReport {
                instance_id: instance_id.into(),
                status: status as i32,
            })),
        };
        self.tx
            .send(report)
            .await
            .map_err(|_| Status::cancelled("session stream gone"))?;
        match tokio::time::timeout(settle, self.stream.message()).await {
            Err(_) => Ok(()),
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err(Status::cancelled("session ended without a status")),
            Ok(Err(s)) => Err(s),
        }
    }

    /// Closes the session cleanly (its instances go at once) and waits for
    /// the control plane to end the stream.
    pub async fn close(mut self) {
        let close = SessionRequest {
            kind: Some(Kind::Close(SessionClose {})),
        };
        let _ = self.tx.send(close).await;
        drop(self.tx);
        let _ = tokio::time::timeout(ANSWER, async {
            while let Ok(Some(_)) = self.stream.message().await {}
        })
        .await;
    }
}

async fn next(stream: &mut Streaming<SessionResponse>) -> Result<SessionResponse, Status> {
    match tokio::time::timeout(ANSWER, stream.message()).await {
        Err(_) => Err(Status::deadline_exceeded("no session answer in time")),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(Status::cancelled("session ended without an answer")),
        Ok(Err(s)) => Err(s),
    }
}

/// An instance of `service` as a sidecar registers it: on loopback at
/// `port`, reached through its sidecar's inbound port.
pub(crate) fn sidecar_instance(service: &str, port: u32) -> Instance {
    Instance {
        service: service.into(),
        address: "127.0.0.1".into(),
        port,
        inbound_port: 15006,
        ..Default::default()
    }
}

const PROBE: Duration = Duration::from_millis(200);

/// A join token for `service`.
pub(crate) async fn join_token(cp: &ControlPlane, service: &str) -> String {
    cp.create_token(&["--role", "join", "--service", service])
        .await
        .secret
}

fn ids(answer: &SessionResponse) -> Vec<&str> {
    answer.instances.iter().map(|i| i.id.as_str()).collect()
}

/// Starts a sidecar for `service` as node `node` joining with `token`,
/// and waits until it is ready and its instance healthy.
async fn victim(cp: &ControlPlane, node: &str, service: &str, token: &str) -> (Sidecar, EchoHttp) {
    let echo = EchoHttp::start(&format!("{node}-{service}")).await;
    let sidecar = SidecarToml::new(node, &cp.grpc_url())
        .join_token(token)
        .service(service, echo.port(), PROBE)
        .start()
        .await;
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let id = format!("{node}.{service}");
    eventually(
        Duration::from_secs(10),
        &format!("{id} healthy"),
        || async {
            let list = cp.instances(service).await?;
            anyhow::ensure!(status_of(&list, &id)? == "healthy", "{list:?}");
            Ok(())
        },
    )
    .await;
    (sidecar, echo)
}

/// The victim's instance as listed, for before/after comparisons.
async fn listed(cp: &ControlPlane, service: &str, id: &str) -> serde_json::Value {
    let list = cp.instances(service).await.expect("instances");
    find_by_id(&list, id)
        .unwrap_or_else(|| panic!("{id} not listed: {list:?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_squatted_by_another_service_locks_no_sidecar_out() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let web = join_token(&cp, "web").await;
    let pay = join_token(&cp, "payments").await;

    // web takes node-b (and node-c) before the payments sidecars connect.
    let (_squat_b, answer) =
        RawSession::open(&cp, &web, "node-b", vec![sidecar_instance("web", 8080)])
            .await
            .expect("web's own session");
    assert_eq!(ids(&answer), ["node-b.web"]);
    let (_squat_c, _) = RawSession::open(&cp, &web, "node-c", vec![])
        .await
        .expect("an empty session");

    // Two payments sidecars, each with its own payments token, join as
    // those node ids: both become ready and healthy.
    let pay2 = join_token(&cp, "payments").await;
    let (_b, _echo_b) = victim(&cp, "node-b", "payments", &pay).await;
    let (_c, _echo_c) = victim(&cp, "node-c", "payments", &pay2).await;
    let payments = cp.instances("payments").await.expect("instances");
    assert_eq!(payments.len(), 2, "{payments:?}");
    // And web's instance is still its own.
    let web_b = listed(&cp, "web", "node-b.web").await;
    assert_eq!(web_b["node_id"], "node-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_a_victims_node_id_changes_nothing_of_the_victim() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let web = join_token(&cp, "web").await;
    let pay = join_token(&cp, "payments").await;
    let (_sidecar, _echo) = victim(&cp, "node-b", "payments", &pay).await;
    let before = listed(&cp, "payments", "node-b.payments").await;

    // Reopening the node with nothing, and closing it: the answer shows
    // none of payments' instances and the close removes none.
    let (empty, answer) = RawSession::open(&cp, &web, "node-b", vec![])
        .await
        .expect("web may open a session of its own on any node id");
    assert!(answer.instances.is_empty(), "{answer:?}");
    empty.close().await;
    // Reopening it with web's instance, then reporting payments' health.
    let (mut s, answer) =
        RawSession::open(&cp, &web, "node-b", vec![sidecar_instance("web", 8080)])
            .await
            .expect("web's own instance on node-b");
    assert_eq!(ids(&answer), ["node-b.web"]);
    let err = s
        .report(
            "node-b.payments",
            HealthStatus::Unhealthy,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // One answer for every id the session did not register: it tells
    // nothing of whether the id exists or whose it is.
    assert!(err.message().contains("not among them"), "{err}");
    assert!(!err.message().contains("payments"), "{err}");
    // A session of the victim's own service cannot be opened by web.
    let err = RawSession::open(&cp, &web, "node-b", vec![sidecar_instance("payments", 9)])
        .await
        .err()
        .expect("web may not register payments");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    holds_for(
        Duration::from_secs(1),
        "payments' instance unchanged",
        || async {
            let now = listed(&cp, "payments", "node-b.payments").await;
            anyhow::ensure!(now == before, "{before} became {now}");
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_ids_are_the_node_and_service_and_operators_take_none_over() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let web = join_token(&cp, "web").await;
    let pay = join_token(&cp, "payments").await;

    // web registering ids payments' sidecar will use, or any other id
    // than its own, is refused, naming the field and the id it must be.
    for id in ["node-b.payments", "payments-1", "node-c.web"] {
        let squat = Instance {
            id: id.into(),
            ..sidecar_instance("web", 8080)
        };
        let err = RawSession::open(&cp, &web, "node-b", vec![squat])
            .await
            .err()
            .unwrap_or_else(|| panic!("web registered id {id}"));
        assert_eq!(err.code(), Code::InvalidArgument, "{id}: {err}");
        assert!(
            err.message().contains("open.instances[0].id")
                && err.message().contains("\"node-b.web\""),
            "{id}: {err}"
        );
    }
    let services = cp.services().await;
    assert_eq!(services.as_array().map(Vec::len), Some(0), "{services}");

    // So payments' sidecar gets its id.
    let (_sidecar, _echo) = victim(&cp, "node-b", "payments", &pay).await;
    let before = listed(&cp, "payments", "node-b.payments").await;
    assert_eq!(before["node_id"], "node-b");

    // An operator's registration does not silently take it over.
    let out = cp
        .ctl(&[
            "register",
            "--service",
            "payments",
            "--id",
            "node-b.payments",
            "--address",
            "127.0.0.1",
            "--port",
            "9",
        ])
        .await;
    assert!(!out.status.success(), "the operator took the instance over");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FailedPrecondition") && err.contains("deregister it first"),
        "{err}"
    );
    let after = listed(&cp, "payments", "node-b.payments").await;
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_instance_must_be_reached_through_its_sidecar() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let web = join_token(&cp, "web").await;
    let admin = cp.admin_token().to_owned();
    for (who, token, port) in [
        ("join", &web, 0),
        ("join", &web, 65_536),
        ("join", &web, u32::MAX),
        ("admin", &admin, 0),
    ] {
        let plaintext = Instance {
            inbound_port: port,
            ..sidecar_instance("web", 8080)
        };
        let err = RawSession::open(&cp, token, "node-a", vec![plaintext])
            .await
            .err()
            .unwrap_or_else(|| panic!("{who} registered inbound_port {port}"));
        assert_eq!(err.code(), Code::InvalidArgument, "{who} {port}: {err}");
        assert!(
            err.message()
                .contains("open.instances[0].inbound_port: must be 1..=65535"),
            "{who} {port}: {err}"
        );
    }
    let services = cp.services().await;
    assert_eq!(services.as_array().map(Vec::len), Some(0), "{services}");
    // A sidecar-less endpoint is an operator's registration.
    cp.register("legacy", "127.0.0.1", 8080, &[]).await;
}

/// A stream serves one node, and opens no faster than one a second: a
/// join credential cannot use one stream to open sessions (each keeping
/// its instances through the grace period) faster than streams are
/// capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_opens_one_node_at_most_once_a_second() {
    let cp = ControlPlane::start(ControlPlaneOpts::default()).await;
    let web = join_token(&cp, "web").await;
    let reopen = |node: &str| SessionRequest {
        kind: Some(Kind::Open(SessionOpen {
            node_id: node.into(),
            instances: vec![sidecar_instance("web", 8080)],
        })),
    };

    // Another node on the same stream: refused, naming the field.
    let (mut s, _) = RawSession::open(&cp, &web, "r1", vec![sidecar_instance("web", 8080)])
        .await
        .expect("opened");
    s.tx.send(reopen("r2")).await.unwrap();
    let e = next(&mut s.stream)
        .await
        .expect_err("a second node on one stream");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("open.node_id"), "{e:?}");
    let listed = cp.instances("web").await.unwrap();
    assert!(find_by_id(&listed, "r2.web").is_none(), "{listed:?}");

    // The same node again at once: refused; after a second: reopened.
    let (mut s, _) = RawSession::open(&cp, &web, "r3", vec![sidecar_instance("web", 8080)])
        .await
        .expect("opened");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.tx.send(reopen("r3")).await.unwrap();
    let answer = next(&mut s.stream).await.expect("a reopen after a second");
    assert_eq!(answer.instances.len(), 1, "{answer:?}");
    s.tx.send(reopen("r3")).await.unwrap();
    let e = next(&mut s.stream).await.expect_err("a reopen at once");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}
