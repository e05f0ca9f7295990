//! `isdp.v1.ProxyStatus`: what each connected sidecar has acknowledged.

use isdp_proto::v1::{
    ListProxiesRequest, ListProxiesResponse,
    proxy_status_server::{ProxyStatus, ProxyStatusServer},
};
use tonic::{Request, Response, Status};

use crate::proxies::Proxies;

pub struct ProxyStatusApi {
    proxies: Proxies,
}

impl ProxyStatusApi {
    pub fn new(proxies: Proxies) -> Self {
        ProxyStatusApi { proxies }
    }

    pub fn into_server(self) -> ProxyStatusServer<Self> {
        ProxyStatusServer::new(self).max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl ProxyStatus for ProxyStatusApi {
    async fn list_proxies(
        &self,
        _req: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        Ok(Response::new(ListProxiesResponse {
            proxies: self.proxies.list(),
        }))
    }
}
