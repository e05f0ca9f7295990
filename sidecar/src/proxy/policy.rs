//! A [`TrafficPolicy`] compiled once per version into what the request
//! path reads: route matchers, per-route settings with the top-level
//! sections filled in, subsets, breaker limits, outlier detection and a
//! balancer override. No policy compiles to [`Compiled::defaults`].
//!
//! The outbound `Select` layer (`outbound/select.rs`) matches a request
//! against the routes, first match wins, and hands the route's
//! [`RoutePolicy`] to the layers below in an extension. Policy changes swap the `Arc<Compiled>` inside a new
//! `UpstreamLb`; requests in flight keep the one they started with.
//!
//! # Defaults with no policy (or an unset section)
//! | setting | default |
//! |---|---|
//! | retries | 2 on connect-failure, reset, gateway-error; idempotent methods; backoff 25..250 ms; budget 20 % + 10/s; 64 KiB body buffer |
//! | timeouts | none per request or try; connect 2 s; HTTP/1.1 pool idle 60 s |
//! | circuit breaker | 1024 requests, 1024 pending, 1024 connections |
//! | adaptive concurrency | off; when set: limit 3..1000, buffer 25 %, 100 ms windows, min RTT from 50 requests every 60 s |
//! | locality | the sidecar file's upstream settings (on, no failover list, overprovisioning 140 %) |
//! | outlier detection | 5 consecutive gateway errors; 30 s × ejections; at most 50 %; latency outliers off |

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, Method, Request};
use isdp_proto::v1::{self as pb, TrafficPolicy};

use crate::balance::{
    Algorithm, HashKey, OutlierConfig,
    locality::{DEFAULT_OVERPROVISIONING, LocalityConfig},
};
use crate::proxy::limits::{AdaptiveConfig, BreakerLimits, DEFAULT_BREAKER_LIMIT};

/// Retry defaults: what Linkerd and Istio users expect without asking.
pub const DEFAULT_ATTEMPTS: u32 = 2;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 10;
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// `adaptive_concurrency.min_rtt_requests` at most: a probe longer than
/// this holds the limit at its floor for too long.
pub const MAX_MIN_RTT_REQUESTS: usize = 1000;

/// Conditions a response or failure may be retried on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub server_error: bool,
    pub gateway_error: bool,
    pub status_codes: bool,
    pub grpc_codes: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first try; 0: none.
    pub attempts: u32,
    pub on: RetryOn,
    pub status_codes: Vec<u16>,
    /// gRPC status codes as numbers.
    pub grpc_codes: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub budget_ratio: f64,
    pub budget_min_per_second: u32,
    pub methods: Vec<Method>,
    pub buffer_bytes: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: DEFAULT_ATTEMPTS,
            on: RetryOn {
                connect_failure: true,
                reset: true,
                gateway_error: true,
                ..Default::default()
            },
            status_codes: Vec::new(),
            grpc_codes: Vec::new(),
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            budget_ratio: DEFAULT_BUDGET_RATIO,
            budget_min_per_second: DEFAULT_BUDGET_MIN_PER_SECOND,
            methods: idempotent(),
            buffer_bytes: DEFAULT_BUFFER_BYTES,
        }
    }
}

fn idempotent() -> Vec<Method> {
    vec![
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultConfig {
    pub delay_percent: f64,
    pub delay: Duration,
    pub abort_percent: f64,
    pub abort_status: http::StatusCode,
}

/// What applies to one request: a route's settings over the top-level ones.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutePolicy {
    /// The route's name; "default" for requests no route matched.
    pub name: String,
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    /// Pooled HTTP/1.1 connections idle longer are not reused.
    pub idle_timeout: Option<Duration>,
    pub retry: RetryConfig,
    /// Subset index and cumulative weight (last = 100); empty: everyone.
    pub split: Vec<(usize, u32)>,
    pub fault: Option<FaultConfig>,
}

#[derive(Debug)]
struct Matcher {
    path_prefix: String,
    method: Option<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Matcher {
    fn matches<B>(&self, req: &Request<B>) -> bool {
        req.uri().path().starts_with(&self.path_prefix)
            && self.method.as_ref().is_none_or(|m| m == req.method())
            && self
                .headers
                .iter()
                .all(|(n, v)| req.headers().get(n) == Some(v))
    }
}

/// One upstream's policy, compiled.
#[derive(Debug)]
pub struct Compiled {
    /// The control plane's version; None when running on defaults.
    pub version: Option<String>,
    routes: Vec<(Matcher, Arc<RoutePolicy>)>,
    default: Arc<RoutePolicy>,
    /// Name and labels, in the policy's order (splits refer to indices).
    pub subsets: Vec<(String, BTreeMap<String, String>)>,
    /// Overrides the sidecar file's `lb` / `hash_key`.
    pub lb: Option<(Algorithm, Option<HashKey>)>,
    pub breaker: BreakerLimits,
    /// None: no adaptive concurrency limit.
    pub adaptive: Option<AdaptiveConfig>,
    pub outlier: OutlierConfig,
    /// Overrides the sidecar file's locality settings; None: keep them.
    pub locality: Option<LocalityConfig>,
}

// === impl Compiled ===

impl Compiled {
    pub fn defaults() -> Self {
        Compiled {
            version: None,
            routes: Vec::new(),
            default: Arc::new(route_policy("default", None, None, &[], None)),
            subsets: Vec::new(),
            lb: None,
            breaker: BreakerLimits::default(),
            adaptive: None,
            outlier: OutlierConfig::default(),
            locality: None,
        }
    }

    /// Compiles `p`. Whatever cannot be used (an unknown algorithm from a
    /// newer control plane) falls back to the default and is logged.
    pub fn new(p: &TrafficPolicy, version: &str) -> Self {
        let subsets: Vec<(String, BTreeMap<String, String>)> = p
            .subsets
            .iter()
            .map(|s| {
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (s.name.clone(), labels)
            })
            .collect();
        let index = |name: &str| subsets.iter().position(|(n, _)| n == name);
        let split_of = |split: &[pb::WeightedSubset]| -> Vec<(usize, u32)> {
            let mut sum = 0;
            split
                .iter()
                .filter(|w| w.weight > 0)
                .filter_map(|w| {
                    sum += w.weight;
                    Some((index(&w.subset)?, sum))
                })
                .collect()
        };
        let default = Arc::new(route_policy(
            "default",
            p.timeouts.as_ref(),
            p.retries.as_ref(),
            &split_of(&p.split),
            p.fault.as_ref(),
        ));
        let routes = p
            .routes
            .iter()
            .map(|r| {
                let m = r.r#match.clone().unwrap_or_default();
                let matcher = Matcher {
                    path_prefix: m.path_prefix,
                    method: (!m.method.is_empty())
                        .then(|| Method::from_bytes(m.method.as_bytes()).ok())
                        .flatten(),
                    headers: m
                        .headers
                        .iter()
                        .filter_map(|(n, v)| {
                            Some((
                                HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok()?,
                                HeaderValue::from_str(v).ok()?,
                            ))
                        })
                        .collect(),
                };
                let split = if r.split.is_empty() {
                    default.split.clone()
                } else {
                    split_of(&r.split)
                };
                let policy = route_policy(
                    &r.name,
                    r.timeouts.as_ref().or(p.timeouts.as_ref()),
                    r.retries.as_ref().or(p.retries.as_ref()),
                    &split,
                    r.fault.as_ref().or(p.fault.as_ref()),
                );
                (matcher, Arc::new(policy))
            })
            .collect();
        let lb = p.load_balancer.as_ref().and_then(|lb| {
            let algorithm = match lb.algorithm.parse::<Algorithm>() {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(service = %p.service, error = %e, "ignoring the policy's load balancer");
                    return None;
                }
            };
            let key = (!lb.hash_key.is_empty())
                .then(|| lb.hash_key.parse::<HashKey>().ok())
                .flatten();
            Some((algorithm, key))
        });
        let breaker = p
            .circuit_breaker
            .as_ref()
            .map_or_else(BreakerLimits::default, |c| {
                let or = |v: u32| {
                    if v == 0 {
                        DEFAULT_BREAKER_LIMIT
                    } else {
                        v as usize
                    }
                };
                BreakerLimits {
                    max_requests: or(c.max_requests),
                    max_pending: or(c.max_pending_requests),
                    max_connections: or(c.max_connections),
                }
            });
        let adaptive = p.adaptive_concurrency.as_ref().map(adaptive_config);
        let outlier = p
            .outlier_detection
            .as_ref()
            .map_or_else(OutlierConfig::default, |o| {
                let d = OutlierConfig::default();
                let both_unset = o.consecutive_5xx == 0 && o.consecutive_gateway_errors == 0;
                OutlierConfig {
                    consecutive_5xx: o.consecutive_5xx,
                    consecutive_gateway_errors: if both_unset {
                        d.consecutive_gateway_errors
                    } else {
                        o.consecutive_gateway_errors
                    },
                    base_ejection: if o.base_ejection_ms == 0 {
                        d.base_ejection
                    } else {
                        Duration::from_millis(o.base_ejection_ms)
                    },
                    max_ejection_percent: if o.max_ejection_percent == 0 {
                        d.max_ejection_percent
                    } else {
                        o.max_ejection_percent.min(100)
                    },
                    latency_factor: if o.latency_factor.is_finite() {
                        o.latency_factor.clamp(0.0, 100.0)
                    } else {
                        0.0
                    },
                    latency_min: if o.latency_min_ms == 0 {
                        d.latency_min
                    } else {
                        Duration::from_millis(o.latency_min_ms)
                    },
                    latency_intervals: if o.latency_intervals == 0 {
                        d.latency_intervals
                    } else {
                        o.latency_intervals
                    },
                    interval: if o.interval_ms == 0 {
                        d.interval
                    } else {
                        Duration::from_millis(o.interval_ms)
                    },
                }
            });
        Compiled {
            version: Some(version.to_owned()),
            routes,
            default,
            subsets,
            lb,
            breaker,
            adaptive,
            outlier,
            locality: p.locality.as_ref().map(locality_config),
        }
    }

    /// The first route `req` matches, else the top-level settings.
    pub fn select<B>(&self, req: &Request<B>) -> &Arc<RoutePolicy> {
        self.routes
            .iter()
            .find(|(m, _)| m.matches(req))
            .map_or(&self.default, |(_, p)| p)
    }
}

/// A policy's `locality`; the control plane refuses a factor out of
/// range, and the sidecar clamps it whatever it is sent.
fn locality_config(l: &pb::Locality) -> LocalityConfig {
    LocalityConfig {
        enabled: l.enabled,
        failover: l.failover.clone(),
        overprovisioning: match l.overprovisioning_percent {
            0 => DEFAULT_OVERPROVISIONING,
            n => n.clamp(100, 1000),
        },
    }
}

/// A policy's `adaptive_concurrency`, each unset (0) knob at its default.
/// The control plane refuses values out of range; the clamps here keep a
/// sidecar sane whatever it is sent.
fn adaptive_config(a: &pb::AdaptiveConcurrency) -> AdaptiveConfig {
    let d = AdaptiveConfig::default();
    let or = |v: u32, d: usize| if v == 0 { d } else { v as usize };
    let ms = |v: u64, d: Duration, lo: u64, hi: u64| {
        if v == 0 {
            d
        } else {
            Duration::from_millis(v.clamp(lo, hi))
        }
    };
    let min_limit = or(a.min_limit, d.min_limit);
    AdaptiveConfig {
        min_limit,
        max_limit: or(a.max_limit, d.max_limit).max(min_limit),
        buffer: if a.buffer.is_finite() && a.buffer > 0.0 {
            a.buffer.min(10.0)
        } else {
            d.buffer
        },
        window: ms(a.window_ms, d.window, 10, 60_000),
        min_rtt_interval: ms(a.min_rtt_interval_ms, d.min_rtt_interval, 1_000, 3_600_000),
        min_rtt_requests: or(a.min_rtt_requests, d.min_rtt_requests).min(MAX_MIN_RTT_REQUESTS),
    }
}

fn ms(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v))
}

fn route_policy(
    name: &str,
    timeouts: Option<&pb::Timeouts>,
    retries: Option<&pb::RetryPolicy>,
    split: &[(usize, u32)],
    fault: Option<&pb::FaultInjection>,
) -> RoutePolicy {
    let t = timeouts.cloned().unwrap_or_default();
    RoutePolicy {
        name: name.to_owned(),
        request_timeout: ms(t.request_ms),
        per_try_timeout: ms(t.per_try_ms),
        connect_timeout: ms(t.connect_ms),
        idle_timeout: ms(t.idle_ms),
        retry: retries.map_or_else(RetryConfig::default, retry_config),
        split: split.to_vec(),
        fault: fault.and_then(|f| {
            let any = f.delay_percent > 0.0 || f.abort_percent > 0.0;
            any.then(|| FaultConfig {
                delay_percent: f.delay_percent,
                delay: Duration::from_millis(f.delay_ms),
                abort_percent: f.abort_percent,
                abort_status: u16::try_from(f.abort_status)
                    .ok()
                    .and_then(|s| http::StatusCode::from_u16(s).ok())
                    .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE),
            })
        }),
    }
}

fn retry_config(r: &pb::RetryPolicy) -> RetryConfig {
    let d = RetryConfig::default();
    let on = if r.retry_on.is_empty() {
        d.on
    } else {
        let has = |w: &str| r.retry_on.iter().any(|x| x == w);
        RetryOn {
            connect_failure: has("connect-failure"),
            reset: has("reset"),
            server_error: has("5xx"),
            gateway_error: has("gateway-error"),
            status_codes: has("retriable-status-codes"),
            grpc_codes: has("retriable-grpc-codes"),
        }
    };
    let budget_unset = r.budget_ratio == 0.0 && r.budget_min_per_second == 0;
    RetryConfig {
        attempts: r.attempts,
        on,
        status_codes: r
            .status_codes
            .iter()
            .filter_map(|c| u16::try_from(*c).ok())
            .collect(),
        grpc_codes: r.grpc_codes.iter().filter_map(|c| grpc_code(c)).collect(),
        backoff_base: ms(r.backoff_base_ms).unwrap_or(d.backoff_base),
        backoff_max: ms(r.backoff_max_ms)
            .unwrap_or(d.backoff_max)
            .max(ms(r.backoff_base_ms).unwrap_or(d.backoff_base)),
        budget_ratio: if budget_unset {
            d.budget_ratio
        } else {
            r.budget_ratio
        },
        budget_min_per_second: if budget_unset {
            d.budget_min_per_second
        } else {
            r.budget_min_per_second
        },
        methods: if r.methods.is_empty() {
            d.methods
        } else {
            r.methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect()
        },
        buffer_bytes: if r.buffer_bytes == 0 {
            d.buffer_bytes
        } else {
            usize::try_from(r.buffer_bytes).unwrap_or(usize::MAX)
        },
    }
}

/// A gRPC status name as the policy writes it (`unavailable`) to its code.
fn grpc_code(name: &str) -> Option<u16> {
    Some(match name {
        "cancelled" => 1,
        "unknown" => 2,
        "deadline-exceeded" => 4,
        "resource-exhausted" => 8,
        "aborted" => 10,
        "internal" => 13,
        "unavailable" => 14,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
