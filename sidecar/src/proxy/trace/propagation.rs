//! W3C trace context (`traceparent` / `tracestate`) in and out of HTTP
//! headers, with static header names: the propagator's own `&str` lookups
//! would parse the name on every request.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::SpanContext;
use opentelemetry_sdk::propagation::TraceContextPropagator;

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let name = match key {
            "traceparent" => &TRACEPARENT,
            "tracestate" => &TRACESTATE,
            _ => return None,
        };
        self.0.get(name).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The caller's trace context, or an empty context (a new root) if the
/// request carries no valid `traceparent`.
pub fn extract(headers: &HeaderMap) -> Context {
    if !headers.contains_key(&TRACEPARENT) {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Replaces the request's trace context with `cx`, so the next hop's spans
/// become children of this one.
pub fn inject(headers: &mut HeaderMap, cx: &SpanContext) {
    if !cx.is_valid() {
        return;
    }
    headers.insert(TRACEPARENT.clone(), traceparent(cx));
    let state = cx.trace_state().header();
    match HeaderValue::try_from(state) {
        Ok(v) if !v.is_empty() => {
            headers.insert(TRACESTATE.clone(), v);
        }
        _ => {
            headers.remove(&TRACESTATE);
        }
    }
}

/// `00-<trace id>-<span id>-<flags>`, hex-encoded into a stack buffer.
fn traceparent(cx: &SpanContext) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [b'-'; 55];
    buf[0] = b'0';
    buf[1] = b'0';
    let mut put = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            buf[at + 2 * i] = HEX[(b >> 4) as usize];
            buf[at + 2 * i + 1] = HEX[(b & 0xf) as usize];
        }
    };
    put(3, &cx.trace_id().to_bytes());
    put(36, &cx.span_id().to_bytes());
    put(53, &[cx.trace_flags().to_u8()]);
    HeaderValue::from_bytes(&buf).expect("hex and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn round_trip_keeps_ids_flags_and_state() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT.clone(),
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("vendor=x"));
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        let next = SpanContext::new(
            sc.trace_id(),
            SpanId::from(0x00f067aa0ba902b7),
            TraceFlags::SAMPLED,
            false,
            sc.trace_state().clone(),
        );
        let mut out = HeaderMap::new();
        inject(&mut out, &next);
        assert_eq!(
            out[&TRACEPARENT],
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
        );
        assert_eq!(out[&TRACESTATE], "vendor=x");
    }

    #[test]
    fn garbage_starts_a_new_root_and_empty_state_is_removed() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT.clone(), HeaderValue::from_static("nonsense"));
        assert!(!extract(&h).span().span_context().is_valid());
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("stale=1"));
        let cx = SpanContext::new(
            TraceId::from(1u128),
            SpanId::from(2u64),
            TraceFlags::default(),
            false,
            TraceState::default(),
        );
        inject(&mut h, &cx);
        assert_eq!(
            h[&TRACEPARENT],
            "00-00000000000000000000000000000001-0000000000000002-00"
        );
        assert!(!h.contains_key(&TRACESTATE));
    }
}
