//! A policy document (as operators write it, in YAML or JSON) to a
//! [`TrafficPolicy`], with every problem found on the way.
//!
//! ```yaml
//! service: payments
//! timeouts: { request: 5s, per_try: 1s, connect: 500ms, idle: 60s }
//! retries:
//!   attempts: 2
//!   retry_on: [connect-failure, reset, gateway-error]
//!   backoff: { base: 25ms, max: 250ms }
//!   budget: { ratio: 0.2, min_per_second: 10 }
//! circuit_breaker: { max_connections: 1024, max_pending_requests: 256, max_requests: 1024 }
//! adaptive_concurrency: { min_limit: 3, max_limit: 1000, buffer: 0.25, window: 100ms, min_rtt_interval: 60s, min_rtt_requests: 50 }
//! outlier_detection: { consecutive_5xx: 5, interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50,
//!                      latency_factor: 3, latency_min: 5ms, latency_intervals: 2 }
//! load_balancer: { algorithm: ring_hash, hash_key: "header:x-user" }
//! locality: { enabled: true, failover: [zone-b], overprovisioning_percent: 140 }
//! subsets: [ { name: v1, labels: { version: v1 } }, { name: v2, labels: { version: v2 } } ]
//! split: [ { subset: v1, weight: 90 }, { subset: v2, weight: 10 } ]
//! routes:
//!   - name: canary
//!     match: { headers: { x-canary: "true" } }
//!     split: [ { subset: v2, weight: 100 } ]
//! fault: { delay: { percent: 10, duration: 100ms }, abort: { percent: 1, status: 503 } }
//! ```

use std::{collections::BTreeSet, time::Duration};

use isdp_proto::v1::{
    AdaptiveConcurrency, CircuitBreaker, FaultInjection, LoadBalancer, OutlierDetection,
    RetryPolicy, Route, RouteMatch, Subset, Timeouts, TrafficPolicy, WeightedSubset,
};
use serde_json::Value;

use super::walk::{Obj, Problems, int_value, join, string_value};
use crate::registry::validate::is_dns_label;

pub const MAX_RETRY_ATTEMPTS: u64 = 10;
pub const MAX_ROUTES: usize = 64;
pub const MAX_SUBSETS: usize = 32;
pub const MAX_LABELS: usize = 16;
pub const MAX_HEADERS: usize = 16;
/// Longest timeout, backoff or ejection an operator may write.
const MAX_DURATION: Duration = Duration::from_secs(3600);
const MAX_LIMIT: u64 = 1_000_000;
const MAX_BUFFER_BYTES: u64 = 16 * 1024 * 1024;
/// `outlier_detection.latency_factor`: 0 or in this range.
const MIN_LATENCY_FACTOR: f64 = 1.5;
const MAX_LATENCY_FACTOR: f64 = 100.0;
const MAX_LATENCY_INTERVALS: u64 = 100;
/// `adaptive_concurrency.buffer`: how far latency may rise, as a fraction.
const MAX_BUFFER: f64 = 10.0;
/// `adaptive_concurrency.min_rtt_requests`: the sidecar's own bound.
const MAX_MIN_RTT_REQUESTS: u64 = 1000;

/// Conditions a retry may be made on.
pub const RETRY_ON: &[&str] = &[
    "connect-failure",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "retriable-grpc-codes",
];
/// gRPC codes by name, as `retries.grpc_codes` takes them.
pub const GRPC_CODES: &[&str] = &[
    "cancelled",
    "unknown",
    "deadline-exceeded",
    "resource-exhausted",
    "aborted",
    "internal",
    "unavailable",
];
pub const ALGORITHMS: &[&str] = &[
    "round_robin",
    "weighted_round_robin",
    "least_request",
    "peak_ewma",
    "load_aware",
    "ring_hash",
    "maglev",
    "random",
];

/// Reads `doc`. `has_instances` says whether any instance of the service
/// carries every label of a subset, so a split cannot send traffic to a
/// subset that has nobody in it.
pub fn parse(
    doc: &Value,
    has_instances: &dyn Fn(&str, &std::collections::BTreeMap<String, String>) -> bool,
) -> Result<TrafficPolicy, Problems> {
    let mut p = Problems::default();
    let Some(mut top) = Obj::new(doc, "", &mut p) else {
        return Err(p);
    };
    let mut policy = TrafficPolicy::default();
    match top.string("service", &mut p) {
        Some(s) if is_dns_label(&s) => policy.service = s,
        Some(s) => p.push(
            "service",
            format!("must be a service name (a DNS label), got {s:?}"),
        ),
        None if top.get("service").is_none() => p.push("service", "required"),
        None => {}
    }
    policy.timeouts = top.obj("timeouts", &mut p).map(|o| timeouts(o, &mut p));
    policy.retries = top.obj("retries", &mut p).map(|o| retries(o, &mut p));
    policy.circuit_breaker = top
        .obj("circuit_breaker", &mut p)
        .map(|o| circuit_breaker(o, &mut p));
    policy.adaptive_concurrency = top
        .obj("adaptive_concurrency", &mut p)
        .map(|o| adaptive_concurrency(o, &mut p));
    policy.outlier_detection = top
        .obj("outlier_detection", &mut p)
        .map(|o| outlier(o, &mut p));
    policy.load_balancer = top
        .obj("load_balancer", &mut p)
        .map(|o| load_balancer(o, &mut p));
    policy.locality = top
        .obj("locality", &mut p)
        .map(|o| locality::locality(o, &mut p));
    if let Some(items) = top.list("subsets", &mut p) {
        policy.subsets = subsets(items, &mut p);
    }
    let names: BTreeSet<String> = policy.subsets.iter().map(|s| s.name.clone()).collect();
    if let Some(items) = top.list("split", &mut p) {
        policy.split = split(items, "split", &names, &mut p);
    }
    policy.fault = top.obj("fault", &mut p).map(|o| fault(o, &mut p));
    if let Some(items) = top.list("routes", &mut p) {
        if items.len() > MAX_ROUTES {
            p.push(
                "routes",
                format!("at most {MAX_ROUTES} routes, got {}", items.len()),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("routes[{i}]");
            if let Some(o) = Obj::new(item, &path, &mut p) {
                let r = route(o, &names, &mut p);
                if !seen.insert(r.name.clone()) {
                    p.push(join(&path, "name"), format!("{:?} is used twice", r.name));
                }
                policy.routes.push(r);
            }
        }
    }
    top.finish(&mut p);

    // Subsets a split sends traffic to must have instances now.
    if !policy.service.is_empty() {
        let used: BTreeSet<&str> = policy
            .split
            .iter()
            .chain(policy.routes.iter().flat_map(|r| r.split.iter()))
            .filter(|w| w.weight > 0)
            .map(|w| w.subset.as_str())
            .collect();
        for (i, s) in policy.subsets.iter().enumerate() {
            if used.contains(s.name.as_str()) && !has_instances(&policy.service, &s.labels) {
                p.push(
                    format!("subsets[{i}]"),
                    format!(
                        "subset {:?} has no instances of {} (labels {:?}); a split would send traffic nowhere",
                        s.name, policy.service, s.labels
                    ),
                );
            }
        }
    }
    if p.0.is_empty() { Ok(policy) } else { Err(p) }
}

fn timeouts(mut o: Obj<'_>, p: &mut Problems) -> Timeouts {
    let d = Duration::from_millis(1);
    let t = Timeouts {
        request_ms: o.duration("request", d, MAX_DURATION, p).unwrap_or(0),
        per_try_ms: o.duration("per_try", d, MAX_DURATION, p).unwrap_or(0),
        connect_ms: o.duration("connect", d, MAX_DURATION, p).unwrap_or(0),
        idle_ms: o.duration("idle", d, MAX_DURATION, p).unwrap_or(0),
    };
    if t.request_ms > 0 && t.per_try_ms > t.request_ms {
        p.push(
            o.path("per_try"),
            "must not be longer than timeouts.request",
        );
    }
    o.finish(p);
    t
}

fn words(o: &mut Obj<'_>, key: &'static str, allowed: &[&str], p: &mut Problems) -> Vec<String> {
    let mut out = Vec::new();
    let path = o.path(key);
    for (i, v) in o.list(key, p).into_iter().flatten().enumerate() {
        let at = format!("{path}[{i}]");
        if let Some(s) = string_value(v, &at, p) {
            if allowed.contains(&s.as_str()) {
                out.push(s);
            } else {
                p.push(
                    at,
                    format!("must be one of {}, got {s:?}", allowed.join(", ")),
                );
            }
        }
    }
    out
}

fn retries(mut o: Obj<'_>, p: &mut Problems) -> RetryPolicy {
    let mut r = RetryPolicy {
        attempts: o.int("attempts", 0, MAX_RETRY_ATTEMPTS, p).unwrap_or(0) as u32,
        retry_on: words(&mut o, "retry_on", RETRY_ON, p),
        grpc_codes: words(&mut o, "grpc_codes", GRPC_CODES, p),
        ..Default::default()
    };
    let path = o.path("status_codes");
    for (i, v) in o.list("status_codes", p).into_iter().flatten().enumerate() {
        if let Some(c) = int_value(v, &format!("{path}[{i}]"), 500, 599, p) {
            r.status_codes.push(c as u32);
        }
    }
    let path = o.path("methods");
    for (i, v) in o.list("methods", p).into_iter().flatten().enumerate() {
        let at = format!("{path}[{i}]");
        if let Some(m) = string_value(v, &at, p) {
            if !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase()) {
                r.methods.push(m);
            } else {
                p.push(at, format!("must be an upper-case HTTP method, got {m:?}"));
            }
        }
    }
    if let Some(mut b) = o.obj("backoff", p) {
        let lo = Duration::from_millis(1);
        r.backoff_base_ms = b.duration("base", lo, MAX_DURATION, p).unwrap_or(0);
        r.backoff_max_ms = b.duration("max", lo, MAX_DURATION, p).unwrap_or(0);
        if r.backoff_max_ms > 0 && r.backoff_base_ms > r.backoff_max_ms {
            p.push(b.path("base"), "must not be longer than backoff.max");
        }
        b.finish(p);
    }
    if let Some(mut b) = o.obj("budget", p) {
        r.budget_ratio = b.number("ratio", 0.0, 1.0, p).unwrap_or(0.0);
        r.budget_min_per_second = b.int("min_per_second", 0, MAX_LIMIT, p).unwrap_or(0) as u32;
        b.finish(p);
    }
    r.buffer_bytes = o.int("buffer", 0, MAX_BUFFER_BYTES, p).unwrap_or(0);
    let needs_codes = r.retry_on.iter().any(|c| c == "retriable-status-codes");
    if needs_codes && r.status_codes.is_empty() {
        p.push(
            o.path("status_codes"),
            "required when retry_on has retriable-status-codes",
        );
    }
    let needs_grpc = r.retry_on.iter().any(|c| c == "retriable-grpc-codes");
    if needs_grpc && r.grpc_codes.is_empty() {
        p.push(
            o.path("grpc_codes"),
            "required when retry_on has retriable-grpc-codes",
        );
    }
    o.finish(p);
    r
}

fn circuit_breaker(mut o: Obj<'_>, p: &mut Problems) -> CircuitBreaker {
    let c = CircuitBreaker {
        max_connections: o.int("max_connections", 1, MAX_LIMIT, p).unwrap_or(0) as u32,
        max_pending_requests: o.int("max_pending_requests", 0, MAX_LIMIT, p).unwrap_or(0) as u32,
        max_requests: o.int("max_requests", 1, MAX_LIMIT, p).unwrap_or(0) as u32,
    };
    o.finish(p);
    c
}

/// Unset knobs stay 0 (the sidecar's defaults).
fn adaptive_concurrency(mut o: Obj<'_>, p: &mut Problems) -> AdaptiveConcurrency {
    let a = AdaptiveConcurrency {
        min_limit: o.int("min_limit", 1, MAX_LIMIT, p).unwrap_or(0) as u32,
        max_limit: o.int("max_limit", 1, MAX_LIMIT, p).unwrap_or(0) as u32,
        buffer: o.number("buffer", 0.01, MAX_BUFFER, p).unwrap_or(0.0),
        window_ms: o
            .duration(
                "window",
                Duration::from_millis(10),
                Duration::from_secs(60),
                p,
            )
            .unwrap_or(0),
        min_rtt_interval_ms: o
            .duration("min_rtt_interval", Duration::from_secs(1), MAX_DURATION, p)
            .unwrap_or(0),
        min_rtt_requests: o
            .int("min_rtt_requests", 1, MAX_MIN_RTT_REQUESTS, p)
            .unwrap_or(0) as u32,
    };
    if a.min_limit != 0 && a.max_limit != 0 && a.min_limit > a.max_limit {
        p.push(
            o.path("max_limit"),
            format!(
                "must be at least min_limit ({}), got {}",
                a.min_limit, a.max_limit
            ),
        );
    }
    o.finish(p);
    a
}

fn outlier(mut o: Obj<'_>, p: &mut Problems) -> OutlierDetection {
    let ms = Duration::from_millis(10);
    let d = OutlierDetection {
        consecutive_5xx: o.int("consecutive_5xx", 0, 1000, p).unwrap_or(0) as u32,
        consecutive_gateway_errors: o.int("consecutive_gateway_errors", 0, 1000, p).unwrap_or(0)
            as u32,
        interval_ms: o.duration("interval", ms, MAX_DURATION, p).unwrap_or(0),
        base_ejection_ms: o
            .duration("base_ejection_time", ms, MAX_DURATION, p)
            .unwrap_or(0),
        max_ejection_percent: o.int("max_ejection_percent", 0, 100, p).unwrap_or(0) as u32,
        latency_factor: latency_factor(&mut o, p),
        latency_min_ms: o
            .duration("latency_min", Duration::from_millis(1), MAX_DURATION, p)
            .unwrap_or(0),
        latency_intervals: o
            .int("latency_intervals", 1, MAX_LATENCY_INTERVALS, p)
            .unwrap_or(0) as u32,
    };
    o.finish(p);
    d
}

/// `latency_factor`: 0 (off) or `MIN_LATENCY_FACTOR..=MAX_LATENCY_FACTOR`;
/// closer to 1 would eject endpoints for noise.
fn latency_factor(o: &mut Obj<'_>, p: &mut Problems) -> f64 {
    let f = o
        .number("latency_factor", 0.0, MAX_LATENCY_FACTOR, p)
        .unwrap_or(0.0);
    if f != 0.0 && f < MIN_LATENCY_FACTOR {
        p.push(
            o.path("latency_factor"),
            format!("must be 0 (off) or {MIN_LATENCY_FACTOR}..{MAX_LATENCY_FACTOR}, got {f}"),
        );
        return 0.0;
    }
    f
}

fn load_balancer(mut o: Obj<'_>, p: &mut Problems) -> LoadBalancer {
    let mut lb = LoadBalancer::default();
    match o.string("algorithm", p) {
        Some(a) if ALGORITHMS.contains(&a.as_str()) => lb.algorithm = a,
        Some(a) => p.push(
            o.path("algorithm"),
            format!("must be one of {}, got {a:?}", ALGORITHMS.join(", ")),
        ),
        None if o.get("algorithm").is_none() => p.push(o.path("algorithm"), "required"),
        None => {}
    }
    if let Some(k) = o.string("hash_key", p) {
        let ok = k == "source_ip"
            || k.strip_prefix("header:").is_some_and(|n| !n.is_empty())
            || k.strip_prefix("cookie:").is_some_and(|n| !n.is_empty());
        if ok {
            lb.hash_key = k;
        } else {
            p.push(
                o.path("hash_key"),
                format!("must be header:NAME, cookie:NAME or source_ip, got {k:?}"),
            );
        }
    }
    let hashing = matches!(lb.algorithm.as_str(), "ring_hash" | "maglev");
    if hashing && lb.hash_key.is_empty() && o.get("hash_key").is_none() {
        p.push(o.path("hash_key"), format!("required for {}", lb.algorithm));
    }
    if !hashing && !lb.hash_key.is_empty() {
        p.push(
            o.path("hash_key"),
            "only ring_hash and maglev hash; remove it or change the algorithm",
        );
    }
    o.finish(p);
    lb
}

fn subsets(items: &[Value], p: &mut Problems) -> Vec<Subset> {
    if items.len() > MAX_SUBSETS {
        p.push(
            "subsets",
            format!("at most {MAX_SUBSETS} subsets, got {}", items.len()),
        );
    }
    let mut out: Vec<Subset> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("subsets[{i}]");
        let Some(mut o) = Obj::new(item, &path, p) else {
            continue;
        };
        let mut s = Subset::default();
        match o.string("name", p) {
            Some(n) if is_dns_label(&n) => {
                if out.iter().any(|x| x.name == n) {
                    p.push(o.path("name"), format!("{n:?} is used twice"));
                }
                s.name = n;
            }
            Some(n) => p.push(o.path("name"), format!("must be a DNS label, got {n:?}")),
            None if o.get("name").is_none() => p.push(o.path("name"), "required"),
            None => {}
        }
        match o.string_map("labels", MAX_LABELS, p) {
            Some(l) if !l.is_empty() => s.labels = l,
            Some(_) => p.push(o.path("labels"), "must have at least one label"),
            None if o.get("labels").is_none() => p.push(o.path("labels"), "required"),
            None => {}
        }
        o.finish(p);
        out.push(s);
    }
    out
}

fn split(
    items: &[Value],
    path: &str,
    subsets: &BTreeSet<String>,
    p: &mut Problems,
) -> Vec<WeightedSubset> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let Some(mut o) = Obj::new(item, &at, p) else {
            continue;
        };
        let mut w = WeightedSubset::default();
        match o.string("subset", p) {
            Some(s) if subsets.contains(&s) => w.subset = s,
            Some(s) => p.push(
                o.path("subset"),
                format!("names no subset in `subsets`, got {s:?}"),
            ),
            None if o.get("subset").is_none() => p.push(o.path("subset"), "required"),
            None => {}
        }
        match o.int("weight", 0, 100, p) {
            Some(x) => w.weight = x as u32,
            None if o.get("weight").is_none() => p.push(o.path("weight"), "required"),
            None => {}
        }
        o.finish(p);
        out.push(w);
    }
    if !out.is_empty() {
        let sum: u32 = out.iter().map(|w| w.weight).sum();
        if sum != 100 {
            p.push(path, format!("weights must sum to 100, got {sum}"));
        }
    }
    out
}

fn fault(mut o: Obj<'_>, p: &mut Problems) -> FaultInjection {
    let mut f = FaultInjection::default();
    if let Some(mut d) = o.obj("delay", p) {
        f.delay_percent = d.number("percent", 0.0, 100.0, p).unwrap_or(0.0);
        match d.duration("duration", Duration::from_millis(1), MAX_DURATION, p) {
            Some(ms) => f.delay_ms = ms,
            None if d.get("duration").is_none() => p.push(d.path("duration"), "required"),
            None => {}
        }
        d.finish(p);
    }
    if let Some(mut a) = o.obj("abort", p) {
        f.abort_percent = a.number("percent", 0.0, 100.0, p).unwrap_or(0.0);
        match a.int("status", 200, 599, p) {
            Some(s) => f.abort_status = s as u32,
            None if a.get("status").is_none() => p.push(a.path("status"), "required"),
            None => {}
        }
        a.finish(p);
    }
    o.finish(p);
    f
}

fn route(mut o: Obj<'_>, subsets: &BTreeSet<String>, p: &mut Problems) -> Route {
    let mut r = Route::default();
    match o.string("name", p) {
        Some(n) if is_dns_label(&n) => r.name = n,
        Some(n) => p.push(o.path("name"), format!("must be a DNS label, got {n:?}")),
        None if o.get("name").is_none() => p.push(o.path("name"), "required"),
        None => {}
    }
    match o.obj("match", p) {
        Some(mut m) => {
            let mut rm = RouteMatch::default();
            if let Some(prefix) = m.string("path_prefix", p) {
                if prefix.starts_with('/') {
                    rm.path_prefix = prefix;
                } else {
                    p.push(
                        m.path("path_prefix"),
                        format!("must start with '/', got {prefix:?}"),
                    );
                }
            }
            if let Some(method) = m.string("method", p) {
                if !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()) {
                    rm.method = method;
                } else {
                    p.push(
                        m.path("method"),
                        format!("must be an upper-case HTTP method, got {method:?}"),
                    );
                }
            }
            if let Some(h) = m.string_map("headers", MAX_HEADERS, p) {
                for name in h.keys() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                        || name.bytes().any(|b| b.is_ascii_uppercase())
                    {
                        p.push(
                            join(&m.path("headers"), name),
                            "must be a lower-case HTTP header name",
                        );
                    }
                }
                rm.headers = h;
            }
            m.finish(p);
            r.r#match = Some(rm);
        }
        None if o.get("match").is_none() => p.push(o.path("match"), "required"),
        None => {}
    }
    r.timeouts = o.obj("timeouts", p).map(|x| timeouts(x, p));
    r.retries = o.obj("retries", p).map(|x| retries(x, p));
    let split_path = o.path("split");
    if let Some(items) = o.list("split", p) {
        r.split = split(items, &split_path, subsets, p);
    }
    r.fault = o.obj("fault", p).map(|x| fault(x, p));
    o.finish(p);
    r
}

mod locality;

#[cfg(test)]
mod tests;
