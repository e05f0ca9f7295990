//! Change indexes for blocking reads (`?index=N&wait=D`, Consul's
//! `X-Consul-Index`): each service's index is the number of the last change
//! seen to its instances, and the catalog's is the last change of any.
//!
//! Numbers come from the store revision the registry view has applied,
//! raised to one past the previous number when the view reports a change
//! before its revision moved: they only grow, also across restarts (a
//! restarted control plane starts at the store's current revision, at or
//! past every number it gave out before), and every change gets a new one.
//! A client that presents an index that is not current is answered at once.
//! One task follows the registry's change notifications and numbers them;
//! waiters wait on its `watch`, so a change is numbered before any waiter
//! wakes for it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
};

use crate::registry::{Change, Registry};

#[derive(Clone)]
pub struct Index {
    shared: Arc<Shared>,
    latest: watch::Receiver<u64>,
}

struct Shared {
    numbers: Mutex<Numbers>,
}

/// Service -> the number of its last change, above `floor`.
#[derive(Default)]
struct Numbers {
    floor: u64,
    services: HashMap<String, u64>,
}

// === impl Index ===

impl Index {
    /// Follows `registry` until `shutdown`.
    pub fn spawn(
        registry: Registry,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let start = registry.revision().max(1);
        let shared = Arc::new(Shared {
            numbers: Mutex::new(Numbers {
                floor: start,
                services: HashMap::new(),
            }),
        });
        let (tx, latest) = watch::channel(start);
        let mut changes = registry.subscribe();
        let task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let change = tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return,
                        c = changes.recv() => c,
                    };
                    let number = registry.revision().max(*tx.borrow() + 1);
                    {
                        let mut n = shared.numbers.lock().expect("index lock");
                        match change {
                            Ok(Change::Service(s)) => {
                                n.services.insert(s.to_string(), number);
                            }
                            // A resync or missed notifications: anything
                            // may have changed.
                            Ok(Change::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                                n.floor = number;
                                n.services.clear();
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                    tx.send_replace(number);
                }
            })
        };
        (Index { shared, latest }, task)
    }

    /// The index of `service`'s instances, or of the whole catalog.
    pub fn current(&self, service: Option<&str>) -> u64 {
        let n = self.shared.numbers.lock().expect("index lock");
        match service {
            Some(s) => n.services.get(s).copied().unwrap_or(0).max(n.floor),
            None => *self.latest.borrow(),
        }
    }

    /// Waits until the index of `service` (or of the catalog) is no longer
    /// `seen`, for at most `wait`; returns the index then.
    pub async fn wait(&self, service: Option<&str>, seen: u64, wait: Duration) -> u64 {
        let mut latest = self.latest.clone();
        latest.borrow_and_update();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = self.current(service);
            if now != seen {
                return now;
            }
            match tokio::time::timeout_at(deadline, latest.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the numbering task ended (shutdown).
                _ => return self.current(service),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::embedded::EmbeddedStore;
    use isdp_proto::v1::Instance;

    use super::*;

    fn instance(id: &str, service: &str) -> Instance {
        Instance {
            id: id.into(),
            service: service.into(),
            address: "127.0.0.1".into(),
            port: 8080,
            ..Default::default()
        }
    }

    /// A waiter on one service wakes for a change of it, not for another
    /// service's, and the index it gets only grows.
    #[tokio::test]
    async fn a_blocking_read_wakes_for_its_own_service() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let registry = Registry::start(Arc::new(store), "", shutdown.clone())
            .await
            .unwrap();
        let (index, _task) = Index::spawn(registry.clone(), shutdown);
        let first = index.current(Some("web"));
        let waiter = {
            let index = index.clone();
            tokio::spawn(async move {
                index
                    .wait(Some("web"), first, Duration::from_secs(30))
                    .await
            })
        };
        registry.register(instance("api-1", "api")).await.unwrap();
        let short = index
            .wait(Some("web"), first, Duration::from_millis(50))
            .await;
        assert_eq!(short, first, "another service's change leaves web's index");
        assert!(!waiter.is_finished());
        registry.register(instance("web-1", "web")).await.unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes for web's change")
            .unwrap();
        assert!(woke > first, "{woke} > {first}");
        assert!(index.current(None) >= woke);
        registry.deregister("web-1").await.unwrap();
        let after = index.wait(Some("web"), woke, Duration::from_secs(5)).await;
        assert!(after > woke, "a removal is a change too: {after} > {woke}");
    }
}
