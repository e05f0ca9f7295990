//! The gradient rule against a simulated upstream: `capacity` servers
//! taking `service` each, so with n requests in flight every request
//! waits `service × max(1, n / capacity)`.

use super::*;

const SERVICE: Duration = Duration::from_millis(10);

fn latency(n: usize, capacity: usize, service: Duration) -> Duration {
    service.mul_f64((n as f64 / capacity as f64).max(1.0))
}

fn limiter(cfg: AdaptiveConfig) -> (Arc<Adaptive>, Instant) {
    let a = Arc::new(Adaptive::default());
    let now = Instant::now();
    a.configure(Some(cfg), now);
    (a, now)
}

/// `demand` callers in a closed loop for `time`: each round as many as the
/// limit lets start together and are answered one latency later.
fn drive(
    a: &Adaptive,
    mut now: Instant,
    time: Duration,
    demand: usize,
    capacity: usize,
    service: Duration,
) -> Instant {
    let end = now + time;
    while now < end {
        let n = demand.min(a.limit().unwrap());
        let rtt = latency(n, capacity, service);
        for _ in 0..n {
            a.sample(now + rtt, now);
        }
        now += rtt;
    }
    now
}

#[test]
fn off_unless_configured() {
    let a = Arc::new(Adaptive::default());
    let now = Instant::now();
    let permits: Vec<_> = (0..10_000).map(|_| a.try_acquire(now).unwrap()).collect();
    assert_eq!(a.limit(), None);
    assert_eq!(a.in_flight(), 10_000);
    drop(permits);
    assert_eq!(a.in_flight(), 0);
}

#[test]
fn refuses_past_the_limit_and_gives_places_back() {
    let (a, now) = limiter(AdaptiveConfig {
        min_limit: 2,
        ..Default::default()
    });
    assert_eq!(a.limit(), Some(2), "pinned to the floor while probing");
    let p1 = a.try_acquire(now).unwrap();
    let _p2 = a.try_acquire(now).unwrap();
    assert!(a.try_acquire(now).is_none());
    assert_eq!(a.in_flight(), 2, "a refused request holds nothing");
    drop(p1);
    assert!(a.try_acquire(now).is_some());
}

#[test]
fn probes_the_min_rtt_first_then_settles_near_the_upstreams_capacity() {
    let (a, now) = limiter(AdaptiveConfig::default());
    // 200 callers, 8 servers: unlimited, each request would wait 25 times
    // its service time.
    let now = drive(&a, now, Duration::from_millis(300), 200, 8, SERVICE);
    assert_eq!(a.min_rtt(), Some(SERVICE), "measured at the floor of 3");
    let now = drive(&a, now, Duration::from_secs(5), 200, 8, SERVICE);
    let mut seen = Vec::new();
    let mut now = now;
    for _ in 0..20 {
        now = drive(&a, now, Duration::from_millis(100), 200, 8, SERVICE);
        seen.push(a.limit().unwrap());
    }
    // Settles where the queue is about √limit deep: near 14. Without a
    // queue it grows by at most 1 + buffer a window.
    assert!(
        seen.iter().all(|l| (8..=24).contains(l)),
        "limits over the last 2 s: {seen:?}"
    );
}

#[test]
fn grows_to_its_ceiling_while_latency_holds() {
    let (a, now) = limiter(AdaptiveConfig::default());
    drive(&a, now, Duration::from_secs(2), 5000, 10_000, SERVICE);
    assert_eq!(a.limit(), Some(1000));
}

#[test]
fn shrinks_within_a_few_windows_when_the_upstream_loses_capacity() {
    let (a, now) = limiter(AdaptiveConfig::default());
    let now = drive(&a, now, Duration::from_secs(3), 500, 100, SERVICE);
    let before = a.limit().unwrap();
    assert!(before >= 100, "{before}");
    // Nine of ten servers gone.
    drive(&a, now, Duration::from_secs(1), 500, 10, SERVICE);
    let after = a.limit().unwrap();
    assert!(after <= 30, "limit {before} -> {after} within 1 s");
    assert!(after >= 3);
}

#[test]
fn reprobes_every_interval_and_follows_a_new_base_latency() {
    let cfg = AdaptiveConfig {
        min_rtt_interval: Duration::from_secs(10),
        ..Default::default()
    };
    let (a, now) = limiter(cfg);
    let now = drive(&a, now, Duration::from_secs(2), 200, 8, SERVICE);
    assert_eq!(a.min_rtt(), Some(SERVICE));
    // The upstream's own work doubles (a slower release, say).
    let slower = SERVICE * 2;
    let mut now = now;
    let mut pinned = false;
    for _ in 0..140 {
        now = drive(&a, now, Duration::from_millis(100), 200, 8, slower);
        pinned |= a.limit() == Some(cfg.min_limit);
    }
    assert!(pinned, "a probe pins the limit to its floor");
    assert_eq!(a.min_rtt(), Some(slower), "measured again within 11 s");
}

#[test]
fn a_probe_ignores_requests_admitted_before_it() {
    let (a, now) = limiter(AdaptiveConfig {
        min_rtt_requests: 3,
        ..Default::default()
    });
    let before = now - Duration::from_secs(1);
    for _ in 0..10 {
        a.sample(now + Duration::from_millis(1), before);
    }
    assert_eq!(a.min_rtt(), None);
    for ms in [5, 6, 7] {
        a.sample(now + Duration::from_millis(ms), now);
    }
    assert_eq!(a.min_rtt(), Some(Duration::from_millis(6)));
}

#[test]
fn a_new_config_starts_over_and_the_same_one_keeps_what_was_learned() {
    let (a, now) = limiter(AdaptiveConfig::default());
    let now = drive(&a, now, Duration::from_secs(1), 5000, 10_000, SERVICE);
    let learned = a.limit().unwrap();
    assert!(learned > 50, "{learned}");
    a.configure(Some(AdaptiveConfig::default()), now);
    assert_eq!(a.limit(), Some(learned));
    let other = AdaptiveConfig {
        min_limit: 5,
        ..Default::default()
    };
    a.configure(Some(other), now);
    assert_eq!(a.limit(), Some(5));
    assert_eq!(a.min_rtt(), None, "probes again");
    a.configure(None, now);
    assert_eq!(a.limit(), None);
}
