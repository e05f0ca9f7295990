//! The access log: one `tracing` event per request on target
//! `isdp::access`, so it follows `--log-format` (one JSON object per line
//! with `--log-format json`) and `RUST_LOG` (`isdp::access=off` silences it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, Uri};
use opentelemetry::trace::TraceId;
use opentelemetry_sdk::trace::Span;

use crate::proxy::upstreams::LbEndpoint;
use crate::proxy::{
    http::SERVICE_HEADER,
    svc::{Body, ERROR_HEADER},
};

/// What is kept of the request until its response arrives.
pub struct Entry {
    method: Method,
    uri: Uri,
    authority: Option<http::HeaderValue>,
    service: Option<http::HeaderValue>,
    trace_id: Option<TraceId>,
}

impl Entry {
    pub fn new(req: &Request<Body>, span: Option<&Span>) -> Self {
        Entry {
            method: req.method().clone(),
            uri: req.uri().clone(),
            authority: req.headers().get(http::header::HOST).cloned(),
            service: req.headers().get(&SERVICE_HEADER).cloned(),
            trace_id: super::trace_id(req, span),
        }
    }

    fn authority(&self) -> &str {
        match self.uri.authority() {
            Some(a) => a.as_str(),
            None => self
                .authority
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        }
    }

    fn trace_id(&self) -> String {
        self.trace_id.map(|t| t.to_string()).unwrap_or_default()
    }

    /// A request this sidecar sent (or answered) for its local service.
    pub fn outbound(
        self,
        resp: &Response<Body>,
        start: Instant,
        picked: Option<&(Arc<str>, Arc<LbEndpoint>)>,
    ) {
        let (upstream, endpoint, endpoint_id) = match picked {
            Some((u, t)) => (u.as_ref(), Some(t.dest.addr), t.id.as_str()),
            None => ("", None, ""),
        };
        tracing::info!(
            target: "isdp::access",
            direction = "outbound",
            method = %self.method,
            authority = self.authority(),
            path = self.uri.path(),
            status = resp.status().as_u16(),
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
            upstream,
            endpoint = endpoint.map(|a| a.to_string()).unwrap_or_default(),
            endpoint_id,
            error = resp.headers().get(&ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or(""),
            trace_id = self.trace_id(),
            "access"
        );
    }

    /// A request from another sidecar for a local service.
    pub fn inbound(self, resp: &Response<Body>, start: Instant, peer: Option<SocketAddr>) {
        tracing::info!(
            target: "isdp::access",
            direction = "inbound",
            method = %self.method,
            authority = self.authority(),
            path = self.uri.path(),
            status = resp.status().as_u16(),
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
            service = self.service.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""),
            peer = peer.map(|a| a.to_string()).unwrap_or_default(),
            error = resp.headers().get(&ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or(""),
            trace_id = self.trace_id(),
            "access"
        );
    }
}
