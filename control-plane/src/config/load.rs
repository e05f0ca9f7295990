//! Flags of the load weights (`crate::load`): how the sidecars' load
//! reports weigh endpoints.

use std::time::Duration;

use crate::load::WeightConfig;

#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Weigh endpoints by the load their sidecars report (gRPC's weighted
    /// round robin formula, `rps / (utilisation + penalty × eps / rps)`),
    /// times the operator's weight. False pushes the operator's weights
    /// only, as registered.
    #[arg(long, env = "ISDP_LOAD_WEIGHTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub load_weights: bool,

    /// How long an endpoint must have reported usable figures (traffic and
    /// a utilisation) before they weigh it: a starting instance's first
    /// figures are noisy.
    #[arg(long, env = "ISDP_LOAD_WEIGHT_BLACKOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub load_weight_blackout: Duration,

    /// What an error rate costs: `eps / rps` times this is added to the
    /// utilisation, so an endpoint failing fast does not attract traffic.
    #[arg(long, env = "ISDP_LOAD_WEIGHT_ERROR_PENALTY", default_value_t = 1.0)]
    pub load_weight_error_penalty: f64,

    /// The smallest load factor (an endpoint's weight against its
    /// service's median), so one report can never starve an endpoint.
    #[arg(long, env = "ISDP_LOAD_WEIGHT_MIN_FACTOR", default_value_t = 0.1)]
    pub load_weight_min_factor: f64,

    /// The largest load factor, so one report can never flood an endpoint.
    #[arg(long, env = "ISDP_LOAD_WEIGHT_MAX_FACTOR", default_value_t = 10.0)]
    pub load_weight_max_factor: f64,
}

/// Bounds of the flags: a blackout of at most an hour, a penalty of at
/// most 100, factors within `0.001..=1000`.
pub const MAX_BLACKOUT: Duration = Duration::from_secs(3600);
pub const MAX_PENALTY: f64 = 100.0;
pub const FACTOR_RANGE: (f64, f64) = (0.001, 1000.0);

impl LoadArgs {
    pub fn validate(&self) -> Result<(), String> {
        if self.load_weight_blackout > MAX_BLACKOUT {
            return Err(format!(
                "--load-weight-blackout must be at most {}, got {}",
                humantime::format_duration(MAX_BLACKOUT),
                humantime::format_duration(self.load_weight_blackout)
            ));
        }
        let p = self.load_weight_error_penalty;
        if !(p.is_finite() && (0.0..=MAX_PENALTY).contains(&p)) {
            return Err(format!(
                "--load-weight-error-penalty must be a number 0..={MAX_PENALTY}, got {p}"
            ));
        }
        let (lo, hi) = FACTOR_RANGE;
        for (flag, v, max) in [
            ("--load-weight-min-factor", self.load_weight_min_factor, 1.0),
            ("--load-weight-max-factor", self.load_weight_max_factor, hi),
        ] {
            let min = if max == 1.0 { lo } else { 1.0 };
            if !(v.is_finite() && (min..=max).contains(&v)) {
                return Err(format!("{flag} must be a number {min}..={max}, got {v}"));
            }
        }
        Ok(())
    }

    pub fn weight_config(&self) -> WeightConfig {
        WeightConfig {
            enabled: self.load_weights,
            blackout: self.load_weight_blackout,
            error_penalty: self.load_weight_error_penalty,
            min_factor: self.load_weight_min_factor,
            max_factor: self.load_weight_max_factor,
        }
    }
}
