//! `isdp.v1.Sidecar/Session`: a sidecar registers its local services and
//! reports their health on one long-lived stream. The auth layer ends it
//! when the sidecar's credential is revoked or expires (its request body
//! then fails, so nothing more the sidecar sends is acted on).

use std::{pin::Pin, time::Duration};

use futures::Stream;
use isdp_proto::v1::{
    HealthStatus, SERVICE_ENDPOINTS_TYPE_URL, SessionRequest, SessionResponse,
    session_request::Kind, sidecar_server,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use tracing::Instrument as _;

use super::{op_span, record_outcome, status};
use crate::{
    auth::Principal,
    load::{Gate, LoadReports, REPORT_TTL, sink::Sink, unix_ms, writer::Write, writer::Writer},
    metrics::Metrics,
    registry::session::{Opener, Session, Sessions},
    tokens::Role,
    traffic::{Reporter, Traffic},
};

pub struct SessionApi {
    sessions: Sessions,
    shutdown: watch::Receiver<bool>,
    loads: Loads,
    traffic: Traffic,
}

/// What one session's reports go to: load reports (for weights) and
/// traffic reports (the dashboard's edges).
struct Reports {
    loads: Loads,
    traffic: Reporter,
}

/// Where sessions' load reports go, and what counts them.
#[derive(Clone, Default)]
struct Loads {
    reports: LoadReports,
    metrics: Option<Metrics>,
    /// Where summaries for load weights are written; None: not at all.
    sink: Option<Sink>,
}

/// How often a session looks for instances that stopped reporting, whose
/// summaries are then deleted.
const STALE_SWEEP: Duration = Duration::from_secs(2);

impl SessionApi {
    pub fn new(sessions: Sessions, shutdown: watch::Receiver<bool>) -> Self {
        SessionApi {
            sessions,
            shutdown,
            loads: Loads::default(),
            traffic: Traffic::default(),
        }
    }

    /// Keeps the sessions' load reports in `reports`, counted in `metrics`.
    pub fn with_loads(mut self, reports: LoadReports, metrics: Metrics) -> Self {
        self.loads.reports = reports;
        self.loads.metrics = Some(metrics);
        self
    }

    /// Writes the sessions' load summaries through `sink`, for the
    /// weights every replica computes.
    pub fn with_load_sink(mut self, sink: Sink) -> Self {
        self.loads.sink = Some(sink);
        self
    }

    /// Keeps the sessions' traffic reports in `traffic` (the dashboard's).
    pub fn with_traffic(mut self, traffic: Traffic) -> Self {
        self.traffic = traffic;
        self
    }

    pub fn into_server(self) -> sidecar_server::SidecarServer<Self> {
        sidecar_server::SidecarServer::new(self).max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<SessionResponse, Status>> + Send>>;

/// How long a session stream may stay open before its `open` message: a
/// sidecar sends it with the stream.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

#[tonic::async_trait]
impl sidecar_server::Sidecar for SessionApi {
    type SessionStream = Responses;

    async fn session(
        &self,
        req: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Responses>, Status> {
        // Absent only when the service runs without the auth layer (unit
        // tests); the layer always authenticates this method.
        let principal = req.extensions().get::<Principal>().cloned();
        let mut inbound = req.into_inner();
        // A stream that never says `open` would hold its place among the
        // principal's streams, and a task, for as long as it stays open.
        let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "session: no open message within {FIRST_MESSAGE_TIMEOUT:?} of the stream opening"
                ))
            })??
            .ok_or_else(|| Status::invalid_argument("session: stream ended before an open message"))?;
        let Some(Kind::Open(open)) = first.kind else {
            return Err(Status::invalid_argument(
                "session: the first message must be `open`",
            ));
        };
        let session = open_session(
            &self.sessions,
            principal.as_ref(),
            &open.node_id,
            open.instances,
        )
        .await?;
        let (tx, rx) = mpsc::channel(4);
        tx.send(Ok(SessionResponse {
            instances: session.instances(),
            load_reports: true,
        }))
        .await
        .map_err(|_| Status::cancelled("session: client went away"))?;
        tokio::spawn(run(
            session,
            inbound,
            tx,
            self.sessions.clone(),
            principal,
            Reports {
                loads: self.loads.clone(),
                traffic: Reporter::new(self.traffic.clone()),
            },
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Opens (or reopens) a sidecar's session, in a span.
/// A join principal may register only its own services (checked before
/// anything is stored) and replaces only its own services' instances of
/// the node ([`Opener`]).
async fn open_session(
    sessions: &Sessions,
    principal: Option<&Principal>,
    node_id: &str,
    instances: Vec<isdp_proto::v1::Instance>,
) -> Result<Session, Status> {
    let span = op_span("isdp.v1.Sidecar/Session.Open");
    span.record("isdp.node", node_id);
    if let Some(p) = principal {
        for i in &instances {
            if let Err(e) = p.check_service("Sidecar/Session", &i.service) {
                let refused = Err(e);
                record_outcome(&span, &refused);
                return refused;
            }
        }
    }
    let opened = sessions
        .open(node_id, instances, &opener(principal))
        .instrument(span.clone())
        .await
        .map_err(status);
    record_outcome(&span, &opened);
    opened
}

/// What a principal may do with a session: a join principal acts as its
/// services only; operators (write, admin) as any. Sessions count against
/// the token that vouches for the caller, so a certificate counts with the
/// token it was issued under.
fn opener(principal: Option<&Principal>) -> Opener {
    let Some(p) = principal else {
        return Opener::anyone();
    };
    Opener {
        principal: Some(p.grant.clone().unwrap_or_else(|| p.id.clone())),
        services: (p.role == Role::Join).then(|| p.services.clone()),
    }
}

/// A later `open` on a stream: at most one per [`REOPEN_GAP`].
/// Each open grants a lease and writes the node's instances, and the
/// session it replaces keeps its instances through the grace period, so
/// a stream must not be a way to open sessions faster than streams can
/// be (streams are capped per principal).
pub const REOPEN_GAP: Duration = Duration::from_secs(1);

/// Whether a later `open` of `node_id` may replace `session` on its
/// stream: the same node (a stream serves one node), and not sooner than
/// [`REOPEN_GAP`] after the last open.
fn reopen(
    session: &Session,
    node_id: &str,
    last_open: &mut tokio::time::Instant,
) -> Result<(), Status> {
    if node_id != session.node_id() {
        return Err(Status::invalid_argument(format!(
            "session: open.node_id: a stream serves one node, opened as {:?}; got {}: open another stream",
            session.node_id(),
            quoted(node_id)
        )));
    }
    let now = tokio::time::Instant::now();
    if now.saturating_duration_since(*last_open) < REOPEN_GAP {
        return Err(Status::resource_exhausted(format!(
            "session: at most one open per {REOPEN_GAP:?} on a stream"
        )));
    }
    *last_open = now;
    Ok(())
}

/// What a session's stream ends with once a newer session of its node
/// took its instances: told, so a sidecar that still runs finds out (and
/// says so in its log) rather than answering for nothing.
fn superseded(session: &Session) -> Status {
    Status::aborted(format!(
        "session: node {:?} was opened again by another session, which now holds its instances; a node id names one sidecar (open the session again if this sidecar is the node)",
        session.node_id()
    ))
}

/// Serves one session until the sidecar closes it, the stream breaks
/// (dropping the session starts its grace period) or shutdown.
async fn run(
    mut session: Session,
    mut inbound: Streaming<SessionRequest>,
    tx: mpsc::Sender<Result<SessionResponse, Status>>,
    sessions: Sessions,
    principal: Option<Principal>,
    reports: Reports,
    mut shutdown: watch::Receiver<bool>,
) {
    let Reports {
        loads,
        traffic: reporter,
    } = reports;
    let mut gate = Gate::default();
    let mut traffic_gate = Gate::default();
    let mut last_open = tokio::time::Instant::now();
    let mut writer = Writer::default();
    let mut sweep = tokio::time::interval(STALE_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let scope = crate::auth::ReadScope::of(principal.as_ref());
    loop {
        let mut taken = false;
        let msg = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            () = session.lease_lost() => None,
            () = session.superseded() => {
                taken = true;
                None
            }
            m = inbound.message() => Some(m),
            _ = sweep.tick(), if loads.sink.is_some() => {
                let now = tokio::time::Instant::now();
                for id in writer.stale(now, REPORT_TTL) {
                    loads.write(&mut writer, Write::Delete(id), session.lease());
                }
                continue;
            }
        };
        if taken {
            let _ = tx.send(Err(superseded(&session))).await;
            return;
        }
        let Some(msg) = msg else {
            // The store dropped the instances with the lease; the sidecar
            // reopens (registering them again) on UNAVAILABLE.
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "session: the store expired the lease of node {:?} (this control plane could not reach it for longer than the session timeout) and with it the node's instances; open the session again",
                    session.node_id()
                ))))
                .await;
            return;
        };
        match msg {
            Ok(Some(SessionRequest {
                kind: Some(Kind::Health(h)),
            })) => {
                let health = HealthStatus::try_from(h.status).unwrap_or(HealthStatus::Unknown);
                let span = op_span("isdp.v1.Sidecar/Session.Health");
                span.record("isdp.node", session.node_id());
                span.record("isdp.instance.id", h.instance_id.as_str());
                let reported = session
                    .report(&h.instance_id, health)
                    .instrument(span.clone())
                    .await
                    .map_err(status);
                record_outcome(&span, &reported);
                // What the client sent is logged cut to a bound, within
                // the sessions' line budget.
                let instance = quoted(&h.instance_id);
                match reported {
                    Err(e) => {
                        if session.log().admit() {
                            tracing::warn!(node = ?session.node_id(), %instance, error = %e, "health report refused");
                        } else {
                            tracing::debug!(node = ?session.node_id(), %instance, error = %e, "health report refused");
                        }
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    // A sidecar may repeat a report as often as it likes:
                    // only a transition is worth a line at info level.
                    Ok(true) if session.log().admit() => {
                        tracing::info!(node = ?session.node_id(), %instance, status = health.as_str_name(), "health reported by sidecar")
                    }
                    Ok(changed) => {
                        tracing::debug!(node = ?session.node_id(), %instance, status = health.as_str_name(), changed, "health reported by sidecar")
                    }
                }
            }
            Ok(Some(SessionRequest {
                kind: Some(Kind::Open(open)),
            })) => match reopen(&session, &open.node_id, &mut last_open) {
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Ok(()) => {
                    match open_session(&sessions, principal.as_ref(), &open.node_id, open.instances)
                        .await
                    {
                        Ok(s) => {
                            session = s;
                            // A new lease: what was written under the old one
                            // goes with it, so everything is written again.
                            writer = Writer::default();
                            let instances = session.instances();
                            let response = SessionResponse {
                                instances,
                                load_reports: true,
                            };
                            if tx.send(Ok(response)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            },
            Ok(Some(SessionRequest {
                kind: Some(Kind::Load(report)),
            })) => {
                if !gate.admit(tokio::time::Instant::now()) {
                    loads.count("dropped");
                    continue;
                }
                let own: Vec<String> = session.instances().into_iter().map(|i| i.id).collect();
                let figures = loads.sink.is_some().then(|| report.instances.clone());
                if let Err(e) = loads.reports.accept(&own, report) {
                    loads.count("refused");
                    if session.log().admit() {
                        tracing::warn!(node = ?session.node_id(), error = %e, "load report refused");
                    }
                    let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                    return;
                }
                loads.count("accepted");
                let (now, now_ms) = (tokio::time::Instant::now(), unix_ms());
                for load in figures.iter().flatten() {
                    if let Some(summary) = writer.offer(load, now, now_ms) {
                        loads.write(&mut writer, Write::Put(summary), session.lease());
                    }
                }
            }
            Ok(Some(SessionRequest {
                kind: Some(Kind::Close(_)),
            })) => {
                let span = op_span("isdp.v1.Sidecar/Session.Close");
                span.record("isdp.node", session.node_id());
                let closed = session
                    .close()
                    .instrument(span.clone())
                    .await
                    .map_err(status);
                record_outcome(&span, &closed);
                if let Err(e) = closed {
                    let _ = tx.send(Err(e)).await;
                }
                return;
            }
            Ok(Some(SessionRequest {
                kind: Some(Kind::Traffic(mut report)),
            })) => {
                // Sidecars report every few seconds; more often is dropped
                // unread, as load reports are.
                if !traffic_gate.admit(tokio::time::Instant::now()) {
                    continue;
                }
                // Only upstreams the caller may discover become edges.
                report
                    .upstreams
                    .retain(|u| scope.allows(SERVICE_ENDPOINTS_TYPE_URL, &u.upstream));
                // Reported as the session's own service, never another: its
                // instances' or, for a sidecar without any (a client), the
                // one service its join credential acts as.
                let caller = session
                    .instances()
                    .into_iter()
                    .next()
                    .map(|i| i.service)
                    .or_else(|| {
                        principal
                            .as_ref()
                            .filter(|p| p.role == Role::Join && p.services.len() == 1)
                            .map(|p| p.services[0].clone())
                    });
                if let Err(e) = reporter.report(caller.as_deref(), report) {
                    let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                    return;
                }
            }
            Ok(Some(SessionRequest { kind: None })) => {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "session: message has no kind",
                    )))
                    .await;
                return;
            }
            Ok(None) | Err(_) => return,
        }
    }
}

impl Loads {
    fn count(&self, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.load_report(outcome);
        }
    }

    /// Queues a summary's write; when the queue is full the write is
    /// dropped and counted, and the writer writes it again next time.
    fn write(&self, writer: &mut Writer, write: Write, lease: crate::store::LeaseId) {
        let Some(sink) = &self.sink else { return };
        let id = match &write {
            Write::Put(s) => s.instance_id.clone(),
            Write::Delete(id) => id.clone(),
        };
        if sink.send(write, Some(lease)) {
            self.count_summary("queued");
        } else {
            writer.unwritten(&id);
            self.count_summary("dropped");
        }
    }

    fn count_summary(&self, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.load_summary(outcome);
        }
    }
}

/// A client-chosen string as the log shows it: Debug-quoted, cut to 200
/// bytes on a character boundary (an instance id is at most 192).
fn quoted(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}
