//! Keeps the rules view in step with the store: a range, then the watch
//! from that revision; on any interruption the view keeps its rules and
//! the watch resumes (a compacted revision reloads everything).

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use isdp_proto::v1::{Action, AuthzRule, GetDefaultResponse};
use prost::Message;
use tokio::sync::watch;

use super::{AuthzError, Rules};
use crate::store::{Event, KeyValue, Revision, Store, StoreError};

/// Key of the mesh-wide default, under `<prefix>authz/`.
pub(super) const DEFAULT_KEY: &str = "default";
/// Folder of the rules, under `<prefix>authz/`: `rules/<destination>/<name>`.
pub(super) const RULES_DIR: &str = "rules/";

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub(super) async fn start(
    store: Arc<dyn Store>,
    prefix: String,
    shutdown: watch::Receiver<bool>,
) -> Result<(watch::Receiver<Arc<Rules>>, watch::Receiver<Revision>), AuthzError> {
    let (rules, rev) = load(&*store, &prefix).await?;
    let (rules_tx, rules_rx) = watch::channel(Arc::new(rules));
    let (applied_tx, applied_rx) = watch::channel(rev);
    tokio::spawn(follow(store, prefix, rev, rules_tx, applied_tx, shutdown));
    Ok((rules_rx, applied_rx))
}

async fn load(store: &dyn Store, prefix: &str) -> Result<(Rules, Revision), StoreError> {
    let (kvs, rev) = store.range(prefix).await?;
    let mut rules = Rules::default();
    for kv in &kvs {
        apply_put(&mut rules, prefix, kv);
    }
    Ok((rules, rev))
}

async fn follow(
    store: Arc<dyn Store>,
    prefix: String,
    mut rev: Revision,
    rules_tx: watch::Sender<Arc<Rules>>,
    applied_tx: watch::Sender<Revision>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = RETRY_MIN;
    loop {
        let failure = match store.watch(&prefix, rev) {
            Err(e) => e,
            Ok(mut stream) => loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    next = stream.next() => match next {
                        Some(Ok(batch)) => {
                            retry = RETRY_MIN;
                            let mut rules = Rules::clone(&rules_tx.borrow());
                            for e in &batch.events {
                                match e {
                                    Event::Put(kv) => apply_put(&mut rules, &prefix, kv),
                                    Event::Delete { key } => apply_delete(&mut rules, &prefix, key),
                                }
                            }
                            rev = batch.revision;
                            rules_tx.send_if_modified(|held| {
                                let changed = **held != rules;
                                if changed {
                                    *held = Arc::new(rules);
                                }
                                changed
                            });
                            applied_tx.send_replace(rev);
                        }
                        Some(Err(e)) => break e,
                        None => return,
                    },
                }
            },
        };
        match failure {
            StoreError::Closed => return,
            StoreError::Compacted { .. } => match load(&*store, &prefix).await {
                Ok((rules, r)) => {
                    tracing::info!(revision = r, "authorization rules reloaded");
                    rev = r;
                    rules_tx.send_replace(Arc::new(rules));
                    applied_tx.send_replace(rev);
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "reloading authorization rules failed"),
            },
            e => {
                tracing::warn!(error = %e, revision = rev, "authorization watch interrupted; resuming")
            }
        }
        let delay = retry;
        retry = (retry * 2).min(RETRY_MAX);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn apply_put(rules: &mut Rules, prefix: &str, kv: &KeyValue) {
    let Some(rest) = kv.key.strip_prefix(prefix) else {
        return;
    };
    if rest == DEFAULT_KEY {
        match GetDefaultResponse::decode(kv.value.as_ref()).map(|d| Action::try_from(d.action)) {
            Ok(Ok(a @ (Action::Allow | Action::Deny))) => rules.default = a,
            _ => {
                tracing::error!(key = %kv.key, "undecodable authorization default in store; kept the previous one")
            }
        }
    } else if rest.starts_with(RULES_DIR) {
        match AuthzRule::decode(kv.value.as_ref()) {
            Ok(rule) => {
                rules
                    .by_destination
                    .entry(rule.destination.clone())
                    .or_default()
                    .insert(rule.name.clone(), rule);
            }
            Err(e) => {
                tracing::error!(key = %kv.key, error = %e, "undecodable authorization rule in store; skipped")
            }
        }
    }
}

fn apply_delete(rules: &mut Rules, prefix: &str, key: &str) {
    let Some(rest) = key.strip_prefix(prefix) else {
        return;
    };
    if rest == DEFAULT_KEY {
        rules.default = super::INITIAL_DEFAULT;
    } else if let Some((destination, name)) =
        rest.strip_prefix(RULES_DIR).and_then(|r| r.split_once('/'))
        && let Some(held) = rules.by_destination.get_mut(destination)
    {
        held.remove(name);
        if held.is_empty() {
            rules.by_destination.remove(destination);
        }
    }
}
