//! The sidecar's session with the control plane for its local services:
//! `SessionOpen` on every (re)connect, a `HealthReport` per probe
//! transition, a `LoadReport` every 2 s once the control plane said it
//! takes them (`load_report` measures), `SessionClose` on shutdown (and, when shutdown finds the
//! session down, an empty session opened and closed within the drain
//! timeout, so the instances go at once).

use std::time::Duration;

use isdp_core::load as bounds;
use isdp_proto::v1::session_request::Kind;
use isdp_proto::v1::sidecar_client::SidecarClient;
use isdp_proto::v1::{
    HealthCheck, HealthReport, Instance, InstanceLoad, LoadReport, SessionClose, SessionOpen,
    SessionRequest,
};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::{Config, Service};
use crate::load_report::{LocalLoad, Meter, REPORT_INTERVAL};
use isdp_core::backoff::Backoff;
use isdp_core::dial::{ControlAuth, DialError, Dialer};
use isdp_core::probe::Health;

/// How long shutdown waits for the server to end the stream after `SessionClose`.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The session's connection state, for the admin page and readiness.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStatus {
    /// Whether a session stream is open right now.
    pub connected: bool,
    /// True once a session was opened at least once.
    pub opened: bool,
    /// The control-plane URL of the current (or last) stream.
    pub control_plane: Option<String>,
    /// Times the stream broke or a connection attempt failed.
    pub reconnects: u64,
}

/// Cheap handle to the session's shared state.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

struct Shared {
    /// Sent in `SessionOpen` and prefixes instance ids.
    node_id: String,
    /// Address advertised for the local services.
    address: String,
    /// Registered with each instance: other sidecars send its traffic to
    /// `address:inbound_port`.
    inbound_port: u16,
    /// Stamped on every instance, so callers in the same zone prefer it.
    zone: String,
    /// The local services, in config order; indexes match `health`.
    services: Vec<Service>,
    /// Current health per service; the session task watches it to send
    /// reports, and reads it to reopen with current statuses.
    health: watch::Sender<Vec<Health>>,
    /// Connection state.
    status: watch::Sender<SessionStatus>,
    /// Each local service's load meter, in config order.
    loads: Vec<Arc<LocalLoad>>,
    /// Where traffic reports are read from, once the data plane has it.
    traffic: std::sync::OnceLock<crate::metrics::Metrics>,
}

// === impl Session ===

impl Session {
    pub fn new(config: &Config) -> Self {
        let services = config.services.clone();
        Self {
            shared: Arc::new(Shared {
                node_id: config.node_id.clone(),
                address: config.address.to_string(),
                inbound_port: config.inbound_listen.port(),
                zone: config.zone.clone().unwrap_or_default(),
                health: watch::Sender::new(vec![Health::Unknown; services.len()]),
                loads: services.iter().map(|s| LocalLoad::new(&s.name)).collect(),
                services,
                status: watch::Sender::new(SessionStatus::default()),
                traffic: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    pub fn services(&self) -> &[Service] {
        &self.shared.services
    }

    /// Each local service's load meter, in config order.
    pub fn loads(&self) -> &[Arc<LocalLoad>] {
        &self.shared.loads
    }

    /// The instance id of a local service: `{node_id}.{service}`.
    pub fn instance_id(&self, service: &str) -> String {
        format!("{}.{}", self.shared.node_id, service)
    }

    /// Records a probe transition of the `index`-th service.
    pub fn set_health(&self, index: usize, health: Health) {
        self.shared
            .health
            .send_if_modified(|all| match all.get_mut(index) {
                Some(h) if *h != health => {
                    *h = health;
                    true
                }
                _ => false,
            });
    }

    /// Current health of every service, in config order.
    pub fn health(&self) -> Vec<Health> {
        self.shared.health.borrow().clone()
    }

    pub fn status(&self) -> SessionStatus {
        self.shared.status.borrow().clone()
    }

    fn instances(&self, health: &[Health]) -> Vec<Instance> {
        let s = &self.shared;
        s.services
            .iter()
            .zip(health)
            .map(|(svc, health)| Instance {
                id: self.instance_id(&svc.name),
                service: svc.name.clone(),
                address: s.address.clone(),
                port: u32::from(svc.port),
                metadata: svc.metadata.clone().into_iter().collect(),
                weight: svc.weight,
                check: svc.check.as_ref().map(|target| HealthCheck {
                    target: target.to_string(),
                    interval_ms: millis(svc.interval),
                    timeout_ms: millis(svc.timeout),
                    rise: svc.rise,
                    fall: svc.fall,
                }),
                status: i32::from(*health),
                node_id: s.node_id.clone(),
                inbound_port: u32::from(s.inbound_port),
                zone: s.zone.clone(),
                priority: svc.priority,
            })
            .collect()
    }

    pub(crate) fn set_status(&self, update: impl FnOnce(&mut SessionStatus)) {
        self.shared.status.send_modify(update);
    }
}

/// The local instances' load since the last report.
fn load_report(session: &Session, meter: &mut Meter) -> LoadReport {
    let (figures, host) = meter.sample(session.loads());
    let instances = session
        .services()
        .iter()
        .zip(figures)
        .map(|(svc, f)| {
            // Within the bounds the control plane holds reports to (it
            // ends a session over one figure outside them): a request
            // held open for hours must not end the session. ORCA figures
            // are checked as they are read.
            let orca = f.orca.unwrap_or_default();
            InstanceLoad {
                instance_id: session.instance_id(&svc.name),
                rps: bounds::clamp(f.rps, bounds::MAX_RPS),
                eps: bounds::clamp(f.eps, bounds::MAX_RPS),
                latency_ms: bounds::clamp(f.latency_ms, bounds::MAX_LATENCY_MS),
                in_flight: f.in_flight.min(bounds::MAX_IN_FLIGHT),
                application_utilization: orca.application_utilization,
                cpu_utilization: orca.cpu_utilization,
                named_metrics: orca.named.into_iter().collect(),
            }
        })
        .collect();
    let host_figure = |v: Option<f64>| v.map(|v| bounds::clamp(v, bounds::MAX_HOST_UTILIZATION));
    LoadReport {
        instances,
        cpu_utilization: host_figure(host.cpu_utilization),
        mem_utilization: host_figure(host.mem_utilization),
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn request(kind: Kind) -> SessionRequest {
    SessionRequest { kind: Some(kind) }
}

/// Why one session stream ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("stream failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("stream ended by the control plane")]
    Ended,
}

/// Starts the session task; it runs until `shutdown`, then closes the
/// session. If shutdown finds the session down (the control plane
/// restarting, say), it keeps trying to deregister for up to `drain`, so
/// the instances do not linger until the control plane's session timeout.
pub fn spawn(
    session: Session,
    control_plane: Vec<String>,
    auth: ControlAuth,
    drain: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut dialer = Dialer::new(control_plane, auth);
        let mut backoff = Backoff::default();
        let closed = loop {
            if *shutdown.borrow() {
                break false;
            }
            let url = dialer.next_url();
            match run_stream(&session, &dialer, &url, &mut backoff, &mut shutdown).await {
                Ok(closed) => break closed,
                Err(error) => tracing::warn!(%url, %error, "session down"),
            }
            backoff.disconnected();
            session.set_status(|s| {
                s.connected = false;
                s.reconnects += 1;
            });
            if !backoff.wait(&mut shutdown).await {
                break false;
            }
        };
        session.set_status(|s| s.connected = false);
        // A session never opened registered nothing to take back.
        if !closed && session.status().opened {
            farewell(&session, &mut dialer, drain).await;
        }
        tracing::debug!("session stopped");
    })
}

/// Deregisters at shutdown while the session is down: every control-plane
/// URL in turn, with backoff, until one answers or `drain` has passed.
async fn farewell(session: &Session, dialer: &mut Dialer, drain: Duration) {
    let deadline = tokio::time::Instant::now() + drain;
    let mut backoff = Backoff::default();
    tracing::info!(
        ?drain,
        "shutting down with the session down: deregistering within the drain timeout"
    );
    loop {
        let url = dialer.next_url();
        match tokio::time::timeout_at(deadline, deregister(session, dialer, &url)).await {
            Ok(Ok(())) => {
                tracing::info!(%url, "deregistered at shutdown");
                return;
            }
            Ok(Err(error)) => tracing::debug!(%url, %error, "deregistering at shutdown failed"),
            Err(_) => break,
        }
        let delay = backoff.next_delay();
        if tokio::time::timeout_at(deadline, tokio::time::sleep(delay))
            .await
            .is_err()
        {
            break;
        }
    }
    tracing::warn!(
        ?drain,
        "no control plane answered within the drain timeout: the local instances stay registered until the control plane's session timeout"
    );
}

/// Opens a session that registers nothing, which removes the instances this
/// node registered before, and closes it at once.
async fn deregister(session: &Session, dialer: &Dialer, url: &str) -> Result<(), StreamError> {
    let channel = dialer.connect(url).await?;
    let (requests, rx) = mpsc::channel(2);
    let open = SessionOpen {
        node_id: session.shared.node_id.clone(),
        instances: Vec::new(),
    };
    let _ = requests.send(request(Kind::Open(open))).await;
    let _ = requests.send(request(Kind::Close(SessionClose {}))).await;
    drop(requests);
    let mut inbound = SidecarClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The server ends the stream once the close is done.
    while inbound.message().await?.is_some() {}
    Ok(())
}

/// One session stream; `Ok(true)` once it closed the session at shutdown,
/// `Ok(false)` when shutdown came before the session was open.
async fn run_stream(
    session: &Session,
    dialer: &Dialer,
    url: &str,
    backoff: &mut Backoff,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, StreamError> {
    let channel = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return Ok(false),
        channel = dialer.connect(url) => channel?,
    };
    let mut health_rx = session.shared.health.subscribe();
    let mut sent = health_rx.borrow_and_update().clone();
    let (requests, rx) = mpsc::channel(64);
    let open = SessionOpen {
        node_id: session.shared.node_id.clone(),
        instances: session.instances(&sent),
    };
    // Queued before the call, so the server sees it first.
    let _ = requests.send(request(Kind::Open(open))).await;
    let mut client = SidecarClient::new(channel);
    let response = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return Ok(false),
        response = client.session(ReceiverStream::new(rx)) => response?,
    };
    let mut inbound = response.into_inner();
    backoff.connected();
    session.set_status(|s| {
        s.connected = true;
        s.opened = true;
        s.control_plane = Some(url.to_owned());
    });
    tracing::info!(%url, instances = sent.len(), "session open");

    // Load reports go only to a control plane that said it takes them.
    let mut reports_taken = false;
    let mut meter = Meter::new(session.loads());
    let mut report_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + REPORT_INTERVAL,
        REPORT_INTERVAL,
    );
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report_due = false;
    let mut traffic_tick = traffic::ticker();
    loop {
        let mut traffic_due = false;
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = traffic_tick.tick() => traffic_due = true,
            changed = health_rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            message = inbound.message() => match message? {
                Some(response) => {
                    tracing::debug!(instances = response.instances.len(), "session response");
                    reports_taken = response.load_reports;
                    continue;
                }
                None => return Err(StreamError::Ended),
            },
            _ = report_tick.tick() => report_due = true,
        }
        if std::mem::take(&mut report_due) {
            let report = load_report(session, &mut meter);
            if reports_taken && !report.instances.is_empty() {
                requests
                    .send(request(Kind::Load(report)))
                    .await
                    .map_err(|_| StreamError::Ended)?;
            }
            continue;
        }
        if traffic_due {
            if let Some(report) = traffic::report(session) {
                let sent = requests.send(request(Kind::Traffic(report))).await;
                sent.map_err(|_| StreamError::Ended)?;
            }
            continue;
        }
        let now = health_rx.borrow_and_update().clone();
        let reports: Vec<HealthReport> = session
            .services()
            .iter()
            .zip(sent.iter().zip(&now))
            .filter(|(_, (old, new))| old != new)
            .map(|(svc, (_, new))| HealthReport {
                instance_id: session.instance_id(&svc.name),
                status: i32::from(*new),
            })
            .collect();
        for report in reports {
            requests
                .send(request(Kind::Health(report)))
                .await
                .map_err(|_| StreamError::Ended)?;
        }
        sent = now;
    }

    // Shutdown: deregister, end our side, and give the server a moment to
    // finish its side so the close is processed before we exit.
    let _ = requests.send(request(Kind::Close(SessionClose {}))).await;
    drop(requests);
    let drained = tokio::time::timeout(CLOSE_WAIT, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("control plane did not end the session in time");
    } else {
        tracing::info!("session closed");
    }
    Ok(true)
}

mod traffic;

#[cfg(test)]
mod tests;
