//! The connection to etcd: one gRPC channel balanced over every member,
//! carrying the metadata each call needs, over etcd's own API (generated
//! from its `.proto` files in `isdp-proto`, feature `etcd`).
//!
//! Why not a client crate: the one well-kept Rust client compiles etcd's
//! protos with a system `protoc` in its build script, which made a plain
//! `cargo build` fail on a machine without `protobuf-compiler` and its
//! include files. What the store needs from a client is small: a balanced
//! channel with TLS, the `hasleader` and `token` metadata, and a login that
//! is repeated when etcd lets the token expire. Retries and timeouts stay
//! in `etcd.rs`, where they always were.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use isdp_proto::etcd::etcdserverpb::{
    AuthenticateRequest, auth_client::AuthClient, kv_client::KvClient, lease_client::LeaseClient,
    watch_client::WatchClient,
};
use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{EtcdOptions, REQUEST_TIMEOUT};

/// Longest one TCP/TLS connect to an etcd member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 PINGs notice a silently dead member (and its watches) quickly.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response accepted. etcd's own default send limit is unbounded;
/// a page of [`super::PAGE`] instances with the largest metadata the
/// registry allows stays well below this.
const MAX_RESPONSE_BYTES: usize = 128 * 1024 * 1024;

/// A channel to the cluster with the metadata interceptor in front.
pub type Intercepted = InterceptedService<Channel, Metadata>;

/// A handle to the cluster; clones share the channel and the login.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    /// Set when etcd has authentication enabled.
    login: Option<Arc<Login>>,
}

/// A user's credentials and the token etcd issued for them. etcd forgets
/// tokens (after 5 minutes idle by default, and on a restart), so the
/// store logs in again when a call is refused for an invalid token.
struct Login {
    user: String,
    password: String,
    /// Read on every call, written after a login; never held across an
    /// `.await`.
    token: RwLock<Option<AsciiMetadataValue>>,
}

/// Adds what every call carries: `hasleader`, so a member cut off from the
/// quorum refuses instead of serving stale data and the caller moves on to
/// another member, and the login's `token`.
#[derive(Clone)]
pub struct Metadata {
    token: Option<AsciiMetadataValue>,
}

impl Interceptor for Metadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert("hasleader", MetadataValue::from_static("true"));
        if let Some(token) = &self.token {
            metadata.insert("token", token.clone());
        }
        Ok(request)
    }
}

// === impl Client ===

impl Client {
    /// Builds the channel. No member is contacted yet unless a user is
    /// given: the token is fetched now, so bad credentials fail at startup.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, String> {
        let tls = tls(options)?;
        let mut endpoints = Vec::with_capacity(options.endpoints.len());
        for url in &options.endpoints {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("endpoint {url}: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            if let Some(tls) = &tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| format!("endpoint {url}: {e}"))?;
            }
            endpoints.push(endpoint);
        }
        if endpoints.is_empty() {
            return Err("no endpoints".into());
        }
        let client = Client {
            channel: Channel::balance_list(endpoints.into_iter()),
            login: match (&options.username, &options.password) {
                (Some(user), Some(password)) => Some(Arc::new(Login {
                    user: user.clone(),
                    password: password.clone(),
                    token: RwLock::new(None),
                })),
                _ => None,
            },
        };
        if client.login.is_some() {
            tokio::time::timeout(REQUEST_TIMEOUT, client.log_in())
                .await
                .map_err(|_| format!("login: no answer within {REQUEST_TIMEOUT:?}"))?
                .map_err(|e| format!("login: {}", describe(&e)))?;
        }
        Ok(client)
    }

    /// Logs in again (if etcd has authentication on), replacing the token.
    pub async fn log_in(&self) -> Result<(), Status> {
        let Some(login) = &self.login else {
            return Ok(());
        };
        let response = AuthClient::new(self.channel.clone())
            .authenticate(AuthenticateRequest {
                name: login.user.clone(),
                password: login.password.clone(),
            })
            .await?
            .into_inner();
        let token = AsciiMetadataValue::try_from(response.token)
            .map_err(|_| Status::internal("etcd returned a token that is not ASCII"))?;
        *login.token.write().unwrap_or_else(|e| e.into_inner()) = Some(token);
        Ok(())
    }

    fn intercepted(&self) -> Intercepted {
        let token = self.login.as_ref().and_then(|login| {
            login
                .token
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        });
        InterceptedService::new(self.channel.clone(), Metadata { token })
    }

    pub fn kv(&self) -> KvClient<Intercepted> {
        KvClient::new(self.intercepted()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    pub fn watch(&self) -> WatchClient<Intercepted> {
        WatchClient::new(self.intercepted()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    pub fn lease(&self) -> LeaseClient<Intercepted> {
        LeaseClient::new(self.intercepted())
    }

    /// etcd's user and role administration, for tests and tools.
    pub fn auth(&self) -> AuthClient<Intercepted> {
        AuthClient::new(self.intercepted())
    }
}

/// Whether etcd refused the call's token (expired, or issued before a
/// member restarted): logging in again and retrying will do.
pub fn token_expired(status: &Status) -> bool {
    status.code() == tonic::Code::Unauthenticated && status.message().contains("invalid auth token")
}

/// A status as one line: etcd's message carries the detail, the code the
/// kind when the message is empty.
pub fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{} ({:?})", status.message(), status.code())
    }
}

fn tls(options: &EtcdOptions) -> Result<Option<ClientTlsConfig>, String> {
    if options.ca_file.is_none() && options.cert_file.is_none() {
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &options.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--etcd-ca-file")?));
    }
    if let (Some(cert), Some(key)) = (&options.cert_file, &options.key_file) {
        let cert = read(cert, "--etcd-cert-file")?;
        let key = read(key, "--etcd-key-file")?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(Some(tls))
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}
