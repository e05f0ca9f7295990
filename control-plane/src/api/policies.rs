//! `isdp.v1.Policies`: operators' traffic policies (stored and distributed
//! by [`crate::policy`]).
//!
//! Writes need `write` (the auth layer checks). Reads are open to join
//! principals too, within their [`ReadScope`], the same one xDS applies:
//! their own services and their upstreams (every service for a join token
//! minted without `--upstream`). `Get` of another service is
//! PERMISSION_DENIED before the policy is looked up (so the answer does
//! not tell whether it exists); `List` and `Watch` leave the others out.

use std::pin::Pin;

use futures::Stream;
use isdp_proto::v1::{
    DeletePolicyRequest, DeletePolicyResponse, GetPolicyRequest, GetPolicyResponse,
    ListPoliciesRequest, ListPoliciesResponse, PutPolicyRequest, PutPolicyResponse, StoredPolicy,
    TRAFFIC_POLICY_TYPE_URL, WatchPoliciesRequest, WatchPoliciesResponse,
    policies_server::{Policies as PoliciesService, PoliciesServer},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    auth::{ReadScope, principal},
    policy::{Policies, PolicyError, decode_all},
    store::StoreError,
};

pub struct PoliciesApi {
    policies: Policies,
    shutdown: watch::Receiver<bool>,
}

impl PoliciesApi {
    pub fn new(policies: Policies, shutdown: watch::Receiver<bool>) -> Self {
        PoliciesApi { policies, shutdown }
    }

    pub fn into_server(self) -> PoliciesServer<Self> {
        PoliciesServer::new(self).max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

fn status(e: PolicyError) -> Status {
    match e {
        PolicyError::Invalid(_) => Status::invalid_argument(e.to_string()),
        PolicyError::NotFound(_) => Status::not_found(e.to_string()),
        PolicyError::VersionMismatch { .. } => Status::aborted(e.to_string()),
        PolicyError::Store(StoreError::Closed) => {
            Status::unavailable("control plane shutting down")
        }
        PolicyError::Store(e) => Status::unavailable(e.to_string()),
    }
}

/// What the caller of `req` may read; the auth layer put its principal there.
fn read_scope<T>(req: &Request<T>) -> Result<ReadScope, Status> {
    Ok(ReadScope::of(Some(principal(req)?)))
}

/// Whether `scope` may read `policy`.
fn visible(scope: &ReadScope, policy: &StoredPolicy) -> bool {
    let service = policy.policy.as_ref().map_or("", |p| p.service.as_str());
    scope.allows(TRAFFIC_POLICY_TYPE_URL, service)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchPoliciesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PoliciesService for PoliciesApi {
    async fn put(
        &self,
        req: Request<PutPolicyRequest>,
    ) -> Result<Response<PutPolicyResponse>, Status> {
        let req = req.into_inner();
        let span = super::op_span("isdp.v1.Policies/Put");
        let result = self
            .policies
            .put(&req.document_json, req.expected_version, req.dry_run)
            .await
            .map_err(status);
        super::record_outcome(&span, &result);
        let stored = result?;
        if !req.dry_run {
            let service = stored.policy.as_ref().map_or("", |p| p.service.as_str());
            tracing::info!(parent: &span, ?service, version = stored.version, "policy stored");
        }
        Ok(Response::new(PutPolicyResponse {
            policy: Some(stored),
        }))
    }

    async fn get(
        &self,
        req: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        let scope = read_scope(&req)?;
        let service = req.into_inner().service;
        scope.check("Policies/Get", TRAFFIC_POLICY_TYPE_URL, &service)?;
        let stored = self.policies.get(&service).map_err(status)?;
        Ok(Response::new(GetPolicyResponse {
            policy: Some(stored),
        }))
    }

    async fn list(
        &self,
        req: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let scope = read_scope(&req)?;
        let mut policies = self.policies.list();
        policies.retain(|p| visible(&scope, p));
        Ok(Response::new(ListPoliciesResponse { policies }))
    }

    async fn delete(
        &self,
        req: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let req = req.into_inner();
        self.policies
            .delete(&req.service, req.expected_version)
            .await
            .map_err(status)?;
        tracing::info!(service = ?req.service, "policy deleted");
        Ok(Response::new(DeletePolicyResponse {}))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<WatchPoliciesRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let scope = read_scope(&req)?;
        let mut changes = self.policies.subscribe();
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            // A change outside the caller's scope leaves what it sees as it
            // was: nothing is sent, so it learns nothing of the change.
            let mut last: Option<Vec<StoredPolicy>> = None;
            loop {
                let policies: Vec<StoredPolicy> = decode_all(&changes.borrow_and_update())
                    .into_values()
                    .filter(|p| visible(&scope, p))
                    .collect();
                if last.as_ref() != Some(&policies) {
                    let msg = WatchPoliciesResponse {
                        policies: policies.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(policies);
                }
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    // The watcher went (or the auth layer ended the call):
                    // stop now rather than at the next change.
                    _ = tx.closed() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a small channel, so a slow reader holds
/// at most a few snapshots (each is the whole set; newer ones supersede).
fn async_stream<F, Fut>(body: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<WatchPoliciesResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
