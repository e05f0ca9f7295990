//! The raw, unvalidated configuration as written in TOML or in flag SPECs,
//! and its validation into [`Config`].

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::{
    Config, ConfigError, DEFAULT_ADMIN_LISTEN, DEFAULT_CHECK_PERIOD, DEFAULT_CONTROL_PLANE,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_LISTEN, LogFormat, Protocol,
    Service, Upstream, default_address, hostname,
};
use crate::balance::{Algorithm, HashKey};
use isdp_core::{names::check_dns_label, probe::Target};

/// The TOML file. Every key is optional here; validation applies defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub control_plane: Option<Vec<String>>,
    pub ca_file: Option<std::path::PathBuf>,
    pub join_token: Option<String>,
    pub admin_listen: Option<String>,
    pub address: Option<String>,
    pub inbound_listen: Option<String>,
    pub outbound_listen: Option<String>,
    #[serde(default)]
    pub service: Vec<ServiceSpec>,
    #[serde(default)]
    pub upstream: Vec<UpstreamSpec>,
    pub log_format: Option<LogFormat>,
    pub drain_timeout: Option<String>,
    pub workers: Option<usize>,
    pub access_log: Option<bool>,
    pub otlp_endpoint: Option<String>,
    pub trace_sample_ratio: Option<f64>,
    pub identity: Option<String>,
    pub zone: Option<String>,
    pub xds_relay_listen: Option<String>,
    pub xds_relay_max_streams: Option<u64>,
    pub dns_listen: Option<String>,
    pub dns_domain: Option<String>,
    pub dns_ttl: Option<String>,
    pub dns_max_answers: Option<i64>,
    pub dns_max_tcp_connections: Option<i64>,
    /// The `[limits]` table; flags merge into it.
    #[serde(default)]
    pub limits: super::LimitsSpec,
}

/// One `[[service]]` table or `--service` SPEC.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// Signed and wide so an out-of-range port gets a precise message.
    pub port: i64,
    pub protocol: Option<Protocol>,
    pub check: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub weight: Option<u32>,
    /// 0..=MAX_PRIORITY; default 0. Signed and wide so a negative value
    /// gets a precise message.
    pub priority: Option<i64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// One `[[upstream]]` table or `--upstream` SPEC.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub name: String,
    pub listen: Option<String>,
    pub protocol: Option<Protocol>,
    /// Balancing algorithm name (see `balance::Algorithm`).
    pub lb: Option<String>,
    /// `header:NAME`, `cookie:NAME` or `source_ip`, for ring_hash / maglev.
    pub hash_key: Option<String>,
    /// Locality-aware balancing on or off (default on).
    pub locality: Option<super::locality::Switch>,
    /// Zones to fail over to after the caller's own, in order: a list, or
    /// one string of names separated by spaces (as a flag SPEC takes it).
    pub failover: Option<super::locality::Zones>,
    /// 100..=1000; default 140.
    pub overprovisioning_percent: Option<i64>,
}

/// Largest weight the registry accepts.
const MAX_WEIGHT: u32 = 10_000;

// === impl FileConfig ===

impl FileConfig {
    /// Parses TOML; `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                // Errors about the top-level table span the whole document.
                .filter(|s| s.start > 0)
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let path = match line {
                Some(line) => format!("{origin}: line {line}"),
                None => origin.to_owned(),
            };
            ConfigError::Parse {
                path,
                message: e.message().to_owned(),
            }
        })
    }

    /// Applies defaults and checks every field.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let node_id = self
            .node_id
            .or_else(hostname)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "node_id",
                    "required (set node_id, --node-id or ISDP_NODE_ID; no hostname found)",
                )
            })?
            .trim()
            .to_owned();
        if node_id.is_empty() {
            return Err(ConfigError::invalid("node_id", "must not be empty"));
        }

        let control_plane = self
            .control_plane
            .unwrap_or_else(|| vec![DEFAULT_CONTROL_PLANE.to_owned()]);
        if control_plane.is_empty() {
            return Err(ConfigError::invalid(
                "control_plane",
                "at least one URL is required",
            ));
        }
        let control_plane = control_plane
            .iter()
            .enumerate()
            .map(|(i, url)| {
                check_url(url).map_err(|r| ConfigError::invalid(format!("control_plane[{i}]"), r))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let join_token = self.join_token.filter(|t| !t.trim().is_empty());
        if control_plane.iter().any(|u| u.starts_with("https://")) {
            if self.ca_file.is_none() {
                return Err(ConfigError::invalid(
                    "ca_file",
                    "required for an https:// control plane (set ca_file, --ca-file or ISDP_CA_FILE to the mesh CA, e.g. <control-plane data dir>/ca.pem)",
                ));
            }
            if join_token.is_none() {
                return Err(ConfigError::invalid(
                    "join_token",
                    "required for an https:// control plane (set join_token, --join-token or ISDP_JOIN_TOKEN; mint one with `isdpctl token create --role join --service NAME`)",
                ));
            }
        }

        let admin_listen = self.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let admin_listen: SocketAddr = admin_listen.trim().parse().map_err(|e| {
            ConfigError::invalid(
                "admin_listen",
                format!("invalid address {admin_listen:?}: {e}"),
            )
        })?;
        let address = match &self.address {
            Some(a) => a.trim().parse::<IpAddr>().map_err(|e| {
                ConfigError::invalid("address", format!("invalid IP address {a:?}: {e}"))
            })?,
            None => default_address(),
        };
        let listen = |field: &str, value: Option<&str>, default: SocketAddr| match value {
            Some(v) => v
                .trim()
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::invalid(field, format!("invalid address {v:?}: {e}"))),
            None => Ok(default),
        };
        let inbound_listen = listen(
            "inbound_listen",
            self.inbound_listen.as_deref(),
            SocketAddr::new(address, DEFAULT_INBOUND_PORT),
        )?;
        let outbound_listen = listen(
            "outbound_listen",
            self.outbound_listen.as_deref(),
            DEFAULT_OUTBOUND_LISTEN.parse().expect("valid default"),
        )?;
        let drain_timeout = match &self.drain_timeout {
            Some(d) => duration("drain_timeout", d)?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };

        let mut seen = BTreeMap::new();
        let mut services = Vec::with_capacity(self.service.len());
        for (i, spec) in self.service.into_iter().enumerate() {
            let service = spec.validate(i)?;
            unique(&mut seen, &service.name, "service", i)?;
            services.push(service);
        }
        let zone = match self.zone.as_deref().map(str::trim) {
            Some("") | None => None,
            Some(z) => {
                check_dns_label(z).map_err(|r| ConfigError::invalid("zone", r))?;
                Some(z.to_owned())
            }
        };
        let mut seen = BTreeMap::new();
        let mut upstreams = Vec::with_capacity(self.upstream.len());
        for (i, spec) in self.upstream.into_iter().enumerate() {
            let mut upstream = spec.validate(i)?;
            upstream.caller_zone = zone.clone();
            unique(&mut seen, &upstream.name, "upstream", i)?;
            upstreams.push(upstream);
        }

        // Calling other sidecars takes a client certificate, so an identity.
        let identity = match self.identity.as_deref().map(str::trim) {
            Some(name) => {
                check_dns_label(name).map_err(|r| ConfigError::invalid("identity", r))?;
                Some(name.to_owned())
            }
            None => services.first().map(|s| s.name.clone()),
        };
        if identity.is_none() && !upstreams.is_empty() {
            return Err(ConfigError::invalid(
                "identity",
                "required to call upstreams over mTLS without a local service \
                 (set identity, --identity or ISDP_IDENTITY)",
            ));
        }

        let xds_relay =
            super::relay::validate(self.xds_relay_listen.as_deref(), self.xds_relay_max_streams)?;
        let dns = super::dns::validate(super::dns::DnsKeys {
            listen: self.dns_listen.as_deref(),
            domain: self.dns_domain.as_deref(),
            ttl: self.dns_ttl.as_deref(),
            max_answers: self.dns_max_answers,
            max_tcp_connections: self.dns_max_tcp_connections,
        })?;
        let limits = self.limits.validate()?;

        Ok(Config {
            identity,
            zone,
            xds_relay,
            dns,
            limits,
            node_id,
            control_plane,
            ca_file: self.ca_file,
            join_token,
            admin_listen,
            inbound_listen,
            outbound_listen,
            address,
            services,
            upstreams,
            log_format: self.log_format.unwrap_or_default(),
            drain_timeout,
            workers: match self.workers {
                Some(0) => return Err(ConfigError::invalid("workers", "must be at least 1")),
                Some(n) => n,
                None => 1,
            },
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.is_empty()),
            trace_sample_ratio: isdp_core::telemetry::check_ratio(
                self.trace_sample_ratio
                    .unwrap_or(isdp_core::telemetry::DEFAULT_SAMPLE_RATIO),
            )
            .map_err(|e| ConfigError::invalid("trace_sample_ratio", e.to_string()))?,
            access_log: self.access_log.unwrap_or(false),
        })
    }
}

fn unique(
    seen: &mut BTreeMap<String, usize>,
    name: &str,
    kind: &str,
    index: usize,
) -> Result<(), ConfigError> {
    match seen.entry(name.to_owned()) {
        Entry::Vacant(v) => {
            v.insert(index);
            Ok(())
        }
        Entry::Occupied(o) => Err(ConfigError::invalid(
            format!("{kind}[{index}].name"),
            format!("duplicate {kind} name {name:?} (also {kind}[{}])", o.get()),
        )),
    }
}

fn check_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.authority().is_none() {
        return Err(format!("expected http://HOST:PORT, got {url:?}"));
    }
    Ok(url.to_owned())
}

pub(super) fn duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| ConfigError::invalid(field, format!("invalid duration {text:?}: {e}")))?;
    if d.is_zero() {
        return Err(ConfigError::invalid(field, "must be greater than 0"));
    }
    Ok(d)
}

/// Turns `k=v,k=v,meta.K=V` into a TOML table so flag SPECs go through the
/// same deserializer (and unknown-key check) as the file.
fn spec_table(spec: &str, what: &str, numeric: &[&str]) -> Result<toml::Value, ConfigError> {
    let mut table = toml::Table::new();
    let mut metadata = toml::Table::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(ConfigError::invalid(
                what,
                format!("expected KEY=VALUE, got {part:?}"),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if let Some(meta) = key.strip_prefix("meta.") {
            metadata.insert(meta.to_owned(), toml::Value::String(value.to_owned()));
        } else if numeric.contains(&key) {
            let n: i64 = value.parse().map_err(|_| {
                ConfigError::invalid(
                    format!("{what}.{key}"),
                    format!("expected a number, got {value:?}"),
                )
            })?;
            table.insert(key.to_owned(), toml::Value::Integer(n));
        } else {
            table.insert(key.to_owned(), toml::Value::String(value.to_owned()));
        }
    }
    if !metadata.is_empty() {
        table.insert("metadata".to_owned(), toml::Value::Table(metadata));
    }
    Ok(toml::Value::Table(table))
}

// === impl ServiceSpec ===

impl ServiceSpec {
    /// Parses a `--service` SPEC (the `index`-th flag).
    pub fn from_flag(spec: &str, index: usize) -> Result<Self, ConfigError> {
        let what = format!("service[{index}]");
        spec_table(spec, &what, &["port", "rise", "fall", "weight", "priority"])?
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::invalid(what, e.message()))
    }

    fn validate(self, i: usize) -> Result<Service, ConfigError> {
        let field = |name: &str| format!("service[{i}].{name}");
        check_dns_label(&self.name).map_err(|r| ConfigError::invalid(field("name"), r))?;
        let port = u16::try_from(self.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                ConfigError::invalid(
                    field("port"),
                    format!("must be 1..=65535, got {}", self.port),
                )
            })?;
        let check = match &self.check {
            Some(c) => Some(
                c.trim()
                    .parse::<Target>()
                    .map_err(|e| ConfigError::invalid(field("check"), e.to_string()))?,
            ),
            None => None,
        };
        let interval = match &self.interval {
            Some(d) => duration(&field("interval"), d)?,
            None => DEFAULT_CHECK_PERIOD,
        };
        let timeout = match &self.timeout {
            Some(d) => duration(&field("timeout"), d)?,
            None => DEFAULT_CHECK_PERIOD,
        };
        let weight = self.weight.unwrap_or(1).max(1);
        if weight > MAX_WEIGHT {
            return Err(ConfigError::invalid(
                field("weight"),
                format!("must be 1..={MAX_WEIGHT}, got {weight}"),
            ));
        }
        let priority = u32::try_from(self.priority.unwrap_or(0))
            .ok()
            .filter(|p| *p <= super::MAX_PRIORITY)
            .ok_or_else(|| {
                ConfigError::invalid(
                    field("priority"),
                    format!(
                        "must be 0..={}, got {}",
                        super::MAX_PRIORITY,
                        self.priority.unwrap_or(0)
                    ),
                )
            })?;
        if self.metadata.keys().any(|k| k.is_empty()) {
            return Err(ConfigError::invalid(
                field("metadata"),
                "keys must not be empty",
            ));
        }
        Ok(Service {
            name: self.name,
            port,
            protocol: self.protocol.unwrap_or_default(),
            check,
            interval,
            timeout,
            rise: self.rise.unwrap_or(1).max(1),
            fall: self.fall.unwrap_or(1).max(1),
            weight,
            priority,
            metadata: self.metadata,
        })
    }
}

// === impl UpstreamSpec ===

impl UpstreamSpec {
    /// Parses an `--upstream` SPEC (the `index`-th flag).
    pub fn from_flag(spec: &str, index: usize) -> Result<Self, ConfigError> {
        let what = format!("upstream[{index}]");
        spec_table(spec, &what, &["overprovisioning_percent"])?
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::invalid(what, e.message()))
    }

    fn validate(self, i: usize) -> Result<Upstream, ConfigError> {
        check_dns_label(&self.name)
            .map_err(|r| ConfigError::invalid(format!("upstream[{i}].name"), r))?;
        let listen = match &self.listen {
            Some(l) => Some(l.trim().parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid(
                    format!("upstream[{i}].listen"),
                    format!("invalid address {l:?}: {e}"),
                )
            })?),
            None => None,
        };
        let lb = match &self.lb {
            Some(l) => l
                .trim()
                .parse::<Algorithm>()
                .map_err(|e| ConfigError::invalid(format!("upstream[{i}].lb"), e.to_string()))?,
            None => Algorithm::default(),
        };
        let hash_key = match &self.hash_key {
            Some(k) => Some(k.trim().parse::<HashKey>().map_err(|e| {
                ConfigError::invalid(format!("upstream[{i}].hash_key"), e.to_string())
            })?),
            None => None,
        };
        if hash_key.is_some() && !matches!(lb, Algorithm::RingHash | Algorithm::Maglev) {
            return Err(ConfigError::invalid(
                format!("upstream[{i}].hash_key"),
                "only used with lb = \"ring_hash\" or \"maglev\"",
            ));
        }
        let locality = super::locality::validate(
            i,
            self.locality.as_ref(),
            self.failover.as_ref(),
            self.overprovisioning_percent,
        )?;
        Ok(Upstream {
            name: self.name,
            listen,
            protocol: self.protocol.unwrap_or_default(),
            lb,
            hash_key,
            locality,
            caller_zone: None,
        })
    }
}
