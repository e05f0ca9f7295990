//! Tests across algorithms, and helpers shared by the per-algorithm tests.

use std::collections::HashMap;

use super::rng::Rng;
use super::*;

/// `n` endpoints of weight 1 with ids `ep-0`..`ep-{n-1}`.
pub(super) fn endpoints(n: usize) -> Vec<Arc<EndpointLoad>> {
    (0..n)
        .map(|i| EndpointLoad::new(format!("ep-{i}"), 1))
        .collect()
}

/// The id each key maps to under `balancer`.
fn owners<'a>(balancer: &'a Balancer, keys: &[u64]) -> Vec<&'a str> {
    keys.iter()
        .map(|&k| balancer.endpoints()[balancer.pick(Some(k)).unwrap()].id())
        .collect()
}

/// With 10 equal endpoints and 10,000 random keys: the same key always
/// maps to the same endpoint (also across rebuilds); each endpoint's share
/// is within `spread` of 1/10; removing one endpoint moves at most
/// `max_moved` of the keys, including every key the removed one owned.
pub(super) fn consistent_hash_checks(algorithm: Algorithm, spread: f64, max_moved: f64) {
    let rng = Rng::new(2024);
    let keys: Vec<u64> = (0..10_000).map(|_| rng.next_u64()).collect();
    let all = endpoints(10);
    let before = Balancer::with_seed(algorithm, all.clone(), 1);
    let mapped = owners(&before, &keys);

    let rebuilt = Balancer::with_seed(algorithm, all.clone(), 99);
    assert_eq!(owners(&rebuilt, &keys), mapped, "same key, same endpoint");
    assert_eq!(owners(&before, &keys), mapped, "picks do not drift");

    let mut shares: HashMap<&str, usize> = HashMap::new();
    for id in &mapped {
        *shares.entry(id).or_default() += 1;
    }
    assert_eq!(shares.len(), 10);
    for (id, count) in &shares {
        let share = *count as f64 / keys.len() as f64;
        assert!(
            (share - 0.1).abs() <= 0.1 * spread,
            "{algorithm}: {id} has {share}, want 0.1 ± {spread:.0}%"
        );
    }

    let mut fewer = all;
    fewer.remove(3);
    let after = Balancer::with_seed(algorithm, fewer, 1);
    let remapped = owners(&after, &keys);
    let moved = mapped.iter().zip(&remapped).filter(|(a, b)| a != b).count();
    let moved = moved as f64 / keys.len() as f64;
    assert!(moved <= max_moved, "{algorithm}: {moved} of keys moved");
    assert!(!remapped.contains(&"ep-3"));
    eprintln!("{algorithm}: shares {shares:?}, moved {moved}");
}

#[test]
fn random_gives_every_endpoint_its_fair_share() {
    let balancer = Balancer::with_seed(Algorithm::Random, endpoints(5), 77);
    let mut counts = [0usize; 5];
    for _ in 0..10_000 {
        counts[balancer.pick(None).unwrap()] += 1;
    }
    assert!(
        counts.iter().all(|&c| c.abs_diff(2000) <= 300),
        "{counts:?}"
    );
}

#[test]
fn random_follows_weights() {
    let eps = vec![EndpointLoad::new("a", 1), EndpointLoad::new("b", 3)];
    let balancer = Balancer::with_seed(Algorithm::Random, eps, 8);
    let b = (0..10_000)
        .filter(|_| balancer.pick(None) == Some(1))
        .count();
    assert!(b.abs_diff(7500) <= 300, "{b}");
}

#[test]
fn consistent_hashing_without_a_key_falls_back_to_random() {
    for algorithm in [Algorithm::RingHash, Algorithm::Maglev] {
        let balancer = Balancer::with_seed(algorithm, endpoints(4), 5);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[balancer.pick(None).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|&c| c.abs_diff(1000) <= 150),
            "{counts:?}"
        );
    }
}

#[test]
fn every_algorithm_handles_empty_and_single_sets() {
    for algorithm in Algorithm::ALL {
        let empty = Balancer::new(algorithm, Vec::new());
        assert_eq!(empty.pick(None), None, "{algorithm}");
        assert_eq!(empty.pick(Some(1)), None, "{algorithm}");
        let one = Balancer::new(algorithm, endpoints(1));
        assert_eq!(one.algorithm(), algorithm);
        for h in [None, Some(0), Some(u64::MAX)] {
            assert_eq!(one.pick(h), Some(0), "{algorithm}");
        }
    }
}

#[test]
fn balancers_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Balancer>();
    assert_send_sync::<EndpointLoad>();
    let balancer = Arc::new(Balancer::new(Algorithm::RoundRobin, endpoints(4)));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let b = Arc::clone(&balancer);
            std::thread::spawn(move || (0..1000).map(|_| b.pick(None).unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let mut counts = [0usize; 4];
    for t in threads {
        for i in t.join().unwrap() {
            counts[i] += 1;
        }
    }
    assert_eq!(
        counts, [1000; 4],
        "no pick lost or doubled under contention"
    );
}

#[test]
fn algorithms_parse_by_config_name() {
    for algorithm in Algorithm::ALL {
        assert_eq!(algorithm.as_str().parse::<Algorithm>(), Ok(algorithm));
        assert_eq!(algorithm.to_string(), algorithm.as_str());
    }
    assert_eq!(Algorithm::default(), Algorithm::LoadAware);
    let err = "p2c".parse::<Algorithm>().unwrap_err().to_string();
    assert!(err.contains("\"p2c\""), "{err}");
    for name in [
        "round_robin",
        "weighted_round_robin",
        "least_request",
        "peak_ewma",
        "load_aware",
        "maglev",
        "random",
    ] {
        assert!(err.contains(name), "{err}");
    }
    #[derive(serde::Deserialize)]
    struct Upstream {
        algorithm: Algorithm,
    }
    let u: Upstream = toml::from_str("algorithm = \"ring_hash\"").unwrap();
    assert_eq!(u.algorithm, Algorithm::RingHash);
    assert!(u.algorithm.uses_hash() && !Algorithm::Random.uses_hash());
}

#[test]
fn candidates_apply_the_panic_threshold() {
    let all = ["a", "b", "c"];
    let (two, panic) = candidates(&all, |e| *e != "c", 0.5);
    assert_eq!((two, panic), (vec!["a", "b"], false));
    let (every, panic) = candidates(&all, |e| *e == "a", 0.5);
    assert_eq!((every, panic), (vec!["a", "b", "c"], true));
    let (every, panic) = candidates(&all, |_| false, 0.5);
    assert_eq!((every, panic), (vec!["a", "b", "c"], true));
    let (none, panic) = candidates::<&str>(&[], |_| true, 0.5);
    assert!(none.is_empty() && !panic);
    let (none, panic) = candidates(&all, |_| false, 0.0);
    assert!(none.is_empty() && !panic, "threshold 0 disables panic");
    let (all_healthy, panic) = candidates(&all, |_| true, 1.0);
    assert_eq!((all_healthy.len(), panic), (3, false));
}
