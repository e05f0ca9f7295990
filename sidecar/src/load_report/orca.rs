//! The ORCA per-request load report an application may add to its
//! responses, in its text form (gRFC A51 / Envoy's `endpoint-load-metrics`):
//!
//! ```text
//! endpoint-load-metrics: TEXT cpu_utilization=0.3, rps_fractional=12.5, named_metrics.queue=4
//! ```
//!
//! The inbound sidecar reads and strips it (callers never see it). The
//! binary and JSON forms are not read: the header is ignored, and still
//! stripped.

use std::collections::BTreeMap;

/// The response header, lower case as `http` stores names.
pub const HEADER: &str = "endpoint-load-metrics";
/// The binary form's header (gRPC's), not read but stripped too: what an
/// application reports of its load is for its sidecar, not its callers.
pub const BIN_HEADER: &str = "endpoint-load-metrics-bin";
/// At most this many named metrics are kept from one report, none with a
/// longer name (after `named_metrics.`): what a load report may carry.
pub use isdp_core::load::{MAX_METRIC_NAME as MAX_NAME, MAX_NAMED_METRICS as MAX_NAMED};
use isdp_core::load::{MAX_RPS, MAX_UTILIZATION, within};

/// One parsed report; every field optional, as the application chooses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Orca {
    pub cpu_utilization: Option<f64>,
    pub mem_utilization: Option<f64>,
    pub application_utilization: Option<f64>,
    pub rps_fractional: Option<f64>,
    pub eps: Option<f64>,
    pub named: BTreeMap<String, f64>,
}

/// Why a header value was not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrcaError {
    #[error("not the TEXT form")]
    NotText,
    #[error("{0:?} is not key=value")]
    Pair(String),
    #[error(
        "{0:?} is not a number within a load report's bounds (utilisations 0..=100, rates 0..=10000000)"
    )]
    Value(String),
}

/// Parses the text form; unknown keys are ignored (a newer application
/// may send more), named metrics past [`MAX_NAMED`] or with longer names
/// dropped.
pub fn parse(value: &str) -> Result<Orca, OrcaError> {
    let rest = value
        .trim()
        .strip_prefix("TEXT")
        .filter(|r| r.is_empty() || r.starts_with(' '))
        .ok_or(OrcaError::NotText)?;
    let mut orca = Orca::default();
    for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, v) = pair
            .split_once('=')
            .ok_or_else(|| OrcaError::Pair(pair.to_owned()))?;
        let key = key.trim();
        // The bounds the control plane holds load reports to: a figure
        // outside them would get the sidecar's whole report refused.
        let max = match key {
            "rps_fractional" | "eps" => MAX_RPS,
            k if k.starts_with("named_metrics.") => f64::MAX,
            _ => MAX_UTILIZATION,
        };
        let v = v
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|x| within(x, max))
            .ok_or_else(|| OrcaError::Value(pair.to_owned()))?;
        match key {
            "cpu_utilization" => orca.cpu_utilization = Some(v),
            "mem_utilization" => orca.mem_utilization = Some(v),
            "application_utilization" => orca.application_utilization = Some(v),
            "rps_fractional" => orca.rps_fractional = Some(v),
            "eps" => orca.eps = Some(v),
            other => {
                if let Some(name) = other.strip_prefix("named_metrics.")
                    && !name.is_empty()
                    && name.len() <= MAX_NAME
                    && (orca.named.len() < MAX_NAMED || orca.named.contains_key(name))
                {
                    orca.named.insert(name.to_owned(), v);
                }
            }
        }
    }
    Ok(orca)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_form_is_read() {
        let o = parse(
            "TEXT cpu_utilization=0.3, mem_utilization=0.5, rps_fractional=12.5, eps=1, \
             application_utilization=1.5, named_metrics.queue=4, future_field=1",
        )
        .unwrap();
        assert_eq!(o.cpu_utilization, Some(0.3));
        assert_eq!(o.mem_utilization, Some(0.5));
        assert_eq!(o.rps_fractional, Some(12.5));
        assert_eq!(o.eps, Some(1.0));
        assert_eq!(o.application_utilization, Some(1.5));
        assert_eq!(o.named["queue"], 4.0);
        assert_eq!(o.named.len(), 1, "unknown keys are ignored");
        assert_eq!(parse("TEXT").unwrap(), Orca::default());
    }

    #[test]
    fn other_forms_and_bad_values_are_refused() {
        assert_eq!(parse("JSON {}"), Err(OrcaError::NotText));
        assert_eq!(parse("TEXTcpu_utilization=1"), Err(OrcaError::NotText));
        assert!(matches!(
            parse("TEXT cpu_utilization"),
            Err(OrcaError::Pair(_))
        ));
        for bad in ["-0.1", "NaN", "inf", "lots", "101", "1e300"] {
            for key in ["cpu_utilization", "application_utilization"] {
                let v = format!("TEXT {key}={bad}");
                assert!(matches!(parse(&v), Err(OrcaError::Value(_))), "{v}");
            }
        }
        // Rates have the report's rate bound; named metrics any finite
        // value.
        assert!(parse("TEXT eps=20000000").is_err());
        assert_eq!(
            parse("TEXT named_metrics.q=1e300").unwrap().named["q"],
            1e300
        );
    }

    #[test]
    fn named_metrics_are_bounded() {
        let many: Vec<String> = (0..40).map(|i| format!("named_metrics.m{i}={i}")).collect();
        let o = parse(&format!("TEXT {}", many.join(", "))).unwrap();
        assert_eq!(o.named.len(), MAX_NAMED);
        let long = format!("TEXT named_metrics.{}=1", "x".repeat(MAX_NAME + 1));
        assert!(parse(&long).unwrap().named.is_empty());
    }
}
