//! Health as the mesh sees it, and the rise/fall state machine that turns
//! individual probe results into it.

use isdp_proto::v1::HealthStatus;

/// Health of one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Health {
    /// No check has concluded yet; routable, so a new instance gets traffic
    /// without waiting a full check interval.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

// === impl Health ===

impl Health {
    /// The lowercase name used in admin output: "healthy", "unhealthy", "unknown".
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<HealthStatus> for Health {
    fn from(status: HealthStatus) -> Self {
        match status {
            HealthStatus::Unknown => Health::Unknown,
            HealthStatus::Healthy => Health::Healthy,
            HealthStatus::Unhealthy => Health::Unhealthy,
        }
    }
}

impl From<Health> for HealthStatus {
    fn from(health: Health) -> Self {
        match health {
            Health::Unknown => HealthStatus::Unknown,
            Health::Healthy => HealthStatus::Healthy,
            Health::Unhealthy => HealthStatus::Unhealthy,
        }
    }
}

impl From<Health> for i32 {
    fn from(health: Health) -> Self {
        HealthStatus::from(health) as i32
    }
}

impl Health {
    /// From the wire value of `HealthStatus`; unknown numbers map to `Unknown`.
    pub fn from_i32(value: i32) -> Self {
        HealthStatus::try_from(value)
            .map(Health::from)
            .unwrap_or(Health::Unknown)
    }
}

/// How many consecutive results it takes to change a concluded health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive passes that turn Unhealthy into Healthy; 0 means 1.
    pub rise: u32,
    /// Consecutive failures that turn Healthy into Unhealthy; 0 means 1.
    pub fall: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { rise: 1, fall: 1 }
    }
}

/// The rise/fall state machine of one checked instance.
#[derive(Clone, Debug)]
pub struct HealthState {
    /// Limits, with 0 already raised to 1.
    thresholds: Thresholds,
    /// The concluded health.
    health: Health,
    /// Consecutive results that disagree with `health`.
    streak: u32,
}

// === impl HealthState ===

impl HealthState {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds: Thresholds {
                rise: thresholds.rise.max(1),
                fall: thresholds.fall.max(1),
            },
            health: Health::Unknown,
            streak: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Feeds one probe result; returns the new health only on a transition.
    ///
    /// From `Unknown` the first result decides at once; after that `rise`
    /// consecutive passes or `fall` consecutive failures are needed.
    pub fn observe(&mut self, passed: bool) -> Option<Health> {
        let (needed, next) = match (self.health, passed) {
            (Health::Unknown, true) => (1, Health::Healthy),
            (Health::Unknown, false) => (1, Health::Unhealthy),
            (Health::Healthy, false) => (self.thresholds.fall, Health::Unhealthy),
            (Health::Unhealthy, true) => (self.thresholds.rise, Health::Healthy),
            (Health::Healthy, true) | (Health::Unhealthy, false) => {
                self.streak = 0;
                return None;
            }
        };
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.health = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_at_once() {
        let mut s = HealthState::new(Thresholds { rise: 3, fall: 3 });
        assert_eq!(s.health(), Health::Unknown);
        assert_eq!(s.observe(false), Some(Health::Unhealthy));
        let mut s = HealthState::new(Thresholds { rise: 3, fall: 3 });
        assert_eq!(s.observe(true), Some(Health::Healthy));
        assert_eq!(s.observe(true), None);
    }

    #[test]
    fn fall_and_rise_need_consecutive_results() {
        let mut s = HealthState::new(Thresholds { rise: 2, fall: 3 });
        assert_eq!(s.observe(true), Some(Health::Healthy));
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        // A pass breaks the streak.
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(Health::Unhealthy));
        assert_eq!(s.health(), Health::Unhealthy);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(Health::Healthy));
        assert_eq!(s.health(), Health::Healthy);
    }

    #[test]
    fn zero_thresholds_mean_one() {
        let mut s = HealthState::new(Thresholds { rise: 0, fall: 0 });
        assert_eq!(s.observe(true), Some(Health::Healthy));
        assert_eq!(s.observe(false), Some(Health::Unhealthy));
        assert_eq!(s.observe(true), Some(Health::Healthy));
    }

    #[test]
    fn converts_to_and_from_proto() {
        for h in [Health::Unknown, Health::Healthy, Health::Unhealthy] {
            assert_eq!(Health::from(HealthStatus::from(h)), h);
            assert_eq!(Health::from_i32(i32::from(h)), h);
        }
        assert_eq!(Health::from_i32(42), Health::Unknown);
        assert_eq!(Health::Unhealthy.to_string(), "unhealthy");
    }
}
