//! An upstream's locality keys (`locality`, `failover`,
//! `overprovisioning_percent`), as TOML or flag SPEC values, to a
//! [`LocalityConfig`].

use serde::Deserialize;

use super::ConfigError;
use crate::balance::locality::{DEFAULT_OVERPROVISIONING, LocalityConfig};
use isdp_core::names::check_dns_label;

/// Zones a failover list may name.
pub const MAX_FAILOVER_ZONES: usize = 16;

/// `true`/`false` in TOML, or the same words in a flag SPEC.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Switch {
    Bool(bool),
    Text(String),
}

/// A TOML list, or one string separated by spaces (a flag SPEC's values
/// are strings, and commas separate its keys).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Zones {
    List(Vec<String>),
    Text(String),
}

/// Checks the keys of the `i`-th upstream; each error names its field.
pub fn validate(
    i: usize,
    switch: Option<&Switch>,
    failover: Option<&Zones>,
    overprovisioning: Option<i64>,
) -> Result<LocalityConfig, ConfigError> {
    let field = |name: &str| format!("upstream[{i}].{name}");
    let enabled = match switch {
        None => true,
        Some(Switch::Bool(b)) => *b,
        Some(Switch::Text(t)) => match t.trim() {
            "true" | "on" => true,
            "false" | "off" => false,
            other => {
                return Err(ConfigError::invalid(
                    field("locality"),
                    format!("expected true or false, got {other:?}"),
                ));
            }
        },
    };
    let zones: Vec<String> = match failover {
        None => Vec::new(),
        Some(Zones::List(l)) => l.iter().map(|z| z.trim().to_owned()).collect(),
        Some(Zones::Text(t)) => t.split_whitespace().map(str::to_owned).collect(),
    };
    if zones.len() > MAX_FAILOVER_ZONES {
        return Err(ConfigError::invalid(
            field("failover"),
            format!("at most {MAX_FAILOVER_ZONES} zones, got {}", zones.len()),
        ));
    }
    for (k, z) in zones.iter().enumerate() {
        check_dns_label(z).map_err(|r| ConfigError::invalid(field("failover"), r))?;
        if zones[..k].contains(z) {
            return Err(ConfigError::invalid(
                field("failover"),
                format!("zone {z:?} is listed twice"),
            ));
        }
    }
    let overprovisioning = match overprovisioning {
        None => DEFAULT_OVERPROVISIONING,
        Some(n @ 100..=1000) => n as u32,
        Some(n) => {
            return Err(ConfigError::invalid(
                field("overprovisioning_percent"),
                format!("must be 100..=1000, got {n}"),
            ));
        }
    };
    Ok(LocalityConfig {
        enabled,
        failover: zones,
        overprovisioning,
    })
}
