//! The bounds of a sidecar's load report (`isdp.v1.LoadReport`): the
//! control plane refuses a report with a value outside them (and ends the
//! session that sent it), so the sidecar keeps every figure it sends
//! within them, whatever its application's ORCA header said or however
//! long a request took.

/// Requests (and errors) per second.
pub const MAX_RPS: f64 = 10_000_000.0;
/// A latency average: one hour.
pub const MAX_LATENCY_MS: f64 = 3_600_000.0;
pub const MAX_IN_FLIGHT: u64 = 10_000_000;
/// An instance's utilisation (application or CPU, ORCA's: 1 is one
/// core's or the application's own notion of full, so above 1 is allowed).
pub const MAX_UTILIZATION: f64 = 100.0;
/// The host's CPU and memory utilisation, as a fraction.
pub const MAX_HOST_UTILIZATION: f64 = 1.0;
/// Named metrics per instance, and the longest name.
pub const MAX_NAMED_METRICS: usize = 16;
pub const MAX_METRIC_NAME: usize = 64;

/// `v` clamped into `0..=max`, for figures a sidecar measures itself; a
/// non-finite figure (no measurement) becomes 0.
pub fn clamp(v: f64, max: f64) -> f64 {
    if v.is_finite() {
        v.clamp(0.0, max)
    } else {
        0.0
    }
}

/// `v` if it is a finite number within `0..=max`, for figures a sidecar
/// is told (an application's ORCA report): a wrong one is dropped, not
/// guessed at.
pub fn within(v: f64, max: f64) -> Option<f64> {
    (v.is_finite() && (0.0..=max).contains(&v)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_stay_within_the_bounds() {
        assert_eq!(clamp(7_200_000.0, MAX_LATENCY_MS), MAX_LATENCY_MS);
        assert_eq!(clamp(-1.0, MAX_RPS), 0.0);
        assert_eq!(clamp(f64::NAN, MAX_RPS), 0.0);
        assert_eq!(within(101.0, MAX_UTILIZATION), None);
        assert_eq!(within(f64::INFINITY, MAX_UTILIZATION), None);
        assert_eq!(within(0.5, MAX_UTILIZATION), Some(0.5));
    }
}
