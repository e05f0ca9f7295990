//! Logs and traces for both binaries: the `tracing` subscriber (text or
//! JSON logs) and, when an OTLP endpoint is configured, an OpenTelemetry
//! tracer exporting spans over OTLP/gRPC.
//!
//! It lives in the sidecar crate because the control plane already depends
//! on it (for `probe`): one setup, no extra crate, and both processes agree
//! on flags, sampling and what happens when the collector is away.
//!
//! Two ways in, one pipeline:
//! - `tracing` spans (the control plane's registration and push spans) go
//!   through `tracing-opentelemetry`;
//! - the data plane starts its per-request spans on the OpenTelemetry
//!   tracer directly ([`tracer`]): the sampler decides before anything is
//!   built, so an unsampled request costs an id and a header, not a
//!   `tracing` span in the registry.
//!
//! Spans leave through [`export`]: a bounded queue drained by a thread of its
//! own, so a slow or absent collector never blocks a request; what does not
//! fit is dropped and counted ([`dropped_spans`]).

mod export;

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use export::{DROPPED_SPANS, dropped_spans};

/// Default share of new traces that are sampled when tracing is on.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;

/// Instrumentation scope of every span ISDP makes.
const SCOPE: &str = "isdp";

/// Tracing flags shared by both binaries. Tracing is off unless an
/// endpoint is given.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TraceArgs {
    /// OTLP/gRPC collector to send spans to, e.g. http://127.0.0.1:4317
    /// (Jaeger accepts OTLP there). Without it nothing is traced.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Share (0.0 to 1.0) of new traces to sample; requests that arrive
    /// with a `traceparent` follow its sampled flag instead [default: 1.0].
    #[arg(long, env = "ISDP_TRACE_SAMPLE_RATIO", value_name = "RATIO")]
    pub trace_sample_ratio: Option<f64>,
}

/// What [`init`] sets up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// JSON log lines instead of text.
    pub json_logs: bool,
    /// Where spans go; `None` turns tracing off.
    pub otlp_endpoint: Option<String>,
    /// Share of root traces sampled (parent-based otherwise).
    pub sample_ratio: f64,
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: String,
    /// `service.instance.id` (the sidecar's node id).
    pub instance_id: Option<String>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--trace-sample-ratio: must be between 0.0 and 1.0, got {0}")]
    Ratio(f64),
    #[error("--otlp-endpoint: {0}")]
    Endpoint(String),
    #[error("starting the span exporter: {0}")]
    Exporter(std::io::Error),
}

/// Checks a sample ratio flag.
pub fn check_ratio(ratio: f64) -> Result<f64, TelemetryError> {
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(TelemetryError::Ratio(ratio))
    }
}

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer for per-request spans, if tracing is on in this process.
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Running telemetry; [`Telemetry::shutdown`] sends what is still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    exporter: Option<export::Handle>,
}

/// Installs the global `tracing` subscriber (levels from `RUST_LOG`,
/// default `info`) and, with an endpoint, the span pipeline.
pub fn init(settings: Settings) -> Result<Telemetry, TelemetryError> {
    let ratio = check_ratio(settings.sample_ratio)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if settings.json_logs {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };

    let (provider, exporter) = match &settings.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            endpoint
                .parse::<http::Uri>()
                .ok()
                .filter(|u| u.scheme().is_some() && u.authority().is_some())
                .ok_or_else(|| {
                    TelemetryError::Endpoint(format!(
                        "want a URL such as http://127.0.0.1:4317, got {endpoint:?}"
                    ))
                })?;
            let service = std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or(settings.service_name.clone());
            let mut resource = Resource::builder_empty().with_service_name(service);
            if let Some(id) = &settings.instance_id {
                resource = resource.with_attribute(opentelemetry::KeyValue::new(
                    "service.instance.id",
                    id.clone(),
                ));
            }
            let resource = resource.build();
            let (processor, handle) = export::start(endpoint.clone(), resource.clone())
                .map_err(TelemetryError::Exporter)?;
            let provider = SdkTracerProvider::builder()
                .with_resource(resource)
                .with_span_processor(processor)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    ratio,
                ))))
                .build();
            let _ = TRACER.set(provider.tracer(SCOPE));
            (Some(provider), Some(handle))
        }
    };
    // Only ISDP's own spans are exported, whatever `RUST_LOG` lets through
    // from the libraries underneath (h2, hyper, tonic).
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(SCOPE))
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("isdp")
            }))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    if let Some(endpoint) = &settings.otlp_endpoint {
        tracing::info!(%endpoint, sample_ratio = ratio, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider, exporter })
}

impl Telemetry {
    /// Exports what is queued, waiting at most `timeout`, and logs how many
    /// spans were dropped over the process's life.
    pub async fn shutdown(self, timeout: Duration) {
        if let Some(handle) = self.exporter {
            handle.shutdown(timeout).await;
        }
        drop(self.provider);
    }
}
