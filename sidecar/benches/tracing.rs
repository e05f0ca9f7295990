//! Tracing cost: the same request through three ISDP sidecar pairs in one
//! run, tracing off, 100 % sampled and 1 % sampled, the traced pairs
//! exporting over OTLP/gRPC to a receiver in this process.
//!
//! ```sh
//! apt-get update && apt-get install -y wrk haproxy nginx-light
//! cargo install --locked oha
//! cargo build --release --workspace --bins
//! cargo bench -p isdp-sidecar --bench tracing
//! ```
//!
//! It reuses the data-plane bench's pieces (`benches/dataplane/`): nginx as
//! the backend, servers and sidecars pinned to core 0, the load generator
//! to core 1, latency at a fixed 1,000 req/s with `oha`, peak throughput
//! with `wrk`, each sidecar's CPU time; runs interleaved across the pairs,
//! repeated, medians reported. The receiver (a tonic `TraceService` that
//! only counts spans) is not pinned: it stands for a collector on another
//! host, and its decoding cost is not the sidecars'.
//!
//! `ISDP_BENCH_SECS` (default 15) and `ISDP_BENCH_REPS` (default 3).

#[path = "dataplane/compare.rs"]
mod compare;
#[path = "dataplane/load.rs"]
mod load;
#[path = "dataplane/process.rs"]
mod process;
// Shared with the data-plane bench, which uses the shapes this one does not.
#[allow(dead_code)]
#[path = "dataplane/shapes.rs"]
mod shapes;
#[allow(dead_code)]
#[path = "dataplane/tools.rs"]
mod tools;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

use process::Proc;
use shapes::Shape;

fn main() -> anyhow::Result<()> {
    process::in_temp_dir("tracing", run)
}

fn run(dir: &std::path::Path) -> anyhow::Result<()> {
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (secs, reps) = (var("ISDP_BENCH_SECS", 15), var("ISDP_BENCH_REPS", 3));
    let tools = tools::preflight()?;
    let bins = tools::isdp_bins()?;
    let ticks = process::clock_ticks()?;
    let (receiver, spans) = receiver()?;

    let backend = shapes::nginx(&tools, dir)?;
    let traced = |ratio: f64| {
        format!("otlp_endpoint = \"http://{receiver}\"\ntrace_sample_ratio = {ratio}\n")
    };
    let mut pairs: Vec<(Shape, Proc)> = Vec::new();
    for (name, extra) in [
        ("tracing off", String::new()),
        ("sampled 100 %", traced(1.0)),
        ("sampled 1 %", traced(0.01)),
    ] {
        let tag = match name {
            "tracing off" => "off",
            "sampled 100 %" => "t100",
            _ => "t1",
        };
        let (mut shape, cp) = shapes::isdp_named(&bins, dir, &backend, tag, &extra)?;
        shape.name = name;
        shapes::check(&shape)?;
        pairs.push((shape, cp));
    }
    compare::print_setup("Tracing-cost bench", &tools, secs, reps);
    let runs = compare::measure(&tools, ticks, &pairs, secs, reps)?;
    // Let the last batches arrive before counting.
    std::thread::sleep(Duration::from_secs(3));

    compare::print(&pairs, &runs)?;
    // Two spans per sampled request (client in A, server in B); warm-ups
    // and checks add a few more.
    let expected = 2.0 * (runs[1].requests + 0.01 * runs[2].requests);
    println!(
        "\nspans received by the collector: {} (the measured runs should make about {expected:.0}; \
         fewer means spans dropped under load)",
        spans.load(Ordering::Relaxed)
    );
    Ok(())
}

// === the receiver ===

struct Counter(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the OTLP receiver on a thread of its own; its address and the
/// count of spans received.
fn receiver() -> anyhow::Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let service = TraceServiceServer::new(Counter(count.clone()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
    });
    Ok((addr, count))
}
