//! A policy's `locality` section: whether calls stay in the caller's zone,
//! where they fail over to, and how much health a zone may lose before it
//! sheds traffic.
//!
//! ```yaml
//! locality: { enabled: true, failover: [eu-west-1b, eu-west-1c], overprovisioning_percent: 140 }
//! ```

use std::collections::BTreeSet;

use isdp_proto::v1::Locality;
use serde_json::Value;

use super::super::walk::{Obj, Problems, string_value};
use crate::registry::validate::is_dns_label;

/// Zones `failover` may list: more would only be read in order anyway,
/// and every zone not listed follows the listed ones.
pub const MAX_FAILOVER_ZONES: usize = 16;
/// `overprovisioning_percent`: 100 (a zone sheds traffic as soon as it
/// loses an endpoint) to 1000 (it keeps everything until it is 90 % down).
pub const MIN_OVERPROVISIONING: u64 = 100;
pub const MAX_OVERPROVISIONING: u64 = 1000;

/// `enabled` defaults to true: writing the section means wanting it.
pub fn locality(mut o: Obj<'_>, p: &mut Problems) -> Locality {
    let enabled = match o.get("enabled") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            p.push(
                o.path("enabled"),
                format!("must be true or false, got {other}"),
            );
            true
        }
    };
    let mut failover = Vec::new();
    let path = o.path("failover");
    if let Some(items) = o.list("failover", p) {
        if items.len() > MAX_FAILOVER_ZONES {
            p.push(
                path.clone(),
                format!(
                    "must list at most {MAX_FAILOVER_ZONES} zones, got {}",
                    items.len()
                ),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate().take(MAX_FAILOVER_ZONES) {
            let here = format!("{path}[{i}]");
            let Some(zone) = string_value(item, &here, p) else {
                continue;
            };
            if !is_dns_label(&zone) {
                p.push(
                    here,
                    format!("must be a zone name (a DNS label), got {zone:?}"),
                );
            } else if !seen.insert(zone.clone()) {
                p.push(here, format!("zone {zone:?} is listed twice"));
            } else {
                failover.push(zone);
            }
        }
    }
    let overprovisioning_percent = o
        .int(
            "overprovisioning_percent",
            MIN_OVERPROVISIONING,
            MAX_OVERPROVISIONING,
            p,
        )
        .unwrap_or(0) as u32;
    o.finish(p);
    Locality {
        enabled,
        failover,
        overprovisioning_percent,
    }
}
