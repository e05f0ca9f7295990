//! Getting finished spans to the collector without ever making a request
//! wait for it.
//!
//! The SDK's batch processor keeps its drop count to itself; this one is as
//! small and says what it lost. A finished, sampled span is offered to a
//! bounded queue (`try_send`: never blocks; a full queue drops the span and
//! counts it). A thread of its own, with its own single-threaded runtime,
//! drains the queue in batches and sends them over OTLP/gRPC: encoding and
//! connection handling stay off the data plane's runtime, and a collector
//! that is slow or gone costs the proxy nothing but the drops. Batches that
//! fail to send are counted as dropped too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _, SpanProcessor};
use tokio::sync::{mpsc, oneshot};

/// Spans waiting to be sent; beyond this, new spans are dropped.
const QUEUE: usize = 4096;
/// Spans per OTLP request.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const DELAY: Duration = Duration::from_secs(1);
/// How long one OTLP request may take before its batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two "spans dropped" warnings.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Spans lost since the process started: the queue was full, the export
/// failed or timed out, or the process stopped before they were sent.
/// Exposed for the metrics endpoint; see [`dropped_spans`].
pub static DROPPED_SPANS: AtomicU64 = AtomicU64::new(0);

/// The number of spans dropped so far (see [`DROPPED_SPANS`]).
pub fn dropped_spans() -> u64 {
    DROPPED_SPANS.load(Ordering::Relaxed)
}

fn dropped(n: usize) {
    DROPPED_SPANS.fetch_add(n as u64, Ordering::Relaxed);
}

/// The span processor the tracer provider calls as spans end.
#[derive(Debug)]
pub struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() && self.tx.try_send(span).is_err() {
            dropped(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    /// The exporter thread is stopped by [`Handle::shutdown`], which can
    /// wait asynchronously; nothing to do here.
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Stops the exporter thread.
pub struct Handle {
    stop: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

impl Handle {
    /// Sends what is queued, giving up after `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.stop.send(());
        if tokio::time::timeout(timeout, self.done).await.is_err() {
            tracing::warn!(?timeout, "span export did not finish in time");
        }
        let lost = dropped_spans();
        if lost > 0 {
            tracing::warn!(
                dropped_spans = lost,
                "spans were dropped (collector slow or unreachable)"
            );
        }
    }
}

/// Starts the exporter thread for `endpoint`.
pub fn start(endpoint: String, resource: Resource) -> std::io::Result<(QueueProcessor, Handle)> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("isdp-otlp".into())
        .spawn(move || {
            runtime.block_on(run(endpoint, resource, rx, stop_rx));
            let _ = done_tx.send(());
        })?;
    Ok((
        QueueProcessor { tx },
        Handle {
            stop: stop_tx,
            done: done_rx,
        },
    ))
}

async fn run(
    endpoint: String,
    resource: Resource,
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<()>,
) {
    let built = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build();
    let mut exporter = match built {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "cannot export spans; they will be dropped");
            None
        }
    };
    if let Some(e) = &mut exporter {
        e.set_resource(&resource);
    }
    let mut warned = Warned::default();
    let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
    loop {
        // Wait for a first span, then give the batch DELAY to fill.
        let stopping = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n == 0,
            _ = &mut stop => true,
        };
        if !stopping {
            let deadline = tokio::time::Instant::now() + DELAY;
            while batch.len() < BATCH {
                let room = BATCH - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = &mut stop => break,
                }
            }
        }
        if stopping {
            rx.close();
            while let Ok(span) = rx.try_recv() {
                batch.push(span);
            }
        }
        while !batch.is_empty() {
            let take = batch.len().min(BATCH);
            let chunk: Vec<SpanData> = batch.drain(..take).collect();
            send(exporter.as_ref(), chunk, &mut warned).await;
        }
        warned.report();
        if stopping {
            return;
        }
    }
}

async fn send(
    exporter: Option<&opentelemetry_otlp::SpanExporter>,
    chunk: Vec<SpanData>,
    warned: &mut Warned,
) {
    let n = chunk.len();
    let Some(exporter) = exporter else {
        dropped(n);
        return;
    };
    let error = match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(chunk)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_owned(),
    };
    dropped(n);
    warned.error = Some(error);
}

/// Rate-limits the warnings about lost spans.
#[derive(Default)]
struct Warned {
    at: Option<Instant>,
    reported: u64,
    error: Option<String>,
}

impl Warned {
    fn report(&mut self) {
        let total = dropped_spans();
        if total == self.reported || self.at.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        tracing::warn!(
            dropped_spans = total,
            error = self.error.take().unwrap_or_default(),
            "spans dropped: the collector is slow or unreachable"
        );
        self.reported = total;
        self.at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    // Both tests read the process-wide counter; they only ever add to it,
    // so each checks the growth it caused as a lower bound.

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let (tx, _rx) = mpsc::channel(2);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor { tx })
            .build();
        let tracer = provider.tracer("test");
        let before = dropped_spans();
        for _ in 0..5 {
            tracer.in_span("s", |_| {});
        }
        assert!(dropped_spans() - before >= 3, "3 of 5 spans do not fit");
    }

    #[tokio::test]
    async fn spans_that_cannot_be_sent_are_counted_at_shutdown() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let (processor, handle) = start(endpoint, Resource::builder_empty().build()).unwrap();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("test");
        let before = dropped_spans();
        for _ in 0..10 {
            tracer.in_span("s", |_| {});
        }
        handle.shutdown(Duration::from_secs(5)).await;
        assert!(
            dropped_spans() - before >= 10,
            "a refused export drops its batch"
        );
    }
}
