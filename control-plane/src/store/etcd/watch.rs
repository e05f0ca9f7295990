//! An etcd watch as a [`WatchStream`]: one task per watch forwards etcd's
//! responses, grouped into one [`WatchBatch`] per revision.
//!
//! Progress: when the consumer asks ([`WatchStream::request_progress`]),
//! etcd is sent a progress request; its answer (no events, the cluster's
//! revision in the header) becomes an empty batch. etcd answers only once
//! the watch has caught up, so the consumer asks again while it waits.
//!
//! The stream ends with an error instead of retrying by itself: the caller
//! (the registry view) knows its last applied revision and decides between
//! resuming from it (`Unavailable`) and a full resync (`Compacted`). That
//! keeps one reconnect policy, in one place, for every backend.

use isdp_proto::etcd::{
    etcdserverpb::{
        WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
        watch_request::RequestUnion,
    },
    mvccpb::{self, event::EventType},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{EtcdStore, prefix_end, to_kv};
use crate::store::{Event, Revision, StoreError, WatchBatch, WatchStream};

/// Batches buffered between etcd and a slow consumer.
const BUFFER: usize = 256;

pub(super) fn start(store: EtcdStore, prefix: String, after: Revision) -> WatchStream {
    let (tx, rx) = mpsc::channel(BUFFER);
    let (progress_tx, progress_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        if let Err(e) = forward(&store, &prefix, after, &tx, progress_rx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    WatchStream::with_progress_requests(ReceiverStream::new(rx), progress_tx)
}

/// Forwards batches until the consumer goes away (`Ok`) or the watch fails.
async fn forward(
    store: &EtcdStore,
    prefix: &str,
    after: Revision,
    tx: &mpsc::Sender<Result<WatchBatch, StoreError>>,
    mut progress: mpsc::Receiver<()>,
) -> Result<(), StoreError> {
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            start_revision: after as i64 + 1,
            ..Default::default()
        })),
    };
    // Each attempt opens its own stream. The request side is kept as long
    // as the watch: etcd ends a watch whose client closed its half.
    let open = store.call(|c| {
        let create = create.clone();
        async move {
            let (requests, request_rx) = mpsc::channel::<WatchRequest>(2);
            requests
                .try_send(create)
                .expect("a new channel has room for one request");
            let stream = c
                .watch()
                .watch(ReceiverStream::new(request_rx))
                .await?
                .into_inner();
            Ok((requests, stream))
        }
    });
    let (requests, mut stream) = tokio::select! {
        _ = tx.closed() => return Ok(()),
        s = open => s.map_err(|f| store.fail("watch", f, None))?,
    };
    let mut last = after;
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return Ok(()),
            Some(()) = progress.recv() => {
                let request = WatchRequest {
                    request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                };
                // Full means a request is already on its way.
                let _ = requests.try_send(request);
                continue;
            }
            m = stream.message() => m,
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return Err(store.unavailable("watch: stream ended")),
            Err(e) => {
                return Err(store.unavailable(format!("watch: {}", super::client::describe(&e))));
            }
        };
        if response.compact_revision > 0 {
            return Err(StoreError::Compacted {
                requested: last,
                oldest: response.compact_revision as Revision,
            });
        }
        if response.canceled {
            return Err(store.unavailable(format!("watch canceled: {}", response.cancel_reason)));
        }
        if is_progress(&response) {
            let revision = response.header.as_ref().map_or(0, |h| h.revision) as Revision;
            if revision > last {
                last = revision;
                let progress = WatchBatch {
                    revision,
                    events: Vec::new(),
                };
                if tx.send(Ok(progress)).await.is_err() {
                    return Ok(());
                }
            }
            continue;
        }
        for batch in batches(&response.events) {
            last = batch.revision;
            if tx.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// An answer to a progress request: no events, and not the answer to the
/// watch's creation (whose header revision says nothing about what was
/// delivered).
fn is_progress(response: &WatchResponse) -> bool {
    response.events.is_empty()
        && !response.created
        && !response.canceled
        && response.compact_revision == 0
        && response.header.as_ref().is_some_and(|h| h.revision > 0)
}

/// Groups events by revision, in order: one etcd transaction, one batch.
fn batches(events: &[mvccpb::Event]) -> Vec<WatchBatch> {
    let mut out: Vec<WatchBatch> = Vec::new();
    for e in events {
        let Some(kv) = &e.kv else { continue };
        let revision = kv.mod_revision as Revision;
        let event = match e.r#type() {
            EventType::Put => Event::Put(to_kv(kv)),
            EventType::Delete => Event::Delete {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
            },
        };
        match out.last_mut() {
            Some(b) if b.revision == revision => b.events.push(event),
            _ => out.push(WatchBatch {
                revision,
                events: vec![event],
            }),
        }
    }
    out
}
