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

mod watch;

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, Identity,
    PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp,
};

use super::{
    Compare, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn, TxnOutcome, WatchStream,
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
/// Longest one TCP/TLS connect to an etcd member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 PINGs notice a silently dead member (and its watches) quickly.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
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
}

/// A handle to the etcd cluster; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    /// The endpoints, for error messages.
    endpoints: Arc<str>,
}

// === impl EtcdStore ===

impl EtcdStore {
    /// Builds the client. Without authentication no member is contacted yet
    /// (the first call connects); with it, the token is fetched now, so bad
    /// credentials fail at startup.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, StoreError> {
        let endpoints: Arc<str> = options.endpoints.join(",").into();
        let fail = |what: String| StoreError::Unavailable(format!("etcd at {endpoints}: {what}"));
        let mut connect = ConnectOptions::new()
            .with_timeout(ATTEMPT_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // A member cut off from the quorum refuses instead of serving
            // stale data, so the client moves on to another member.
            .with_require_leader(true);
        if options.ca_file.is_some() || options.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.ca_file {
                let pem = read(ca, "--etcd-ca-file")?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&options.cert_file, &options.key_file) {
                let cert = read(cert, "--etcd-cert-file")?;
                let key = read(key, "--etcd-key-file")?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(tls);
        }
        if let (Some(user), Some(password)) = (&options.username, &options.password) {
            // etcd's tokens expire (5 min idle by default); fetch a new one
            // instead of failing every call after that.
            connect = connect
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        let client = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Client::connect(&options.endpoints, Some(connect)),
        )
        .await
        .map_err(|_| fail(format!("no answer within {REQUEST_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
        Ok(EtcdStore {
            shared: Arc::new(Shared { client, endpoints }),
        })
    }

    /// The underlying client, for tests and tools that need etcd calls the
    /// trait does not offer (compaction, member status).
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("etcd at {}: {what}", self.shared.endpoints))
    }

    /// Runs one etcd call within [`REQUEST_TIMEOUT`], retrying transient
    /// failures (see [`transient`]) until it succeeds, fails for good, or
    /// the time is up; the error is then the last attempt's.
    ///
    /// A retried attempt may have been applied already (a timeout or a
    /// leader change leaves that open). Every write the control plane makes
    /// tolerates that: compare-and-set writes then fail their compare and
    /// are re-read and retried by their caller, the others (session puts,
    /// deletes, lease calls) have the same effect applied twice.
    async fn call<T, Fut>(&self, mut f: impl FnMut(Client) -> Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let attempt = (tokio::time::Instant::now() + ATTEMPT_TIMEOUT).min(deadline);
            let failure =
                match tokio::time::timeout_at(attempt, f(self.shared.client.clone())).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) if !transient(&e) => return Err(Failure::Etcd(e)),
                    Ok(Err(e)) => Failure::Etcd(e),
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
            Failure::Etcd(e) if is_lease_not_found(&e) => {
                StoreError::LeaseNotFound(lease.unwrap_or_default())
            }
            Failure::Etcd(e) => self.unavailable(format!("{what}: {e}")),
            Failure::Timeout => {
                self.unavailable(format!("{what}: no answer within {REQUEST_TIMEOUT:?}"))
            }
        }
    }
}

/// Why an etcd call failed.
enum Failure {
    Etcd(etcd_client::Error),
    Timeout,
}

/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Whether another attempt may succeed: the member could not be reached
/// (the client's balancer keeps dead members in rotation, so while one of
/// three is down every few calls land on it), has no leader (an election
/// is under way), or did not answer in time.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

fn read(path: &std::path::Path, flag: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| StoreError::Unavailable(format!("{flag} {}: {e}", path.display())))
}

/// Whether etcd refused because the lease does not exist (any more); the
/// keep-alive stream reports it as a TTL of 0.
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

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

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        mod_revision: kv.mod_revision() as Revision,
        lease: (kv.lease() != 0).then_some(kv.lease() as LeaseId),
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        // Every page is read at the first page's revision, so the result
        // is one consistent snapshot however many pages it takes.
        let mut revision = 0i64;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let key = from.clone();
            let resp = self
                .call(|c| {
                    let (key, options) = (key.clone(), options.clone());
                    async move { c.kv_client().get(key, Some(options)).await }
                })
                .await
                .map_err(|f| self.fail("range", f, None))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            out.extend(resp.kvs().iter().map(to_kv));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((out, revision as Revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => {
                    EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *revision as i64)
                }
            })
            .collect();
        let lease = txn.ops.iter().find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete { .. } => None,
        });
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(
                    key,
                    value.to_vec(),
                    lease.map(|l| PutOptions::new().with_lease(l as i64)),
                ),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let request = EtcdTxn::new().when(compares).and_then(ops);
        let resp = self
            .call(|c| {
                let request = request.clone();
                async move { c.kv_client().txn(request).await }
            })
            .await
            .map_err(|f| self.fail("txn", f, lease))?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()) as Revision,
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
            .call(|c| async move { c.lease_client().grant(secs, None).await })
            .await
            .map_err(|f| self.fail("lease grant", f, None))?;
        Ok(resp.id() as LeaseId)
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        // Opening the stream sends one keep-alive and waits for its answer;
        // a TTL of 0 there (lease gone) comes back as an error.
        self.call(|c| async move { c.lease_client().keep_alive(id as i64).await })
            .await
            .map(drop)
            .map_err(|f| self.fail("lease keep-alive", f, Some(id)))
    }

    async fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(|c| async move { c.lease_client().revoke(id as i64).await })
            .await
            .map(drop)
            .map_err(|f| self.fail("lease revoke", f, Some(id)))
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
