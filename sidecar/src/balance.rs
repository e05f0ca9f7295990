//! Load balancing for the data plane: pure algorithms, no I/O.
//!
//! The proxy builds a [`Balancer`] per upstream whenever its endpoint set
//! changes (after [`candidates`] has applied health and the panic
//! threshold) and calls [`Balancer::pick`] per request (HTTP) or per
//! connection (TCP). Building may allocate (rings, tables, schedules);
//! `pick` never does and takes no lock: it reads atomics and immutable
//! tables. Load state ([`EndpointLoad`]) is owned by the proxy per endpoint
//! id and outlives balancers, so rebuilding loses no in-flight counts or
//! latency history.
//!
//! | algorithm | pick | weights |
//! |---|---|---|
//! | `round_robin` | atomic cursor | ignored |
//! | `weighted_round_robin` | precomputed smooth schedule ([`weighted`](self::weighted)) | honoured |
//! | `least_request` | P2C on `(in_flight + 1) / weight` | honoured |
//! | `peak_ewma` | P2C on `latency × (in_flight + 1) / weight` | honoured |
//! | `load_aware` (default) | P2C on `recent latency² × (in_flight + 1) / weight`, with probes ([`load_aware`](self::load_aware)) | honoured |
//! | `ring_hash` | binary search on a ring of virtual nodes | node counts |
//! | `maglev` | `table[hash mod 65537]` | slot counts |
//! | `random` | prefix-sum search on one random number | honoured |
//!
//! Locality ([`locality`]) comes before the algorithm: it groups the
//! endpoints into levels by zone (the caller's, its failover zones, the
//! rest) and picks a level by the share its health earns; the algorithm
//! then picks within that level.
//!
//! Outlier detection ([`outlier`]) keeps per-endpoint ejection state beside
//! the load; the proxy skips ejected endpoints when it picks.
//!
//! Ring hash and Maglev pick at random (weighted) when the request has no
//! hash key. Every random choice comes from one lock-free, seedable source
//! per balancer ([`Balancer::with_seed`] for deterministic tests).

mod hash_key;
mod load;
mod load_aware;
pub mod locality;
mod maglev;
pub mod outlier;
mod p2c;
mod ring_hash;
pub(crate) mod rng;
mod round_robin;
mod weighted;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use hash_key::HashKey;
pub use load::{DECAY, DEFAULT_RTT, EndpointLoad, FAILURE_PENALTY, LoadGuard};
pub use load_aware::{PROBE_INTERVAL, RECENT_DECAY};
pub use maglev::TABLE_SIZE as MAGLEV_TABLE_SIZE;
pub use outlier::{Outcome, Outlier, OutlierConfig};
pub use ring_hash::{MAX_RING, MIN_RING};
pub use weighted::MAX_SCHEDULE;

use self::maglev::Maglev;
use self::ring_hash::RingHash;
use self::rng::Rng;
use self::round_robin::RoundRobin;
use self::weighted::Weighted;

/// A load-balancing algorithm, as named in config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastRequest,
    PeakEwma,
    /// The default: adapts to both slow and busy endpoints without tuning,
    /// and shuns an endpoint much slower than its peers (see `load_aware`).
    #[default]
    LoadAware,
    RingHash,
    Maglev,
    Random,
}

// === impl Algorithm ===

impl Algorithm {
    /// Every algorithm, in the order error messages list them.
    pub const ALL: [Algorithm; 8] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastRequest,
        Algorithm::PeakEwma,
        Algorithm::LoadAware,
        Algorithm::RingHash,
        Algorithm::Maglev,
        Algorithm::Random,
    ];

    /// The config name; also a low-cardinality metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::LeastRequest => "least_request",
            Algorithm::PeakEwma => "peak_ewma",
            Algorithm::LoadAware => "load_aware",
            Algorithm::RingHash => "ring_hash",
            Algorithm::Maglev => "maglev",
            Algorithm::Random => "random",
        }
    }

    /// Whether `pick` uses a request hash, so the proxy knows whether to
    /// compute one ([`HashKey::hash`]).
    pub fn uses_hash(self) -> bool {
        matches!(self, Algorithm::RingHash | Algorithm::Maglev)
    }
}

impl FromStr for Algorithm {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| ParseError::Algorithm(s.to_owned()))
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an [`Algorithm`] or [`HashKey`] string was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "unknown load-balancing algorithm {0:?}; expected one of round_robin, \
         weighted_round_robin, least_request, peak_ewma, load_aware, ring_hash, maglev, \
         random"
    )]
    Algorithm(String),
    #[error(
        "invalid hash key {input:?}: {reason} (expected header:NAME, cookie:NAME or source_ip)"
    )]
    HashKey { input: String, reason: String },
}

/// Picks endpoints for one upstream's current endpoint set.
pub struct Balancer {
    algorithm: Algorithm,
    endpoints: Vec<Arc<EndpointLoad>>,
    strategy: Strategy,
    rng: Rng,
}

/// The per-algorithm state built from the endpoint set.
enum Strategy {
    /// No endpoints: every pick is `None`.
    Empty,
    RoundRobin(RoundRobin),
    Weighted(Weighted),
    LeastRequest,
    PeakEwma,
    LoadAware,
    RingHash(RingHash, WeightedRandom),
    Maglev(Maglev, WeightedRandom),
    Random(WeightedRandom),
}

// === impl Balancer ===

impl Balancer {
    /// Builds the balancer; `endpoints` are the candidates (already
    /// filtered for health by the caller). Seeds its randomness from the OS.
    pub fn new(algorithm: Algorithm, endpoints: Vec<Arc<EndpointLoad>>) -> Self {
        Self::with_seed(algorithm, endpoints, rand::random())
    }

    /// Like [`new`](Self::new) with a fixed seed, for reproducible picks.
    pub fn with_seed(algorithm: Algorithm, endpoints: Vec<Arc<EndpointLoad>>, seed: u64) -> Self {
        let rng = Rng::new(seed);
        let strategy = if endpoints.is_empty() {
            Strategy::Empty
        } else {
            let start = rng.below(endpoints.len());
            let weights = || endpoints.iter().map(|e| e.weight()).collect::<Vec<_>>();
            match algorithm {
                Algorithm::RoundRobin => Strategy::RoundRobin(RoundRobin::new(start)),
                Algorithm::WeightedRoundRobin => {
                    Strategy::Weighted(Weighted::new(&weights(), rng.next_u64() as usize))
                }
                Algorithm::LeastRequest => Strategy::LeastRequest,
                Algorithm::PeakEwma => Strategy::PeakEwma,
                Algorithm::LoadAware => Strategy::LoadAware,
                Algorithm::RingHash => {
                    Strategy::RingHash(RingHash::new(&endpoints), WeightedRandom::new(&endpoints))
                }
                Algorithm::Maglev => {
                    Strategy::Maglev(Maglev::new(&endpoints), WeightedRandom::new(&endpoints))
                }
                Algorithm::Random => Strategy::Random(WeightedRandom::new(&endpoints)),
            }
        };
        Self {
            algorithm,
            endpoints,
            strategy,
            rng,
        }
    }

    /// An index into [`endpoints`](Self::endpoints), or `None` if there are
    /// none. `hash` is used by ring hash and Maglev (random without it) and
    /// ignored by the others.
    pub fn pick(&self, hash: Option<u64>) -> Option<usize> {
        let index = match &self.strategy {
            Strategy::Empty => return None,
            Strategy::RoundRobin(rr) => rr.pick(self.endpoints.len()),
            Strategy::Weighted(w) => w.pick(),
            Strategy::LeastRequest => p2c::least_request(&self.endpoints, &self.rng),
            Strategy::PeakEwma => p2c::peak_ewma(&self.endpoints, &self.rng),
            Strategy::LoadAware => load_aware::load_aware(&self.endpoints, &self.rng),
            Strategy::RingHash(ring, fallback) => match hash {
                Some(h) => ring.pick(h),
                None => fallback.pick(&self.rng),
            },
            Strategy::Maglev(table, fallback) => match hash {
                Some(h) => table.pick(h),
                None => fallback.pick(&self.rng),
            },
            Strategy::Random(random) => random.pick(&self.rng),
        };
        Some(index)
    }

    /// The endpoints given to [`new`](Self::new), in the same order.
    pub fn endpoints(&self) -> &[Arc<EndpointLoad>] {
        &self.endpoints
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("algorithm", &self.algorithm)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// Random by weight: the running sum of weights, searched for one uniform
/// number in `0..total`. With equal weights this is uniform.
struct WeightedRandom {
    cumulative: Box<[u64]>,
}

// === impl WeightedRandom ===

impl WeightedRandom {
    fn new(endpoints: &[Arc<EndpointLoad>]) -> Self {
        let cumulative = endpoints
            .iter()
            .scan(0u64, |sum, e| {
                *sum += u64::from(e.weight());
                Some(*sum)
            })
            .collect();
        Self { cumulative }
    }

    fn pick(&self, rng: &Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1);
        let r = ((u128::from(rng.next_u64()) * u128::from(total)) >> 64) as u64;
        self.cumulative.partition_point(|&c| c <= r)
    }
}

/// Applies health with a panic threshold: the healthy endpoints, unless
/// fewer than `panic_threshold` (a fraction, e.g. 0.5) of all are healthy;
/// then all of them, and `true` for "panic mode". Health checks can be
/// wrong and survivors can be overloaded; past the threshold, spreading
/// over every endpoint (some of which may well work) beats concentrating
/// all traffic on the few that passed. A threshold of 0 disables panic
/// (then no healthy endpoint means no candidates); no endpoints at all is
/// never panic.
pub fn candidates<T: Clone>(
    all: &[T],
    healthy: impl Fn(&T) -> bool,
    panic_threshold: f64,
) -> (Vec<T>, bool) {
    let survivors: Vec<T> = all.iter().filter(|e| healthy(e)).cloned().collect();
    let panic = !all.is_empty() && (survivors.len() as f64) < panic_threshold * all.len() as f64;
    if panic {
        (all.to_vec(), true)
    } else {
        (survivors, false)
    }
}

#[cfg(test)]
mod tests;
