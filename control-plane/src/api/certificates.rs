//! `isdp.v1.Certificates`: signs sidecar CSRs, serves the trust bundle and
//! rotates the root. The auth layer has checked the role; Sign checks the
//! service scope of a join principal here, and issues no certificate that
//! outlives the token the caller stands on.

use isdp_proto::v1::{
    RotateRootRequest, RotateRootResponse, SignRequest, SignResponse, TrustBundleRequest,
    TrustBundleResponse, certificates_server,
};
use tonic::{Request, Response, Status};

use crate::{
    auth::principal,
    ca::{Ca, CaError},
};

pub struct CertificatesApi {
    ca: Ca,
}

impl CertificatesApi {
    pub fn new(ca: Ca) -> Self {
        CertificatesApi { ca }
    }

    pub fn into_server(self) -> certificates_server::CertificatesServer<Self> {
        certificates_server::CertificatesServer::new(self)
            .max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

fn status(e: CaError) -> Status {
    match e {
        CaError::Csr(_) | CaError::Invalid(_) => Status::invalid_argument(e.to_string()),
        CaError::Contended => Status::aborted(e.to_string()),
        CaError::GrantExpired { .. } => Status::unauthenticated(e.to_string()),
        CaError::Store(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl certificates_server::Certificates for CertificatesApi {
    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let p = principal(&req)?.clone();
        let r = req.into_inner();
        p.check_service("Certificates/Sign", &r.service)?;
        let signed = self
            .ca
            .sign(
                &r.service,
                &r.csr_der,
                r.lifetime_seconds,
                p.grant
                    .clone()
                    .map(|token| crate::ca::grant::Grant {
                        token,
                        upstreams: p.upstreams.clone(),
                    })
                    .as_ref(),
                p.grant_expires_at_unix_ms,
            )
            .map_err(status)?;
        tracing::info!(service = ?r.service, principal = %p.id, not_after_unix_ms = signed.not_after_unix_ms, "signed a certificate");
        Ok(Response::new(signed))
    }

    async fn trust_bundle(
        &self,
        _req: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundleResponse>, Status> {
        Ok(Response::new(TrustBundleResponse {
            bundle: Some(self.ca.bundle()),
        }))
    }

    async fn rotate_root(
        &self,
        req: Request<RotateRootRequest>,
    ) -> Result<Response<RotateRootResponse>, Status> {
        let after = std::time::Duration::from_secs(req.into_inner().prune_after_seconds);
        let bundle = self.ca.rotate(after).await.map_err(status)?;
        Ok(Response::new(RotateRootResponse {
            bundle: Some(bundle),
        }))
    }
}
