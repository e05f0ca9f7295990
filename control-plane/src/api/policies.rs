//! `isdp.v1.Policies`: operators' traffic policies (stored and distributed
//! by [`crate::policy`]).

use std::pin::Pin;

use futures::Stream;
use isdp_proto::v1::{
    DeletePolicyRequest, DeletePolicyResponse, GetPolicyRequest, GetPolicyResponse,
    ListPoliciesRequest, ListPoliciesResponse, PutPolicyRequest, PutPolicyResponse,
    WatchPoliciesRequest, WatchPoliciesResponse,
    policies_server::{Policies as PoliciesService, PoliciesServer},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
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
            tracing::info!(parent: &span, %service, version = stored.version, "policy stored");
        }
        Ok(Response::new(PutPolicyResponse {
            policy: Some(stored),
        }))
    }

    async fn get(
        &self,
        req: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        let stored = self
            .policies
            .get(&req.into_inner().service)
            .map_err(status)?;
        Ok(Response::new(GetPolicyResponse {
            policy: Some(stored),
        }))
    }

    async fn list(
        &self,
        _req: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        Ok(Response::new(ListPoliciesResponse {
            policies: self.policies.list(),
        }))
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
        tracing::info!(service = %req.service, "policy deleted");
        Ok(Response::new(DeletePolicyResponse {}))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _req: Request<WatchPoliciesRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let mut changes = self.policies.subscribe();
        let mut shutdown = self.shutdown.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let policies = decode_all(&changes.borrow_and_update())
                    .into_values()
                    .collect();
                if tx
                    .send(Ok(WatchPoliciesResponse { policies }))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
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
