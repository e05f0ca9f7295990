//! The production [`Signer`]: `isdp.v1.Certificates/Sign` on the control
//! plane.
//!
//! Each call dials the next control-plane URL. Signing happens once per
//! service every few hours (and on retries), so a dedicated connection per
//! call costs nothing that matters, keeps this independent of the session
//! and xDS streams, and rotates over replicas on failure for free.

use std::{future::Future, pin::Pin, sync::Mutex};

use isdp_proto::v1::{SignRequest, SignResponse, certificates_client::CertificatesClient};

use super::Signer;
use isdp_core::dial::{ControlAuth, ControlChannel, Dialer};

/// Signs through a connected channel.
#[derive(Clone)]
pub struct ChannelSigner(pub CertificatesClient<ControlChannel>);

impl Signer for ChannelSigner {
    fn sign(
        &self,
        request: SignRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SignResponse, tonic::Status>> + Send + '_>> {
        let mut client = self.0.clone();
        Box::pin(async move { Ok(client.sign(request).await?.into_inner()) })
    }
}

/// Dials the control plane for each call, rotating over its URLs.
pub struct DialSigner {
    /// Held for the URL rotation; connecting needs no lock.
    dialer: Mutex<Dialer>,
    auth: ControlAuth,
}

impl DialSigner {
    pub fn new(urls: Vec<String>, auth: ControlAuth) -> Self {
        DialSigner {
            dialer: Mutex::new(Dialer::new(urls, auth.clone())),
            auth,
        }
    }
}

impl Signer for DialSigner {
    fn sign(
        &self,
        request: SignRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SignResponse, tonic::Status>> + Send + '_>> {
        let url = self.dialer.lock().expect("dialer lock").next_url();
        Box::pin(async move {
            let channel = isdp_core::dial::connect(&url, &self.auth)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            ChannelSigner(CertificatesClient::new(channel))
                .sign(request)
                .await
        })
    }
}
