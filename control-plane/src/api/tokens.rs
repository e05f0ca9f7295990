//! `isdp.v1.Tokens`: mint, list and revoke bearer tokens (admin only; the
//! auth layer checks that).

use std::time::Duration;

use isdp_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, RevokeTokenResponse, tokens_server,
};
use tonic::{Request, Response, Status};

use crate::{
    auth::principal,
    tokens::{Role, TokenError, Tokens},
};

pub struct TokensApi {
    tokens: Tokens,
}

impl TokensApi {
    pub fn new(tokens: Tokens) -> Self {
        TokensApi { tokens }
    }

    pub fn into_server(self) -> tokens_server::TokensServer<Self> {
        tokens_server::TokensServer::new(self).max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

fn status(e: TokenError) -> Status {
    match e {
        TokenError::Invalid(_) => Status::invalid_argument(e.to_string()),
        TokenError::NotFound(_) => Status::not_found(e.to_string()),
        TokenError::TooManyRevoked { .. } => Status::resource_exhausted(e.to_string()),
        TokenError::Store(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl tokens_server::Tokens for TokensApi {
    async fn create(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let by = principal(&req)?.id.clone();
        let r = req.into_inner();
        let role = Role::from_proto(r.role)
            .ok_or_else(|| Status::invalid_argument("role: must be read, write, admin or join"))?;
        let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds));
        let (token, secret) = self
            .tokens
            .create(
                role,
                crate::tokens::Scope {
                    services: r.services,
                    upstreams: r.upstreams,
                },
                r.description,
                ttl,
            )
            .await
            .map_err(status)?;
        tracing::info!(id = %token.id, role = role.name(), by = %by, "created a token");
        Ok(Response::new(CreateTokenResponse {
            info: Some(token.info()),
            secret,
        }))
    }

    async fn list(
        &self,
        _req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        Ok(Response::new(ListTokensResponse {
            tokens: self.tokens.list().iter().map(|t| t.info()).collect(),
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let by = principal(&req)?.id.clone();
        let id = req.into_inner().id;
        let tombstone = self.tokens.revoke(&id).await.map_err(status)?;
        tracing::info!(id = %id, by = %by, remembered_until_unix_ms = tombstone.prune_at_unix_ms, "revoked a token");
        Ok(Response::new(RevokeTokenResponse {
            remembered_until_unix_ms: tombstone.prune_at_unix_ms,
        }))
    }
}
