//! A set of endpoints with its balancer, and, when its endpoints fall in
//! several levels (priorities, or zones for a caller in one), one balancer
//! per level in front of which `balance::locality` chooses the level. The upstream as a whole and each policy subset is
//! one [`Pool`]; all of it is built per endpoint set, and a pick allocates
//! nothing.

use std::sync::Arc;

use super::{LbEndpoint, choose};
use crate::balance::{
    Algorithm, Balancer,
    locality::{LocalityConfig, Member, Plan},
};

/// Endpoints and how a request is spread over them.
pub struct Pool {
    pub endpoints: Vec<Arc<LbEndpoint>>,
    balancer: Balancer,
    local: Option<Local>,
}

/// The levels of a pool whose endpoints the caller's zone orders.
struct Local {
    plan: Plan,
    /// Per level: its routable endpoints and their balancer.
    levels: Vec<(Vec<Arc<LbEndpoint>>, Balancer)>,
}

/// What `/config` shows of one level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelView {
    pub zone: String,
    pub priority: u32,
    /// Percent of requests sent to the level now.
    pub share_percent: f64,
    pub endpoints: usize,
    pub healthy: usize,
}

// === impl Pool ===

impl Pool {
    /// `targets` are the routable endpoints; `unroutable` the (zone,
    /// priority) of the pool's endpoints that are not, which count against
    /// their level's health. `config` None: no levels at all (panic mode,
    /// where health is not to be trusted).
    pub fn new(
        algorithm: Algorithm,
        targets: Vec<Arc<LbEndpoint>>,
        unroutable: &[(&str, u32)],
        config: Option<&LocalityConfig>,
        caller_zone: Option<&str>,
    ) -> Pool {
        let balancer_of = |ts: &[Arc<LbEndpoint>]| {
            Balancer::new(algorithm, ts.iter().map(|t| t.load.clone()).collect())
        };
        let members: Vec<Member<'_>> = targets
            .iter()
            .map(|t| Member {
                zone: &t.zone,
                priority: t.priority,
                healthy: true,
            })
            .chain(unroutable.iter().map(|&(zone, priority)| Member {
                zone,
                priority,
                healthy: false,
            }))
            .collect();
        let plan = config.and_then(|c| Plan::new(c, caller_zone, &members, rand::random()));
        let local = plan.map(|plan| Local {
            levels: plan
                .levels()
                .iter()
                .map(|l| {
                    let ts: Vec<Arc<LbEndpoint>> =
                        l.members.iter().map(|&i| targets[i].clone()).collect();
                    let b = balancer_of(&ts);
                    (ts, b)
                })
                .collect(),
            plan,
        });
        Pool {
            balancer: balancer_of(&targets),
            endpoints: targets,
            local,
        }
    }

    /// An endpoint for a request: from the level the plan picks when
    /// there are levels, from the whole pool when there are none or the
    /// level has nothing usable left (every one ejected or tried).
    pub fn choose(&self, hash: Option<u64>, avoid: &[Arc<LbEndpoint>]) -> Option<Arc<LbEndpoint>> {
        if let Some(local) = &self.local {
            let (targets, balancer) = &local.levels[local.plan.pick()];
            if let Some(t) = choose(targets, balancer, hash, avoid)
                && !t.outlier.is_ejected()
                && !avoid.iter().any(|a| a.id == t.id)
            {
                return Some(t);
            }
        }
        choose(&self.endpoints, &self.balancer, hash, avoid)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.balancer.algorithm()
    }

    /// Folds outlier ejections into the levels' shares (the upstreams'
    /// task calls this on its tick): a level whose endpoints are ejected
    /// sheds traffic as one whose endpoints are unhealthy does.
    pub fn refresh(&self) {
        let Some(local) = &self.local else { return };
        let usable: Vec<usize> = local.levels.iter().map(|(ts, _)| usable_in(ts)).collect();
        local.plan.set_health(&usable);
    }

    /// The levels and their shares now; empty when there are none.
    pub fn levels(&self) -> Vec<LevelView> {
        let Some(local) = &self.local else {
            return Vec::new();
        };
        local
            .plan
            .levels()
            .iter()
            .enumerate()
            .map(|(i, l)| LevelView {
                zone: l.zone.clone(),
                priority: l.priority,
                share_percent: (local.plan.share_percent(i) * 100.0).round() / 100.0,
                endpoints: l.total,
                healthy: l.members.len(),
            })
            .collect()
    }

    /// The level endpoint `id` is balanced in, if there are levels and it
    /// is routable.
    pub fn level_of(&self, id: &str) -> Option<usize> {
        let local = self.local.as_ref()?;
        local
            .levels
            .iter()
            .position(|(ts, _)| ts.iter().any(|t| t.id == id))
    }
}

fn usable_in(targets: &[Arc<LbEndpoint>]) -> usize {
    targets.iter().filter(|t| !t.outlier.is_ejected()).count()
}
