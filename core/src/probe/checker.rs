//! A background task that probes one target on an interval and reports
//! health transitions.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::{Health, HealthState, Target, Thresholds, probe};

/// Everything a checker needs to know about one check.
#[derive(Clone, Debug)]
pub struct CheckSpec {
    /// What to probe.
    pub target: Target,
    /// Time between the starts of two probes; a zero interval means 1s.
    pub interval: Duration,
    /// Time one probe may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive results needed to change a concluded health.
    pub thresholds: Thresholds,
}

/// Spawns a task that probes `spec.target` every `spec.interval` (the first
/// probe at once) and calls `on_transition` on each health transition.
///
/// It stops when `shutdown` becomes true or its sender is dropped; a probe in
/// flight is abandoned.
pub fn spawn_checker(
    spec: CheckSpec,
    on_transition: impl Fn(Health) + Send + Sync + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let period = if spec.interval.is_zero() {
            Duration::from_secs(1)
        } else {
            spec.interval
        };
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut state = HealthState::new(spec.thresholds);
        let stopped = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        loop {
            let result = tokio::select! {
                biased;
                _ = &mut stopped => break,
                result = async {
                    ticker.tick().await;
                    probe(&spec.target, spec.timeout).await
                } => result,
            };
            if let Err(error) = &result {
                tracing::debug!(target = %spec.target, %error, "probe failed");
            }
            if let Some(health) = state.observe(result.is_ok()) {
                match &result {
                    Ok(()) => tracing::info!(target = %spec.target, %health, "health changed"),
                    Err(error) => {
                        tracing::warn!(target = %spec.target, %health, %error, "health changed")
                    }
                }
                on_transition(health);
            }
        }
    })
}
