//! `isdp.v1.Authorization`: operators' rules on which services may call
//! which (stored and distributed by [`crate::authz`]).

use isdp_proto::v1::{
    Action, DeleteRuleRequest, DeleteRuleResponse, GetDefaultRequest, GetDefaultResponse,
    ListRulesRequest, ListRulesResponse, PutRuleRequest, PutRuleResponse, SetDefaultRequest,
    SetDefaultResponse,
    authorization_server::{Authorization, AuthorizationServer},
};
use tonic::{Request, Response, Status};

use crate::{
    authz::{Authz, AuthzError},
    store::StoreError,
};

pub struct AuthorizationApi {
    authz: Authz,
}

impl AuthorizationApi {
    pub fn new(authz: Authz) -> Self {
        AuthorizationApi { authz }
    }

    pub fn into_server(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self).max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

fn status(e: AuthzError) -> Status {
    match e {
        AuthzError::Invalid(_) | AuthzError::InvalidDefault => {
            Status::invalid_argument(e.to_string())
        }
        AuthzError::NotFound { .. } => Status::not_found(e.to_string()),
        AuthzError::TooMany { .. } => Status::resource_exhausted(e.to_string()),
        AuthzError::Store(StoreError::Closed) => Status::unavailable("control plane shutting down"),
        AuthzError::Store(e) => Status::unavailable(e.to_string()),
    }
}

#[tonic::async_trait]
impl Authorization for AuthorizationApi {
    async fn put_rule(
        &self,
        req: Request<PutRuleRequest>,
    ) -> Result<Response<PutRuleResponse>, Status> {
        let rule = req
            .into_inner()
            .rule
            .ok_or_else(|| Status::invalid_argument("rule: required"))?;
        let rule = self.authz.put_rule(rule).await.map_err(status)?;
        tracing::info!(destination = ?rule.destination, rule = ?rule.name, "authorization rule stored");
        Ok(Response::new(PutRuleResponse { rule: Some(rule) }))
    }

    async fn delete_rule(
        &self,
        req: Request<DeleteRuleRequest>,
    ) -> Result<Response<DeleteRuleResponse>, Status> {
        let req = req.into_inner();
        self.authz
            .delete_rule(&req.destination, &req.name)
            .await
            .map_err(status)?;
        tracing::info!(destination = ?req.destination, rule = ?req.name, "authorization rule deleted");
        Ok(Response::new(DeleteRuleResponse {}))
    }

    async fn list_rules(
        &self,
        req: Request<ListRulesRequest>,
    ) -> Result<Response<ListRulesResponse>, Status> {
        let destination = req.into_inner().destination;
        let rules = self
            .authz
            .list((!destination.is_empty()).then_some(destination.as_str()));
        Ok(Response::new(ListRulesResponse { rules }))
    }

    async fn set_default(
        &self,
        req: Request<SetDefaultRequest>,
    ) -> Result<Response<SetDefaultResponse>, Status> {
        let action = Action::try_from(req.into_inner().action).unwrap_or(Action::Unspecified);
        self.authz.set_default(action).await.map_err(status)?;
        tracing::info!(default = ?action, "authorization default set");
        Ok(Response::new(SetDefaultResponse {}))
    }

    async fn get_default(
        &self,
        _req: Request<GetDefaultRequest>,
    ) -> Result<Response<GetDefaultResponse>, Status> {
        Ok(Response::new(GetDefaultResponse {
            action: self.authz.default_action() as i32,
        }))
    }
}
