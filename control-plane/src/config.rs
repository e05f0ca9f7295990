//! Command-line flags of `isdp-control-plane`; each is also an `ISDP_*`
//! environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

mod http;
mod load;
mod ui;

pub use http::{DEFAULT_MAX_BODY_BYTES, HttpArgs};
pub use load::LoadArgs;
pub use ui::UiArgs;

use crate::registry::Quotas;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "isdp-control-plane",
    version,
    about = "ISDP control plane: registry, health checks and xDS server"
)]
pub struct Config {
    /// gRPC listener for operators, sidecars and xDS. Port 0 picks a free port.
    #[arg(long, env = "ISDP_LISTEN", default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,

    /// Admin HTTP listener: /healthz, /ready, /metrics.
    #[arg(long, env = "ISDP_ADMIN_LISTEN", default_value = "127.0.0.1:15014")]
    pub admin_listen: SocketAddr,

    /// Most connections the gRPC listener holds at once, TLS handshakes
    /// included; one over it is closed as it is accepted (counted in
    /// `isdp_grpc_connections_refused_total{reason="max-connections"}`).
    /// Raise the process's file limit (`ulimit -n`) above it.
    #[arg(long, env = "ISDP_MAX_CONNECTIONS", default_value_t = crate::tls::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// How long a gRPC connection may go without its first request after
    /// it was accepted (its TLS handshake and HTTP/2 preface included);
    /// it is closed then, so a client holds no place without presenting a
    /// credential.
    #[arg(long, env = "ISDP_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub first_request_timeout: Duration,

    /// Most streams one gRPC connection may have open at once (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`); a client past it waits for one
    /// to end. A sidecar holds three or four.
    #[arg(long, env = "ISDP_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,

    /// Where Envoy nodes served over ADS listen for the mesh's services:
    /// the address of the `isdp_outbound` listener they receive (every
    /// service by its `Host`). The control plane does not bind it.
    #[arg(
        long,
        env = "ISDP_ENVOY_OUTBOUND_LISTEN",
        default_value = "127.0.0.1:15001"
    )]
    pub envoy_outbound_listen: SocketAddr,

    /// Which store holds the registry: `embedded` (one redb file in
    /// --data-dir, a single control plane) or `etcd` (an etcd cluster shared
    /// by several control-plane replicas).
    #[arg(long, env = "ISDP_STORE", default_value = "embedded", value_enum)]
    pub store: StoreKind,

    /// etcd member URLs (`http://HOST:2379` or `https://...`), comma-separated
    /// or repeated. Required with `--store etcd`.
    #[arg(long, env = "ISDP_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of everything this mesh keeps in etcd, so several meshes
    /// (or other applications) can share one cluster. Starts and ends with '/'.
    #[arg(long, env = "ISDP_ETCD_PREFIX", default_value = crate::KEY_PREFIX)]
    pub etcd_prefix: String,

    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long, env = "ISDP_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for etcd mutual TLS; needs --etcd-key-file.
    #[arg(long, env = "ISDP_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Private key (PEM) of --etcd-cert-file.
    #[arg(long, env = "ISDP_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user, when etcd authentication is enabled; needs a password.
    #[arg(long, env = "ISDP_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// Password of --etcd-username. Prefer the variable: flags show in `ps`.
    #[arg(long, env = "ISDP_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// How long every call may fail to reach etcd before `/ready` says 503
    /// (and `isdp_store_up` 0): longer than one call's 3 s bound and an
    /// etcd election, so a blip does not take the replica out. Default 10s.
    #[arg(long, env = "ISDP_ETCD_UNREADY_AFTER", value_parser = humantime::parse_duration)]
    pub etcd_unready_after: Option<Duration>,

    /// TTL of the lease that makes one replica the leader for work that must
    /// run once (health checks of operator-registered instances). A killed
    /// leader is replaced within about this long. Ignored by the embedded
    /// store, whose only control plane always leads.
    #[arg(long, env = "ISDP_LEADER_LEASE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub leader_lease: Duration,

    /// Where the embedded store keeps its file.
    #[arg(long, env = "ISDP_DATA_DIR", default_value = "./isdp-data")]
    pub data_dir: PathBuf,

    /// How long a sidecar's session stream may be gone before its instances
    /// are marked unhealthy. Covers a sidecar restart or a short partition.
    #[arg(long, env = "ISDP_SESSION_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub session_grace: Duration,

    /// How long a sidecar's session may be gone before its instances are
    /// removed. Must be longer than the grace period.
    #[arg(long, env = "ISDP_SESSION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub session_timeout: Duration,

    /// Log format: text (for people) or json (for log pipelines). Levels
    /// come from RUST_LOG (default: info).
    #[arg(long, env = "ISDP_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// SPIFFE trust domain of the mesh: sidecar certificates say
    /// `spiffe://<trust-domain>/svc/<service>`. A DNS name.
    #[arg(long, env = "ISDP_TRUST_DOMAIN", default_value = "isdp.local")]
    pub trust_domain: String,

    /// Lifetime of a sidecar certificate when it asks for none. Short, so a
    /// stolen key is useful briefly; sidecars renew before expiry.
    #[arg(long, env = "ISDP_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,

    /// Longest sidecar certificate lifetime; longer requests are capped.
    /// Also how long an old root stays trusted after a rotation by default,
    /// and (plus 10 s) how long a revoked token is remembered and sent to
    /// sidecars, whose certificates issued under it are refused until then.
    #[arg(long, env = "ISDP_MAX_CERT_LIFETIME", default_value = "30days", value_parser = humantime::parse_duration)]
    pub max_cert_lifetime: Duration,

    /// Root CA certificate (PEM) to sign with instead of generating one on
    /// first start; needs --ca-key. Ignored once the store holds a root.
    #[arg(long, env = "ISDP_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// Private key (PEM) of --ca-cert; refused unless private to its owner
    /// (mode 0600 or stricter). Stored sealed under the KEK.
    #[arg(long, env = "ISDP_CA_KEY")]
    pub ca_key: Option<PathBuf>,

    /// File holding the key-encryption key (KEK: base64 of 32 random bytes)
    /// that seals the CA's private key in the store; mode 0600 or stricter.
    /// Or the key itself in the variable ISDP_KEK (there is no flag for the
    /// value: it would show in `ps`). Without either, the embedded store
    /// generates `<data-dir>/kek` on first start; `--store etcd` needs one,
    /// the same on every replica.
    #[arg(long, env = "ISDP_KEK_FILE")]
    pub kek_file: Option<PathBuf>,

    /// The KEK being rotated away from (or ISDP_PREVIOUS_KEK): it still
    /// opens what it sealed, and the CA key is sealed again under the
    /// current KEK on start. Remove it once every replica has restarted.
    #[arg(long, env = "ISDP_PREVIOUS_KEK_FILE")]
    pub previous_kek_file: Option<PathBuf>,

    /// ISDP_KEK: read from the environment only.
    #[arg(skip = EnvSecret::var("ISDP_KEK"))]
    pub kek: Option<EnvSecret>,

    /// ISDP_PREVIOUS_KEK: read from the environment only.
    #[arg(skip = EnvSecret::var("ISDP_PREVIOUS_KEK"))]
    pub previous_kek: Option<EnvSecret>,

    /// Extra DNS name or IP for the gRPC listener's certificate (besides
    /// localhost, loopback, the listen IP and the hostname); repeatable.
    #[arg(long = "tls-san", env = "ISDP_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,

    /// Most instances one service may have, operator and sidecar
    /// registrations together.
    #[arg(long, env = "ISDP_MAX_INSTANCES_PER_SERVICE", default_value_t = Quotas::default().instances_per_service)]
    pub max_instances_per_service: usize,

    /// Most bytes of metadata (keys plus values) one instance may carry.
    #[arg(long, env = "ISDP_MAX_METADATA_BYTES_PER_INSTANCE", default_value_t = Quotas::default().metadata_bytes_per_instance)]
    pub max_metadata_bytes_per_instance: usize,

    /// Most bytes of metadata the instances of one service may carry
    /// together.
    #[arg(long, env = "ISDP_MAX_METADATA_BYTES_PER_SERVICE", default_value_t = Quotas::default().metadata_bytes_per_service)]
    pub max_metadata_bytes_per_service: usize,

    /// Largest encoded `ServiceEndpoints` xDS resource of one service, which
    /// the sidecar of every caller decodes. At most half of what a sidecar
    /// decodes in one message (8 MiB of 16 MiB).
    #[arg(long, env = "ISDP_MAX_SERVICE_ENDPOINTS_BYTES", default_value_t = Quotas::default().service_endpoints_bytes)]
    pub max_service_endpoints_bytes: usize,

    /// Most instances one sidecar session registers.
    #[arg(long, env = "ISDP_MAX_INSTANCES_PER_SESSION", default_value_t = Quotas::default().instances_per_session)]
    pub max_instances_per_session: usize,

    /// Most sidecar sessions one principal (a token, together with the
    /// certificates issued under it) may hold open on this control plane.
    #[arg(long, env = "ISDP_MAX_SESSIONS_PER_PRINCIPAL", default_value_t = Quotas::default().sessions_per_principal)]
    pub max_sessions_per_principal: usize,

    /// Most distinct resource names one xDS stream may subscribe to per
    /// resource type, names it may not read included; the request that
    /// would exceed it ends the stream with RESOURCE_EXHAUSTED. Bounds what
    /// one stream makes the control plane hold and log.
    #[arg(long, env = "ISDP_XDS_MAX_NAMES_PER_STREAM", default_value_t = isdp_xds::Limits::default().names_per_stream)]
    pub xds_max_names_per_stream: usize,

    /// Most streaming calls of each kind (ADS, state of the world and
    /// delta together; sessions; policy watches; registry watches) one
    /// principal (a token, together with the certificates issued under
    /// it) may hold open on this control plane; the next is refused with
    /// RESOURCE_EXHAUSTED. Every replica of a service usually joins with
    /// one token, so it matches the sessions one principal may hold.
    #[arg(long, env = "ISDP_MAX_STREAMS_PER_PRINCIPAL", default_value_t = Quotas::default().sessions_per_principal)]
    pub max_streams_per_principal: usize,

    /// Most bytes of subscribed xDS resource names one principal's ADS
    /// streams may hold together on this control plane, each name
    /// counting its length plus 64 bytes (its entries); the subscription
    /// that would exceed it ends its stream with RESOURCE_EXHAUSTED.
    /// Without it the per-stream bounds multiply by the streams a token
    /// may open. The default (16 MiB) fits 1000 sidecars sharing one join
    /// token with ~25 upstreams each (~6 KiB of names per sidecar) with
    /// room to spare; raise it for more sidecars per token.
    #[arg(long, env = "ISDP_XDS_MAX_NAME_BYTES_PER_PRINCIPAL", default_value_t = crate::auth::DEFAULT_NAME_BYTES_PER_PRINCIPAL)]
    pub xds_max_name_bytes_per_principal: usize,

    #[command(flatten)]
    pub trace: isdp_core::telemetry::TraceArgs,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub ui: UiArgs,

    #[command(flatten)]
    pub load: LoadArgs,
}

/// A secret taken from the environment; `Debug` does not show it.
#[derive(Clone)]
pub struct EnvSecret(pub String);

impl EnvSecret {
    /// The variable's value, if set and not empty (a value that is not
    /// UTF-8 is kept, lossily, so that it fails to parse loudly).
    pub fn var(name: &str) -> Option<EnvSecret> {
        let v = std::env::var_os(name)?;
        (!v.is_empty()).then(|| EnvSecret(v.to_string_lossy().into_owned()))
    }
}

impl std::fmt::Debug for EnvSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnvSecret(<hidden>)")
    }
}

/// The store backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Embedded,
    Etcd,
}

/// Default `--max-concurrent-streams`: hyper's own default, which the
/// server would otherwise leave unset.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 200;

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        self.validate_etcd()?;
        self.validate_ca()?;
        self.validate_kek()?;
        if self.session_timeout <= self.session_grace {
            return Err(format!(
                "--session-timeout ({}) must be longer than --session-grace ({})",
                humantime::format_duration(self.session_timeout),
                humantime::format_duration(self.session_grace)
            ));
        }
        if self.session_grace.is_zero() {
            return Err("--session-grace must be more than zero".into());
        }
        if self.first_request_timeout.is_zero() {
            return Err("--first-request-timeout must be more than zero".into());
        }
        self.http.validate()?;
        self.ui.validate()?;
        self.load.validate()?;
        self.validate_quotas()
    }

    /// Every quota at least 1; the resource bound within what sidecars
    /// decode.
    fn validate_quotas(&self) -> Result<(), String> {
        let q = self.quotas();
        for (flag, v) in [
            ("--max-instances-per-service", q.instances_per_service),
            (
                "--max-metadata-bytes-per-instance",
                q.metadata_bytes_per_instance,
            ),
            (
                "--max-metadata-bytes-per-service",
                q.metadata_bytes_per_service,
            ),
            ("--max-service-endpoints-bytes", q.service_endpoints_bytes),
            ("--max-instances-per-session", q.instances_per_session),
            ("--max-sessions-per-principal", q.sessions_per_principal),
            ("--xds-max-names-per-stream", self.xds_max_names_per_stream),
            (
                "--max-streams-per-principal",
                self.max_streams_per_principal,
            ),
            (
                "--xds-max-name-bytes-per-principal",
                self.xds_max_name_bytes_per_principal,
            ),
            ("--max-connections", self.max_connections),
            (
                "--max-concurrent-streams",
                self.max_concurrent_streams as usize,
            ),
        ] {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        let max = crate::publish::endpoints::MAX_RESOURCE_BYTES;
        if q.service_endpoints_bytes > max {
            return Err(format!(
                "--max-service-endpoints-bytes ({}) must be at most {max} (half of the {} bytes a sidecar decodes in one xDS message)",
                q.service_endpoints_bytes,
                isdp_core::dial::MAX_RESPONSE_BYTES
            ));
        }
        Ok(())
    }

    /// The limits every xDS stream is held to, from the flags.
    pub fn xds_limits(&self) -> isdp_xds::Limits {
        isdp_xds::Limits {
            names_per_stream: self.xds_max_names_per_stream,
        }
    }

    /// The registry's quotas, from the flags.
    pub fn quotas(&self) -> Quotas {
        Quotas {
            instances_per_service: self.max_instances_per_service,
            metadata_bytes_per_instance: self.max_metadata_bytes_per_instance,
            metadata_bytes_per_service: self.max_metadata_bytes_per_service,
            service_endpoints_bytes: self.max_service_endpoints_bytes,
            instances_per_session: self.max_instances_per_session,
            sessions_per_principal: self.max_sessions_per_principal,
        }
    }

    /// The CA flags: a DNS trust domain, sane lifetimes, cert and key
    /// together.
    fn validate_ca(&self) -> Result<(), String> {
        let td = &self.trust_domain;
        let labels_ok = !td.is_empty()
            && td.len() <= 253
            && td
                .split('.')
                .all(|l| isdp_core::names::check_dns_label(l).is_ok());
        if !labels_ok {
            return Err(format!(
                "--trust-domain: {td:?} must be a DNS name (lowercase labels separated by '.')"
            ));
        }
        let min = crate::ca::MIN_LIFETIME;
        if self.cert_lifetime < min || self.cert_lifetime > self.max_cert_lifetime {
            return Err(format!(
                "--cert-lifetime ({}) must be between {} and --max-cert-lifetime ({})",
                humantime::format_duration(self.cert_lifetime),
                humantime::format_duration(min),
                humantime::format_duration(self.max_cert_lifetime)
            ));
        }
        if self.max_cert_lifetime > Duration::from_secs(365 * 24 * 3600) {
            return Err("--max-cert-lifetime must be at most 365 days".into());
        }
        if self.ca_cert.is_some() != self.ca_key.is_some() {
            return Err("--ca-cert and --ca-key go together".into());
        }
        Ok(())
    }

    /// The KEK settings: each key given once, a previous one only beside a
    /// current one, and one at all with etcd (replicas must share it).
    fn validate_kek(&self) -> Result<(), String> {
        if self.kek_file.is_some() && self.kek.is_some() {
            return Err(
                "give the KEK once: --kek-file (ISDP_KEK_FILE) or ISDP_KEK, not both".into(),
            );
        }
        if self.previous_kek_file.is_some() && self.previous_kek.is_some() {
            return Err(
                "give the previous KEK once: --previous-kek-file (ISDP_PREVIOUS_KEK_FILE) or \
                 ISDP_PREVIOUS_KEK, not both"
                    .into(),
            );
        }
        let current = self.kek_file.is_some() || self.kek.is_some();
        let previous = self.previous_kek_file.is_some() || self.previous_kek.is_some();
        if previous && !current {
            return Err(
                "--previous-kek-file / ISDP_PREVIOUS_KEK needs the new KEK too: --kek-file \
                 (ISDP_KEK_FILE) or ISDP_KEK"
                    .into(),
            );
        }
        if self.store == StoreKind::Etcd && !current {
            return Err(
                "--store etcd needs a key-encryption key, the same on every replica, to seal \
                 the CA key in etcd: --kek-file PATH (ISDP_KEK_FILE) or ISDP_KEK (base64 of 32 \
                 random bytes, e.g. `head -c 32 /dev/urandom | base64`)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Where the KEKs come from.
    pub fn kek_sources(&self) -> crate::ca::KekSources {
        crate::ca::KekSources {
            file: self.kek_file.clone(),
            env: self.kek.as_ref().map(|s| s.0.clone()),
            previous_file: self.previous_kek_file.clone(),
            previous_env: self.previous_kek.as_ref().map(|s| s.0.clone()),
        }
    }

    /// The etcd flags: required together, consistent with each other, and
    /// not silently ignored when the embedded store is selected.
    fn validate_etcd(&self) -> Result<(), String> {
        if self.store == StoreKind::Embedded {
            let set = [
                ("--etcd-endpoints", !self.etcd_endpoints.is_empty()),
                ("--etcd-ca-file", self.etcd_ca_file.is_some()),
                ("--etcd-cert-file", self.etcd_cert_file.is_some()),
                ("--etcd-key-file", self.etcd_key_file.is_some()),
                ("--etcd-username", self.etcd_username.is_some()),
                ("--etcd-password", self.etcd_password.is_some()),
                ("--etcd-unready-after", self.etcd_unready_after.is_some()),
            ];
            if let Some((flag, _)) = set.iter().find(|(_, on)| *on) {
                return Err(format!("{flag} needs --store etcd (the store is embedded)"));
            }
            return Ok(());
        }
        if self.etcd_endpoints.is_empty() {
            return Err("--store etcd needs --etcd-endpoints (e.g. http://127.0.0.1:2379)".into());
        }
        for url in &self.etcd_endpoints {
            let ok = ["http://", "https://"]
                .iter()
                .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
            if !ok {
                return Err(format!(
                    "--etcd-endpoints: {url:?} must be an http:// or https:// URL"
                ));
            }
        }
        let tls = self.etcd_ca_file.is_some() || self.etcd_cert_file.is_some();
        if tls && self.etcd_endpoints.iter().any(|u| u.starts_with("http://")) {
            return Err("--etcd-ca-file/--etcd-cert-file need https:// --etcd-endpoints".into());
        }
        // No system roots are built in (rustls without a root store): an
        // etcd cluster's certificates come from its own CA anyway.
        if self.etcd_ca_file.is_none()
            && self
                .etcd_endpoints
                .iter()
                .any(|u| u.starts_with("https://"))
        {
            return Err(
                "https:// --etcd-endpoints need --etcd-ca-file (the CA of the etcd members' certificates)"
                    .into(),
            );
        }
        if self.etcd_cert_file.is_some() != self.etcd_key_file.is_some() {
            return Err("--etcd-cert-file and --etcd-key-file go together".into());
        }
        if self.etcd_username.is_some() != self.etcd_password.is_some() {
            return Err(
                "--etcd-username and --etcd-password (ISDP_ETCD_PASSWORD) go together".into(),
            );
        }
        let p = &self.etcd_prefix;
        if !p.starts_with('/') || !p.ends_with('/') || p.len() > 128 {
            return Err(format!(
                "--etcd-prefix: {p:?} must start and end with '/' and be at most 128 bytes"
            ));
        }
        if self.leader_lease < std::time::Duration::from_secs(2) {
            return Err(format!(
                "--leader-lease ({}) must be at least 2s (etcd's shortest lease)",
                humantime::format_duration(self.leader_lease)
            ));
        }
        Ok(())
    }

    /// The key prefix of everything the control plane stores.
    pub fn key_prefix(&self) -> &str {
        match self.store {
            StoreKind::Embedded => crate::KEY_PREFIX,
            StoreKind::Etcd => &self.etcd_prefix,
        }
    }

    pub fn etcd_options(&self) -> crate::store::etcd::EtcdOptions {
        crate::store::etcd::EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            unready_after: self.etcd_unready_after,
        }
    }
}

#[cfg(test)]
mod tests;
