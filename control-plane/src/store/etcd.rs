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
//! a couple of seconds instead of hanging, and keeps serving reads from its
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

/// Longest any single etcd call may take before it counts as unavailable.
/// Short, because a caller (an operator, a sidecar opening its session)
/// would rather retry elsewhere than wait on a partitioned etcd.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
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
            .with_timeout(REQUEST_TIMEOUT)
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
            connect = connect.with_user(user, password);
        }
        let client = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Client::connect(&options.endpoints, Some(connect)),
        )
        .await
        .map_err(|_| fail(format!("no answer within {REQUEST_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
        Ok(EtcdStore { client, endpoints })
    }

    /// The underlying client, for tests and tools that need etcd calls the
    /// trait does not offer (compaction, member status).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn unavailable(&self, what: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("etcd at {}: {what}", self.endpoints))
    }

    /// Runs one etcd call within [`REQUEST_TIMEOUT`]. The client's own
    /// timeout does not cover waiting for a reachable member, hence this.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(format!("{what}: {e}"))),
            Err(_) => {
                Err(self.unavailable(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")))
            }
        }
    }
}

fn read(path: &std::path::Path, flag: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| StoreError::Unavailable(format!("{flag} {}: {e}", path.display())))
}

/// Whether etcd refused because the lease does not exist (any more).
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
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
            let mut kv = self.client.kv_client();
            let resp = self
                .call("range", kv.get(from.clone(), Some(options)))
                .await?;
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
        let mut kv = self.client.kv_client();
        let request = EtcdTxn::new().when(compares).and_then(ops);
        match tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(request)).await {
            Ok(Ok(resp)) => Ok(TxnOutcome {
                succeeded: resp.succeeded(),
                revision: resp.header().map_or(0, |h| h.revision()) as Revision,
            }),
            Ok(Err(e)) if is_lease_not_found(&e) => {
                Err(StoreError::LeaseNotFound(lease.unwrap_or_default()))
            }
            Ok(Err(e)) => Err(self.unavailable(format!("txn: {e}"))),
            Err(_) => Err(self.unavailable(format!("txn: no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }

    fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream, StoreError> {
        Ok(watch::start(self.clone(), prefix.to_owned(), after))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd counts in whole seconds (and raises very short TTLs to its
        // minimum, about 2 s with default timings).
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let mut lease = self.client.lease_client();
        let resp = self.call("lease grant", lease.grant(secs, None)).await?;
        Ok(resp.id() as LeaseId)
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        // Opening the stream sends one keep-alive; its answer says whether
        // the lease still exists (a TTL of 0 means it does not).
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async move {
            let (_keeper, mut stream) = lease.keep_alive(id as i64).await?;
            stream.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(()),
            Ok(Ok(_)) => Err(StoreError::LeaseNotFound(id)),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
            Ok(Err(e)) => Err(self.unavailable(format!("lease keep-alive: {e}"))),
            Err(_) => Err(self.unavailable(format!(
                "lease keep-alive: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    async fn revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        match tokio::time::timeout(REQUEST_TIMEOUT, lease.revoke(id as i64)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
            Ok(Err(e)) => Err(self.unavailable(format!("lease revoke: {e}"))),
            Err(_) => Err(self.unavailable(format!(
                "lease revoke: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
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
