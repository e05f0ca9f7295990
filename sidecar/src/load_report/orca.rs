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
/// At most this many named metrics are kept from one report.
pub const MAX_NAMED: usize = 16;
/// Longest named-metric name kept (after `named_metrics.`).
pub const MAX_NAME: usize = 64;

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
    #[error("{0:?} is not a finite number of at least 0")]
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
        let v = v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| OrcaError::Value(pair.to_owned()))?;
        match key.trim() {
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
        for bad in ["-0.1", "NaN", "inf", "lots"] {
            let v = format!("TEXT cpu_utilization={bad}");
            assert!(matches!(parse(&v), Err(OrcaError::Value(_))), "{bad}");
        }
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
