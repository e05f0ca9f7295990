//! The clustered store: the [`Store`] trait over an etcd v3 cluster, so
//! several control-plane replicas share one registry.
//!
//! The trait was shaped after etcd, so most calls map one to one: `range` is
//! a prefix range read (paged, at one revision), `txn` an etcd transaction
//! with `mod_revision` compares, `watch` an etcd watch from a revision, and
//! leases are etcd leases, which is what cleans up a crashed replica's
//! sessions: nobody keeps their leases alive, so etcd deletes their keys.
//!
//! Every call is bounded by [`REQUEST_TIMEOUT`]: a replica that cannot reach
//! etcd answers writes with `Unavailable` (naming etcd and the endpoints) in
//! three seconds instead of hanging, and keeps serving reads from its
//! in-memory views. The client's channel balances over all endpoints and
//! reconnects by itself, so nothing here has to notice etcd coming back.

mod client;
mod watch;

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use isdp_proto::etcd::{
    etcdserverpb::{
        Compare as EtcdCompare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
        LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
        compare::{CompareResult, CompareTarget, TargetUnion},
        request_op::Request as RequestKind,
    },
    mvccpb,
};
use tonic::Status;

pub use client::Client;

use super::{
    Compare, KeyValue, LeaseId, Op, Revision, Store, StoreError, StoreHealth, Txn, TxnOutcome,
    WatchStream, health::CallHealth,
};

/// Longest any single etcd call may take, retries included, before it
/// counts as unavailable. Short, because a caller (an operator, a sidecar
/// opening its session) would rather retry elsewhere than wait on a
/// partitioned etcd; long enough to ride out an etcd leader election.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest one attempt may take. A request a follower forwarded to a leader
/// that just died hangs until etcd gives up on it; cutting it short lets
/// the next attempt reach the new leader instead.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Keys per page of a range read, so a large registry never exceeds the
/// gRPC message limit.
const PAGE: i64 = 1_000;

/// How to reach etcd: endpoints, TLS and authentication.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// `http://` or `https://` URLs of the members.
    pub endpoints: Vec<String>,
    /// CA bundle (PEM) to verify the members with; needs https endpoints.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user and password, when etcd has authentication enabled.
    pub username: Option<String>,
    pub password: Option<String>,
    /// How long every call may fail to reach etcd before the store counts
    /// as failed (`/ready` 503); [`UNREADY_AFTER`] when unset.
    pub unready_after: Option<Duration>,
}

/// Default of [`EtcdOptions::unready_after`]: longer than a call's own
/// bound and an etcd election, so one slow call does not flip readiness.
pub const UNREADY_AFTER: Duration = Duration::from_secs(10);

/// A handle to the etcd cluster; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    /// The endpoints, for error messages.
    endpoints: Arc<str>,
    /// Whether calls reach etcd, for `/ready` and the metrics.
    health: CallHealth,
}

// === impl EtcdStore ===

impl EtcdStore {
    /// Builds the client. Without authentication no member is contacted yet
    /// (the first call connects); with it, the token is fetched now, so bad
    /// credentials fail at startup.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, StoreError> {
        let endpoints: Arc<str> = options.endpoints.join(",").into();
        let client = Client::connect(options)
            .await
            .map_err(|what| StoreError::Unavailable(format!("etcd at {endpoints}: {what}")))?;
        let health = CallHealth::new(options.unready_after.unwrap_or(UNREADY_AFTER));
        Ok(EtcdStore {
            shared: Arc::new(Shared {
                client,
                endpoints,
                health,
            }),
        })
    }

    /// The underlying client, for tests and tools that need etcd calls the
    /// trait does not offer (compaction, users and roles).
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("etcd at {}: {what}", self.shared.endpoints))
    }

    /// Runs one etcd call within [`REQUEST_TIMEOUT`], retrying transient
    /// failures (see [`transient`]) until it succeeds, fails for good, or
    /// the time is up; the error is then the last attempt's. A call refused
    /// for an expired token logs in again first.
    ///
    /// A retried attempt may have been applied already (a timeout or a
    /// leader change leaves that open). Every write the control plane makes
    /// tolerates that: compare-and-set writes then fail their compare and
    /// are re-read and retried by their caller, the others (session puts,
    /// deletes, lease calls) have the same effect applied twice.
    async fn call<T, Fut>(&self, f: impl FnMut(Client) -> Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<T, Failure>>,
    {
        let r = self.attempts(f).await;
        match &r {
            Err(f) if f.transient() => self.shared.health.unreachable(f.describe()),
            _ => self.shared.health.reached(),
        }
        r
    }

    /// [`Self::call`]'s attempts, until one succeeds, fails for good, or
    /// the time is up.
    async fn attempts<T, Fut>(&self, mut f: impl FnMut(Client) -> Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<T, Failure>>,
    {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let attempt = (tokio::time::Instant::now() + ATTEMPT_TIMEOUT).min(deadline);
            let client = self.shared.client.clone();
            let failure = match tokio::time::timeout_at(attempt, f(client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(Failure::Etcd(s))) if client::token_expired(&s) => {
                    match tokio::time::timeout_at(deadline, client.log_in()).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => return Err(Failure::Etcd(e)),
                        Err(_) => Failure::Timeout,
                    }
                }
                Ok(Err(f)) if !f.transient() => return Err(f),
                Ok(Err(f)) => f,
                Err(_) => Failure::Timeout,
            };
            if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(failure);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The error of a failed call of kind `what`; a missing lease is its
    /// own error, everything else is Unavailable naming etcd.
    fn fail(&self, what: &str, failure: Failure, lease: Option<LeaseId>) -> StoreError {
        match failure {
            Failure::LeaseGone => StoreError::LeaseNotFound(lease.unwrap_or_default()),
            Failure::Etcd(s) if s.message().contains("lease not found") => {
                StoreError::LeaseNotFound(lease.unwrap_or_default())
            }
            Failure::Etcd(s) => self.unavailable(format!("{what}: {}", client::describe(&s))),
            Failure::Timeout => {
                self.unavailable(format!("{what}: no answer within {REQUEST_TIMEOUT:?}"))
            }
        }
    }
}

/// Why an etcd call failed.
enum Failure {
    Etcd(Status),
    /// A keep-alive answered with a TTL of 0: the lease does not exist
    /// (any more).
    LeaseGone,
    Timeout,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Etcd(status)
    }
}

impl Failure {
    /// Whether another attempt may succeed: the member could not be
    /// reached (the channel's balancer keeps dead members in rotation, so
    /// while one of three is down every few calls land on it), has no
    /// leader (an election is under way), or did not answer in time.
    fn transient(&self) -> bool {
        match self {
            Failure::Etcd(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            Failure::LeaseGone => false,
            Failure::Timeout => true,
        }
    }

    /// For health: what the last failed call met.
    fn describe(&self) -> String {
        match self {
            Failure::Etcd(s) => client::describe(s),
            Failure::LeaseGone => "lease gone".into(),
            Failure::Timeout => format!("no answer within {REQUEST_TIMEOUT:?}"),
        }
    }
}

/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn to_kv(kv: &mvccpb::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        value: Bytes::copy_from_slice(&kv.value),
        mod_revision: kv.mod_revision as Revision,
        lease: (kv.lease != 0).then_some(kv.lease as LeaseId),
    }
}

fn revision(header: Option<&isdp_proto::etcd::etcdserverpb::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let range_end = prefix_end(prefix);
        let mut out = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        // Every page is read at the first page's revision, so the result
        // is one consistent snapshot however many pages it takes.
        let mut at = 0i64;
        loop {
            let request = RangeRequest {
                key: from.clone(),
                range_end: range_end.clone(),
                limit: PAGE,
                revision: at,
                ..Default::default()
            };
            let resp = self
                .call(|c| {
                    let request = request.clone();
                    async move { Ok(c.kv().range(request).await?.into_inner()) }
                })
                .await
                .map_err(|f| self.fail("range", f, None))?;
            if at == 0 {
                at = revision(resp.header.as_ref());
            }
            out.extend(resp.kvs.iter().map(to_kv));
            match resp.kvs.last() {
                Some(last) if resp.more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((out, at as Revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compare = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => EtcdCompare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Mod as i32,
                    key: key.as_bytes().to_vec(),
                    target_union: Some(TargetUnion::ModRevision(*revision as i64)),
                    ..Default::default()
                },
            })
            .collect();
        let lease = txn.ops.iter().find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete { .. } => None,
        });
        let success = txn
            .ops
            .into_iter()
            .map(|op| RequestOp {
                request: Some(match op {
                    Op::Put { key, value, lease } => RequestKind::RequestPut(PutRequest {
                        key: key.into_bytes(),
                        value: value.to_vec(),
                        lease: lease.map_or(0, |l| l as i64),
                        ..Default::default()
                    }),
                    Op::Delete { key } => RequestKind::RequestDeleteRange(DeleteRangeRequest {
                        key: key.into_bytes(),
                        ..Default::default()
                    }),
                }),
            })
            .collect();
        let request = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        let resp = self
            .call(|c| {
                let request = request.clone();
                async move { Ok(c.kv().txn(request).await?.into_inner()) }
            })
            .await
            .map_err(|f| self.fail("txn", f, lease))?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded,
            revision: revision(resp.header.as_ref()) as Revision,
        })
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        Ok(watch::start(self.clone(), prefix.to_owned(), after))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd counts in whole seconds (and raises very short TTLs to its
        // minimum, about 2 s with default timings).
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let resp = self
            .call(|c| async move {
                let request = LeaseGrantRequest { ttl: secs, id: 0 };
                Ok(c.lease().lease_grant(request).await?.into_inner())
            })
            .await
            .map_err(|f| self.fail("lease grant", f, None))?;
        Ok(resp.id as LeaseId)
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        // One keep-alive on a stream of its own, and its answer; a TTL of 0
        // there means the lease is gone.
        self.call(|c| async move {
            let request = LeaseKeepAliveRequest { id: id as i64 };
            let mut answers = c
                .lease()
                .lease_keep_alive(tokio_stream::once(request))
                .await?
                .into_inner();
            match answers.message().await? {
                Some(answer) if answer.ttl > 0 => Ok(()),
                Some(_) => Err(Failure::LeaseGone),
                None => Err(Status::unavailable("lease keep-alive stream ended").into()),
            }
        })
        .await
        .map_err(|f| self.fail("lease keep-alive", f, Some(id)))
    }

    async fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(|c| async move {
            let request = LeaseRevokeRequest { id: id as i64 };
            c.lease().lease_revoke(request).await?;
            Ok(())
        })
        .await
        .map_err(|f| self.fail("lease revoke", f, Some(id)))
    }

    /// Failed once every call has failed to reach etcd for longer than
    /// [`EtcdOptions::unready_after`]; the reason names the endpoints.
    fn health(&self) -> StoreHealth {
        let mut health = self.shared.health.health();
        if let Some(problem) = &mut health.problem {
            *problem = format!("etcd at {} {problem}", self.shared.endpoints);
        }
        health
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end("/isdp/"), b"/isdp0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
