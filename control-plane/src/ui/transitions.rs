//! Recent health transitions, for the dashboard: a ring of the last
//! [`CAPACITY`] changes of an instance's health (registrations and
//! removals included), fed by the registry view's change notifications.
//!
//! It is memory of this replica since it started, not history: a change
//! the view applied between two notifications of the same service shows
//! as one transition, and a restart starts empty.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use isdp_proto::v1::HealthStatus;
use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
};

use crate::registry::{Change, Registry};

/// Transitions kept.
pub const CAPACITY: usize = 200;

/// One change of one instance's health. `None`: not registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub at_unix_ms: i64,
    pub service: String,
    pub instance: String,
    pub from: Option<HealthStatus>,
    pub to: Option<HealthStatus>,
}

/// instance id -> (service, health), as last seen.
pub type Known = HashMap<String, (String, HealthStatus)>;

#[derive(Clone, Default)]
pub struct Transitions {
    ring: Arc<Mutex<VecDeque<Transition>>>,
}

// === impl Transitions ===

impl Transitions {
    /// Follows `registry` until `shutdown`. What is registered at the start
    /// is the baseline, not a transition.
    pub fn spawn(
        registry: Registry,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let this = Transitions::default();
        let mut changes = registry.subscribe();
        let mut known = Known::new();
        diff(&mut known, None, &current(&registry, None), 0);
        let task = {
            let this = this.clone();
            tokio::spawn(async move {
                loop {
                    let change = tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return,
                        c = changes.recv() => c,
                    };
                    let service = match change {
                        Ok(Change::Service(s)) => Some(s),
                        Ok(Change::All) | Err(broadcast::error::RecvError::Lagged(_)) => None,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    let now = crate::ca::unix_ms();
                    let seen = current(&registry, service.as_deref());
                    let found = diff(&mut known, service.as_deref(), &seen, now);
                    this.push(found);
                }
            })
        };
        (this, task)
    }

    fn push(&self, found: Vec<Transition>) {
        if found.is_empty() {
            return;
        }
        let mut ring = self.ring.lock().expect("transitions lock");
        for t in found {
            if ring.len() == CAPACITY {
                ring.pop_front();
            }
            ring.push_back(t);
        }
    }

    /// The transitions kept, newest first.
    pub fn recent(&self) -> Vec<Transition> {
        let ring = self.ring.lock().expect("transitions lock");
        ring.iter().rev().cloned().collect()
    }
}

/// The instances of `service` (or of every service), with their health.
fn current(registry: &Registry, service: Option<&str>) -> Known {
    let stored = match service {
        Some(s) => registry.instances(s),
        None => registry.all(),
    };
    stored
        .iter()
        .map(|s| {
            let i = &s.instance;
            (i.id.clone(), (i.service.clone(), i.status()))
        })
        .collect()
}

/// Updates `known` to `seen` (everything of `service`, or of every
/// service when `None`) and returns what changed, in instance id order.
pub fn diff(known: &mut Known, service: Option<&str>, seen: &Known, now: i64) -> Vec<Transition> {
    let mut found = Vec::new();
    let gone: Vec<String> = known
        .iter()
        .filter(|(id, (s, _))| service.is_none_or(|w| w == s) && !seen.contains_key(*id))
        .map(|(id, _)| id.clone())
        .collect();
    for id in gone {
        if let Some((s, health)) = known.remove(&id) {
            found.push(Transition {
                at_unix_ms: now,
                service: s,
                instance: id,
                from: Some(health),
                to: None,
            });
        }
    }
    for (id, (s, health)) in seen {
        let before = known.insert(id.clone(), (s.clone(), *health));
        let from = before.as_ref().map(|(_, h)| *h);
        if from != Some(*health) {
            found.push(Transition {
                at_unix_ms: now,
                service: s.clone(),
                instance: id.clone(),
                from,
                to: Some(*health),
            });
        }
    }
    found.sort_by(|a, b| a.instance.cmp(&b.instance));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(items: &[(&str, &str, HealthStatus)]) -> Known {
        items
            .iter()
            .map(|(id, s, h)| (id.to_string(), (s.to_string(), *h)))
            .collect()
    }

    #[test]
    fn diff_reports_registrations_health_changes_and_removals_once() {
        use HealthStatus::*;
        let mut k = Known::new();
        let seen = known(&[("a1", "a", Unknown), ("b1", "b", Healthy)]);
        let first = diff(&mut k, None, &seen, 1);
        assert_eq!(first.len(), 2);
        assert_eq!((first[0].from, first[0].to), (None, Some(Unknown)));
        assert!(diff(&mut k, None, &seen, 2).is_empty(), "nothing changed");
        // A change of service a leaves b alone, even though b is not in `seen`.
        let found = diff(&mut k, Some("a"), &known(&[("a1", "a", Unhealthy)]), 3);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0],
            Transition {
                at_unix_ms: 3,
                service: "a".into(),
                instance: "a1".into(),
                from: Some(Unknown),
                to: Some(Unhealthy),
            }
        );
        let found = diff(&mut k, Some("b"), &Known::new(), 4);
        assert_eq!((found[0].instance.as_str(), found[0].to), ("b1", None));
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let t = Transitions::default();
        let one = |i: usize| Transition {
            at_unix_ms: i as i64,
            service: "s".into(),
            instance: format!("i{i}"),
            from: None,
            to: Some(HealthStatus::Healthy),
        };
        t.push((0..CAPACITY + 5).map(one).collect());
        let recent = t.recent();
        assert_eq!(recent.len(), CAPACITY);
        assert_eq!(recent[0].at_unix_ms, (CAPACITY + 4) as i64, "newest first");
        assert_eq!(
            recent[CAPACITY - 1].at_unix_ms,
            5,
            "the oldest five dropped"
        );
    }
}
