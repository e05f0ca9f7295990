//! Locality-aware balancing: which group of endpoints (a *level*) a
//! request goes to, before the upstream's balancer picks within it.
//!
//! After Envoy's priority levels and Istio's locality failover: an
//! endpoint's `priority` (its instance's, 0 first) orders the levels
//! first, so every endpoint of priority 0 precedes any of priority 1.
//! Within a priority, when the caller names a zone, locality is on and
//! some endpoint names one, there is one level per zone: the caller's own,
//! then the zones of the failover list in order, then every other zone
//! (by name, so the order is stable) and endpoints without a zone last.
//! Otherwise zones do not matter and each priority is one level
//! ([`ANY_ZONE`]); priorities apply whatever the locality setting, since
//! they are the operator's word on the instances. Each level keeps
//! `healthy fraction × overprovisioning` of the traffic (capped at what the
//! levels before it left); the rest spills to the next one. With the
//! default factor of 1.4 a level keeps everything until fewer than 72 % of
//! its endpoints are healthy. When healthy levels cannot take 100 % between
//! them, the shares are scaled up to 100 %, as Envoy normalises priority
//! load; when no level has a healthy endpoint the caller goes back to
//! balancing over everything.
//!
//! Panic mode (spreading over every endpoint, healthy or not, when fewer
//! than half are healthy) is decided for the whole upstream, not per level
//! as Envoy does, and only after the levels had their say: an upstream
//! whose levels can take all of its traffic by the rule above ([`covers`]:
//! a standby priority with enough healthy capacity) does not panic however
//! many endpoints of the others are down, so failover to a smaller DR site
//! never sends traffic back to the dead primary. Only when the levels
//! together fall short and under half of all endpoints are healthy does
//! the upstream panic, and then it has no levels, health being not to be
//! trusted. One rule for the whole upstream is simpler to reason about
//! and to show in `/config` than a panic flag per level.
//!
//! A [`Plan`] is built per endpoint set (allocation here is fine); its
//! shares live in atomics so outlier ejections can be folded in on the
//! upstreams' sweep without a rebuild, and [`Plan::pick`] reads them with
//! one random number and no allocation.

use std::sync::atomic::{AtomicU32, Ordering};

use super::rng::Rng;

/// Envoy's default overprovisioning factor, as a percentage.
pub use isdp_core::probe::DEFAULT_OVERPROVISIONING;
/// Shares are kept in parts per million.
const WHOLE: u32 = 1_000_000;
/// The zone a level shows when zones do not order the levels: it holds
/// every endpoint of its priority (zones are DNS labels, so none is `*`).
pub const ANY_ZONE: &str = "*";

/// How an upstream groups its endpoints by zone; from the sidecar file's
/// upstream or, when it has one, the traffic policy's `locality`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityConfig {
    /// Off: zones do not order the levels (priorities still do).
    pub enabled: bool,
    /// Zones to fail over to after the caller's own, in order.
    pub failover: Vec<String>,
    /// Percent, 100..=1000.
    pub overprovisioning: u32,
}

impl Default for LocalityConfig {
    fn default() -> Self {
        LocalityConfig {
            enabled: true,
            failover: Vec::new(),
            overprovisioning: DEFAULT_OVERPROVISIONING,
        }
    }
}

/// One endpoint as the plan sees it.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    pub zone: &'a str,
    pub priority: u32,
    /// Routable by pushed health; unhealthy members count against their
    /// level's share but are never picked.
    pub healthy: bool,
}

/// One level: its zones, its routable members and its share.
#[derive(Debug)]
pub struct Level {
    /// The zone in it: one, "" for the endpoints with no zone, or
    /// [`ANY_ZONE`] when zones do not order the levels.
    pub zone: String,
    pub priority: u32,
    /// Indices into the members given to [`Plan::new`], healthy ones only.
    pub members: Vec<usize>,
    /// Members in the level, healthy or not.
    pub total: usize,
    /// Parts per million of requests, cumulative up to this level.
    upto: AtomicU32,
}

/// The levels of one endpoint set and their shares.
#[derive(Debug)]
pub struct Plan {
    levels: Vec<Level>,
    overprovisioning: u32,
    rng: Rng,
}

// === impl Plan ===

impl Plan {
    /// Groups `members` for a caller in `caller_zone`. None when there
    /// is only one level (then the plain balancer is the same thing), or
    /// no member is healthy.
    pub fn new(
        config: &LocalityConfig,
        caller_zone: Option<&str>,
        members: &[Member<'_>],
        seed: u64,
    ) -> Option<Plan> {
        let grouping = Grouping::of(config, caller_zone, members)?;
        let mut levels: Vec<Level> = grouping
            .keys
            .iter()
            .map(|(priority, _, zone)| Level {
                zone: (*zone).to_owned(),
                priority: *priority,
                members: Vec::new(),
                total: 0,
                upto: AtomicU32::new(0),
            })
            .collect();
        for (i, (m, &at)) in members.iter().zip(&grouping.level_of).enumerate() {
            levels[at].total += 1;
            if m.healthy {
                levels[at].members.push(i);
            }
        }
        let plan = Plan {
            levels,
            overprovisioning: config.overprovisioning.clamp(100, 1000),
            rng: Rng::new(seed),
        };
        let healthy: Vec<usize> = plan.levels.iter().map(|l| l.members.len()).collect();
        if !plan.set_health(&healthy) {
            return None;
        }
        Some(plan)
    }

    /// Recomputes the shares from how many members of each level (in
    /// level order) are usable now. False when none is: the caller then
    /// balances over everything, and the shares are left as they were.
    pub fn set_health(&self, usable: &[usize]) -> bool {
        let totals: Vec<usize> = self.levels.iter().map(|l| l.total).collect();
        let Some(shares) = shares(&totals, usable, self.overprovisioning) else {
            return false;
        };
        // The last level with a share takes what rounding left, so a
        // level with nothing usable is never picked.
        let last = shares.iter().rposition(|&s| s > 0).unwrap_or(0);
        let mut upto = 0u32;
        for (i, (level, share)) in self.levels.iter().zip(shares).enumerate() {
            upto = if i >= last {
                WHOLE
            } else {
                upto.saturating_add(share).min(WHOLE)
            };
            level.upto.store(upto, Ordering::Relaxed);
        }
        true
    }

    /// A level by share: an index into [`levels`](Self::levels).
    pub fn pick(&self) -> usize {
        let r = ((u64::from(self.rng.next_u64() as u32) * u64::from(WHOLE)) >> 32) as u32;
        self.levels
            .iter()
            .position(|l| r < l.upto.load(Ordering::Relaxed))
            .unwrap_or(self.levels.len() - 1)
    }

    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// Level `i`'s share now, in percent.
    pub fn share_percent(&self, i: usize) -> f64 {
        let upto = |i: usize| self.levels[i].upto.load(Ordering::Relaxed);
        let below = if i == 0 { 0 } else { upto(i - 1) };
        f64::from(upto(i).saturating_sub(below)) * 100.0 / f64::from(WHOLE)
    }
}

/// Whether the levels of `members` take every request between them by
/// the overprovisioning rule alone, before any scaling up: then the
/// healthy endpoints can carry the upstream and it need not panic. False
/// when there are no levels (one group only).
pub fn covers(config: &LocalityConfig, caller_zone: Option<&str>, members: &[Member<'_>]) -> bool {
    let Some(grouping) = Grouping::of(config, caller_zone, members) else {
        return false;
    };
    let mut totals = vec![0; grouping.keys.len()];
    let mut usable = vec![0; grouping.keys.len()];
    for (m, &at) in members.iter().zip(&grouping.level_of) {
        totals[at] += 1;
        usable[at] += usize::from(m.healthy);
    }
    let (_, left) = spread(&totals, &usable, config.overprovisioning.clamp(100, 1000));
    left == 0
}

/// Each level's share in parts per million, from its size and its usable
/// members (the overprovisioning rule, then scaled to a whole when the
/// levels together fall short); None when no level has a usable member.
pub fn shares(totals: &[usize], usable: &[usize], overprovisioning: u32) -> Option<Vec<u32>> {
    let (mut out, left) = spread(totals, usable, overprovisioning);
    let sum: u64 = out.iter().sum();
    if sum == 0 {
        return None;
    }
    if left > 0 {
        // Envoy's normalisation: what no level could take is spread over
        // the levels in proportion to what they did take.
        for s in &mut out {
            *s = *s * u64::from(WHOLE) / sum;
        }
    }
    Some(out.into_iter().map(|s| s as u32).collect())
}

/// The overprovisioning rule in order of levels: each level's share in
/// parts per million, and what none of them took.
fn spread(totals: &[usize], usable: &[usize], overprovisioning: u32) -> (Vec<u64>, u64) {
    let mut left = u64::from(WHOLE);
    let out = totals
        .iter()
        .zip(usable)
        .map(|(&total, &ok)| {
            if total == 0 || ok == 0 {
                return 0;
            }
            let health = (ok.min(total) as u64 * u64::from(overprovisioning) * u64::from(WHOLE))
                / (total as u64 * 100);
            let share = health.min(u64::from(WHOLE)).min(left);
            left -= share;
            share
        })
        .collect();
    (out, left)
}

/// Level keys in level order, and each member's level.
struct Grouping<'a> {
    /// (priority, rank of the zone within it, zone), sorted and unique.
    keys: Vec<(u32, (usize, String), &'a str)>,
    /// Per member, an index into `keys`.
    level_of: Vec<usize>,
}

impl<'a> Grouping<'a> {
    /// None when every member falls in one level.
    fn of(
        config: &LocalityConfig,
        caller_zone: Option<&str>,
        members: &[Member<'a>],
    ) -> Option<Grouping<'a>> {
        let caller = caller_zone
            .filter(|z| !z.is_empty())
            .filter(|_| config.enabled && members.iter().any(|m| !m.zone.is_empty()));
        // Rank within a priority: the caller's zone, the failover list,
        // then the rest by name (and endpoints without a zone last); when
        // zones do not apply, one level per priority.
        let key = |m: &Member<'a>| -> (u32, (usize, String), &'a str) {
            let Some(caller) = caller else {
                return (m.priority, (0, String::new()), ANY_ZONE);
            };
            let rank = if m.zone == caller {
                (0, String::new())
            } else if let Some(i) = config.failover.iter().position(|f| f == m.zone) {
                (1 + i, String::new())
            } else if m.zone.is_empty() {
                (usize::MAX, String::new())
            } else {
                (usize::MAX - 1, m.zone.to_owned())
            };
            (m.priority, rank, m.zone)
        };
        let each: Vec<_> = members.iter().map(key).collect();
        let mut keys = each.clone();
        keys.sort();
        keys.dedup();
        if keys.len() < 2 {
            return None;
        }
        let level_of = each
            .iter()
            .map(|k| keys.binary_search(k).expect("every member's level exists"))
            .collect();
        Some(Grouping { keys, level_of })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percent(shares: Option<Vec<u32>>) -> Vec<f64> {
        shares
            .expect("some level is healthy")
            .into_iter()
            .map(|s| (f64::from(s) / 100.0).round() / 100.0)
            .collect()
    }

    #[test]
    fn a_healthy_local_zone_keeps_everything() {
        assert_eq!(percent(shares(&[4, 2], &[4, 2], 140)), [100.0, 0.0]);
        // 3 of 4 is 75 % × 1.4 = 105 %: still everything.
        assert_eq!(percent(shares(&[4, 2], &[3, 2], 140)), [100.0, 0.0]);
    }

    #[test]
    fn a_degraded_local_zone_spills_the_rest() {
        // 1 of 4: 25 % × 1.4 = 35 % stays, 65 % goes to the next level.
        assert_eq!(percent(shares(&[4, 2], &[1, 2], 140)), [35.0, 65.0]);
        // 2 of 4: 70 %.
        assert_eq!(
            percent(shares(&[4, 2, 2], &[2, 2, 2], 140)),
            [70.0, 30.0, 0.0]
        );
        // Without overprovisioning a zone sheds as soon as it loses one.
        assert_eq!(percent(shares(&[4, 2], &[3, 2], 100)), [75.0, 25.0]);
    }

    #[test]
    fn an_empty_local_zone_fails_over_in_order() {
        assert_eq!(
            percent(shares(&[2, 2, 2], &[0, 1, 2], 140)),
            [0.0, 70.0, 30.0]
        );
        // Both degraded: 35 % + 35 % = 70 %, scaled up to a whole.
        assert_eq!(percent(shares(&[4, 4], &[1, 1], 140)), [50.0, 50.0]);
        assert_eq!(shares(&[2, 2], &[0, 0], 140), None);
    }

    fn member(zone: &str, healthy: bool) -> Member<'_> {
        Member {
            zone,
            priority: 0,
            healthy,
        }
    }

    fn zones(plan: &Plan) -> Vec<(&str, Vec<usize>, f64)> {
        (0..plan.levels().len())
            .map(|i| {
                let l = &plan.levels()[i];
                (
                    l.zone.as_str(),
                    l.members.clone(),
                    (plan.share_percent(i) * 100.0).round() / 100.0,
                )
            })
            .collect()
    }

    #[test]
    fn levels_follow_the_caller_then_the_failover_list_then_the_rest() {
        let members = [
            member("c", true),
            member("b", true),
            member("a", true),
            member("d", true),
            member("", true),
            member("a", false),
        ];
        let config = LocalityConfig {
            failover: vec!["d".into(), "c".into()],
            ..LocalityConfig::default()
        };
        let plan = Plan::new(&config, Some("a"), &members, 1).unwrap();
        assert_eq!(
            zones(&plan),
            [
                ("a", vec![2], 70.0),
                ("d", vec![3], 30.0),
                ("c", vec![0], 0.0),
                ("b", vec![1], 0.0),
                ("", vec![4], 0.0),
            ]
        );
        // A higher priority number comes after every zone of a lower one.
        let mut late = members;
        late[2].priority = 1;
        late[5].priority = 1;
        let plan = Plan::new(&config, Some("a"), &late, 1).unwrap();
        let order: Vec<&str> = plan.levels().iter().map(|l| l.zone.as_str()).collect();
        assert_eq!(order, ["d", "c", "b", "", "a"]);
    }

    #[test]
    fn without_zones_or_priorities_nothing_changes() {
        let config = LocalityConfig::default();
        let zoned = [member("a", true), member("b", true)];
        let plain = [member("", true), member("", true)];
        assert!(
            Plan::new(&config, None, &zoned, 1).is_none(),
            "caller without zone"
        );
        assert!(Plan::new(&config, Some(""), &zoned, 1).is_none());
        assert!(
            Plan::new(&config, Some("a"), &plain, 1).is_none(),
            "endpoints without zones"
        );
        assert!(
            Plan::new(&config, Some("a"), &zoned[..1], 1).is_none(),
            "one level"
        );
        let off = LocalityConfig {
            enabled: false,
            ..config.clone()
        };
        assert!(
            Plan::new(&off, Some("a"), &zoned, 1).is_none(),
            "turned off"
        );
        let down = [member("a", false), member("b", false)];
        assert!(
            Plan::new(&config, Some("a"), &down, 1).is_none(),
            "nothing healthy"
        );
    }

    fn ranked(zone: &str, priority: u32, healthy: bool) -> Member<'_> {
        Member {
            zone,
            priority,
            healthy,
        }
    }

    #[test]
    fn priorities_make_levels_without_zones() {
        // cat-0..2 at priority 0, cat-3..4 at 1 (a standby pool), no zones.
        let mut members = [
            ranked("", 0, true),
            ranked("", 0, true),
            ranked("", 0, true),
            ranked("", 1, true),
            ranked("", 1, true),
        ];
        let config = LocalityConfig::default();
        for caller in [None, Some("a")] {
            let plan = Plan::new(&config, caller, &members, 1).unwrap();
            assert_eq!(
                zones(&plan),
                [("*", vec![0, 1, 2], 100.0), ("*", vec![3, 4], 0.0)],
                "{caller:?}"
            );
        }
        // Two of three down: 1/3 × 1.4 ≈ 46.67 % stays at priority 0.
        members[0].healthy = false;
        members[1].healthy = false;
        let plan = Plan::new(&config, None, &members, 1).unwrap();
        assert_eq!(
            zones(&plan),
            [("*", vec![2], 46.67), ("*", vec![3, 4], 53.33)]
        );
        // Locality off leaves zones out, not priorities.
        let off = LocalityConfig {
            enabled: false,
            ..config.clone()
        };
        let zoned = [
            ranked("a", 0, true),
            ranked("b", 0, true),
            ranked("a", 2, true),
        ];
        let plan = Plan::new(&off, Some("a"), &zoned, 1).unwrap();
        let order: Vec<_> = plan
            .levels()
            .iter()
            .map(|l| (l.zone.as_str(), l.priority, l.members.clone()))
            .collect();
        assert_eq!(order, [("*", 0, vec![0, 1]), ("*", 2, vec![2])]);
        // One priority and no zones: one level, so no plan.
        assert!(Plan::new(&config, None, &members[..3], 1).is_none());
    }

    #[test]
    fn levels_that_carry_everything_cover_the_upstream() {
        let config = LocalityConfig::default();
        // The primary is down, the standby whole: it takes everything.
        let standby = [
            ranked("", 0, false),
            ranked("", 0, false),
            ranked("", 0, false),
            ranked("", 1, true),
            ranked("", 1, true),
        ];
        assert!(covers(&config, None, &standby));
        // Half the standby down too: 50 % × 1.4 = 70 %, short of a whole.
        let mut short = standby;
        short[4].healthy = false;
        assert!(!covers(&config, None, &short));
        // One level only: nothing to cover with.
        assert!(!covers(&config, None, &standby[..3]));
        // Zones count as levels for a caller in one.
        let zoned = [
            ranked("a", 0, false),
            ranked("a", 0, false),
            ranked("a", 0, false),
            ranked("b", 0, true),
        ];
        assert!(covers(&config, Some("a"), &zoned));
        assert!(!covers(&config, None, &zoned), "no caller zone: one level");
    }

    #[test]
    fn picks_follow_the_shares_and_health_updates_them() {
        let members = [
            member("a", true),
            member("a", true),
            member("a", true),
            member("a", true),
            member("b", true),
            member("b", true),
        ];
        let plan = Plan::new(&LocalityConfig::default(), Some("a"), &members, 7).unwrap();
        let count = |plan: &Plan| {
            let mut n = [0u32; 2];
            for _ in 0..10_000 {
                n[plan.pick()] += 1;
            }
            n
        };
        assert_eq!(count(&plan), [10_000, 0]);
        assert!(plan.set_health(&[1, 2]));
        let n = count(&plan);
        assert!((3_200..3_800).contains(&n[0]), "{n:?}");
        assert!(
            !plan.set_health(&[0, 0]),
            "nothing usable: left to the caller"
        );
        assert_eq!(zones(&plan)[0].2, 35.0, "shares kept");
    }
}
