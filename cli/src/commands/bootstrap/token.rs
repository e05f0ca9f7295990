//! The join token a first bootstrap creates when given none: for the one
//! service, scoped to the upstreams, described so `isdpctl token list`
//! says what it is for; and revoked again if the bootstrap then fails.

use isdp_core::{dial::ControlAuth, role::Role};
use isdp_proto::v1::{CreateTokenRequest, RevokeTokenRequest, tokens_client::TokensClient};

use super::{
    BootstrapError, GrpcArgs,
    identity::{api, connect},
};
use crate::commands::Cli;

/// A join token this command created: revoked again if the bootstrap
/// fails after it, so a failure leaves no credential behind.
pub struct Minted {
    pub id: String,
    pub secret: String,
    admin: ControlAuth,
}

/// Creates the join token: role join, the one service, the upstreams,
/// the TTL; described so `isdpctl token list` says what it is for.
pub async fn mint(
    cli: &Cli,
    args: &GrpcArgs,
    node_id: &str,
    anonymous: ControlAuth,
) -> Result<Minted, BootstrapError> {
    let admin = ControlAuth {
        token: crate::commands::operator_token(cli),
        ..anonymous
    };
    let channel = connect(&cli.control_plane, &admin).await?;
    let resp = TokensClient::new(channel)
        .create(CreateTokenRequest {
            role: Role::Join.to_proto() as i32,
            services: vec![args.service.clone()],
            upstreams: args.upstreams.clone(),
            description: format!("isdpctl bootstrap grpc: node {node_id}"),
            ttl_seconds: args.ttl.map_or(0, |t| t.as_secs().max(1)),
        })
        .await
        .map_err(api("token create", ""))?
        .into_inner();
    let id = resp.info.map(|i| i.id).unwrap_or_default();
    Ok(Minted {
        id,
        secret: resp.secret,
        admin,
    })
}

/// Best effort: the bootstrap failed after creating its token.
pub async fn revoke(cli: &Cli, minted: &Minted) {
    let revoked = async {
        let channel = connect(&cli.control_plane, &minted.admin).await?;
        TokensClient::new(channel)
            .revoke(RevokeTokenRequest {
                id: minted.id.clone(),
            })
            .await
            .map_err(api("token revoke", ""))
    }
    .await;
    match revoked {
        Ok(_) => eprintln!("revoked token {} again, which this run created", minted.id),
        Err(e) => eprintln!(
            "token {} was created for this run and could not be revoked ({e}): revoke it with `isdpctl token revoke {}`",
            minted.id, minted.id
        ),
    }
}
