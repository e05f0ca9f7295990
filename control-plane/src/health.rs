//! Control-plane health checks for instances no sidecar watches.
//!
//! Instances registered by an operator (no owning sidecar session) that carry
//! a check are probed from here, with the sidecar's own prober
//! ([`isdp_core::probe`]) so both sides judge health the same way.
//! Instances owned by a sidecar are probed by that sidecar, which reports
//! transitions over its session.
//!
//! With several replicas only the elected leader ([`crate::election`]) runs
//! checkers, so each instance is probed once: a replica that loses (or never
//! had) the leadership stops its checkers, and the new leader starts them
//! from the registry.

use std::{collections::HashMap, time::Duration};

use isdp_core::probe::{CheckSpec, Health, Target, Thresholds, spawn_checker};
use isdp_proto::v1::{HealthCheck, HealthStatus, Instance};
use tokio::sync::{broadcast, mpsc, watch};

use crate::{
    metrics::Metrics,
    registry::{Change, Registry},
};

/// One running checker, and what it was started for: a changed check or
/// address restarts it.
struct Running {
    service: String,
    check: HealthCheck,
    stop: watch::Sender<bool>,
}

/// Runs checkers while `leader` is true, until `shutdown`.
pub fn spawn(
    registry: Registry,
    metrics: Metrics,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = registry.subscribe();
    tokio::spawn(async move {
        let (tx, mut transitions) = mpsc::unbounded_channel::<(String, Health)>();
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut leading = *leader.borrow_and_update();
        if leading {
            reconcile(&registry, &mut running, None, &tx);
        }
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
                // A leadership that cannot change (embedded store) has no
                // sender; this branch is then simply never taken.
                Ok(()) = leader.changed() => {
                    leading = *leader.borrow_and_update();
                    if leading {
                        tracing::info!("leading: starting control-plane health checks");
                        reconcile(&registry, &mut running, None, &tx);
                    } else {
                        tracing::info!("not leading: stopping control-plane health checks");
                        for (_, r) in running.drain() {
                            let _ = r.stop.send(true);
                        }
                    }
                }
                c = changes.recv() => match c {
                    Err(broadcast::error::RecvError::Closed) => break,
                    _ if !leading => {}
                    Ok(Change::Service(s)) => reconcile(&registry, &mut running, Some(&s), &tx),
                    Ok(Change::All) | Err(broadcast::error::RecvError::Lagged(_)) => reconcile(&registry, &mut running, None, &tx),
                },
                Some((id, health)) = transitions.recv() => {
                    // A transition for a checker stopped meanwhile is stale.
                    if !running.contains_key(&id) {
                        continue;
                    }
                    let status = HealthStatus::from(health);
                    tracing::info!(instance = ?id, status = status.as_str_name(), "health transition");
                    metrics.health_transition(status);
                    if let Err(e) = registry.set_status(&id, status).await {
                        tracing::warn!(instance = ?id, error = %e, "recording health transition");
                    }
                }
            }
        }
        for (_, r) in running {
            let _ = r.stop.send(true);
        }
    })
}

/// Starts, restarts or stops checkers so they match the registry, for one
/// service or (None) for all.
fn reconcile(
    registry: &Registry,
    running: &mut HashMap<String, Running>,
    service: Option<&str>,
    tx: &mpsc::UnboundedSender<(String, Health)>,
) {
    let wanted: Vec<Instance> = match service {
        Some(s) => registry.instances(s),
        None => registry.all(),
    }
    .iter()
    .map(|s| s.instance.clone())
    .filter(|i| i.node_id.is_empty() && i.check.is_some())
    .collect();
    let wanted_ids: std::collections::HashSet<&str> =
        wanted.iter().map(|i| i.id.as_str()).collect();
    running.retain(|id, r| {
        let in_scope = service.is_none_or(|s| r.service == s);
        let keep = !in_scope || wanted_ids.contains(id.as_str());
        if !keep {
            let _ = r.stop.send(true);
        }
        keep
    });
    for i in wanted {
        let check = i.check.clone().expect("filtered");
        if running
            .get(&i.id)
            .is_some_and(|r| r.check == check && r.service == i.service)
        {
            continue;
        }
        let spec = match spec(&check) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(instance = ?i.id, error = %e, "unusable check");
                continue;
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        if let Some(old) = running.insert(
            i.id.clone(),
            Running {
                service: i.service.clone(),
                check,
                stop,
            },
        ) {
            let _ = old.stop.send(true);
        }
        let tx = tx.clone();
        let id = i.id.clone();
        spawn_checker(spec, move |h| drop(tx.send((id.clone(), h))), stop_rx);
    }
}

fn spec(c: &HealthCheck) -> Result<CheckSpec, isdp_core::probe::ProbeError> {
    Ok(CheckSpec {
        target: c.target.parse::<Target>()?,
        interval: Duration::from_millis(u64::from(c.interval_ms.max(1))),
        timeout: Duration::from_millis(u64::from(c.timeout_ms.max(1))),
        thresholds: Thresholds {
            rise: c.rise,
            fall: c.fall,
        },
    })
}
