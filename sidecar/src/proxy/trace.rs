//! Per-request observability: OpenTelemetry spans and the access log, as
//! tower layers around the request path.
//!
//! Outbound, `Trace` is the outermost layer, so requests the sidecar answers
//! itself (unknown upstream, no healthy endpoint) get a span and a log line
//! too; `TraceEndpoint` sits between `Balance` and `Dispatch`, where the
//! chosen endpoint is known: it records it and writes this hop's context
//! into `traceparent` for the next one. Inbound, `TraceInbound` wraps the
//! whole `Inbound` service with a server span. The halves share one
//! [`Exchange`] through the request's extensions.
//!
//! With tracing and the access log both off (the default) each layer is a
//! single branch on a `bool` before calling the next one: no allocation,
//! no header work. Spans end when the response headers arrive, so their
//! duration (and the access log's) is time to first byte, not to the end of
//! a streamed body.

mod access;
pub mod propagation;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{Method, Request, Response};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use super::http::SERVICE_HEADER;
use super::svc::{Body, BoxFuture, ClientAddr, ERROR_HEADER, Next, Step, step_layer};
use super::upstreams::{LbEndpoint, PickedSlot};

// OpenTelemetry HTTP semantic conventions, plus `isdp.*` for the mesh.
const METHOD: Key = Key::from_static_str("http.request.method");
const PATH: Key = Key::from_static_str("url.path");
const STATUS: Key = Key::from_static_str("http.response.status_code");
const SERVER_ADDRESS: Key = Key::from_static_str("server.address");
const PEER_ADDRESS: Key = Key::from_static_str("network.peer.address");
const PEER_PORT: Key = Key::from_static_str("network.peer.port");
const ERROR_TYPE: Key = Key::from_static_str("error.type");
const UPSTREAM: Key = Key::from_static_str("isdp.upstream");
const ENDPOINT_ID: Key = Key::from_static_str("isdp.endpoint.id");
const SERVICE: Key = Key::from_static_str("isdp.service");
/// Who sent the request: the peer's socket address today; the peer's
/// SPIFFE id once mTLS authenticates sidecars.
const PEER_IDENTITY: Key = Key::from_static_str("isdp.peer.identity");

/// What the request path records, decided once per listener.
#[derive(Clone, Default)]
pub struct TraceSettings {
    tracer: Option<SdkTracer>,
    access_log: bool,
}

impl TraceSettings {
    /// Spans if this process has a tracer (see `telemetry`), access log
    /// lines if `access_log`.
    pub fn new(access_log: bool) -> Self {
        TraceSettings {
            tracer: isdp_core::telemetry::tracer().cloned(),
            access_log,
        }
    }

    fn enabled(&self) -> bool {
        self.tracer.is_some() || self.access_log
    }

    /// Starts a span of `kind` as a child of the request's `traceparent`
    /// (or a new root). Attributes are only built for sampled spans.
    fn start(&self, kind: SpanKind, req: &Request<Body>) -> Option<Span> {
        let tracer = self.tracer.as_ref()?;
        let parent = propagation::extract(req.headers());
        let mut span = tracer
            .span_builder(method_name(req.method()))
            .with_kind(kind)
            .start_with_context(tracer, &parent);
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new(METHOD, method_name(req.method())),
                KeyValue::new(PATH, req.uri().path().to_owned()),
            ]);
        }
        Some(span)
    }
}

/// Span names and method attributes: static for the standard methods.
fn method_name(m: &Method) -> std::borrow::Cow<'static, str> {
    let s = match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return m.as_str().to_owned().into(),
    };
    s.into()
}

/// Records the response on `span` and ends it. `client` spans count 4xx as
/// errors too (OpenTelemetry HTTP conventions); sidecar-made answers carry
/// their reason as `error.type`.
fn finish(span: &mut Span, resp: &Response<Body>, client: bool) {
    let status = resp.status();
    if span.is_recording() {
        span.set_attribute(KeyValue::new(STATUS, i64::from(status.as_u16())));
        let reason = resp.headers().get(&ERROR_HEADER);
        if let Some(r) = reason.and_then(|v| v.to_str().ok()) {
            span.set_attribute(KeyValue::new(ERROR_TYPE, r.to_owned()));
        }
        if status.is_server_error() || (client && status.is_client_error()) || reason.is_some() {
            if reason.is_none() {
                span.set_attribute(KeyValue::new(ERROR_TYPE, status.as_str().to_owned()));
            }
            span.set_status(Status::error(""));
        }
    }
    span.end();
}

/// What the outer and inner outbound halves share for one request.
struct Exchange {
    /// This hop's span, to pass on in `traceparent`.
    context: Option<SpanContext>,
    /// The upstream and endpoint `Balance` chose.
    picked: OnceLock<(Arc<str>, Arc<LbEndpoint>)>,
}

#[derive(Clone)]
struct ExchangeRef(Arc<Exchange>);

// === Trace (outbound, outermost) ===

/// The client span of an outbound request, and its access log line.
#[derive(Clone)]
pub struct TraceLayer(pub TraceSettings);

step_layer!(TraceLayer => Trace);

impl Step for TraceLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        let settings = &self.0;
        if !settings.enabled() {
            return next.call(req);
        }
        let start = Instant::now();
        let mut span = settings.start(SpanKind::Client, &req);
        let log = settings
            .access_log
            .then(|| access::Entry::new(&req, span.as_ref()));
        let exchange = Arc::new(Exchange {
            context: span.as_ref().map(|s| s.span_context().clone()),
            picked: OnceLock::new(),
        });
        req.extensions_mut().insert(ExchangeRef(exchange.clone()));
        let fut = next.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let picked = exchange.picked.get();
            if let Some(span) = &mut span {
                if let Some((upstream, target)) = picked.filter(|_| span.is_recording()) {
                    span.set_attributes([
                        KeyValue::new(SERVER_ADDRESS, upstream.clone()),
                        KeyValue::new(UPSTREAM, upstream.clone()),
                        KeyValue::new(ENDPOINT_ID, target.id.clone()),
                        KeyValue::new(PEER_ADDRESS, target.dest.addr.ip().to_string()),
                        KeyValue::new(PEER_PORT, i64::from(target.dest.addr.port())),
                    ]);
                }
                finish(span, &resp, true);
            }
            if let Some(log) = log {
                log.outbound(&resp, start, picked);
            }
            Ok(resp)
        })
    }
}

// === TraceEndpoint (outbound, between Balance and Dispatch) ===

/// Notes the chosen endpoint for [`Trace`] and passes this hop's trace
/// context on.
#[derive(Clone, Copy, Debug)]
pub struct TraceEndpointLayer {
    enabled: bool,
}

impl TraceEndpointLayer {
    pub fn new(settings: &TraceSettings) -> Self {
        TraceEndpointLayer {
            enabled: settings.enabled(),
        }
    }
}

step_layer!(TraceEndpointLayer => TraceEndpoint);

impl Step for TraceEndpointLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        if !self.enabled {
            return next.call(req);
        }
        if let Some(ExchangeRef(exchange)) = req.extensions_mut().remove::<ExchangeRef>() {
            if let Some(slot) = req.extensions().get::<PickedSlot>()
                && let Some(p) = slot.lock().expect("picked lock").as_ref()
            {
                let _ = exchange
                    .picked
                    .set((p.upstream.name.clone(), p.endpoint.clone()));
            }
            if let Some(cx) = &exchange.context {
                propagation::inject(req.headers_mut(), cx);
            }
        }
        next.call(req)
    }
}

// === TraceInbound ===

/// The server span of a request from another sidecar, and its access log
/// line; the local service receives this span's context.
#[derive(Clone)]
pub struct TraceInboundLayer(pub TraceSettings);

step_layer!(TraceInboundLayer => TraceInbound);

impl Step for TraceInboundLayer {
    fn call<S: Next>(&self, next: &mut S, mut req: Request<Body>) -> BoxFuture {
        let settings = &self.0;
        if !settings.enabled() {
            return next.call(req);
        }
        let start = Instant::now();
        let mut span = settings.start(SpanKind::Server, &req);
        let peer = req.extensions().get::<ClientAddr>().map(|c| c.addr);
        if let Some(span) = &mut span {
            if span.is_recording() {
                if let Some(service) = req
                    .headers()
                    .get(&SERVICE_HEADER)
                    .and_then(|v| v.to_str().ok())
                {
                    span.set_attribute(KeyValue::new(SERVICE, service.to_owned()));
                }
                if let Some(peer) = peer {
                    span.set_attributes([
                        KeyValue::new(PEER_IDENTITY, peer.to_string()),
                        KeyValue::new(PEER_ADDRESS, peer.ip().to_string()),
                        KeyValue::new(PEER_PORT, i64::from(peer.port())),
                    ]);
                }
            }
            propagation::inject(req.headers_mut(), span.span_context());
        }
        let log = settings
            .access_log
            .then(|| access::Entry::new(&req, span.as_ref()));
        let fut = next.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if let Some(span) = &mut span {
                finish(span, &resp, false);
            }
            if let Some(log) = log {
                log.inbound(&resp, start, peer);
            }
            Ok(resp)
        })
    }
}

/// The trace id a log line should carry: this hop's span, else the
/// caller's `traceparent`, else none.
fn trace_id(req: &Request<Body>, span: Option<&Span>) -> Option<opentelemetry::trace::TraceId> {
    let sc = match span {
        Some(s) => s.span_context().clone(),
        None => propagation::extract(req.headers())
            .span()
            .span_context()
            .clone(),
    };
    sc.is_valid().then(|| sc.trace_id())
}
